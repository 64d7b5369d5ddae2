"""ResNet block with optional timestep conditioning, and the down/up-sampling layers of SD's UNet and VAE."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tadsr_jax.nn.layers import Conv2d, GroupNorm, Linear

TIME_MODES = ("add", "scale_shift")


class ResnetBlock2D(nnx.Module):
    """diffusers' ResnetBlock2D (output_scale_factor 1, no dropout).

    time_mode 'add': h += proj(SiLU(temb)) after conv1 (SD UNet).
    time_mode 'scale_shift': GN2(h) * (1 + scale) + shift with (scale, shift) = proj(SiLU(temb)) (TADSR's
    time-aware VAE encoder). `zero_init_time` zero-initialises that projection, so the block starts out
    identical to the unconditioned one.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        groups: int,
        eps: float,
        temb_channels: int | None = None,
        time_mode: str = "add",
        zero_init_time: bool = False,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if time_mode not in TIME_MODES:
            raise ValueError(f"time_mode must be one of {TIME_MODES}, got {time_mode!r}")
        self.time_mode = time_mode
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, dtype=dtype)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, dtype=dtype, rngs=rngs)
        if temb_channels is None:
            self.time_emb_proj = None
        else:
            proj_out = out_channels * (2 if time_mode == "scale_shift" else 1)
            self.time_emb_proj = Linear(temb_channels, proj_out, dtype=dtype, zero_init=zero_init_time, rngs=rngs)
        self.norm2 = GroupNorm(groups, out_channels, eps=eps, dtype=dtype)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, dtype=dtype, rngs=rngs)
        self.conv_shortcut = (
            Conv2d(in_channels, out_channels, 1, dtype=dtype, rngs=rngs) if in_channels != out_channels else None
        )

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        h = self.conv1(self.norm1(x, silu=True))
        t = None
        if self.time_emb_proj is not None:
            if temb is None:
                raise ValueError("this ResNet block is time-conditioned and needs a time embedding")
            t = self.time_emb_proj(jax.nn.silu(temb)).astype(h.dtype)[:, None, None, :]
        if self.time_mode == "scale_shift" and t is not None:
            h = self.norm2(h, scale_shift=tuple(jnp.split(t, 2, axis=-1)), silu=True)
        else:
            h = self.norm2(h if t is None else h + t, silu=True)
        h = self.conv2(h)
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class Downsample2D(nnx.Module):
    """3x3 stride-2 conv. padding=1 (UNet) or padding=0 after a (0,1,0,1) zero pad (VAE)."""

    def __init__(self, channels: int, *, padding: int = 1, dtype=jnp.float32, rngs: nnx.Rngs):
        self.padding = padding
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=padding, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return self.conv(x)


def nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """PyTorch 'nearest' interpolation of NHWC maps: source index floor(dst * in / out)."""
    (h, w), (oh, ow) = x.shape[1:3], size
    rows = (jnp.arange(oh) * h) // oh
    cols = (jnp.arange(ow) * w) // ow
    return x[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
    """Nearest x2 (or to an explicit size) then a 3x3 conv; x2 as one operation (`Conv2d(nearest_x2=True)`)."""

    def __init__(self, channels: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = Conv2d(channels, channels, 3, padding=1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, size: tuple[int, int] | None = None) -> jax.Array:
        if size is None or tuple(size) == (2 * x.shape[1], 2 * x.shape[2]):
            return self.conv(x, nearest_x2=True)
        return self.conv(nearest_resize(x, size))
