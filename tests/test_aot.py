"""Ahead-of-time compilation for a multi-host TPU slice with no TPU attached (libtpu from the `tpu` extra)."""

import os

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs.tiny import get_config
from tadsr_jax import parallel
from tadsr_jax.flops import matmul_flops
from tadsr_jax.nn import ResnetBlock2D
from tadsr_jax.nn.attention import Attention, set_implementation
from tadsr_jax.train import aot
from tadsr_jax.train.step import split_model

pytestmark = pytest.mark.slow  # compiles for a TPU slice

TOPOLOGY = "v5e:2x4"  # 8 chips on 2 hosts


@pytest.fixture(scope="module", autouse=True)
def _quick_tpu_compiles():
    """These tests check what compiles and where it lives, not how fast it would run: XLA's least effort on
    execution time halves libtpu's compiles (this module alone on 2 cores: 110 s -> 65 s; the tiny train step 58 s
    -> 32 s, its temporaries 67 -> 76 MiB; the SR program 26 s -> 13 s). XLA:CPU ignores the setting (the CPU
    train step compiled in 20 s either way)."""
    previous = jax.config.jax_exec_time_optimization_effort
    jax.config.update("jax_exec_time_optimization_effort", -1.0)
    yield
    jax.config.update("jax_exec_time_optimization_effort", previous)


@pytest.fixture(scope="module")
def compiled():
    config = get_config()
    config.train.batch_size = 8
    config.mesh.data, config.mesh.fsdp = 4, 2
    config.mesh.fsdp_min_size = 4096  # the tiny UNet's larger kernels are sharded, as SD's are at the default
    devices = aot.topology_devices(TOPOLOGY)
    return config, devices, aot.compile_train_step(config, devices)


def test_topology_is_a_multi_host_slice(compiled):
    _, devices, step = compiled
    assert (step.num_devices, step.num_hosts) == (8, 2)
    assert {d.device_kind for d in devices} == {"TPU v5 lite"}
    assert step.mesh_shape == {"data": 4, "fsdp": 2}


def test_tiny_step_fits_and_reports(compiled):
    _, devices, step = compiled
    report = aot.report(step, aot.CHIPS[devices[0].device_kind])
    assert report["fits"] and 0 < report["total_gib"] < report["hbm_gib"]
    assert report["temporaries_gib"] > 0 and report["arguments_gib"] > 0
    assert 0 < report["model_tflop"] <= report["executed_tflop"] and report["xla_tflop_per_chip"] > 0
    assert report["time_s"] > 0 and 0 < report["mfu"] < 1
    # Data parallelism needs the gradients summed across chips.
    assert report["collectives"]["all-reduce"]["count"] >= 1


def test_estimated_cycles_say_what_the_step_spends_them_on(compiled):
    """XLA's per-instruction estimates, summed by kind, shape and source line (launch/compile.py --cycles)."""
    _, _, step = compiled
    items = aot.estimated_cycles(step.compiled.as_text())
    assert len(items) > 10 and sum(i["share"] for i in items) == pytest.approx(1.0)
    assert [i["cycles"] for i in items] == sorted((i["cycles"] for i in items), reverse=True)
    convolutions = [i for i in items if i["kind"] == "convolution"]
    assert convolutions and any(i["source"].startswith("layers.py:") for i in convolutions)
    assert all(i["shape"] == "tuple" or "[" in i["shape"] for i in items)
    # a CPU program carries no such estimates
    cpu = jax.jit(lambda x: x @ x).lower(jnp.ones((4, 4))).compile()
    assert aot.estimated_cycles(cpu.as_text()) == []


