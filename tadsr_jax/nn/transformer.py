"""SD's spatial transformer: diffusers' Transformer2DModel with BasicTransformerBlocks and a GEGLU feed-forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tadsr_jax.nn.attention import Attention
from tadsr_jax.nn.layers import Conv2d, GroupNorm, LayerNorm, Linear


class GEGLU(nnx.Module):
    def __init__(self, dim_in: int, dim_out: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.proj = Linear(dim_in, 2 * dim_out, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden, gate = jnp.split(self.proj(x), 2, axis=-1)
        return hidden * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """net = [GEGLU, Dropout, Linear], as diffusers names it (ff.net.0.proj, ff.net.2)."""

    def __init__(self, dim: int, *, mult: int = 4, dtype=jnp.float32, rngs: nnx.Rngs):
        inner = dim * mult
        self.net = nnx.List(
            [GEGLU(dim, inner, dtype=dtype, rngs=rngs), nnx.Dropout(0.0), Linear(inner, dim, dtype=dtype, rngs=rngs)]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
    """Pre-LayerNorm self-attention, cross-attention and feed-forward, each with a residual."""

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        dim_head: int,
        cross_attention_dim: int,
        upcast: bool,
        eps: float = 1e-5,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.norm1 = LayerNorm(dim, eps=eps, dtype=dtype)
        self.attn1 = Attention(dim, heads=heads, dim_head=dim_head, upcast=upcast, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(dim, eps=eps, dtype=dtype)
        self.attn2 = Attention(
            dim,
            heads=heads,
            dim_head=dim_head,
            cross_attention_dim=cross_attention_dim,
            upcast=upcast,
            dtype=dtype,
            rngs=rngs,
        )
        self.norm3 = LayerNorm(dim, eps=eps, dtype=dtype)
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """GroupNorm -> proj_in (Linear or 1x1 conv) -> transformer blocks -> proj_out, plus the input residual."""

    def __init__(
        self,
        channels: int,
        *,
        heads: int,
        cross_attention_dim: int,
        num_layers: int = 1,
        norm_groups: int = 32,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if channels % heads:
            raise ValueError(f"Transformer2DModel: {channels} channels do not split into {heads} heads")
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(norm_groups, channels, eps=1e-6, dtype=dtype)
        make_proj = (
            (lambda: Linear(channels, channels, dtype=dtype, rngs=rngs))
            if use_linear_projection
            else (lambda: Conv2d(channels, channels, 1, dtype=dtype, rngs=rngs))
        )
        self.proj_in = make_proj()
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(
                    channels,
                    heads=heads,
                    dim_head=channels // heads,
                    cross_attention_dim=cross_attention_dim,
                    upcast=upcast_attention,
                    dtype=dtype,
                    rngs=rngs,
                )
                for _ in range(num_layers)
            ]
        )
        self.proj_out = make_proj()

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        residual = x
        x = self.norm(x)
        if self.use_linear_projection:
            x = self.proj_in(x.reshape(b, h * w, c))
        else:
            x = self.proj_in(x).reshape(b, h * w, c)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear_projection:
            x = self.proj_out(x).reshape(b, h, w, c)
        else:
            x = self.proj_out(x.reshape(b, h, w, c))
        return x + residual
