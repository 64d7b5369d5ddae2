"""Multi-head attention with diffusers' `Attention` parameter layout, computed by `jax.nn.dot_product_attention`
(so GPUs can use cuDNN flash attention)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tadsr_jax.nn.layers import GroupNorm, Linear


def attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, *, is_causal: bool = False,
              float32_logits: bool = False) -> jax.Array:
    """(B, T, heads*D) queries against (B, S, heads*D) keys/values -> (B, T, heads*D)."""
    b, t, _ = q.shape
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, -1)
    dtype = q.dtype
    if float32_logits:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
        v = v.astype(jnp.float32)
    out = jax.nn.dot_product_attention(split(q), split(k), split(v), is_causal=is_causal)
    return out.reshape(b, t, -1).astype(dtype)


class Attention(nnx.Module):
    """to_q/to_k/to_v/to_out.0 (+ optional group_norm and residual for the VAE's spatial self-attention).

    Called on (B, T, C) tokens, or on (B, H, W, C) maps when it owns a GroupNorm (VAE mid block).
    """

    def __init__(self, query_dim: int, *, heads: int, dim_head: int, cross_attention_dim: int | None = None,
                 qkv_bias: bool = False, norm_groups: int | None = None, norm_eps: float = 1e-6,
                 residual_connection: bool = False, upcast: bool = False, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        self.heads, self.upcast, self.residual_connection = heads, upcast, residual_connection
        self.group_norm = (GroupNorm(norm_groups, query_dim, eps=norm_eps, dtype=dtype)
                           if norm_groups else None)
        self.to_q = Linear(query_dim, inner, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.to_k = Linear(kv_dim, inner, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.to_v = Linear(kv_dim, inner, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.to_out = nnx.List([Linear(inner, query_dim, dtype=dtype, rngs=rngs), nnx.Dropout(0.0)])

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        residual, spatial_shape = x, None
        if x.ndim == 4:
            spatial_shape = x.shape
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        if self.group_norm is not None:
            x = self.group_norm(x)
        context = x if context is None else context
        h = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads,
                      float32_logits=self.upcast)
        h = self.to_out[0](h)
        if spatial_shape is not None:
            h = h.reshape(spatial_shape)
        return h + residual if self.residual_connection else h
