"""Shared NNX building blocks (NHWC, PyTorch-compatible parameter names)."""

from tadsr_jax.nn import lora
from tadsr_jax.nn.attention import Attention, attention
from tadsr_jax.nn.embeddings import TimestepEmbedding, batch_timesteps, timestep_sinusoid
from tadsr_jax.nn.layers import Conv2d, Embedding, GroupNorm, LayerNorm, Linear, conv2d
from tadsr_jax.nn.resnet import Downsample2D, ResnetBlock2D, Upsample2D, nearest_resize
from tadsr_jax.nn.transformer import BasicTransformerBlock, FeedForward, Transformer2DModel

__all__ = [
    "Attention",
    "BasicTransformerBlock",
    "Conv2d",
    "Downsample2D",
    "Embedding",
    "FeedForward",
    "GroupNorm",
    "LayerNorm",
    "Linear",
    "ResnetBlock2D",
    "TimestepEmbedding",
    "Transformer2DModel",
    "Upsample2D",
    "attention",
    "batch_timesteps",
    "conv2d",
    "lora",
    "nearest_resize",
    "timestep_sinusoid",
]
