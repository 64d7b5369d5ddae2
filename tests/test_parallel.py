"""Parallelism: pure rules in this process; meshes, sharded training and multi-host runs in subprocesses.

The pytest process stays single-device, so runs on 8 simulated CPU devices
(`--xla_force_host_platform_device_count`) and the 2-process x 4-device run (coordinator on 127.0.0.1,
gloo collectives) use tests/parallel_worker.py in child processes that are always killed on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import portpicker
import pytest
from jax.sharding import PartitionSpec as P

from tadsr_jax import parallel

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("parallel_worker.py")
TIMEOUT_S = 60
# Relative float32 noise of a mean of per-image PSNR/SSIM (computed in float32) between compiles: measured up to
# 2.5e-7 (SSIM; PSNR 2.1e-8) between conftest.py's fast-compile flags and XLA's defaults, 0 between 1 and 2
# processes.
# An unweighted mean of the processes' means, or a padding row scored, moves the means by percents.
METRIC_NOISE = 3e-6


def _worker_env(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_COORDINATOR"))}
    env.update(
        JAX_PLATFORMS="cpu",
        TF_CPP_MIN_LOG_LEVEL="2",
        XLA_FLAGS=f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    return env


def _run_workers(arg_lists: list[list[str]], devices: int, log_dir: Path, timeout: float = TIMEOUT_S) -> None:
    """Run the workers concurrently; stop all of them as soon as one fails or the time is up."""
    procs: list[subprocess.Popen] = []
    with contextlib.ExitStack() as logs:
        try:
            for i, args in enumerate(arg_lists):
                log = logs.enter_context(open(log_dir / f"worker{i}.log", "w"))
                procs.append(
                    subprocess.Popen(
                        [sys.executable, str(WORKER), *args],
                        cwd=REPO,
                        env=_worker_env(devices),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
            deadline = time.monotonic() + timeout
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                if any(p.returncode not in (None, 0) for p in procs):
                    break
                for p in procs:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        p.wait(timeout=0.2)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
        report = "\n".join(
            f"--- worker {i} exit {rc}{' (killed: timeout or a sibling failed)' if rc < 0 else ''}"
            f" ---\n{(log_dir / f'worker{i}.log').read_text()[-3000:]}"
            for i, rc in failed
        )
        pytest.fail(f"parallel worker failed:\n{report}")


def _train(out_dir: Path, devices: int, *mesh_and_host_args: str) -> tuple[dict, dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    _run_workers([["train", str(out_dir / "run"), *mesh_and_host_args]], devices, out_dir)
    return dict(np.load(out_dir / "run.npz")), json.loads((out_dir / "run.json").read_text())


def _assert_same_training(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    assert sorted(got) == sorted(ref)
    for name, expected in ref.items():
        err = np.linalg.norm(got[name] - expected) / np.linalg.norm(expected)
        # sharded reductions sum in another order: measured up to 1.8e-7 (15 leaves, 8 devices and 2 processes)
        assert err < 5e-6, f"{name}: relative difference {err:.2e} to the 1-device run"


@pytest.fixture(scope="module")
def one_device(tmp_path_factory) -> tuple[dict, dict]:
    arrays, meta = _train(tmp_path_factory.mktemp("one_device"), 1)
    # The run really trained: LoRA B factors start at zero, the loss moves.
    assert np.abs(arrays["lora/fc1/lora/toy/b"]).max() > 0
    assert len(set(arrays["losses"].tolist())) == 3
    return arrays, meta


# ------------------------------------------------------------------------------------- pure rules, in-process


@pytest.mark.parametrize(
    "data, fsdp, devices, expected",
    [
        (-1, 1, 8, (8, 1)),
        (2, -1, 8, (2, 4)),
        (-1, 8, 8, (1, 8)),
        (4, 2, 8, (4, 2)),
        (-1, 1, 1, (1, 1)),
    ],
)
def test_mesh_shape(data, fsdp, devices, expected):
    assert parallel.mesh_shape(data, fsdp, devices) == expected


@pytest.mark.parametrize(
    "data, fsdp, devices, message",
    [
        (4, 4, 8, "data=4 x fsdp=4 = 16 devices, but there are 8 devices"),
        (3, -1, 8, "8 devices cannot be split into data=3 x fsdp=-1 (8 is not divisible by 3)"),
        (-1, -1, 8, "at most one axis size may be -1"),
        (0, 8, 8, "axis sizes must be positive or -1"),
    ],
)
def test_mesh_shape_errors(data, fsdp, devices, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parallel.mesh_shape(data, fsdp, devices)


@pytest.mark.parametrize(
    "shape, fsdp, expected",
    [
        ((64, 512), 4, P(None, "fsdp")),  # largest divisible dimension
        ((4096, 8), 4, P("fsdp")),  # ... wherever it is
        ((1001, 64), 4, P(None, "fsdp")),  # the largest dimension is not divisible: the next one
        ((512, 512), 4, P(None, "fsdp")),  # tie: the last one
        ((3, 3, 320, 640), 8, P(None, None, None, "fsdp")),  # conv kernel: output channels
        ((1001, 999), 4, P()),  # nothing divisible
        ((64, 127), 4, P()),  # below min_size
        ((), 4, P()),  # scalars (step counts)
        ((64, 512), 1, P()),  # no fsdp axis
    ],
)
def test_param_spec(shape, fsdp, expected):
    assert parallel.param_spec(shape, fsdp, min_size=8192) == expected


def test_param_spec_min_size_is_inclusive():
    assert parallel.param_spec((64, 128), 4, min_size=8192) == P(None, "fsdp")
    assert parallel.param_spec((64, 128), 4, min_size=8193) == P()


def test_process_rows():
    assert parallel.process_rows(16, num_processes=2, num_devices=8) == 8
    assert parallel.process_rows(4) == 4  # this process: 1 process, 1 device
    with pytest.raises(ValueError, match="global batch size 9 is not divisible by the 2 processes"):
        parallel.process_rows(9, num_processes=2, num_devices=2)
    with pytest.raises(ValueError, match="global batch size 12 is not divisible by the 8 devices"):
        parallel.process_rows(12, num_processes=2, num_devices=8)


@pytest.mark.parametrize(
    "flags, given",
    [
        ({"coordinator_address": "10.0.0.1:1234"}, "coordinator_address"),
        ({"num_processes": 2, "process_id": 0}, "num_processes, process_id"),
    ],
)
def test_initialize_needs_all_three_flags(flags, given):
    with pytest.raises(ValueError, match=f"together \\(got only {given}\\)"):
        parallel.initialize(**flags)


@pytest.mark.parametrize(
    "env, tpu_vm, flags, expected_call",
    [
        ({}, False, {}, None),  # a workstation: single process
        ({"SLURM_NTASKS": "4"}, False, {}, None),  # inside an sbatch script, not under srun
        ({"SLURM_NTASKS": "1", "SLURM_STEP_NODELIST": "n1"}, False, {}, None),  # srun with one task
        ({"SLURM_NTASKS": "4", "SLURM_STEP_NODELIST": "n[1-4]"}, False, {}, ()),  # srun: auto-detect
        ({}, True, {}, ()),  # Cloud TPU VM: auto-detect
        ({}, False, {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}, ("h:1", 2, 1)),
    ],
)
def test_initialize_dispatch(monkeypatch, env, tpu_vm, flags, expected_call):
    for name in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    calls = []
    monkeypatch.setattr(parallel, "_on_cloud_tpu_vm", lambda: tpu_vm)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args: calls.append(args))
    parallel.initialize(**flags)
    assert calls == ([] if expected_call is None else [expected_call])
    if calls:
        assert jax.config.jax_cpu_collectives_implementation == "gloo"


# --------------------------------------------------------------------------------- simulated devices


@pytest.mark.slow
def test_rules_on_8_devices(tmp_path):
    _run_workers([["unit", str(tmp_path / "unit.json")]], 8, tmp_path)
    got = json.loads((tmp_path / "unit.json").read_text())
    assert got["mesh_default"] == {"data": 8, "fsdp": 1}
    assert got["mesh_data2"] == {"data": 2, "fsdp": 4}
    assert got["mesh_fsdp8"] == {"data": 1, "fsdp": 8}
    assert got["mesh_axis_names"] == ["data", "fsdp"]
    assert got["err_indivisible"] == "mesh: 8 devices cannot be split into data=3 x fsdp=-1 (8 is not divisible by 3)"
    assert got["err_product"] == "mesh: data=4 x fsdp=4 = 16 devices, but there are 8 devices"
    assert got["specs_fsdp4"] == {
        "big": "P(None, 'fsdp')",
        "conv": "P(None, None, None, 'fsdp')",
        "count": "P()",
        "odd": "P()",
        "small": "P()",
        "square": "P(None, 'fsdp')",
    }
    assert set(got["specs_fsdp1"].values()) == {"P()"}
    assert (got["linear_kernel"], got["linear_bias"]) == ("P(None, 'fsdp')", "P()")  # nnx.State in, State out
    assert got["replicated"] == "P()"
    assert got["batch_spec"] == "P(('data', 'fsdp'),)"
    assert got["batch_keys"] == ["x"]  # the string entry is dropped
    assert got["batch_shard_shapes"] == [[2, 3]] and got["batch_equal"]
    assert got["row_slice"] == [0, 16]
    assert got["err_batch_rows"].startswith("global batch size 12 is not divisible by the 8 devices")
    assert got["err_batch_scalar"] == "batch entry 'x' is a scalar; every entry needs a leading batch axis"


@pytest.mark.slow
def test_train_step_on_8_devices_matches_1_device(tmp_path, one_device):
    ref, ref_meta = one_device
    assert ref_meta["frozen_kernel_spec"] == "P()" and ref_meta["device_count"] == 1
    got, meta = _train(tmp_path, 8, "--data=2", "--fsdp=4")
    assert meta["mesh"] == {"data": 2, "fsdp": 4}
    assert meta["frozen_kernel_spec"] == "P(None, 'fsdp')"
    assert meta["frozen_kernel_shard_shapes"] == [[64, 128]]  # (64, 512) split 4 ways
    assert meta["frozen_fc2_spec"] == "P()"  # below min_size
    assert meta["trainable_specs"] == ["P()"]
    assert meta["batch_shard_shapes"] == [[2, 64]] and meta["batch_keys"] == ["x", "y"]
    assert meta["donated"] == [True, True, True]
    _assert_same_training(got, ref)


@pytest.mark.slow
def test_two_processes_match_1_device(tmp_path, one_device):
    ref, _ = one_device
    address = f"127.0.0.1:{portpicker.pick_unused_port()}"
    host_args = ["--data=1", "--fsdp=8", f"--coordinator={address}", "--num_processes=2"]
    _run_workers([["train", str(tmp_path / f"run{i}"), *host_args, f"--process_id={i}"] for i in range(2)], 4, tmp_path)
    for i in range(2):
        meta = json.loads((tmp_path / f"run{i}.json").read_text())
        assert (meta["process_index"], meta["process_count"]) == (i, 2)
        assert (meta["device_count"], meta["local_device_count"]) == (8, 4)
        assert meta["rows"] == [8 * i, 8 * i + 8]  # each process fed only its own half
        assert meta["frozen_kernel_spec"] == "P(None, 'fsdp')"
        assert meta["frozen_kernel_shard_shapes"] == [[64, 64]]  # split over both hosts
        assert meta["batch_shard_shapes"] == [[2, 64]]
        _assert_same_training(dict(np.load(tmp_path / f"run{i}.npz")), ref)


@pytest.mark.slow
def test_validation_over_two_processes_equals_one(tmp_path):
    """tadsr_jax/train/validation.py on 3 images in global batches of 2 (the last one padded): process 0 scores
    images 0 and 2, process 1 image 1 and a blank row; the means, weighted by those counts, equal one process's."""
    from tadsr_jax import evaluation
    from tadsr_jax.data.samples import HELD_OUT_SAMPLES, write_sample_images

    images = tmp_path / "held_out"
    write_sample_images(str(images), HELD_OUT_SAMPLES, size=48)
    common = ["validate", f"--images={images}"]
    _run_workers([[*common[:1], str(tmp_path / "one"), *common[1:]]], 2, tmp_path, timeout=300)
    address = f"127.0.0.1:{portpicker.pick_unused_port()}"
    _run_workers(
        [
            [
                common[0],
                str(tmp_path / f"two{i}"),
                *common[1:],
                f"--coordinator={address}",
                "--num_processes=2",
                f"--process_id={i}",
            ]
            for i in range(2)
        ],
        1,
        tmp_path,
        timeout=300,
    )
    one = json.loads((tmp_path / "one.json").read_text())
    one_rows = np.load(tmp_path / "one.npz")
    assert one["images"] == 3 and one["compiled_samplers"] == 1

    # One process: the means are those of evaluation.Scorer over the 3 real rows (the padding row is left out).
    mask = one_rows["mask"]
    assert mask.tolist() == [[True, True], [True, False]]
    scorer = evaluation.Scorer(["psnr", "ssim"])  # in this process: compiled apart from the workers' program
    hq = one_rows["hq"][mask].astype(np.float32) / 255
    for t, means in one["means"].items():
        scores = scorer(one_rows[f"sr_t{t}"][mask].astype(np.float32) / 255, hq)
        for name, values in scores.items():
            assert abs(means[name] - np.mean(values)) <= METRIC_NOISE * abs(np.mean(values)), (t, name)

    differences = []
    for i in range(2):
        two = json.loads((tmp_path / f"two{i}.json").read_text())
        rows = np.load(tmp_path / f"two{i}.npz")
        assert (two["images"], two["local_images"]) == (3, 2 - i)
        assert two["compiled_samplers"] == 1
        # Each process loaded (same LQ: seeded per image) and super-resolved its own rows of every global batch.
        for key in ("hq", "mask", *(f"sr_t{t}" for t in one["means"])):
            np.testing.assert_array_equal(rows[key][:, 0], one_rows[key][:, i], err_msg=key)
        for t, means in one["means"].items():
            for name, value in means.items():
                got = two["means"][t][name]
                differences.append(abs(got - value) / abs(value))
                # measured 0: the same per-image scores, summed per process and then over the processes
                assert abs(got - value) <= METRIC_NOISE * abs(value), (i, t, name, got, value)
        # float64 sums travel exactly: 1 + (1 + 2^-40) is not 2 in float64, but would be after float32
        assert two["process_sum"] == [2.0 + 2.0**-40, 4.0]
    print("2 processes vs 1, largest relative difference of a mean:", max(differences))
