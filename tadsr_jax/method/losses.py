"""TADSR's loss math on given predictions (docs/method.md 3.2); the model calls live in method/tadsr.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

MAX_BLUR_TAPS = 21  # 5 + 4 * floor(999 / 200)


def blur_kernel_size(t: jax.Array) -> jax.Array:
    """5 + 4 floor(t / 200): 5, 9, 13, 17 or 21 taps."""
    return 5 + 4 * (t // 200)


def blur_taps(t: jax.Array) -> jax.Array:
    """(B,) timesteps -> (B, 21) torchvision-GaussianBlur 1-D taps, centred and zero outside each kernel.

    Kernel k = 5 + 4 floor(t/200), sigma = 1 + t/200, taps exp(-x^2 / 2 sigma^2) at x = -(k-1)/2 .. (k-1)/2,
    normalised. Embedding every kernel in 21 centred taps lets one reflect-padded convolution serve all
    samples: reflection depends only on the offset, so zero taps outside k change nothing.
    """
    t = jnp.asarray(t)
    sigma = 1.0 + t.astype(jnp.float32) / 200.0
    half = (blur_kernel_size(t) - 1) // 2
    x = jnp.arange(MAX_BLUR_TAPS, dtype=jnp.float32) - MAX_BLUR_TAPS // 2
    taps = jnp.where(jnp.abs(x)[None] <= half[:, None], jnp.exp(-0.5 * (x[None] / sigma[:, None]) ** 2), 0.0)
    return taps / taps.sum(axis=1, keepdims=True)


def timestep_blur(images: jax.Array, t: jax.Array) -> jax.Array:
    """Per-sample separable Gaussian blur of NHWC images with reflect padding (TADSR's Blur_t).

    Samples and channels are folded into the feature axis of one depthwise convolution per direction, so each
    sample gets its own kernel in two ops.
    """
    b, h, w, c = images.shape
    pad = MAX_BLUR_TAPS // 2
    if min(h, w) <= pad:
        raise ValueError(f"timestep_blur needs images larger than {pad} pixels, got {h}x{w}")
    taps = jnp.repeat(blur_taps(t).astype(images.dtype), c, axis=0).T  # (21, b*c), feature index = b * c + ch
    x = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
    x = x.transpose(1, 2, 0, 3).reshape(1, h + 2 * pad, w + 2 * pad, b * c)
    conv = lambda x, kernel: jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=b * c
    )
    x = conv(conv(x, taps.reshape(MAX_BLUR_TAPS, 1, 1, b * c)), taps.reshape(1, MAX_BLUR_TAPS, 1, b * c))
    return x.reshape(h, w, b, c).transpose(2, 0, 1, 3)


def blurred_mse(pred: jax.Array, target: jax.Array, t: jax.Array) -> jax.Array:
    """mean((Blur_t(pred) - Blur_t(target))^2) over all elements, computed as mean(Blur_t(pred - target)^2): the
    blur is linear (reflect padding too), so one blur serves both images."""
    return jnp.mean(jnp.square(timestep_blur(pred.astype(jnp.float32) - target.astype(jnp.float32), t)))


def student_timesteps(num: int, max_timestep: int) -> np.ndarray:
    """The reference's generator timesteps: int(linspace(1, 999, num)) (truncation), num = 50; `max_timestep` < 999
    keeps training to the fidelity end of the knob."""
    return np.linspace(1, max_timestep, num).astype(np.int32)


def teacher_timestep(t: jax.Array, scale: float, shift: float) -> jax.Array:
    """TA-VSD ties the teacher/fake-score timestep to the student's: floor(scale * t + shift)."""
    return jnp.floor(scale * t.astype(jnp.float32) + shift).astype(jnp.int32)


def guidance_scale(t_teacher: jax.Array, base: float, per_step: float) -> jax.Array:
    """CFG weight growing with the teacher timestep: base + per_step * t (the reference's 7.5 + t/200)."""
    return base + per_step * t_teacher.astype(jnp.float32)


def classifier_free_guidance(eps_uncond: jax.Array, eps_cond: jax.Array, scale: jax.Array) -> jax.Array:
    return eps_uncond + scale.reshape((-1,) + (1,) * (eps_cond.ndim - 1)) * (eps_cond - eps_uncond)


def distribution_matching_loss(x0: jax.Array, x0_fake: jax.Array, x0_real: jax.Array) -> jax.Array:
    """DMD/VSD surrogate whose gradient w.r.t. x0 is 2 g / N with g = (x0_fake - x0_real) / mean|x0 - x0_real|.

    Per-sample weighting mean_{h,w,c} |x0 - x0_real| without epsilon, no 0.5 factor, target detached (so the
    weight carries no gradient), exactly as the reference.
    """
    x0 = x0.astype(jnp.float32)
    x0_fake, x0_real = jax.lax.stop_gradient(x0_fake), jax.lax.stop_gradient(x0_real)
    axes = tuple(range(1, x0.ndim))
    weight = jnp.mean(jnp.abs(jax.lax.stop_gradient(x0) - x0_real), axis=axes, keepdims=True)
    grad = (x0_fake - x0_real) / weight
    return jnp.mean(jnp.square(x0 - jax.lax.stop_gradient(x0 - grad)))
