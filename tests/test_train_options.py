"""Training options of issue 18, in-process on the tiny model: learning-rate schedules against diffusers'
`get_scheduler` (the reference's), gradient accumulation against one large batch, and fine-tuning from a trained
generator against the inference pipeline on the same weights."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest

from configs import tadsr_sd21
from tadsr_jax.train.step import LR_SCHEDULES, learning_rate

# ------------------------------------------------------------------------------------------------ schedules

STEPS, WARMUP, LR = 120, 10, 5e-5


def _train_config(**changes) -> ml_collections.ConfigDict:
    config = tadsr_sd21.get_config().train
    config.update(steps=STEPS, lr=LR, **changes)
    return config


def _diffusers_lrs(kind: str, config: ml_collections.ConfigDict, lr_end: float | None = None) -> np.ndarray:
    """The learning rate of updates 0..steps-1 as the reference gets it: diffusers' get_scheduler on a torch AdamW
    with the reference's arguments, stepped once per update (polynomial with another lr_end: the schedule
    function itself, since get_scheduler does not pass lr_end)."""
    import torch
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup, get_scheduler

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    if lr_end is None:
        scheduler = get_scheduler(
            kind,
            optimizer=optimizer,
            num_warmup_steps=config.warmup_steps,
            num_training_steps=config.steps,
            num_cycles=config.lr_num_cycles,
            power=config.lr_power,
        )
    else:
        scheduler = get_polynomial_decay_schedule_with_warmup(
            optimizer, config.warmup_steps, config.steps, lr_end=lr_end, power=config.lr_power
        )
    lrs = []
    for _ in range(config.steps):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return np.array(lrs)


CASES = [  # (kind, config changes, lr_end for the direct polynomial reference)
    ("constant", {}, None),
    ("constant_with_warmup", {"warmup_steps": WARMUP}, None),
    ("linear", {"warmup_steps": WARMUP}, None),
    ("linear", {}, None),
    ("cosine", {"warmup_steps": WARMUP}, None),
    ("cosine_with_restarts", {"warmup_steps": WARMUP, "lr_num_cycles": 3}, None),  # cycles of 36.67 updates
    ("cosine_with_restarts", {"lr_num_cycles": 1}, None),
    ("polynomial", {"warmup_steps": WARMUP, "lr_power": 2.0}, None),  # lr_end 1e-7, get_scheduler's
    ("polynomial", {"warmup_steps": WARMUP, "lr_power": 0.5, "lr_end": 1e-5}, 1e-5),
]


@pytest.mark.parametrize("kind, changes, lr_end", CASES)
def test_lr_schedule_matches_diffusers_get_scheduler(kind, changes, lr_end):
    config = _train_config(lr_schedule=kind, **changes)
    ours = np.asarray(learning_rate(config)(np.arange(STEPS)), np.float64)
    ref = _diffusers_lrs(kind, config, lr_end)
    err = float(np.max(np.abs(ours - ref)) / LR)
    print(f"\n{kind} {changes}: max |ours - diffusers| / lr = {err:.1e}")
    # float32 schedule arithmetic against diffusers' float64: measured at most 2.4e-7 of lr over these cases (the
    # restarts); a warmup one update longer moves the lr by >= 1/110 of lr, a wrong formula by far more.
    assert err <= 2.5e-6
    assert (len(np.unique(ref)) == 1) == (kind == "constant")  # the comparison covers a real schedule


def test_every_get_scheduler_kind_is_covered():
    from diffusers.optimization import SchedulerType

    assert set(LR_SCHEDULES) == {k.value for k in SchedulerType} - {"piecewise_constant"}
    assert set(LR_SCHEDULES) == {kind for kind, _, _ in CASES}


@pytest.mark.parametrize(
    "changes, line",
    [
        (
            {"lr_schedule": "cosine_annealing"},
            "train.lr_schedule: unknown schedule 'cosine_annealing' (known: constant, constant_with_warmup, linear, "
            "cosine, cosine_with_restarts, polynomial)",
        ),
        (
            {"lr_schedule": "constant", "warmup_steps": 500},
            "train.warmup_steps=500 does nothing with train.lr_schedule='constant' (as in diffusers' get_scheduler): "
            "use 'constant_with_warmup', or warmup_steps=0",
        ),
        (
            {"lr_schedule": "linear", "warmup_steps": STEPS},
            f"train.warmup_steps must be in 0..{STEPS - 1} (train.steps - 1), got {STEPS}",
        ),
        ({"lr_schedule": "polynomial", "lr_end": LR}, "train.lr_end (5e-05) must be below train.lr (5e-05)"),
        ({"lr_schedule": "cosine_with_restarts", "lr_num_cycles": 0}, "train.lr_num_cycles must be at least 1, got 0"),
    ],
)
def test_bad_lr_schedule_is_one_line_naming_the_key(changes, line):
    with pytest.raises(ValueError) as error:
        learning_rate(_train_config(**changes))
    assert str(error.value) == line


# ------------------------------------------------------------------------------------------------ the tiny model

CROP = 16  # the smallest image timestep_blur takes: fast compiles


def _tiny_config(tiny_sd: str, **train) -> ml_collections.ConfigDict:
    """configs/tiny.py on `tiny_sd`, TA-VSD on (so the generator's gradients depend on the fake score), LPIPS off."""
    from configs.tiny import get_config

    config = get_config()
    config.model.pretrained = tiny_sd
    config.loss.update(vsd=1.0, lpips=0.0)
    config.data.crop_size = CROP
    config.train.update(**train)
    return config


def _batch(trainer, seed: int, size: int) -> dict:
    """A global batch of random LQ/HQ crops and differing prompts, on the trainer's devices."""
    from tadsr_jax import parallel

    rng = np.random.default_rng(seed)
    prompts = ["", "a photo of a cat", "coffee", "grass, sky"] * (size // 4 + 1)
    host = {
        "lq": rng.uniform(-1, 1, (size, CROP, CROP, 3)).astype(np.float32),
        "hq": rng.uniform(-1, 1, (size, CROP, CROP, 3)).astype(np.float32),
        "input_ids": trainer.tokenize(prompts[:size]),
    }
    return parallel.global_batch(host, trainer.batch_sharding)


# ------------------------------------------------------------------------------------------------ accumulation


def test_micro_batches_take_every_device_block_in_turn():
    from tadsr_jax.train.step import micro_batches

    rows = np.arange(16).reshape(16, 1) * np.ones((1, 3))
    got = np.asarray(micro_batches(rows, 2, 4))[..., 0]  # 4 devices with 4 rows each, 2 micro-batches
    assert got.tolist() == [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]]
    assert np.asarray(micro_batches(rows, 4, 1))[:, :, 0].tolist() == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9, 10, 11],
        [12, 13, 14, 15],
    ]


