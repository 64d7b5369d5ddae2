"""tadsr_jax/prng.py draws jax.random's very numbers, whichever way it compiles them."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tadsr_jax import prng

SHAPES = [(), (5,), (16, 16), (2, 3, 5), (0, 4)]  # sizes 1, odd, a power of two, rank 3, empty


def _bits(x: jax.Array) -> np.ndarray:
    x = np.asarray(x)
    return x.view(np.uint16) if x.dtype == jnp.bfloat16 else x


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("traced", [False, True], ids=["eager", "jitted"])
def test_draws_equal_jax_random_bit_for_bit(shape, traced):
    key = jax.random.key(3)
    draws = {
        "normal": (lambda k: prng.normal(k, shape), lambda k: jax.random.normal(k, shape)),
        "normal bf16": (
            lambda k: prng.normal(k, shape, jnp.bfloat16),
            lambda k: jax.random.normal(k, shape, jnp.bfloat16),
        ),
        "uniform": (
            lambda k: prng.uniform(k, shape, minval=-0.3, maxval=0.7),
            lambda k: jax.random.uniform(k, shape, minval=-0.3, maxval=0.7),
        ),
        "randint": (lambda k: prng.randint(k, shape, 2, 999), lambda k: jax.random.randint(k, shape, 2, 999)),
    }
    for name, (ours, theirs) in draws.items():
        # In one context or the other both: jitted, XLA folds uniform's constant bounds (1 ulp from the eager draw).
        got, want = (jax.jit(ours)(key), jax.jit(theirs)(key)) if traced else (ours(key), theirs(key))
        assert got.shape == want.shape and got.dtype == want.dtype, name
        np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=name)


def test_per_row_keys_draw_each_row_from_its_own_key():
    keys = jax.random.split(jax.random.key(5), 3)
    got = prng.normal(keys, (3, 4, 2))
    for row, key in enumerate(keys):
        np.testing.assert_array_equal(np.asarray(got[row]), np.asarray(jax.random.normal(key, (8,)).reshape(4, 2)))


def test_eager_draws_of_many_sizes_share_a_few_samplers(caplog):
    """Sizes 1..32 outside a trace compile one sampler per power of two (6), not one per shape (float16: a dtype
    nothing else here draws, so none is cached yet)."""
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        for size in range(1, 33):
            prng.normal(jax.random.key(size), (size, 1), jnp.float16)
    compiled = [r for r in caplog.records if "Compiling jit(_normal)" in r.getMessage()]
    assert len(compiled) == 6, [r.getMessage()[:120] for r in compiled]
