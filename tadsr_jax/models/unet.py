"""Stable Diffusion's UNet2DConditionModel (SD 1.x and 2.x block structures), NHWC, diffusers parameter names."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tadsr_jax.nn import (
    Conv2d,
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    TimestepEmbedding,
    Transformer2DModel,
    Upsample2D,
    batch_timesteps,
    remat,
    timestep_sinusoid,
)

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers options we do not implement, with the only value we accept.
_UNSUPPORTED_UNLESS = {
    "act_fn": "silu",
    "center_input_sample": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "encoder_hid_dim": None,
    "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default",
    "dual_cross_attention": False,
    "only_cross_attention": False,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "num_class_embeds": None,
    "attention_type": "default",
    "time_embedding_dim": None,
    "timestep_post_act": None,
    "mid_block_scale_factor": 1,
    "resnet_out_scale_factor": 1.0,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
    "class_embeddings_concat": False,
}


def _per_block(value, n: int, name: str) -> tuple:
    values = tuple(value) if isinstance(value, Sequence) else (value,) * n
    if len(values) != n:
        raise ValueError(f"UNet config: {name} has {len(values)} entries for {n} blocks")
    return values


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    transformer_layers_per_block: int | tuple[int, ...] = 1
    # diffusers' historical naming: for SD, `attention_head_dim` is the number of heads per block.
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    cross_attention_dim: int = 1280
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    sample_size: int = 64

    @classmethod
    def from_dict(cls, config: dict) -> UNetConfig:
        """From a diffusers `unet/config.json` dict; unsupported options raise one clear ValueError."""
        for key, allowed in _UNSUPPORTED_UNLESS.items():
            if config.get(key, allowed) != allowed:
                raise ValueError(f"UNet config: {key}={config[key]!r} is not supported (only {allowed!r})")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}
        cfg = cls(**values)
        for t in cfg.down_block_types:
            if t not in DOWN_BLOCKS:
                raise ValueError(f"UNet config: down block type {t!r} is not supported ({DOWN_BLOCKS})")
        for t in cfg.up_block_types:
            if t not in UP_BLOCKS:
                raise ValueError(f"UNet config: up block type {t!r} is not supported ({UP_BLOCKS})")
        if cfg.mid_block_type != "UNetMidBlock2DCrossAttn":
            raise ValueError(f"UNet config: mid block type {cfg.mid_block_type!r} is not supported")
        return cfg

    def heads(self) -> tuple[int, ...]:
        return _per_block(
            self.num_attention_heads or self.attention_head_dim, len(self.block_out_channels), "num_attention_heads"
        )


class UNetDownBlock(nnx.Module):
    """DownBlock2D (resnets) or CrossAttnDownBlock2D (resnets + spatial transformers), then a stride-2 conv."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        temb_channels: int,
        num_layers: int,
        heads: int | None,
        transformer_layers: int,
        add_downsample: bool,
        cfg: UNetConfig,
        dtype,
        rngs: nnx.Rngs,
    ):
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    in_channels if i == 0 else out_channels,
                    out_channels,
                    groups=cfg.norm_num_groups,
                    eps=cfg.norm_eps,
                    temb_channels=temb_channels,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(num_layers)
            ]
        )
        self.attentions = (
            None
            if heads is None
            else nnx.List(
                [_transformer(out_channels, heads, transformer_layers, cfg, dtype, rngs) for _ in range(num_layers)]
            )
        )
        self.downsamplers = (
            nnx.List([Downsample2D(out_channels, padding=cfg.downsample_padding, dtype=dtype, rngs=rngs)])
            if add_downsample
            else None
        )

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UNetMidBlock(nnx.Module):
    """UNetMidBlock2DCrossAttn: resnet, then (transformer, resnet)."""

    def __init__(
        self,
        channels: int,
        *,
        temb_channels: int,
        heads: int,
        transformer_layers: int,
        cfg: UNetConfig,
        dtype,
        rngs: nnx.Rngs,
    ):
        self.attentions = nnx.List([_transformer(channels, heads, transformer_layers, cfg, dtype, rngs)])
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    channels,
                    channels,
                    groups=cfg.norm_num_groups,
                    eps=cfg.norm_eps,
                    temb_channels=temb_channels,
                    dtype=dtype,
                    rngs=rngs,
                )
                for _ in range(2)
            ]
        )

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