SHARDED_MICRO_BATCHES = """
import json
import jax, jax.numpy as jnp, numpy as np
from tadsr_jax import parallel
from tadsr_jax.train.step import mean_over_micro_batches, micro_batches
mesh = parallel.make_mesh(2, 2)
sharding = parallel.batch_sharding(mesh)
x = jax.device_put(np.arange(16 * 3, dtype=np.float32).reshape(16, 3), sharding)
split = jax.jit(parallel.under_mesh(mesh, lambda x: micro_batches(x, 2, 4)), in_shardings=sharding)
mean = jax.jit(parallel.under_mesh(mesh, lambda x: mean_over_micro_batches(lambda r: jnp.mean(r ** 2), x, 2, 4)),
               in_shardings=sharding)
y = split(x)
held = {s.device.id: set(np.asarray(s.data)[:, 0].tolist()) for s in x.addressable_shards}
moved = [s.device.id for s in y.addressable_shards
         if not set(np.asarray(s.data)[..., 0].ravel().tolist()) <= held[s.device.id]]
ops = ("all-to-all", "all-gather", "collective-permute", "all-reduce")
hlo = {name: f.lower(x).compile().as_text() for name, f in (("split", split), ("mean", mean))}
print(json.dumps({"moved": moved, "spec": str(y.sharding.spec), "mean": float(mean(x)),
                  "collectives": {name: sorted(op for op in ops if op in text) for name, text in hlo.items()}}))
"""


