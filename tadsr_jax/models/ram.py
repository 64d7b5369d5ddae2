"""The tagging path of the Recognize Anything Model (RAM), as DAPE (SeeSR's degradation-aware RAM) runs it.

RAM's `generate_tag`: Swin image tokens (`tadsr_jax.models.swin`) -> `image_proj` to 512; the label queries
(`label_embed`, one 512-d embedding per tag) -> `wordvec_proj` to the head's width and ReLU; the tagging head,
a BERT encoder configured by `ram/configs/q2l_config.json` (hidden 768, 4 heads, 2 layers, GELU, LayerNorm eps
1e-12) whose layers run in RAM's 'tagging' mode: cross-attention from the label queries to all image tokens
(no mask), then the feed-forward, and no self-attention (RAM deletes it, and the word embeddings, as
Query2Label does); `fc` -> one logit per tag. A tag is on where sigmoid(logit) > its threshold
(`tadsr_jax.infer.tagger`). RAM's two 12-layer text BERTs and its tokenizer play no part in tagging.

The attribute tree mirrors RAM's names (`tagging_head.encoder.layer.N.crossattention.self.query`, ...), so its
checkpoint maps by rule (`tadsr_jax.weights.dape`); the bare `label_embed` Parameter is held by an `Embedding`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from tadsr_jax.models.swin import SwinConfig, SwinTransformer
from tadsr_jax.nn.attention import attention
from tadsr_jax.nn.layers import Embedding, LayerNorm, Linear

BERT_LN_EPS = 1e-12  # q2l_config.json layer_norm_eps


@dataclasses.dataclass(frozen=True)
class RAMConfig:
    """The tagging path's hyper-parameters; the defaults are DAPE's (RAM Swin-L/384, q2l_config.json)."""

    swin: SwinConfig = SwinConfig()
    embed_width: int = 512  # image_proj output = label embedding size = the head's encoder_width
    hidden_size: int = 768
    num_heads: int = 4
    num_layers: int = 2
    intermediate_size: int = 3072
    num_tags: int = 4585

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, fields: dict) -> RAMConfig:
        swin = dict(fields["swin"])
        swin["depths"], swin["num_heads"] = tuple(swin["depths"]), tuple(swin["num_heads"])
        return cls(**{**fields, "swin": SwinConfig(**swin)})


DAPE_CONFIG = RAMConfig()


class BertSelfAttention(nnx.Module):
    """Query from the label tokens, key and value from the image tokens (`crossattention.self`)."""

    def __init__(self, config: RAMConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.heads = config.num_heads
        self.query = Linear(config.hidden_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.key = Linear(config.embed_width, config.hidden_size, dtype=dtype, rngs=rngs)
        self.value = Linear(config.embed_width, config.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        return attention(self.query(x), self.key(context), self.value(context), self.heads, float32_logits=True)


class BertResidualOutput(nnx.Module):
    """dense, then LayerNorm(dense(x) + residual): BERT's `attention.output` and `output`."""

    def __init__(self, in_features: int, hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.dense = Linear(in_features, hidden, dtype=dtype, rngs=rngs)
        self.LayerNorm = LayerNorm(hidden, eps=BERT_LN_EPS, dtype=dtype)

    def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
        return self.LayerNorm(self.dense(x) + residual)


class BertCrossAttention(nnx.Module):
    def __init__(self, config: RAMConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.self = BertSelfAttention(config, dtype=dtype, rngs=rngs)
        self.output = BertResidualOutput(config.hidden_size, config.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        return self.output(self.self(x, context), x)


class BertIntermediate(nnx.Module):
    def __init__(self, config: RAMConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.dense = Linear(config.hidden_size, config.intermediate_size, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(self.dense(x), approximate=False)


class BertTaggingLayer(nnx.Module):
    """A BERT layer in RAM's 'tagging' mode: cross-attention, then the feed-forward."""

    def __init__(self, config: RAMConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.crossattention = BertCrossAttention(config, dtype=dtype, rngs=rngs)
        self.intermediate = BertIntermediate(config, dtype=dtype, rngs=rngs)
        self.output = BertResidualOutput(config.intermediate_size, config.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        x = self.crossattention(x, context)
        return self.output(self.intermediate(x), x)


class BertEncoder(nnx.Module):
    def __init__(self, config: RAMConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.layer = nnx.List([BertTaggingLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)])

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        for layer in self.layer:
            x = layer(x, context)
        return x


class TaggingHead(nnx.Module):
    """RAM's `tagging_head` (a BertModel without embeddings, pooler or self-attention)."""

    def __init__(self, config: RAMConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.encoder = BertEncoder(config, dtype=dtype, rngs=rngs)

    def __call__(self, queries: jax.Array, image_tokens: jax.Array) -> jax.Array:
        return self.encoder(queries, image_tokens)


class RAMTagger(nnx.Module):
    """(B, S, S, 3) ImageNet-normalised images -> (B, num_tags) float32 logits."""

    def __init__(self, config: RAMConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.visual_encoder = SwinTransformer(config.swin, dtype=dtype, rngs=rngs)
        self.image_proj = Linear(config.swin.width, config.embed_width, dtype=dtype, rngs=rngs)
        self.label_embed = Embedding(config.num_tags, config.embed_width, dtype=dtype, rngs=rngs)
        self.wordvec_proj = Linear(config.embed_width, config.hidden_size, dtype=dtype, rngs=rngs)
        self.tagging_head = TaggingHead(config, dtype=dtype, rngs=rngs)
        self.fc = Linear(config.hidden_size, 1, dtype=dtype, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        image_tokens = self.image_proj(self.visual_encoder(images))
        queries = jax.nn.relu(self.wordvec_proj(self.label_embed.embedding[...].astype(images.dtype)))
        queries = jnp.broadcast_to(queries, (images.shape[0], *queries.shape))
        return self.fc(self.tagging_head(queries, image_tokens))[..., 0].astype(jnp.float32)
