"""DISTS image distance (Ding et al. 2020, "Image Quality Assessment: Unifying Structure and Texture Similarity"), NHWC.

Matches `DISTS_pytorch.DISTS` (and pyiqa's `dists`, the same network) in eval mode, for images in [0, 1]:

    D(x, y) = 1 - sum_k sum_c ( a_kc S1(m_kc(x), m_kc(y)) + b_kc S2(x_kc, y_kc) ) / (sum a + sum b)

k runs over the image itself and the VGG16 activations relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of
(x - mean) / std (ImageNet statistics), with each 2x2 max-pool replaced by `L2Pool2d`; m, var and cov are
global spatial statistics per channel; S1 = (2 m_x m_y + c1) / (m_x^2 + m_y^2 + c1) (texture),
S2 = (2 cov + c2) / (var_x + var_y + c2) (structure), c1 = c2 = 1e-6; a, b: the 1475 learnt `alpha`, `beta`.

The trunk is laid out as torchvision's `vgg16().features` (indices 0..29, `L2Pool2d` at 4, 9, 16, 23 where
torchvision has its max-pools; DISTS_pt's `stage{1..5}.{i}` modules carry the same indices), so torchvision
weights map by rule; `alpha` / `beta` are (1475,) vectors (PyTorch: (1, 1475, 1, 1)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tadsr_jax import prng
from tadsr_jax.models.lpips import vgg16_features, vgg16_taps

# Channels of the compared representations: the input image, then relu1_2 .. relu5_3.
CHANNELS = (3, 64, 128, 256, 512, 512)
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
C1 = C2 = 1e-6
L2POOL_EPS = 1e-12


class L2Pool2d(nnx.Module):
    """DISTS' `L2pooling`: sqrt(g * x^2 + 1e-12), g the normalised 3x3 Hann window (np.hanning(5)[1:-1] outer
    itself, i.e. [1, 2, 1]^T [1, 2, 1] / 16), depthwise, stride 2, zero padding 1; output size ceil(n / 2).

    The window is separable with exactly representable taps, so it runs as two strided 1-D passes.
    """

    def __call__(self, x: jax.Array) -> jax.Array:
        out_h, out_w = (x.shape[1] + 1) // 2, (x.shape[2] + 1) // 2
        p = jnp.pad(jnp.square(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
        p = 0.25 * p[:, 0 : 2 * out_h - 1 : 2] + 0.5 * p[:, 1 : 2 * out_h : 2] + 0.25 * p[:, 2 : 2 * out_h + 1 : 2]
        p = (
            0.25 * p[:, :, 0 : 2 * out_w - 1 : 2]
            + 0.5 * p[:, :, 1 : 2 * out_w : 2]
            + 0.25 * p[:, :, 2 : 2 * out_w + 1 : 2]
        )
        return jnp.sqrt(p + L2POOL_EPS)


class DISTS(nnx.Module):
    """DISTS with its VGG16 trunk; `__call__(x, y)` gives the (B,) distances of NHWC RGB images in [0, 1].

    The VGG convolutions run in the weights' dtype; normalisation, statistics and weights in float32
    (float64 for float64 weights), which is also the dtype of the distances.
    """

    def __init__(self, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.features = vgg16_features(L2Pool2d, dtype=dtype, rngs=rngs)
        # DISTS_pt's initialisation, N(0.1, 0.01^2); the trained values come from its weights.pt.
        self.alpha = nnx.Param(0.1 + 0.01 * prng.normal(rngs.params(), (sum(CHANNELS),), dtype))
        self.beta = nnx.Param(0.1 + 0.01 * prng.normal(rngs.params(), (sum(CHANNELS),), dtype))

    @property
    def compute_dtype(self):
        """float32, or float64 for float64 weights: the dtype of everything but the VGG convolutions."""
        return jnp.promote_types(self.features[0].kernel.dtype, jnp.float32)

    def representations(self, x: jax.Array) -> list[jax.Array]:
        """The six compared representations of x: x itself (in `compute_dtype`), then relu1_2 .. relu5_3 of
        the normalised x (in the weights' dtype)."""
        dtype = self.compute_dtype
        # DISTS_pt's mean/std are float32 buffers; keep their float32 values at any precision.
        mean, std = (jnp.asarray(c, jnp.float32).astype(dtype) for c in (MEAN, STD))
        x = x.astype(dtype)
        h = ((x - mean) / std).astype(self.features[0].kernel.dtype)
        return [x, *vgg16_taps(self.features, h)]

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """DISTS distance per batch element: x, y (B, H, W, 3) in [0, 1] -> (B,) in `compute_dtype`."""
        if x.shape != y.shape:
            raise ValueError(f"DISTS: image shapes differ, {x.shape} vs {y.shape}")
        batch = x.shape[0]
        dtype = self.compute_dtype
        alpha, beta = self.alpha[...].astype(dtype), self.beta[...].astype(dtype)
        total = alpha.sum() + beta.sum()
        splits = np.cumsum(CHANNELS)[:-1]
        alphas, betas = jnp.split(alpha / total, splits), jnp.split(beta / total, splits)
        texture = structure = jnp.zeros((batch,), dtype)
        taps = self.representations(jnp.concatenate([x, y], axis=0))  # one trunk pass for both images
        for feat, a, b in zip(taps, alphas, betas, strict=True):
            fx, fy = feat[:batch].astype(dtype), feat[batch:].astype(dtype)
            mx, my = fx.mean(axis=(1, 2)), fy.mean(axis=(1, 2))
            s1 = (2 * mx * my + C1) / (jnp.square(mx) + jnp.square(my) + C1)
            var_x = jnp.square(fx - mx[:, None, None]).mean(axis=(1, 2))
            var_y = jnp.square(fy - my[:, None, None]).mean(axis=(1, 2))
            cov = (fx * fy).mean(axis=(1, 2)) - mx * my
            s2 = (2 * cov + C2) / (var_x + var_y + C2)
            texture = texture + (a * s1).sum(axis=-1)
            structure = structure + (b * s2).sum(axis=-1)
        return 1 - (texture + structure)
