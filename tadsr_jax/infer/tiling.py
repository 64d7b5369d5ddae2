"""Latent tiling of the UNet call with Gaussian blending (docs/method.md 5, with the fixes it lists).

Tile offsets follow the reference: stride tile - overlap, the last tile snapped to the edge. Two fixes: the
tiles use the same timestep as the rest of the forward pass (the reference's tiled branch reads an undefined
attribute), and the Gaussian weights are centred at (T - 1) / 2 on both axes (the reference uses T / 2 on one).
A latent that fits in one tile is not tiled (the reference decides on the area, so 64x140 is not tiled).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Offsets of the tiles along one axis of length `size` (one tile of `size` when it fits)."""
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile), got tile={tile}, overlap={overlap}")
    if size <= tile:
        return [0]
    stride = tile - overlap
    count = math.ceil((size - tile) / stride) + 1
    return [min(i * stride, size - tile) for i in range(count)]


def gaussian_weights(tile: int) -> np.ndarray:
    """(tile, tile) blending weights: a Gaussian of std 0.1 * tile centred on the tile."""
    x = np.arange(tile, dtype=np.float64)
    w = np.exp(-np.square(x - (tile - 1) / 2) / (2 * 0.01 * tile * tile)) / np.sqrt(2 * np.pi * 0.01)
    return np.outer(w, w).astype(np.float32)


def tiled_call(
    fn: Callable[[jax.Array], jax.Array], z: jax.Array, tile: int, overlap: int, *, map_tiles: Callable = jax.lax.map
) -> jax.Array:
    """`fn` over (1, h, w, C) -> (1, h, w, C') applied to overlapping square tiles of `z`, blended.

    A latent within one tile is not tiled; otherwise the tile side is min(tile, h, w) as in the reference. Tiles
    run one after the other (`map_tiles(f, tiles)`, `lax.map` inside a jitted caller), so memory is that of one
    tile whatever the image size. Tile positions are static (they depend on shapes only).
    """
    if z.shape[0] != 1:
        raise ValueError(f"tiled_call takes one image at a time, got a batch of {z.shape[0]}")
    h, w = z.shape[1:3]
    if h <= tile and w <= tile:
        return fn(z)
    side = min(tile, h, w)
    positions = [(y, x) for y in tile_starts(h, side, overlap) for x in tile_starts(w, side, overlap)]
    tiles = jnp.stack([z[0, y : y + side, x : x + side] for y, x in positions])
    outputs = map_tiles(lambda t: fn(t[None])[0].astype(jnp.float32), tiles)
    weights = jnp.asarray(gaussian_weights(side))[:, :, None]
    total = jnp.zeros((h, w, outputs.shape[-1]), jnp.float32)
    norm = jnp.zeros((h, w, 1), jnp.float32)
    for i, (y, x) in enumerate(positions):
        total = total.at[y : y + side, x : x + side].add(outputs[i] * weights)
        norm = norm.at[y : y + side, x : x + side].add(weights)
    return (total / norm)[None]
