"""Random sampling with the values of `jax.random`, compiled quickly on every backend, and drawn row by row when
given one key per row.

XLA:CPU takes seconds to compile JAX's (default, partitionable) threefry sampler for arrays of rank >= 3,
against ~0.3 s for rank <= 2, and the values only depend on the flat index. So inside a traced program we sample a
(leading axis, rest) matrix and reshape: identical numbers, the leading (batch) axis kept for sharding. Outside
one (initialising a model's weights), every new shape would compile a sampler of its own (a tiny UNet and VAE: 72
samplers, 5.4 s of its 7.2 s build); there we draw the next power of two of the size as a vector and keep the
first values, the same numbers again, so that all sizes up to 2^k share k + 1 compiled samplers.

Every function also takes a (B,) array of keys, one per row of the leading axis: each row is then drawn from its
own key alone, so a row's numbers do not depend on which other rows share its batch. The train step draws this
way, which makes a batch computed as micro-batches (gradient accumulation) see the same noise as in one piece.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp


def _matrix_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(shape)
    return shape if len(shape) <= 2 else (shape[0], math.prod(shape[1:]))


def _per_row(key: jax.Array) -> bool:
    """A (B,) array of typed keys (jax.random.key / split), one per row."""
    return jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.ndim == 1


def _draw(sample: Callable[[jax.Array, tuple[int, ...]], jax.Array], key: jax.Array, shape: Sequence[int]) -> jax.Array:
    """`sample(key, shape)`, or with one key per row, each row's flattened values from its own key."""
    shape = tuple(shape)
    if _per_row(key):
        return jax.vmap(lambda k: sample(k, (math.prod(shape[1:]),)))(key).reshape(shape)
    if isinstance(key, jax.core.Tracer) or not jax.config.jax_threefry_partitionable:
        return sample(key, _matrix_shape(shape)).reshape(shape)
    size = math.prod(shape)
    return sample(key, (1 << max(size - 1, 0).bit_length(),))[:size].reshape(shape)


def normal(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    return _draw(lambda k, s: jax.random.normal(k, s, dtype), key, shape)


def uniform(
    key: jax.Array, shape: Sequence[int], dtype=jnp.float32, minval: float = 0.0, maxval: float = 1.0
) -> jax.Array:
    return _draw(lambda k, s: jax.random.uniform(k, s, dtype, minval, maxval), key, shape)


def randint(key: jax.Array, shape: Sequence[int], minval: int, maxval: int) -> jax.Array:
    return _draw(lambda k, s: jax.random.randint(k, s, minval, maxval), key, shape)


def split(key: jax.Array, num: int = 2) -> jax.Array:
    """`jax.random.split(key, num)`; of one key per row, `num` arrays of one key per row."""
    if _per_row(key):
        return jax.vmap(lambda k: jax.random.split(k, num), out_axes=1)(key)
    return jax.random.split(key, num)
