"""TADSR's one-step generator: time-aware encode at t, one UNet call, the student x0 rule, decode.

The same function serves training (with LoRA adapters active) and inference (docs/method.md 3.2, 5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tadsr_jax.diffusion import NoiseSchedule
from tadsr_jax.models.unet import UNet2DConditionModel
from tadsr_jax.models.vae import AutoencoderKL
from tadsr_jax.nn import Conv2d


def generate(
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
    schedule: NoiseSchedule,
    lq: jax.Array,
    timesteps: jax.Array,
    context: jax.Array,
    key: jax.Array,
    *,
    conv_in: Conv2d | None = None,
    sample_posterior: bool = True,
) -> tuple[jax.Array, jax.Array]:
    """LQ images (B,H,W,3) in [-1, 1], already at output size -> (x0 latents, SR images in [-1, 1]).

    The latent is sampled from the posterior with `key` (the reference always samples); `sample_posterior=False`
    takes the mean instead. `conv_in` is the student's own UNet input convolution, if it has one.
    """
    scale = vae.config.scaling_factor
    posterior = vae.encode(lq, timesteps)
    z = (posterior.sample(key) if sample_posterior else posterior.mode()) * scale
    residual = unet(z, timesteps, context, conv_in=conv_in).astype(jnp.float32)
    x0 = schedule.student_x0(z, residual, timesteps)
    images = jnp.clip(vae.decode(x0 / scale).astype(jnp.float32), -1.0, 1.0)
    return x0, images
