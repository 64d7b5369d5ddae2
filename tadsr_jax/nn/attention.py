"""Multi-head attention with diffusers' `Attention` parameter layout.

GPUs and TPUs run `jax.nn.dot_product_attention` (cuDNN flash attention where available); XLA:CPU runs
`blockwise_attention`, which is 2-3x faster there at SD's 4096-token self-attention (see its docstring).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tadsr_jax.nn.layers import GroupNorm, Linear

QUERY_BLOCK = 256  # queries per block of `blockwise_attention`


def attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, *, is_causal: bool = False,
              float32_logits: bool = False) -> jax.Array:
    """(B, T, heads*D) queries against (B, S, heads*D) keys/values -> (B, T, heads*D)."""
    b, t, _ = q.shape
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, -1)
    dtype = q.dtype
    if float32_logits:
        q, k = q.astype(jnp.float32), k.astype(jnp.float32)
        v = v.astype(jnp.float32)
    if jax.default_backend() == "cpu" and not is_causal:
        out = blockwise_attention(split(q), split(k), split(v))
    else:
        out = jax.nn.dot_product_attention(split(q), split(k), split(v), is_causal=is_causal)
    return out.reshape(b, t, -1).astype(dtype)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int = QUERY_BLOCK) -> jax.Array:
    """Softmax attention of (B, T, N, D) queries on (B, S, N, D) keys/values, `block` queries at a time.

    The same math as `jax.nn.dot_product_attention` (logits and softmax in float32), laid out for XLA:CPU:
    there, dot_product_attention's (B, N, T, S) probabilities go through a transposing copy that costs more
    than its two matmuls at T = S = 4096. Here each block's probabilities stay in cache, in the layout the
    second matmul reads, and the softmax denominator divides the (T, D) output rather than the (T, S)
    probabilities.
    """
    b, t, n, d = q.shape
    scale = d ** -0.5
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # (B, N, T, D)

    def one_block(q_block: jax.Array) -> jax.Array:
        logits = jnp.einsum("bnqd,bnkd->bnqk", q_block, k, preferred_element_type=jnp.float32)
        weights = jnp.exp((logits - logits.max(-1, keepdims=True)) * scale)
        out = jnp.einsum("bnqk,bnkd->bnqd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return out / weights.sum(-1, keepdims=True)

    blocks = -(-t // block)
    if blocks == 1:
        out = one_block(q)
    else:
        q = jnp.pad(q, ((0, 0), (0, 0), (0, blocks * block - t), (0, 0)))
        q = q.reshape(b, n, blocks, block, d).transpose(2, 0, 1, 3, 4)
        out = jax.lax.map(one_block, q).transpose(1, 2, 0, 3, 4).reshape(b, n, blocks * block, d)[:, :, :t]
    return out.transpose(0, 2, 1, 3).astype(v.dtype)


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
