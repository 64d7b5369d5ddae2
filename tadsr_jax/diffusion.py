"""The DDPM noise schedule and the x0 rules TADSR uses (docs/method.md sections 0 and 3.2)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

_BETA_SCHEDULES = ("scaled_linear", "linear")


def _per_sample(values: jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """values[t] shaped (B, 1, ..., 1) to broadcast against (B, ...) arrays of rank `ndim`."""
    v = values[jnp.asarray(t, jnp.int32).reshape(-1)]
    return v.reshape(v.shape + (1,) * (ndim - 1))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    """alphas_cumprod of a discrete DDPM schedule; a pytree, so it can be passed into jitted functions."""

    alphas_cumprod: jax.Array

    @classmethod
    def from_config(cls, config: dict) -> NoiseSchedule:
        """From a diffusers scheduler_config.json dict (only the beta schedule matters here)."""
        kind = config.get("beta_schedule", "linear")
        if config.get("trained_betas") is not None or kind not in _BETA_SCHEDULES:
            raise ValueError(f"scheduler config: beta_schedule={kind!r} is not supported ({_BETA_SCHEDULES})")
        n = int(config.get("num_train_timesteps", 1000))
        start, end = float(config.get("beta_start", 0.0001)), float(config.get("beta_end", 0.02))
        if kind == "scaled_linear":
            betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
        else:
            betas = np.linspace(start, end, n, dtype=np.float64)
        return cls(jnp.asarray(np.cumprod(1.0 - betas), jnp.float32))

    @classmethod
    def stable_diffusion(cls) -> NoiseSchedule:
        """SD's schedule: scaled_linear, 0.00085 -> 0.012, 1000 steps."""
        return cls.from_config(
            {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
        )

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def add_noise(self, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
        """sqrt(a_t) x0 + sqrt(1 - a_t) noise, per sample."""
        a = _per_sample(self.alphas_cumprod, t, x0.ndim)
        return (jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise).astype(x0.dtype)

    def eps_to_x0(self, z_t: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
        """(z_t - sqrt(1 - a_t) eps) / sqrt(a_t): the standard x0 from an eps prediction (teacher, fake score)."""
        a = _per_sample(self.alphas_cumprod, t, z_t.ndim)
        return ((z_t - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)).astype(z_t.dtype)

    def student_x0(self, z_lq: jax.Array, residual: jax.Array, t: jax.Array) -> jax.Array:
        """TADSR's generator rule z_lq / sqrt(a_t) - residual (the clean LQ latent is the UNet input; no noise)."""
        a = _per_sample(self.alphas_cumprod, t, z_lq.ndim)
        return (z_lq / jnp.sqrt(a) - residual).astype(z_lq.dtype)
