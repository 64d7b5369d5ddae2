"""The Swin Transformer image encoder of the Recognize Anything Model (RAM), NHWC, inference only.

RAM's variant (`ram/models/swin_transformer.py`, SeeSR's `swin_transformer_lora.py` for DAPE): patch embedding
(a 4x4 stride-4 convolution and LayerNorm), stages of blocks with windowed multi-head self-attention plus a
learned relative position bias, every second block on windows shifted by half a window (with the mask that keeps
wrapped-around regions apart), patch merging between stages, a final LayerNorm, and the average of the last
stage's tokens prepended to them: (B, 1 + h*w, C). A stage whose map is no larger than the window uses one
window of the map's size and no shift, as the reference does (Swin-L/384's last stage: 12x12 = one window).

The attribute tree mirrors the PyTorch names, so RAM's checkpoint maps by rule (`tadsr_jax.weights.dape`);
the reference's bare `relative_position_bias_table` Parameter is held by an `Embedding`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tadsr_jax.nn.layers import Conv2d, Embedding, LayerNorm, Linear

LN_EPS = 1e-5  # nn.LayerNorm's default, which RAM's Swin uses throughout
SHIFT_MASK = -100.0  # the reference's additive mask between regions of a shifted window


@dataclasses.dataclass(frozen=True)
class SwinConfig:
    """RAM's Swin hyper-parameters (`ram/configs/swin/config_swinL_384.json` for DAPE)."""

    image_size: int = 384
    embed_dim: int = 192
    depths: tuple[int, ...] = (2, 2, 18, 2)
    num_heads: tuple[int, ...] = (6, 12, 24, 48)
    window_size: int = 12
    patch_size: int = 4
    mlp_ratio: float = 4.0

    @property
    def width(self) -> int:
        """Channels of the last stage (RAM's `vision_width`)."""
        return self.embed_dim * 2 ** (len(self.depths) - 1)


