"""Multi-head attention with diffusers' `Attention` parameter layout, through the best kernel of the platform.

Implementations (`Attention.implementation`, set for a whole model by `set_implementation`):
- "blockwise": `blockwise_attention`, for XLA:CPU, where it is 2-3x faster than XLA's at SD's 4096-token
  self-attention (see its docstring);
- "xla": `jax.nn.dot_product_attention`'s XLA implementation (float32 logits and softmax);
- "cudnn": `jax.nn.dot_product_attention` through cuDNN's fused (flash) kernel, for bf16/fp16 on NVIDIA GPUs;
- "flash": the Pallas TPU flash-attention kernel (`jax.experimental.pallas.ops.tpu.flash_attention`), which never
  writes the (T, S) probabilities to HBM and keeps only the softmax statistics for the backward pass. XLA's
  implementation keeps them: 1.3 GB per 4096-token layer and 4 images in float32. Sequences that do not split
  into its 128-token blocks (SD's 77-token text context, 8x8 maps) go through "xla";
- "auto": by platform, "blockwise" on CPU, "flash" on TPU, "cudnn" on GPU for half-precision inputs, else "xla".
The platform is the one the program is compiled for: a deviceless TPU compile on a CPU host passes it
(`set_implementation(model, "auto", platform="tpu")`); otherwise it is JAX's default backend when traced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tadsr_jax.nn.layers import GroupNorm, Linear

QUERY_BLOCK = 256  # queries per block of `blockwise_attention`
FLASH_BLOCK = 128  # sequence lengths the TPU flash kernel takes: multiples of its default block
IMPLEMENTATIONS = ("auto", "blockwise", "xla", "cudnn", "flash")


def resolve(implementation: str, platform: str | None = None, dtype=jnp.bfloat16) -> str:
    """The concrete implementation "auto" stands for on `platform` (default: JAX's default backend)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r} (one of {', '.join(IMPLEMENTATIONS)})")
    if implementation != "auto":
        return implementation
    platform = platform or jax.default_backend()
    if platform == "cpu":
        return "blockwise"
    if platform == "tpu":
        return "flash"
    if platform in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    heads: int,
    *,
    is_causal: bool = False,
    float32_logits: bool = False,
    implementation: str = "auto",
) -> jax.Array:
    """(B, T, heads*D) queries against (B, S, heads*D) keys/values -> (B, T, heads*D)."""
    b, t, _ = q.shape
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, -1)
    dtype = q.dtype
    if float32_logits:
        q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
    implementation = resolve(implementation, dtype=q.dtype)
    if implementation == "flash" and not _flash_fits(b, t, k.shape[1]):
        implementation = "xla"
    if implementation == "blockwise" and not is_causal:
        out = blockwise_attention(split(q), split(k), split(v))
    elif implementation == "flash":
        out = flash_attention(split(q), split(k), split(v), is_causal=is_causal)
    else:
        out = jax.nn.dot_product_attention(
            split(q),
            split(k),
            split(v),
            is_causal=is_causal,
            implementation="cudnn" if implementation == "cudnn" else "xla",
        )
    return out.reshape(b, t, -1).astype(dtype)


def _flash_fits(batch: int, t: int, s: int) -> bool:
    """Whether the TPU flash kernel takes these shapes: sequences in whole blocks, the batch split evenly over
    the context mesh (see `flash_attention`)."""
    mesh = jax.sharding.get_abstract_mesh()
    return t % FLASH_BLOCK == 0 and s % FLASH_BLOCK == 0 and (mesh.empty or batch % mesh.size == 0)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, is_causal: bool = False) -> jax.Array:
    """(B, T, N, D) attention through the Pallas TPU flash kernel (which takes (B, N, T, D)).

    XLA cannot partition a Pallas kernel, so under a context mesh (`tadsr_jax.parallel.under_mesh`) the kernel
    runs per device through `jax.shard_map`, the batch split over every mesh axis, as the train step shards it.
    """
    from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash

    def kernel(q, k, v):
        heads_first = lambda x: x.transpose(0, 2, 1, 3)
        out = pallas_flash.flash_attention(
            heads_first(q), heads_first(k), heads_first(v), causal=is_causal, sm_scale=q.shape[-1] ** -0.5
        )
        return heads_first(out)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return kernel(q, k, v)
    batch = jax.sharding.PartitionSpec(tuple(mesh.axis_names))
    return jax.shard_map(kernel, in_specs=(batch, batch, batch), out_specs=batch, check_vma=False)(q, k, v)


def set_implementation(module: nnx.Module, implementation: str, platform: str | None = None) -> None:
    """Every `Attention` in `module` uses `implementation` ("auto" resolved now, for `platform` if given)."""
    for _, node in nnx.iter_graph(module):
        if isinstance(node, Attention):
            node.implementation = resolve(implementation, platform, node.to_q.kernel.dtype)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int = QUERY_BLOCK) -> jax.Array:
    """Softmax attention of (B, T, N, D) queries on (B, S, N, D) keys/values, `block` queries at a time.

    The same math as `jax.nn.dot_product_attention` (logits and softmax in float32), laid out for XLA:CPU:
    there, dot_product_attention's (B, N, T, S) probabilities go through a transposing copy that costs more
    than its two matmuls at T = S = 4096. Here each block's probabilities stay in cache, in the layout the
    second matmul reads, and the softmax denominator divides the (T, D) output rather than the (T, S)
    probabilities.
    """
    b, t, n, d = q.shape
    scale = d**-0.5
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

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
        qkv_bias: bool = False,
        norm_groups: int | None = None,
        norm_eps: float = 1e-6,
        residual_connection: bool = False,
        upcast: bool = False,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        inner = heads * dim_head
        kv_dim = cross_attention_dim or query_dim
        self.heads, self.upcast, self.residual_connection = heads, upcast, residual_connection
        self.implementation = "auto"
        self.group_norm = GroupNorm(norm_groups, query_dim, eps=norm_eps, dtype=dtype) if norm_groups else None
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
        h = attention(
            self.to_q(x),
            self.to_k(context),
            self.to_v(context),
            self.heads,
            float32_logits=self.upcast,
            implementation=self.implementation,
        )
        h = self.to_out[0](h)
        if spatial_shape is not None:
            h = h.reshape(spatial_shape)
        return h + residual if self.residual_connection else h