@pytest.mark.slow  # a 4-device Python process
def test_micro_batches_stay_on_the_devices_of_their_rows():
    """On 4 devices (mesh 2 x 2): every micro-batch is spread over all devices and each device's rows stay on it;
    the accumulation's only collective is the all-reduce of the mean."""
    import json
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])),
    }
    run = subprocess.run(
        [sys.executable, "-c", SHARDED_MICRO_BATCHES],
        capture_output=True,
        text=True,
        env=env,
        cwd=repo,
        timeout=300,
        check=True,
    )
    got = json.loads(run.stdout.splitlines()[-1])
    assert got["moved"] == [] and got["spec"] == "P(None, ('data', 'fsdp'))"
    assert got["collectives"] == {"split": [], "mean": ["all-reduce"]}
    assert abs(got["mean"] - np.mean(np.arange(48.0) ** 2)) <= 1e-6 * got["mean"]


def _delta(after: dict, before: dict, prefix: str) -> np.ndarray:
    names = sorted(k for k in after if k.startswith(prefix))
    return np.concatenate([(after[k].astype(np.float64) - before[k]).ravel() for k in names])


def _flat(state) -> dict[str, np.ndarray]:
    from train_worker import flat_state

    return {k: v.astype(np.float64) for k, v in flat_state(state).items()}


@pytest.mark.slow  # compiles two tiny train steps
def test_accumulating_4_micro_batches_of_1_trains_as_one_batch_of_4(tiny_sd, tmp_path):
    """Two updates with train.accumulate_steps=4 (micro-batches of 1) and with 1 (the batch of 4 at once), from the
    same state on the same batches: the same losses and gradient norms, the same parameter changes and optimizer
    states, to float32 noise. The per-row draws make it exact: each row's student timestep and noises come from
    its own key whichever micro-batch it is in."""
    from tadsr_jax.train.loop import build
    from tadsr_jax.train.step import host_metrics

    runs = {}
    for accumulate in (1, 4):
        trainer = build(_tiny_config(tiny_sd, batch_size=4, accumulate_steps=accumulate), str(tmp_path))
        state, initial, metrics = trainer.state, _flat(trainer.state), []
        for seed in (1, 2):
            state, values = trainer.step_fn(
                state, trainer.frozen, trainer.rest, _batch(trainer, seed, 4), trainer.neg_context
            )
            metrics.append(host_metrics(values))
        runs[accumulate] = initial, _flat(state), metrics
    (initial, one, one_metrics), (initial4, four, four_metrics) = runs[1], runs[4]
    assert all(np.array_equal(initial[k], initial4[k]) for k in initial)

    errors = {}
    for step, (a, b) in enumerate(zip(four_metrics, one_metrics), 1):
        assert a["finite"] == b["finite"] == 1.0 and sorted(a) == sorted(b)
        for name in sorted(set(b) - {"finite"}):
            errors[f"step {step} {name}"] = abs(a[name] - b[name]) / abs(b[name])
    for part in ("generator/", "fake_score/", "generator_opt/", "fake_score_opt/"):
        names = sorted(k for k in one if k.startswith(part))
        a, b = (np.concatenate([s[k].ravel() for k in names]) for s in (four, one))
        errors[part] = float(np.linalg.norm(a - b) / np.linalg.norm(b))
    assert np.array_equal(four["key"], one["key"]) and four["step"] == one["step"] == 2
    changes = {}
    for part in ("generator/", "fake_score/"):
        ref = _delta(one, initial, part)
        assert np.abs(ref).max() > 0, part  # trained
        changes[part] = float(np.linalg.norm(_delta(four, initial, part) - ref) / np.linalg.norm(ref))
    worst = max(errors, key=errors.get)
    print(
        f"\naccumulate 4 x 1 vs batch 4, 2 updates (relative): worst {worst} {errors[worst]:.1e}; "
        + ", ".join(f"{k} {v:.1e}" for k, v in errors.items() if "/" in k and "loss" not in k)
        + "; parameter changes "
        + ", ".join(f"{k} {v:.1e}" for k, v in changes.items())
    )
    # Losses, gradient norms, parameters and Adam's moments differ by float32 noise of different reduction orders
    # (a batch of 4 vs 4 of 1, summed): measured worst 8.9e-6, step 2's generator gradient norm (step 1: 1.1e-7),
    # parameters 5.1e-6, moments 8.4e-7; the bound is 11x above. Summing instead of averaging the micro-batches
    # quadruples the gradient norms and moments; one key per micro-batch instead of one per row changes every
    # loss. Not bounded: the parameter changes alone (1.1e-3), whose float32 noise Adam's first steps amplify
    # where a gradient is at noise level (g / (|g| + eps)); that is also what step 2's gradients inherit.
    assert errors[worst] <= 1e-4, errors


