"""TADSR's loss math on given predictions (docs/method.md 3.2); the model calls live in method/tadsr.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tadsr_jax import flops

MAX_BLUR_TAPS = 21  # 5 + 4 * floor(999 / 200)
_EXACT = jax.lax.Precision.HIGHEST  # float32 products on every platform (TPU's default would round to bf16)


def blur_kernel_size(t: jax.Array) -> jax.Array:
    """5 + 4 floor(t / 200): 5, 9, 13, 17 or 21 taps."""
    return 5 + 4 * (t // 200)


def blur_taps(t: jax.Array) -> jax.Array:
    """(B,) timesteps -> (B, 21) torchvision-GaussianBlur 1-D taps, centred and zero outside each kernel.

    Kernel k = 5 + 4 floor(t/200), sigma = 1 + t/200, taps exp(-x^2 / 2 sigma^2) at x = -(k-1)/2 .. (k-1)/2,
    normalised. Every kernel is embedded in 21 centred taps, so all samples share one shape: the zero taps outside
    k add nothing, reflected or not.
    """
    t = jnp.asarray(t)
    sigma = 1.0 + t.astype(jnp.float32) / 200.0
    half = (blur_kernel_size(t) - 1) // 2
    x = jnp.arange(MAX_BLUR_TAPS, dtype=jnp.float32) - MAX_BLUR_TAPS // 2
    taps = jnp.where(jnp.abs(x)[None] <= half[:, None], jnp.exp(-0.5 * (x[None] / sigma[:, None]) ** 2), 0.0)
    return taps / taps.sum(axis=1, keepdims=True)


def _blur_matrices(taps: jax.Array, n: int) -> jax.Array:
    """(B, 21) taps -> (B, n, n): row i holds the weight of every input position in output position i along an
    axis of n positions, reflect padding folded in (torch's "reflect": the edge pixel is not repeated)."""
    pad = MAX_BLUR_TAPS // 2
    source = jnp.abs(jnp.arange(n)[:, None] + jnp.arange(-pad, pad + 1)[None])  # (n, 21): reflected at 0 ...
    source = jnp.where(source > n - 1, 2 * (n - 1) - source, source)  # ... and at n - 1
    return jnp.einsum("bk,ikj->bij", taps, jax.nn.one_hot(source, n, dtype=taps.dtype), precision=_EXACT)


def timestep_blur(images: jax.Array, t: jax.Array) -> jax.Array:
    """Per-sample separable Gaussian blur of NHWC images with reflect padding (TADSR's Blur_t).

    Each direction is one batched matmul with a (B, n, n) banded matrix that holds the sample's taps and the
    reflection. XLA:CPU runs the 21-tap depthwise convolution of the same blur (samples and channels as feature
    groups) far from its matmul speed: forward and gradient of the blurred L2 of two 128x128 images took 34 ms as
    convolutions and 1.5 ms as matmuls (380 ms and 37 ms at 512x512).
    """
    h, w = images.shape[1:3]
    if min(h, w) <= MAX_BLUR_TAPS // 2:
        raise ValueError(f"timestep_blur needs images larger than {MAX_BLUR_TAPS // 2} pixels, got {h}x{w}")
    taps = blur_taps(t).astype(images.dtype)
    with flops.uncounted():  # n multiply-adds per output where the model's blur has at most 21
        x = jnp.einsum("bij,bjwc->biwc", _blur_matrices(taps, h), images, precision=_EXACT)
        return jnp.einsum("bkw,biwc->bikc", _blur_matrices(taps, w), x, precision=_EXACT)


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
