"""Ahead-of-time compilation for a multi-host TPU slice with no TPU attached (libtpu from the `tpu` extra)."""

import jax
import pytest
from flax import nnx

from configs.tiny import get_config
from tadsr_jax import parallel
from tadsr_jax.train import aot
from tadsr_jax.train.step import split_model

TOPOLOGY = "v5e:2x4"  # 8 chips on 2 hosts


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
    report = aot.step_report(step, aot.CHIPS[devices[0].device_kind])
    assert report["fits"] and 0 < report["total_gib"] < report["hbm_gib"]
    assert report["temporaries_gib"] > 0 and report["arguments_gib"] > 0
    assert report["model_tflop_per_step"] > 0 and report["xla_tflop_per_chip"] > 0
    assert report["step_time_s"] > 0 and 0 < report["mfu"] < 1
    # Data parallelism needs the gradients summed across chips.
    assert report["collectives"]["all-reduce"]["count"] >= 1


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