# ------------------------------------------------------------------------------------------------ fine-tuning

SR_SIZE, SR_SEED = 32, 7


def _generator_leaves(state) -> dict[str, np.ndarray]:
    """{'unet/.../a': array} of a train state's generator, named as in a generator export."""
    from train_worker import flat_state

    return {
        k.removeprefix("generator/").removesuffix("/value"): v
        for k, v in flat_state(state).items()
        if k.startswith("generator/")
    }


@pytest.mark.slow  # builds and compiles a trainer
def test_fine_tuning_starts_from_the_generator_that_inference_loads(tiny_sd, tiny_generator, tmp_path):
    """model.init_generator = an export: step 0's generator is the file's, bit for bit, with fresh optimizer
    states, and the train state's sampler super-resolves as the inference pipeline (launch/sr.py's model and
    jitted forward) on the same export, image, prompt, timestep and posterior noise."""
    import jax
    from safetensors.numpy import load_file

    from tadsr_jax import parallel
    from tadsr_jax.infer.model import WeightsSource, load_sr_model
    from tadsr_jax.infer.pipeline import SRSettings, Upscaler
    from tadsr_jax.train.loop import build
    from tadsr_jax.train.step import optimizer

    config = _tiny_config(tiny_sd)
    config.model.init_generator = tiny_generator
    trainer = build(config, str(tmp_path / "fine_tune"))
    state = trainer.state
    exported = load_file(tiny_generator)
    leaves = _generator_leaves(state)
    assert sorted(leaves) == sorted(exported)
    assert all(np.array_equal(leaves[k], exported[k]) for k in exported)
    assert int(np.asarray(state.step)) == 0
    fresh = optimizer(config.train).init(state.generator)
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(state.generator_opt), jax.tree.leaves(fresh))
    )

    rng = np.random.default_rng(5)
    lq = np.clip(rng.normal(0, 0.4, (1, SR_SIZE, SR_SIZE, 3)), -1, 1).astype(np.float32)
    t = config.sr.timestep
    batch = parallel.global_batch({"lq": lq, "input_ids": trainer.tokenize([""])}, trainer.batch_sharding)
    timesteps = parallel.global_batch({"t": np.full(1, t, np.int32)}, trainer.batch_sharding)["t"]
    ours = np.asarray(trainer.sample_fn(state, trainer.frozen, trainer.rest, batch, timesteps, jax.random.key(SR_SEED)))
    config.sr.color_fix, config.sr.seed = "none", SR_SEED
    model = load_sr_model(config, tiny_sd, WeightsSource(generator=tiny_generator))
    upscaler = Upscaler(model, SRSettings.from_config(config.sr))
    ref = np.asarray(upscaler(lq, [""], [t]))
    err = float(np.abs(ours - ref).max())
    moved = float(np.abs(ref - lq).mean())
    print(
        f"\nfine-tuning step 0 vs inference on the export: max |SR difference| {err:.1e}, mean "
        f"{np.abs(ours - ref).mean():.1e} (SR moves the LQ by {moved:.2f} on average, "
        f"{np.mean(np.abs(ref) < 1):.0%} of the values unclipped)"
    )
    # The comparison means something: SR moves the image, and much of it is not clipped to +-1 (measured 47% of the
    # values with the session's generator).
    assert np.mean(np.abs(ref) < 1) > 0.3 and moved > 0.01
    # Inference folds the LoRA factors into the kernels (W + s B A), training applies them beside (W x + s B A x):
    # float32 rounding of the two, measured 1.8e-5 at most (images in [-1, 1]); the bound is 8x above. Training
    # from fresh adapters instead (model.init_generator ignored) gives 2.0 (mean 0.6).
    assert err <= 1.5e-4


