"""LPIPS perceptual distance (Zhang et al. 2018), version 0.1, NHWC, with the VGG16 or the AlexNet trunk.

Matches `lpips.LPIPS(net=..., version='0.1', lpips=True, spatial=False)` of the `lpips` package in eval mode
with `normalize=False` (inputs in [-1, 1]), net 'vgg' or 'alex' (the package's default, pyiqa's 'lpips' and the
paper's LPIPS column):

    d(x, y) = sum_l mean_hw( w_l . (n(f_l(s(x))) - n(f_l(s(y))))^2 )

s: ScalingLayer ((x - shift) / scale, per RGB channel); f_l: the trunk's five tapped ReLU outputs (VGG16
`features`: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3; AlexNet `features`: the ReLU after each of its five
convolutions); n: unit norm over channels, f / (||f|| + 1e-10); w_l >= 0: the 1x1 convolutions (no bias) of the
heads `lin0..lin4`. Only the trunk differs between the two; scaling, normalisation and heads are shared.

The attribute tree mirrors the PyTorch names, so weights map by rule (`tadsr_jax.weights.convert`):
torchvision's `features.N.weight/bias` (VGG16: N = 0, 2, 5, ..., 28; AlexNet: 0, 3, 6, 8, 10) -> `features[N]`
(param-less `ReLU` / `MaxPool2d` placeholders fill the other positions, exactly as in torchvision's Sequential)
and LPIPS' `lin{k}.model.1.weight` -> `lin{k}.model[1]` (`model[0]` is the head's Dropout, an identity in eval
mode).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tadsr_jax.nn.layers import Conv2d

# torchvision vgg16 `features`: 3x3 convolutions ("M" = 2x2 max-pool), of which LPIPS uses indices 0..29.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# The `features` indices whose (ReLU) outputs LPIPS compares: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
TAP_INDICES = (3, 8, 15, 22, 29)
CHANNELS = (64, 128, 256, 512, 512)
# torchvision alexnet `features` as far as LPIPS uses it (indices 0..11): (channels, kernel, stride, padding) per
# convolution, each followed by a ReLU; "M" = 3x3 max-pool with stride 2.
ALEXNET_LAYOUT = ((64, 11, 4, 2), "M", (192, 5, 1, 2), "M", (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1))
ALEXNET_TAP_INDICES = (1, 4, 7, 9, 11)  # the ReLU after each convolution
ALEXNET_CHANNELS = (64, 192, 384, 256, 256)
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10


class ReLU(nnx.Module):
    """Param-less placeholder for torchvision's `ReLU(inplace=True)` positions in `features`."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x)