class UNetUpBlock(nnx.Module):
    """UpBlock2D / CrossAttnUpBlock2D: each resnet takes the concatenated skip; then nearest x2 + conv."""

    def __init__(
        self,
        in_channels: int,
        prev_output_channels: int,
        out_channels: int,
        *,
        temb_channels: int,
        num_layers: int,
        heads: int | None,
        transformer_layers: int,
        add_upsample: bool,
        cfg: UNetConfig,
        dtype,
        rngs: nnx.Rngs,
    ):
        resnets = []
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in = prev_output_channels if i == 0 else out_channels
            resnets.append(
                ResnetBlock2D(
                    resnet_in + skip_channels,
                    out_channels,
                    groups=cfg.norm_num_groups,
                    eps=cfg.norm_eps,
                    temb_channels=temb_channels,
                    dtype=dtype,
                    rngs=rngs,
                )
            )
        self.resnets = nnx.List(resnets)
        self.attentions = (
            None
            if heads is None
            else nnx.List(
                [_transformer(out_channels, heads, transformer_layers, cfg, dtype, rngs) for _ in range(num_layers)]
            )
        )
        self.upsamplers = nnx.List([Upsample2D(out_channels, dtype=dtype, rngs=rngs)]) if add_upsample else None

    def __call__(
        self,
        x: jax.Array,
        skips: list[jax.Array],
        temb: jax.Array,
        context: jax.Array,
        upsample_size: tuple[int, int] | None,
    ) -> jax.Array:
        for i, resnet in enumerate(self.resnets):
            x = resnet(jnp.concatenate([x, skips.pop()], axis=-1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


def _transformer(channels: int, heads: int, layers: int, cfg: UNetConfig, dtype, rngs) -> Transformer2DModel:
    return Transformer2DModel(
        channels,
        heads=heads,
        cross_attention_dim=cfg.cross_attention_dim,
        num_layers=layers,
        norm_groups=cfg.norm_num_groups,
        use_linear_projection=cfg.use_linear_projection,
        upcast_attention=cfg.upcast_attention,
        dtype=dtype,
        rngs=rngs,
    )


class UNet2DConditionModel(nnx.Module):
    """eps/residual predictor: `unet(latents (B,H,W,C), timesteps (B,) or scalar, context (B,T,D)) -> (B,H,W,C)`."""

    def __init__(self, config: UNetConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        channels = config.block_out_channels
        n = len(channels)
        heads = config.heads()
        layers = _per_block(config.layers_per_block, n, "layers_per_block")
        t_layers = _per_block(config.transformer_layers_per_block, n, "transformer_layers_per_block")
        temb_channels = channels[0] * 4
        self.conv_in = Conv2d(config.in_channels, channels[0], 3, padding=1, dtype=dtype, rngs=rngs)
        self.time_embedding = TimestepEmbedding(channels[0], temb_channels, dtype=dtype, rngs=rngs)

        down, out_ch = [], channels[0]
        for i, block_type in enumerate(config.down_block_types):
            in_ch, out_ch = out_ch, channels[i]
            down.append(
                UNetDownBlock(
                    in_ch,
                    out_ch,
                    temb_channels=temb_channels,
                    num_layers=layers[i],
                    heads=heads[i] if block_type.startswith("CrossAttn") else None,
                    transformer_layers=t_layers[i],
                    add_downsample=i < n - 1,
                    cfg=config,
                    dtype=dtype,
                    rngs=rngs,
                )
            )
        self.down_blocks = nnx.List(down)
        self.mid_block = UNetMidBlock(
            channels[-1],
            temb_channels=temb_channels,
            heads=heads[-1],
            transformer_layers=t_layers[-1],
            cfg=config,
            dtype=dtype,
            rngs=rngs,
        )

        up, rev = [], channels[::-1]
        out_ch = rev[0]
        for i, block_type in enumerate(config.up_block_types):
            prev_ch, out_ch = out_ch, rev[i]
            in_ch = rev[min(i + 1, n - 1)]
            up.append(
                UNetUpBlock(
                    in_ch,
                    prev_ch,
                    out_ch,
                    temb_channels=temb_channels,
                    num_layers=layers[::-1][i] + 1,
                    heads=heads[::-1][i] if block_type.startswith("CrossAttn") else None,
                    transformer_layers=t_layers[::-1][i],
                    add_upsample=i < n - 1,
                    cfg=config,
                    dtype=dtype,
                    rngs=rngs,
                )
            )
        self.up_blocks = nnx.List(up)
        self.conv_norm_out = GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps, dtype=dtype)
        self.conv_out = Conv2d(channels[0], config.out_channels, 3, padding=1, dtype=dtype, rngs=rngs)
        self.remat = "none"  # tadsr_jax.nn.remat policy of every down, mid and up block

    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | int,
        encoder_hidden_states: jax.Array,
        *,
        conv_in: Conv2d | None = None,
    ) -> jax.Array:
        """`conv_in` replaces the model's input convolution for this call (TADSR's student trains its own)."""
        dtype = self.conv_in.kernel.dtype
        t = batch_timesteps(timesteps, sample.shape[0])
        t_feat = timestep_sinusoid(
            t,
            self.config.block_out_channels[0],
            flip_sin_to_cos=self.config.flip_sin_to_cos,
            freq_shift=self.config.freq_shift,
        )
        temb = self.time_embedding(t_feat.astype(dtype))
        context = encoder_hidden_states.astype(dtype)
        x = (conv_in or self.conv_in)(sample.astype(dtype))
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = remat.call(block, self.remat, x, temb, context)
            skips.extend(block_skips)
        x = remat.call(self.mid_block, self.remat, x, temb, context)
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            upsample_size = tuple(skips[-1].shape[1:3]) if skips else None
            x = remat.call(block, self.remat, x, block_skips, temb, context, upsample_size=upsample_size)
        return self.conv_out(self.conv_norm_out(x, silu=True))