def relative_position_index(window: int) -> np.ndarray:
    """(N, N) index into the (2w-1)^2 bias table for the N = w*w tokens of a window (row-major)."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    delta = coords[:, :, None] - coords[:, None, :] + window - 1
    return delta[0] * (2 * window - 1) + delta[1]


def shift_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
    """(num_windows, N, N) additive mask of a shifted-window pass: 0 within a region, SHIFT_MASK across regions."""
    regions = np.zeros((height, width), np.int32)
    bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, rows in enumerate(bounds):
        for j, cols in enumerate(bounds):
            regions[rows, cols] = 3 * i + j
    windows = _partition(regions[None, :, :, None], window)[..., 0]  # (nW, N)
    return np.where(windows[:, None, :] != windows[:, :, None], SHIFT_MASK, 0.0).astype(np.float32)


def _partition(x, window: int):
    """(B, H, W, C) -> (B * H/w * W/w, w*w, C), windows in row-major order (numpy or jax arrays)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def _merge(windows: jax.Array, window: int, height: int, width: int) -> jax.Array:
    """Inverse of `_partition`."""
    c = windows.shape[-1]
    x = windows.reshape(-1, height // window, width // window, window, window, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, height, width, c)


class WindowAttention(nnx.Module):
    """Multi-head self-attention within windows, with the relative position bias (`attn` of a block)."""

    def __init__(self, dim: int, heads: int, window: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.heads, self.window = heads, window
        self.relative_position_bias_table = Embedding((2 * window - 1) ** 2, heads, dtype=dtype, rngs=rngs)
        self.qkv = Linear(dim, 3 * dim, dtype=dtype, rngs=rngs)
        self.proj = Linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: np.ndarray | None) -> jax.Array:
        """x: (B * nW, N, C) window tokens; mask: (nW, N, N) or None. Logits and softmax in float32."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).transpose(2, 0, 3, 1, 4)
        logits = jnp.einsum("bhqd,bhkd->bhqk", q.astype(jnp.float32) * (c // self.heads) ** -0.5, k)
        table = self.relative_position_bias_table.embedding[...].astype(jnp.float32)
        logits = logits + table[relative_position_index(self.window)].transpose(2, 0, 1)
        if mask is not None:
            logits = logits.reshape(-1, mask.shape[0], self.heads, n, n) + mask[None, :, None]
            logits = logits.reshape(bw, self.heads, n, n)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bhkd->bqhd", probs, v).reshape(bw, n, c)
        return self.proj(out)


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.fc1 = Linear(dim, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = Linear(hidden, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class SwinBlock(nnx.Module):
    """Pre-norm (shifted-)window attention and MLP, both residual, on a (B, H, W, C) map."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_ratio: float, *, dtype, rngs: nnx.Rngs):
        self.window, self.shift = window, shift
        self.norm1 = LayerNorm(dim, eps=LN_EPS, dtype=dtype)
        self.attn = WindowAttention(dim, heads, window, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(dim, eps=LN_EPS, dtype=dtype)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        _, h, w, _ = x.shape
        y = self.norm1(x)
        mask = None
        if self.shift:
            y = jnp.roll(y, (-self.shift, -self.shift), axis=(1, 2))
            mask = shift_mask(h, w, self.window, self.shift)
        y = _merge(self.attn(_partition(y, self.window), mask), self.window, h, w)
        if self.shift:
            y = jnp.roll(y, (self.shift, self.shift), axis=(1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchMerging(nnx.Module):
    """2x2 neighbourhoods -> channels (the reference's order: (0,0), (1,0), (0,1), (1,1)), LayerNorm, Linear."""

    def __init__(self, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.norm = LayerNorm(4 * dim, eps=LN_EPS, dtype=dtype)
        self.reduction = Linear(4 * dim, 2 * dim, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
        return self.reduction(self.norm(x))


class BasicLayer(nnx.Module):
    """One stage: `depth` blocks (odd ones shifted) at `resolution`, then patch merging unless it is the last."""

    def __init__(
        self,
        dim: int,
        resolution: int,
        depth: int,
        heads: int,
        config: SwinConfig,
        *,
        downsample: bool,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        window = min(config.window_size, resolution)
        shift = config.window_size // 2 if resolution > config.window_size else 0
        self.blocks = nnx.List(
            [
                SwinBlock(dim, heads, window, shift if i % 2 else 0, config.mlp_ratio, dtype=dtype, rngs=rngs)
                for i in range(depth)
            ]
        )
        self.downsample = PatchMerging(dim, dtype=dtype, rngs=rngs) if downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class PatchEmbed(nnx.Module):
    def __init__(self, patch: int, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.proj = Conv2d(3, dim, patch, stride=patch, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(dim, eps=LN_EPS, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.proj(x))


class SwinTransformer(nnx.Module):
    """(B, S, S, 3) normalised images, S = config.image_size -> (B, 1 + (S/32)^2, width) tokens, pooled first."""

    def __init__(self, config: SwinConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.patch_embed = PatchEmbed(config.patch_size, config.embed_dim, dtype=dtype, rngs=rngs)
        resolution = config.image_size // config.patch_size
        stages = len(config.depths)
        self.layers = nnx.List(
            [
                BasicLayer(
                    config.embed_dim * 2**i,
                    resolution // 2**i,
                    depth,
                    heads,
                    config,
                    downsample=i < stages - 1,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i, (depth, heads) in enumerate(zip(config.depths, config.num_heads, strict=True))
            ]
        )
        self.norm = LayerNorm(config.width, eps=LN_EPS, dtype=dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        size = self.config.image_size
        if images.shape[1:] != (size, size, 3):
            raise ValueError(f"Swin encoder: images must be (B, {size}, {size}, 3), got {images.shape}")
        x = self.patch_embed(images)
        for layer in self.layers:
            x = layer(x)
        x = self.norm(x.reshape(x.shape[0], -1, x.shape[-1]))
        return jnp.concatenate([x.mean(axis=1, keepdims=True, dtype=jnp.float32).astype(x.dtype), x], axis=1)
