"""The attention kernels (XLA:CPU blockwise, Pallas TPU flash) against `jax.nn.dot_product_attention`, values and
gradients, and which kernel each platform gets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.tiny import get_config
from tadsr_jax.flops import matmul_flops
from tadsr_jax.models.unet import UNet2DConditionModel, UNetConfig
from tadsr_jax.nn.attention import (
    Attention,
    attention,
    blockwise_attention,
    flash_attention,
    resolve,
    set_implementation,
)


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


def _float64_reference(q, k, v, weights):
    """Outputs and gradients of sum(attention * weights) in float64, the reference for float32 kernels."""
    with jax.enable_x64():
        q, k, v, weights = (jnp.asarray(np.asarray(x), jnp.float64) for x in (q, k, v, weights))
        fn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla")
        grads = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * weights), argnums=(0, 1, 2))(q, k, v)
        return np.asarray(fn(q, k, v)), [np.asarray(g) for g in grads]


def test_flash_kernel_equals_float64_attention():
    """The Pallas TPU flash kernel (run by Pallas' TPU interpreter on CPU), values and gradients.

    Noise measured (2 seeds, entries up to 7 / gradients up to 26): float32 XLA attention vs float64 up to 1.0e-5 on
    outputs and 2.5e-5 on gradients; the kernel vs float64 up to 1.1e-5 and 3.3e-5. Bounds: 10x those.
    """
    from jax.experimental.pallas import tpu as pltpu

    q, k, v = _qkv(256, 256, 2, 64, jnp.float32)
    weights = jnp.asarray(np.random.default_rng(3).standard_normal(q.shape), jnp.float32)
    with pltpu.force_tpu_interpret_mode():
        out = flash_attention(q, k, v)
        grads = jax.grad(lambda q, k, v: jnp.sum(flash_attention(q, k, v) * weights), argnums=(0, 1, 2))(q, k, v)
    ref_out, ref_grads = _float64_reference(q, k, v, weights)
    np.testing.assert_allclose(out, ref_out, atol=1e-4)
    for ours, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(ours, ref, atol=3e-4)


def test_flash_takes_whole_blocks_and_leaves_the_rest_to_xla():
    """4096-token self-attention goes through the kernel; SD's 77-token text context cannot and uses XLA's."""
    flat = lambda x: x.reshape(x.shape[0], x.shape[1], -1)

    def primitives(t, s):
        q, k, v = _qkv(t, s, 2, 64, jnp.bfloat16)
        jaxpr = jax.make_jaxpr(lambda q, k, v: attention(q, k, v, 2, implementation="flash"))(flat(q), flat(k), flat(v))
        return str(jaxpr)

    assert "pallas_call" in primitives(256, 256)
    assert "pallas_call" not in primitives(256, 77)
    q, k, v = _qkv(256, 77, 2, 64, jnp.float32)
    np.testing.assert_array_equal(
        attention(flat(q), flat(k), flat(v), 2, implementation="flash"),
        attention(flat(q), flat(k), flat(v), 2, implementation="xla"),
    )


@pytest.mark.parametrize(
    "platform, dtype, expected",
    [
        ("cpu", jnp.float32, "blockwise"),
        ("tpu", jnp.bfloat16, "flash"),
        ("tpu", jnp.float32, "flash"),
        ("gpu", jnp.bfloat16, "cudnn"),
        ("gpu", jnp.float32, "xla"),
    ],
)
def test_auto_picks_the_platforms_kernel(platform, dtype, expected):
    assert resolve("auto", platform, dtype) == expected
    assert resolve("xla", platform, dtype) == "xla"


def test_unknown_implementation_is_refused():
    with pytest.raises(ValueError, match="unknown attention implementation 'flsh'"):
        resolve("flsh")


def test_set_implementation_reaches_every_attention_layer():
    unet = UNet2DConditionModel(UNetConfig.from_dict(get_config().model.unet.to_dict()), rngs=nnx.Rngs(0))
    set_implementation(unet, "auto", platform="tpu")
    layers = [node for _, node in nnx.iter_graph(unet) if isinstance(node, Attention)]
    assert layers and {layer.implementation for layer in layers} == {"flash"}


def test_flops_of_the_flash_kernel_are_counted_in_full():
    """MFU's numerator counts a Pallas kernel's body once per grid point: 2 matmuls of 2*T*S*D per head."""
    q = jnp.ones((2, 256, 3, 64), jnp.float32)
    assert matmul_flops(jax.make_jaxpr(flash_attention)(q, q, q)) == 2 * 2 * 3 * (2 * 256 * 256 * 64)
