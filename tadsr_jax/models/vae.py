"""SD's AutoencoderKL (encoder, decoder, quant convs, diagonal Gaussian posterior) and TADSR's time-aware encoder.

The time-aware encoder (docs/method.md 1.1) adds a timestep MLP (128 -> 256 -> 256) and a scale/shift
projection to each of its 10 ResNets; with those projections at zero it is exactly the stock encoder.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from tadsr_jax import prng
from tadsr_jax.nn import (
    Attention,
    Conv2d,
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    TimestepEmbedding,
    Upsample2D,
    batch_timesteps,
    remat,
    timestep_sinusoid,
)

VAE_EPS = 1e-6
TIME_EMBED_CHANNELS = 256  # hard-coded in the reference's TimeAwareEncoder


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    sample_size: int = 32

    @classmethod
    def from_dict(cls, config: dict) -> VAEConfig:
        """From a diffusers `vae/` (or TADSR `time_vae/`) config.json dict."""
        if config.get("act_fn", "silu") != "silu":
            raise ValueError(f"VAE config: act_fn={config['act_fn']!r} is not supported (only 'silu')")
        fields = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields})
        if set(cfg.down_block_types) != {"DownEncoderBlock2D"} or set(cfg.up_block_types) != {"UpDecoderBlock2D"}:
            raise ValueError("VAE config: only DownEncoderBlock2D/UpDecoderBlock2D blocks are supported")
        if not (len(cfg.down_block_types) == len(cfg.up_block_types) == len(cfg.block_out_channels)):
            raise ValueError("VAE config: block types and block_out_channels differ in length")
        return cfg


def time_sinusoid_dim(cfg: VAEConfig) -> int:
    """Width of the time-aware encoder's timestep sinusoid (max(128, first block's channels))."""
    return max(128, cfg.block_out_channels[0])


def _resnet_time_kwargs(time_aware: bool) -> dict:
    """ResNet keyword arguments for a plain or time-aware (scale/shift, zero-initialised) encoder."""
    if not time_aware:
        return {}
    return dict(temb_channels=TIME_EMBED_CHANNELS, time_mode="scale_shift", zero_init_time=True)


class VAEMidBlock(nnx.Module):
    """UNetMidBlock2D: resnet, single-head spatial self-attention with its own GroupNorm, resnet."""

    def __init__(self, channels: int, *, groups: int, add_attention: bool, resnet_kwargs: dict, dtype, rngs: nnx.Rngs):
        self.attentions = (
            nnx.List(
                [
                    Attention(
                        channels,
                        heads=1,
                        dim_head=channels,
                        qkv_bias=True,
                        norm_groups=groups,
                        norm_eps=VAE_EPS,
                        residual_connection=True,
                        upcast=True,
                        dtype=dtype,
                        rngs=rngs,
                    )
                ]
            )
            if add_attention
            else None
        )
        self.resnets = nnx.List(
            [
                ResnetBlock2D(channels, channels, groups=groups, eps=VAE_EPS, dtype=dtype, rngs=rngs, **resnet_kwargs)
                for _ in range(2)
            ]
        )

    def __call__(self, x: jax.Array, temb: jax.Array | None = None, *, layer_remat: str = "none") -> jax.Array:
        x = remat.call(self.resnets[0], layer_remat, x, temb)
        if self.attentions is not None:
            x = remat.call(self.attentions[0], layer_remat, x)
        return remat.call(self.resnets[1], layer_remat, x, temb)


class EncoderDownBlock(nnx.Module):
    """DownEncoderBlock2D: resnets, then (except the last block) a padded stride-2 conv."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        groups: int,
        add_downsample: bool,
        resnet_kwargs: dict,
        dtype,
        rngs: nnx.Rngs,
    ):
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    groups=groups,
                    eps=VAE_EPS,
                    dtype=dtype,
                    rngs=rngs,
                    **resnet_kwargs,
                )
                for i in range(num_layers)
            ]
        )
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, padding=0, dtype=dtype, rngs=rngs)]) if add_downsample else None
        )

    def __call__(self, x: jax.Array, temb: jax.Array | None = None, *, layer_remat: str = "none") -> jax.Array:
        for resnet in self.resnets:
            x = remat.call(resnet, layer_remat, x, temb)
        return x if self.downsamplers is None else remat.call(self.downsamplers[0], layer_remat, x)


