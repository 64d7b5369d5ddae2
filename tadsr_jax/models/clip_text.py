"""CLIP text encoder (transformers' `CLIPTextModel` layout) and the CLIP tokenizer glue.

Stable Diffusion conditions on the last hidden state after the final LayerNorm, computed with causal
self-attention and no padding mask over prompts padded to `max_position_embeddings` tokens.
Tokenisation is delegated to transformers, imported lazily so that importing this module needs
neither transformers nor torch.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import DTypeLike

from tadsr_jax.nn.attention import attention
from tadsr_jax.nn.layers import Embedding, LayerNorm, Linear

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The architecture fields of a transformers `CLIPTextConfig`; defaults are transformers' own."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"CLIP text encoder: unsupported hidden_act {self.hidden_act!r} "
                f"(supported: {', '.join(map(repr, _ACTIVATIONS))})"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"CLIP text encoder: hidden_size {self.hidden_size} does not split into "
                f"{self.num_attention_heads} heads"
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPTextConfig:
        """From a transformers config.json dict; keys that are not architecture fields are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype: DTypeLike, rngs: nnx.Rngs):
        self.token_embedding = Embedding(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.position_embedding = Embedding(config.max_position_embeddings, config.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        return self.token_embedding(input_ids) + self.position_embedding(jnp.arange(input_ids.shape[1]))


class CLIPAttention(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype: DTypeLike, rngs: nnx.Rngs):
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.q_proj = Linear(d, d, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, d, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, d, dtype=dtype, rngs=rngs)
        self.out_proj = Linear(d, d, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads, is_causal=True)
        return self.out_proj(h)


class CLIPMLP(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype: DTypeLike, rngs: nnx.Rngs):
        self.hidden_act = config.hidden_act
        self.fc1 = Linear(config.hidden_size, config.intermediate_size, dtype=dtype, rngs=rngs)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(_ACTIVATIONS[self.hidden_act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype: DTypeLike, rngs: nnx.Rngs):
        eps = config.layer_norm_eps
        self.self_attn = CLIPAttention(config, dtype=dtype, rngs=rngs)
        self.layer_norm1 = LayerNorm(config.hidden_size, eps=eps, dtype=dtype)
        self.mlp = CLIPMLP(config, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(config.hidden_size, eps=eps, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype: DTypeLike, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [CLIPEncoderLayer(config, dtype=dtype, rngs=rngs) for _ in range(config.num_hidden_layers)]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextModel(nnx.Module):
    """(B, T) token ids -> (B, T, hidden) last hidden state after the final LayerNorm."""

    def __init__(self, config: CLIPTextConfig, *, dtype: DTypeLike = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config, dtype=dtype, rngs=rngs)
        self.encoder = CLIPEncoder(config, dtype=dtype, rngs=rngs)
        self.final_layer_norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"CLIP text encoder: {input_ids.shape[1]} tokens exceed max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )
        return self.final_layer_norm(self.encoder(self.embeddings(input_ids)))


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str], max_length: int) -> np.ndarray:
    """(len(prompts), max_length) int32 ids: <|startoftext|> prompt <|endoftext|>, padded and truncated as SD does."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np"
    ).input_ids
    return ids.astype(np.int32)


def encode_prompts(model: CLIPTextModel, tokenizer: CLIPTokenizer, prompts: list[str]) -> jax.Array:
    """(len(prompts), max_position_embeddings, hidden) prompt embeddings, as SD's text conditioning."""
    ids = tokenize(tokenizer, prompts, model.config.max_position_embeddings)
    return model(jnp.asarray(ids))
