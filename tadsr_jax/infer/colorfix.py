"""Colour fix: give the super-resolved image the colours of the (upscaled) input, as TADSR's test script does.

Both methods follow StableSR's colorfix. AdaIN matches each channel's mean and standard deviation to the input's;
the wavelet fix keeps the output's high frequencies and takes the low frequencies from the input. Images are RGB
in [0, 1], (H, W, 3) or (B, H, W, 3), statistics per image and channel. Unlike the reference, which fixes 8-bit
PIL images, we fix float images before the pipeline's only 8-bit quantisation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

COLOR_FIX_METHODS = ("adain", "wavelet", "none")

_HEIGHT_WIDTH = (-3, -2)
_VARIANCE_EPS = 1e-5
_WAVELET_RADII = (1, 2, 4, 8, 16)


def _as_float32_images(target: jax.Array, source: jax.Array) -> tuple[jax.Array, jax.Array]:
    if jnp.shape(target) != jnp.shape(source):
        raise ValueError(f"target and source must have the same shape, got {jnp.shape(target)} and {jnp.shape(source)}")
    if jnp.ndim(target) not in (3, 4):
        raise ValueError(f"expected (H, W, C) or (B, H, W, C) images, got shape {jnp.shape(target)}")
    return jnp.asarray(target, jnp.float32), jnp.asarray(source, jnp.float32)


def _channel_mean_std(images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per image and channel; the std is sqrt(unbiased variance + eps), eps inside the root as in the reference."""
    mean = jnp.mean(images, axis=_HEIGHT_WIDTH, keepdims=True)
    variance = jnp.var(images, axis=_HEIGHT_WIDTH, ddof=1, keepdims=True)
    return mean, jnp.sqrt(variance + _VARIANCE_EPS)


def adain_color_fix(target: jax.Array, source: jax.Array) -> jax.Array:
    """Renormalise each channel of `target` (the SR output) to the mean and std of `source`; clamped to [0, 1]."""
    target, source = _as_float32_images(target, source)
    target_mean, target_std = _channel_mean_std(target)
    source_mean, source_std = _channel_mean_std(source)
    return jnp.clip((target - target_mean) / target_std * source_std + source_mean, 0.0, 1.0)


def _blur(images: jax.Array, radius: int) -> jax.Array:
    """The reference's 3x3 [[1,2,1],[2,4,2],[1,2,1]]/16 kernel, dilated by `radius`, on edge-replicated images.

    The kernel is the outer product of [1,2,1]/4 with itself, so we edge-pad once and apply [1,2,1]/4 along H,
    then along W: the same values, with plain adds instead of a convolution whose float32 precision depends on the
    backend. (Padding once rather than per axis lets XLA fuse it all: ~5x faster to compile and run on CPU.)
    """
    pad_width = [(0, 0)] * images.ndim
    for axis in _HEIGHT_WIDTH:
        pad_width[axis] = (radius, radius)
    blurred = jnp.pad(images, pad_width, mode="edge")
    for axis in _HEIGHT_WIDTH:
        size = images.shape[axis]
        before, centre, after = (
            lax.slice_in_dim(blurred, start, start + size, axis=axis) for start in (0, radius, 2 * radius)
        )
        blurred = 0.25 * before + 0.5 * centre + 0.25 * after
    return blurred


def _wavelet_decomposition(images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(high, low): `low` is `images` blurred at every radius in turn, `high` the detail each blur removed."""
    high = jnp.zeros_like(images)
    low = images
    for radius in _WAVELET_RADII:
        blurred = _blur(low, radius)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet_color_fix(target: jax.Array, source: jax.Array) -> jax.Array:
    """High frequencies of `target` (the SR output) plus low frequencies of `source`; clamped to [0, 1]."""
    target, source = _as_float32_images(target, source)
    target_high, _ = _wavelet_decomposition(target)
    _, source_low = _wavelet_decomposition(source)
    return jnp.clip(target_high + source_low, 0.0, 1.0)


def color_fix(target: jax.Array, source: jax.Array, method: str) -> jax.Array:
    """Colour-fix `target` against `source` with one of `COLOR_FIX_METHODS` ("none" returns `target` as float32).

    Under `jax.jit`, `method` must be static (`static_argnames="method"`).
    """
    if method == "adain":
        return adain_color_fix(target, source)
    if method == "wavelet":
        return wavelet_color_fix(target, source)
    if method == "none":
        return _as_float32_images(target, source)[0]
    raise ValueError(f"unknown colour-fix method {method!r}; choose one of {COLOR_FIX_METHODS}")