def test_frozen_weights_are_sharded_as_the_rules_say(compiled):
    config, _, step = compiled
    model, _ = aot.abstract_model(config)
    _, _, _, frozen, _ = split_model(model)
    frozen_shardings = step.compiled.input_shardings[0][1]
    leaves = jax.tree.leaves(frozen)
    shardings = jax.tree.leaves(frozen_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    assert len(leaves) == len(shardings)
    sharded = 0
    for leaf, sharding in zip(leaves, shardings):
        expected = parallel.param_spec(leaf.shape, 2, config.mesh.fsdp_min_size)
        assert sharding.spec == expected, (leaf.shape, sharding.spec, expected)
        sharded += "fsdp" in expected
    assert sharded > 10  # the rule really splits something here
    assert not any(isinstance(leaf, nnx.Variable) for leaf in leaves)


def test_sr_program_compiles_for_one_chip():
    """launch/sr.py's program, bf16, on one chip of the slice: model FLOPs as the jaxpr counts them."""
    config = get_config()
    config.sr.batch_size, config.sr.dtype = 2, "bfloat16"
    device = aot.topology_devices(TOPOLOGY)[0]
    program = aot.compile_sr(config, device, size=64)  # 64x64 compiles in 2/3 of the time of 128x128
    report = aot.report(program, aot.CHIPS[device.device_kind])
    assert report["fits"] and report["chips"] == 1 and report["images_per_chip"] == 2
    assert report["model_tflop"] > 0 and report["ms_per_image"] > 0


def test_flash_attention_is_partitioned_over_a_multi_host_mesh():
    """XLA cannot partition a Pallas kernel: under the step's mesh it runs per device through shard_map (without
    `parallel.under_mesh` this compile fails with "Mosaic kernels cannot be automatically partitioned")."""
    devices = aot.topology_devices(TOPOLOGY)
    mesh = parallel.make_mesh(4, 2, devices)
    layer = nnx.eval_shape(lambda: Attention(128, heads=2, dim_head=64, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    set_implementation(layer, "auto", platform=devices[0].platform)
    graphdef, params = nnx.split(layer)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.replicated(mesh)), params)
    tokens = jax.ShapeDtypeStruct((8, 256, 128), jnp.bfloat16, sharding=parallel.batch_sharding(mesh))

    def loss(params, x):
        return nnx.merge(graphdef, params)(x).astype(jnp.float32).sum()

    step = jax.jit(parallel.under_mesh(mesh, jax.grad(loss, argnums=(0, 1))))
    assert "tpu_custom_call" in step.lower(params, tokens).compile().as_text()  # the Pallas kernel
    # Its FLOPs are counted on all 8 devices' shards: the forward's two matmuls at least, 2 * 2*T*S*D per head.
    assert matmul_flops(step.trace(params, tokens)) >= 8 * 2 * (2 * 2 * 256 * 256 * 64)


def test_fsdp_split_kernels_are_gathered_where_they_are_used():
    """Two SD-size ResNet blocks (512 channels, 32x32 maps), the batch and their 3x3 kernels split 8 ways (data 1 x
    fsdp 8): the backward pass all-gathers the kernels and keeps the maps split by batch. Without
    `layers.gathered`, XLA rotated kernel shards between the chips instead (36 collective-permutes), and for the
    same blocks at 256x256 and 64 images needed 5.5 GiB of temporaries per chip against 2.5."""
    devices = aot.topology_devices(TOPOLOGY)
    mesh = parallel.make_mesh(1, 8, devices)
    blocks = nnx.eval_shape(
        lambda: [ResnetBlock2D(512, 512, groups=32, eps=1e-6, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)) for _ in range(2)]
    )
    graphdef, params = nnx.split(blocks)
    shardings = parallel.shard_params(params, mesh, min_size=2**20)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)
    maps = jax.ShapeDtypeStruct((8, 32, 32, 512), jnp.bfloat16, sharding=parallel.batch_sharding(mesh))

    def loss(params, x):
        for block in nnx.merge(graphdef, params):
            x = block(x)
        return x.astype(jnp.float32).sum()

    grad = jax.jit(parallel.under_mesh(mesh, jax.grad(loss, argnums=1)))
    assert set(aot.collectives(grad.lower(params, maps).compile().as_text())) == {"all-gather"}


# A ResNet block's forward pass on one v5e chip (bf16, 8 x 128x128x256), for which XLA slices a weight prefetch
# (at its default optimisation effort; this module's quick compiles do not).
_BLOCK_ESTIMATE = """
import jax, jax.numpy as jnp
from flax import nnx
from tadsr_jax.nn import ResnetBlock2D
from tadsr_jax.train import aot
on_chip = jax.sharding.SingleDeviceSharding(aot.topology_devices("v5e:2x2")[0])
block = nnx.eval_shape(lambda: ResnetBlock2D(256, 256, groups=32, eps=1e-6, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
graphdef, params = nnx.split(block)
params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=on_chip), params)
x = jax.ShapeDtypeStruct((8, 128, 128, 256), jnp.bfloat16, sharding=on_chip)
compiled = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)).lower(params, x).compile()
cost = compiled.cost_analysis()
print(*aot.xla_time_estimate(cost[0] if isinstance(cost, list) else cost, compiled.as_text()))
"""


def test_xla_time_estimate_adds_back_its_placeholder_prices():
    """XLA prices each ConcatBitcast (a weight prefetched in slices, reassembled) at -1 s: the block's raw
    estimate is negative, and with the placeholders added back it is the estimate of the same block compiled
    with sliced prefetch off (measured 2.034 against 2.036 ms). Compiled in subprocesses: libtpu reads its
    options once per process, and the persistent compilation cache would not see them."""
    import subprocess
    import sys

    def estimate(libtpu_args: str) -> list[float]:
        env = {**os.environ, "LIBTPU_INIT_ARGS": libtpu_args, "JAX_ENABLE_COMPILATION_CACHE": "false"}
        run = subprocess.run(
            [sys.executable, "-c", _BLOCK_ESTIMATE], env=env, capture_output=True, text=True, timeout=600, check=True
        )
        return [float(v) for v in run.stdout.split()]

    corrected, raw, placeholders = estimate("")
    unsliced, unsliced_raw, none = estimate("--xla_tpu_sliced_prefetch_max_slices=0")
    assert raw < 0 and placeholders >= 1 and none == 0 and unsliced == unsliced_raw > 0
    assert abs(corrected / unsliced - 1) < 0.05


def test_a_program_too_large_for_the_chip_is_refused_in_one_line():
    """XLA's out-of-memory refusal becomes DoesNotFit with its one line (launch/compile.py reports it and goes
    on); here a program whose sort needs two 24 GiB buffers on a 16 GiB v5e chip."""
    on_chip = jax.sharding.SingleDeviceSharding(aot.topology_devices(TOPOLOGY)[0])
    x = jax.ShapeDtypeStruct((80_000,), jnp.float32, sharding=on_chip)
    traced = jax.jit(lambda x: jnp.sort(x[:, None] * x[None, :], axis=0)[:1]).trace(x)
    with pytest.raises(aot.DoesNotFit, match=r"^RESOURCE_EXHAUSTED: .*exceeds available HBM \(15\.75G\)\.$"):
        aot.compile_for_chip(traced)