class Encoder(nnx.Module):
    """Image in [-1, 1] (B,H,W,3) -> moments (B,H/f,W/f,2*latent) before quant_conv.

    With `time_aware=True` it is TADSR's TimeAwareEncoder and takes integer timesteps (B,) or a scalar.
    """

    def __init__(self, cfg: VAEConfig, *, time_aware: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
        channels, groups = cfg.block_out_channels, cfg.norm_num_groups
        resnet_kwargs = _resnet_time_kwargs(time_aware)
        self.time_aware = time_aware
        self.time_sinusoid_dim = time_sinusoid_dim(cfg)
        self.time_embedding = (
            TimestepEmbedding(self.time_sinusoid_dim, TIME_EMBED_CHANNELS, dtype=dtype, rngs=rngs)
            if time_aware
            else None
        )
        self.conv_in = Conv2d(cfg.in_channels, channels[0], 3, padding=1, dtype=dtype, rngs=rngs)
        self.down_blocks = nnx.List(
            [
                EncoderDownBlock(
                    channels[max(i - 1, 0)],
                    channels[i],
                    num_layers=cfg.layers_per_block,
                    groups=groups,
                    add_downsample=i < len(channels) - 1,
                    resnet_kwargs=resnet_kwargs,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(len(channels))
            ]
        )
        self.mid_block = VAEMidBlock(
            channels[-1],
            groups=groups,
            add_attention=cfg.mid_block_add_attention,
            resnet_kwargs=resnet_kwargs,
            dtype=dtype,
            rngs=rngs,
        )
        self.conv_norm_out = GroupNorm(groups, channels[-1], eps=VAE_EPS, dtype=dtype)
        self.conv_out = Conv2d(channels[-1], 2 * cfg.latent_channels, 3, padding=1, dtype=dtype, rngs=rngs)
        self.remat = "none"  # tadsr_jax.nn.remat policy of each down block and the mid block (or of their layers)

    def time_embed(self, timesteps: jax.Array | int, batch: int) -> jax.Array:
        t = batch_timesteps(timesteps, batch)
        feat = timestep_sinusoid(t, self.time_sinusoid_dim, flip_sin_to_cos=True, freq_shift=0)
        return self.time_embedding(feat.astype(self.conv_in.kernel.dtype))

    def __call__(self, x: jax.Array, timesteps: jax.Array | int | None = None) -> jax.Array:
        if self.time_aware and timesteps is None:
            raise ValueError("the time-aware encoder needs timesteps")
        temb = self.time_embed(timesteps, x.shape[0]) if self.time_aware else None
        x = self.conv_in(x.astype(self.conv_in.kernel.dtype))
        block_remat, layer_remat = remat.block_and_layer_policies(self.remat)
        for block in self.down_blocks:
            x = remat.call(block, block_remat, x, temb, layer_remat=layer_remat)
        x = remat.call(self.mid_block, block_remat, x, temb, layer_remat=layer_remat)
        return self.conv_out(self.conv_norm_out(x, silu=True))


class DecoderUpBlock(nnx.Module):
    """UpDecoderBlock2D: resnets, then (except the last block) nearest x2 + conv."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        groups: int,
        add_upsample: bool,
        dtype,
        rngs: nnx.Rngs,
    ):
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    groups=groups,
                    eps=VAE_EPS,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(num_layers)
            ]
        )
        self.upsamplers = nnx.List([Upsample2D(out_channels, dtype=dtype, rngs=rngs)]) if add_upsample else None

    def __call__(self, x: jax.Array, *, layer_remat: str = "none") -> jax.Array:
        for resnet in self.resnets:
            x = remat.call(resnet, layer_remat, x)
        return x if self.upsamplers is None else remat.call(self.upsamplers[0], layer_remat, x)


class Decoder(nnx.Module):
    """Latent (B,h,w,latent) after post_quant_conv -> image (B,f*h,f*w,3), unclamped."""

    def __init__(self, cfg: VAEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        rev, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = Conv2d(cfg.latent_channels, rev[0], 3, padding=1, dtype=dtype, rngs=rngs)
        self.mid_block = VAEMidBlock(
            rev[0], groups=groups, add_attention=cfg.mid_block_add_attention, resnet_kwargs={}, dtype=dtype, rngs=rngs
        )
        self.up_blocks = nnx.List(
            [
                DecoderUpBlock(
                    rev[max(i - 1, 0)],
                    rev[i],
                    num_layers=cfg.layers_per_block + 1,
                    groups=groups,
                    add_upsample=i < len(rev) - 1,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(len(rev))
            ]
        )
        self.conv_norm_out = GroupNorm(groups, rev[-1], eps=VAE_EPS, dtype=dtype)
        self.conv_out = Conv2d(rev[-1], cfg.out_channels, 3, padding=1, dtype=dtype, rngs=rngs)
        self.remat = "none"  # tadsr_jax.nn.remat policy of the mid block and each up block (or of their layers)

    def __call__(self, z: jax.Array) -> jax.Array:
        block_remat, layer_remat = remat.block_and_layer_policies(self.remat)
        x = self.conv_in(z.astype(self.conv_in.kernel.dtype))
        x = remat.call(self.mid_block, block_remat, x, layer_remat=layer_remat)
        for block in self.up_blocks:
            x = remat.call(block, block_remat, x, layer_remat=layer_remat)
        return self.conv_out(self.conv_norm_out(x, silu=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DiagonalGaussian:
    """The VAE posterior; logvar clamped to [-30, 20] as diffusers does."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        return self.mean + self.std * prng.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean


class AutoencoderKL(nnx.Module):
    """`encode(images, timesteps=None) -> DiagonalGaussian`; `decode(latents) -> images` (NHWC, [-1, 1] scale).

    Latents here are unscaled; multiply by `config.scaling_factor` (0.18215 for SD) for the UNet.
    With `time_aware=True` this is TADSR's TimeAwareAutoencoderKL and `encode` needs timesteps.
    """

    def __init__(self, config: VAEConfig, *, time_aware: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        latent = config.latent_channels
        self.encoder = Encoder(config, time_aware=time_aware, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(config, dtype=dtype, rngs=rngs)
        self.quant_conv = Conv2d(2 * latent, 2 * latent, 1, dtype=dtype, rngs=rngs) if config.use_quant_conv else None
        self.post_quant_conv = Conv2d(latent, latent, 1, dtype=dtype, rngs=rngs) if config.use_post_quant_conv else None

    def encode(self, images: jax.Array, timesteps: jax.Array | int | None = None) -> DiagonalGaussian:
        moments = self.encoder(images, timesteps)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, latents: jax.Array) -> jax.Array:
        z = latents.astype(self.decoder.conv_in.kernel.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)
