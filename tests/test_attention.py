"""XLA:CPU's blockwise attention against `jax.nn.dot_product_attention`, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tadsr_jax.nn.attention import attention, blockwise_attention


def _qkv(t: int, s: int, heads: int, dim: int, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((2, n, heads, dim)) * 2, dtype) for n in (t, s, s))


@pytest.mark.parametrize("t, s, block", [(300, 300, 128), (100, 77, 256), (512, 40, 128), (7, 900, 4)])
def test_blockwise_equals_dot_product_attention(t, s, block):
    """One block, several, and a padded last block (300 = 2 x 128 + 44 queries)."""
    q, k, v = _qkv(t, s, 3, 16, jnp.float32)
    ours = blockwise_attention(q, k, v, block)
    ref = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    # The online softmax rescales partial sums in another order: measured |ours - ref| up to 7e-6 on outputs of size
    # ~6, i.e. half of rtol=2e-5, atol=2e-6 (2 seeds); these bounds are 10x those. A dropped rescale errs by O(1).
    np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=2e-5)


def test_blockwise_gradients_equal_dot_product_attention():
    """Training differentiates through the block loop."""
    q, k, v = _qkv(300, 200, 2, 8, jnp.float32, seed=1)
    weights = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * weights)

    ours = jax.grad(loss(lambda q, k, v: blockwise_attention(q, k, v, 128)), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v)), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, ref):
        # measured up to 0.37 of rtol=1e-4, atol=1e-5 (2 seeds); these bounds are 10x those
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_blockwise_bf16_within_rounding_of_dot_product_attention():
    q, k, v = _qkv(600, 600, 2, 32, jnp.bfloat16)
    ours = blockwise_attention(q, k, v).astype(jnp.float32)
    ref = jax.nn.dot_product_attention(q, k, v).astype(jnp.float32)
    exact = jax.nn.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)))
    assert ours.dtype == ref.dtype
    # no further from the float32 result than dot_product_attention's own bf16 run, give or take rounding
    assert float(jnp.abs(ours - exact).max()) <= 2 * float(jnp.abs(ref - exact).max())


def test_attention_routes_causal_masks_to_dot_product_attention():
    """The CLIP text encoder's causal attention keeps the library path; the result is causal."""
    q, k, v = _qkv(10, 10, 2, 4, jnp.float32)
    flat = lambda x: x.reshape(2, 10, 8)
    out = attention(flat(q), flat(k), flat(v), 2, is_causal=True)
    changed = v.at[:, 5:].add(1.0)  # later keys' values do not reach earlier queries
    out2 = attention(flat(q), flat(k), flat(changed), 2, is_causal=True)
    np.testing.assert_array_equal(out[:, :5], out2[:, :5])
    assert not np.allclose(out[:, 5:], out2[:, 5:])