@pytest.mark.slow  # builds a trainer
def test_a_workdir_with_checkpoints_resumes_without_reading_init_generator(tiny_sd, tmp_path):
    """A workdir holding a saved step resumes its own checkpoint (tests/test_training.py), so the build does not
    even read model.init_generator (here a file that is gone); a fresh workdir reads it, and says so if it is gone."""
    from tadsr_jax.checkpoints import has_saved_steps
    from tadsr_jax.train.loop import build
    from tadsr_jax.weights.convert import WeightsError

    config = _tiny_config(tiny_sd)
    config.model.init_generator = str(tmp_path / "gone.safetensors")
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints" / "4.orbax-checkpoint-tmp-1").mkdir(parents=True)  # an unfinished save: not a step
    assert not has_saved_steps(str(resumed))
    with pytest.raises(WeightsError, match="gone.safetensors: no such file"):
        build(config, str(resumed))
    (resumed / "checkpoints" / "3").mkdir()
    assert has_saved_steps(str(resumed))
    state = build(config, str(resumed)).state
    assert not any(np.any(v) for k, v in _generator_leaves(state).items() if k.endswith("/b"))  # fresh adapters


# Paths that are never read: each case below stops before anything loads.
INPUTS = ["--config.model.pretrained=no_sd_here", "--config.data.path=no_images_here"]


@pytest.mark.slow  # runs launch/train.py
@pytest.mark.parametrize(
    "args, line",
    [
        (
            [],
            "train: error: model.pretrained is empty: set it to the SD-2.1-base diffusers folder (offline, for "
            "configs/tiny.py: launch/stand_ins.py writes a tiny stand-in and prints the flags)",
        ),
        (
            [INPUTS[0]],
            "train: error: data.path is empty: set it to the training data (data.source='hr_folder': hr_folder, "
            "paired_list, tfds or mixture)",
        ),
        (
            [*INPUTS, "--config.model.remat.unet=layers"],
            "train: error: model.remat.unet: unknown remat policy 'layers' (one of none, full, dots, dots_no_batch)",
        ),
        (
            [*INPUTS, "--config.train.lr_schedule=cosine_annealing"],
            "train: error: train.lr_schedule: unknown schedule 'cosine_annealing' (known: constant, "
            "constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial)",
        ),
        (
            [*INPUTS, "--config.train.batch_size=6", "--config.train.accumulate_steps=4"],
            "train: error: train.batch_size=6 must be divisible by train.accumulate_steps x devices = 4 x 1 (every "
            "device gets the same rows in every micro-batch)",
        ),
        (
            [*INPUTS, "--config.model.init_generator=tadsr.ckpt"],
            "train: error: model.init_generator=tadsr.ckpt: not a .pkl (the reference's tadsr.pkl), a .safetensors "
            "export (launch/convert.py --what=generator) or a training workdir",
        ),
    ],
)
def test_train_py_refuses_bad_settings_in_one_line_before_loading(args, line, tmp_path):
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])),
    }
    run = subprocess.run(
        [sys.executable, "launch/train.py", "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}", *args],
        capture_output=True,
        text=True,
        cwd=repo,
        env=env,
        timeout=300,
        check=False,
    )
    assert (run.returncode, run.stderr.splitlines()) == (2, [line])
