"""TADSR in JAX/Flax NNX: time-aware one-step diffusion x4 super-resolution."""

__version__ = "0.1.0"