class MaxPool2d(nnx.Module):
    """k x k max-pool with stride s over NHWC (no padding), as PyTorch's: partial windows at the end are dropped,
    and of tied maxima the first in row-major window order takes the gradient (plain `x.max` would split it
    between ties)."""

    def __init__(self, kernel_size: int = 2, stride: int = 2):
        self.kernel_size, self.stride = kernel_size, stride

    def __call__(self, x: jax.Array) -> jax.Array:
        k, s = self.kernel_size, self.stride
        rows, cols = s * ((x.shape[1] - k) // s) + 1, s * ((x.shape[2] - k) // s) + 1
        taps = [x[:, i : i + rows : s, j : j + cols : s] for i in range(k) for j in range(k)]  # row-major window order
        m = functools.reduce(jnp.maximum, taps)
        out = taps[-1]
        for tap in reversed(taps[:-1]):
            out = jnp.where(tap == m, tap, out)
        return out


class Identity(nnx.Module):
    """Param-less placeholder for the heads' `Dropout` (an identity in eval mode, where LPIPS is used)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x


def vgg16_features(pool: Callable[[], nnx.Module], *, dtype, rngs: nnx.Rngs) -> nnx.List:
    """Indices 0..29 of torchvision's vgg16().features: 3x3 convolutions each followed by a ReLU, `pool()` at the
    pooling positions (max-pool for LPIPS, L2 pooling for DISTS)."""
    layers: list[nnx.Module] = []
    channels = 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(pool())
        else:
            layers += [Conv2d(channels, item, 3, padding=1, dtype=dtype, rngs=rngs), ReLU()]
            channels = item
    return nnx.List(layers)


def alexnet_features(*, dtype, rngs: nnx.Rngs) -> nnx.List:
    """Indices 0..11 of torchvision's alexnet().features (ALEXNET_LAYOUT), the part LPIPS taps."""
    layers: list[nnx.Module] = []
    channels = 3
    for item in ALEXNET_LAYOUT:
        if item == "M":
            layers.append(MaxPool2d(3, 2))
        else:
            out, kernel, stride, padding = item
            layers += [Conv2d(channels, out, kernel, stride=stride, padding=padding, dtype=dtype, rngs=rngs), ReLU()]
            channels = out
    return nnx.List(layers)


def feature_taps(features: nnx.List, h: jax.Array, indices: Sequence[int]) -> list[jax.Array]:
    """The activations after the layers at `indices` of `features` applied to h."""
    taps = []
    for i, layer in enumerate(features[: max(indices) + 1]):
        h = layer(h)
        if i in indices:
            taps.append(h)
    return taps


def vgg16_taps(features: nnx.List, h: jax.Array) -> list[jax.Array]:
    """The activations at TAP_INDICES (relu1_2 .. relu5_3) of `vgg16_features` layers applied to h."""
    return feature_taps(features, h, TAP_INDICES)


@dataclasses.dataclass(frozen=True)
class Trunk:
    """An LPIPS trunk: its `features` layers, the indices whose outputs are compared and their channels."""

    build: Callable[..., nnx.List]  # (dtype=, rngs=) -> layers
    taps: tuple[int, ...]
    channels: tuple[int, ...]


TRUNKS = {
    "vgg": Trunk(functools.partial(vgg16_features, MaxPool2d), TAP_INDICES, CHANNELS),
    "alex": Trunk(alexnet_features, ALEXNET_TAP_INDICES, ALEXNET_CHANNELS),
}


class NetLinLayer(nnx.Module):
    """One LPIPS head: `model` = [Dropout, 1x1 conv c -> 1 without bias], as in the lpips package."""

    def __init__(self, channels: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.model = nnx.List([Identity(), Conv2d(channels, 1, 1, use_bias=False, dtype=dtype, rngs=rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.model[1](self.model[0](x))


def _normalize(f: jax.Array, dtype) -> jax.Array:
    """f / (||f||_channels + 1e-10) in `dtype`; the sqrt's gradient is kept finite where ||f|| = 0."""
    f = f.astype(dtype)
    sq = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
    return f / (jnp.sqrt(jnp.maximum(sq, 1e-30)) + NORM_EPS)


class LPIPS(nnx.Module):
    """LPIPS v0.1 with the trunk `net` ("vgg" or "alex", see TRUNKS); `__call__(x, y)` gives the (B,) distances
    of NHWC images in [-1, 1].

    The trunk's convolutions run in the weights' dtype; scaling, normalisation, heads and averages in float32
    (float64 for float64 weights), which is also the dtype of the distances.
    """

    def __init__(self, *, net: str = "vgg", dtype=jnp.float32, rngs: nnx.Rngs):
        if net not in TRUNKS:
            raise ValueError(f"LPIPS trunk must be one of {', '.join(TRUNKS)}, got {net!r}")
        trunk = TRUNKS[net]
        self.net = net
        self.features = trunk.build(dtype=dtype, rngs=rngs)
        self.lin0 = NetLinLayer(trunk.channels[0], dtype=dtype, rngs=rngs)
        self.lin1 = NetLinLayer(trunk.channels[1], dtype=dtype, rngs=rngs)
        self.lin2 = NetLinLayer(trunk.channels[2], dtype=dtype, rngs=rngs)
        self.lin3 = NetLinLayer(trunk.channels[3], dtype=dtype, rngs=rngs)
        self.lin4 = NetLinLayer(trunk.channels[4], dtype=dtype, rngs=rngs)

    @property
    def compute_dtype(self):
        """float32, or float64 for float64 weights: the dtype of everything but the trunk's convolutions."""
        return jnp.promote_types(self.features[0].kernel.dtype, jnp.float32)

    @property
    def heads(self) -> tuple[NetLinLayer, ...]:
        return (self.lin0, self.lin1, self.lin2, self.lin3, self.lin4)

    def trunk_features(self, x: jax.Array) -> list[jax.Array]:
        """The five tapped trunk activations of ScalingLayer(x), in the weights' dtype."""
        dtype = self.compute_dtype
        # The package's constants are float32 buffers; keep their float32 values at any precision.
        shift, scale = (jnp.asarray(c, jnp.float32).astype(dtype) for c in (SHIFT, SCALE))
        h = ((x.astype(dtype) - shift) / scale).astype(self.features[0].kernel.dtype)
        return feature_taps(self.features, h, TRUNKS[self.net].taps)

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """LPIPS distance per batch element: x, y (B, H, W, 3) in [-1, 1] -> (B,) in `compute_dtype`."""
        if x.shape != y.shape:
            raise ValueError(f"LPIPS: image shapes differ, {x.shape} vs {y.shape}")
        # Two trunk passes, not one on the concatenation: when only x is differentiated (a loss against a
        # target), y's pass then keeps nothing for the backward pass.
        dtype = self.compute_dtype
        total = jnp.zeros((x.shape[0],), dtype)
        for fx, fy, head in zip(self.trunk_features(x), self.trunk_features(y), self.heads, strict=True):
            diff = jnp.square(_normalize(fx, dtype) - _normalize(fy, dtype))
            total = total + head(diff).mean(axis=(1, 2, 3))
        return total
