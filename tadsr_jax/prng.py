"""Random sampling with the values of `jax.random`, compiled quickly on every backend.

XLA:CPU takes seconds to compile JAX's (default, partitionable) threefry sampler for arrays of rank >= 3,
against ~0.3 s for rank <= 2, and the values only depend on the flat index. So we sample a
(leading axis, rest) matrix and reshape: identical numbers, the leading (batch) axis kept for sharding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp


def _matrix_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(shape)
    return shape if len(shape) <= 2 else (shape[0], math.prod(shape[1:]))


def normal(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    return jax.random.normal(key, _matrix_shape(shape), dtype).reshape(shape)


def uniform(key: jax.Array, shape: Sequence[int], dtype=jnp.float32, minval: float = 0.0,
            maxval: float = 1.0) -> jax.Array:
    return jax.random.uniform(key, _matrix_shape(shape), dtype, minval, maxval).reshape(shape)
