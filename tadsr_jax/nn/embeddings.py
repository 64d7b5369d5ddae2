"""Sinusoidal timestep features and the two-layer timestep MLP of diffusers' `TimestepEmbedding`."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from tadsr_jax.nn.layers import Linear


def timestep_sinusoid(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """(B,) timesteps -> (B, dim) float32 features; frequencies exp(-ln(max_period) j / (dim/2 - freq_shift))."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_features: int, time_embed_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.linear_1 = Linear(in_features, time_embed_dim, dtype=dtype, rngs=rngs)
        self.linear_2 = Linear(time_embed_dim, time_embed_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


def batch_timesteps(timesteps: jax.Array | int, batch: int) -> jax.Array:
    """Broadcast a scalar or (B,) timestep to shape (B,)."""
    t = jnp.asarray(timesteps)
    return jnp.broadcast_to(t.reshape(-1) if t.ndim else t, (batch,))
