"""Validation during training (tadsr_jax/train/validation.py): the held-out LQs, the loop's logged scores against
launch/evaluate.py on PNGs of the same outputs, and the one-line refusal. The split of the set over 2 processes is
tested in tests/test_parallel.py (`test_validation_over_two_processes_equals_one`).

The loop test trains the tiny model with a stand-in train step (it moves every generator weight by 1e-3 and does
nothing else: the real step's compile would cost minutes; its correctness is tests/test_training.py's), so the
generator changes between validations while only the sampler of `StepProgram` and the metrics are compiled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from tadsr_jax.data.samples import HELD_OUT_SAMPLES, write_sample_images
from tadsr_jax.data.transforms import bicubic_degrade
from tadsr_jax.train import loop, validation

REPO = Path(__file__).resolve().parents[1]
EVAL_SIZE = 48  # the held-out photos; validation takes their central 32x32 (configs/tiny.py's crop_size)
TIMESTEPS = (100, 200)


def _config(**train):
    from configs.tiny import get_config

    config = get_config()
    config.train.update(dict(batch_size=2, log_every=1, checkpoint_every=100), **train)
    return config


@pytest.fixture(scope="module")
def eval_folder(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("eval") / "held_out")
    write_sample_images(folder, HELD_OUT_SAMPLES, size=EVAL_SIZE)  # 3 images: the last batch of 2 is padded
    return folder


def _shard(config, rows: slice = slice(0, 2)) -> validation.EvalShard:
    return validation.load_shard(
        config.data, config.seed, config.train.batch_size, rows, lambda prompts: np.zeros((len(prompts), 4), np.int32)
    )


def test_eval_lq_is_the_training_degradation_of_the_centre_crop(eval_folder):
    config = _config()
    config.data.eval.path = eval_folder
    shard = _shard(config)
    assert shard.mask.tolist() == [[True, True], [True, False]]  # images 0, 1 | image 2, padding
    crop, offset = config.data.crop_size, (EVAL_SIZE - config.data.crop_size) // 2
    for index, name in enumerate(sorted(HELD_OUT_SAMPLES)):  # the folder source lists files sorted by name
        hr = Image.open(os.path.join(eval_folder, f"{name}.png")).convert("RGB")
        hr = hr.crop((offset, offset, offset + crop, offset + crop))
        k, r = divmod(index, 2)
        np.testing.assert_array_equal(shard.hq[k, r], np.asarray(hr))
        np.testing.assert_array_equal(shard.lq[k, r], np.asarray(bicubic_degrade(hr, config.data.scale)))
    assert not shard.hq[1, 1].any() and not shard.lq[1, 1].any()


def test_realesrgan_eval_lq_is_seeded_per_image(eval_folder):
    config = _config()
    config.data.eval.path, config.data.degradation = eval_folder, "realesrgan"
    first, again = _shard(config), _shard(config)
    np.testing.assert_array_equal(first.lq, again.lq)  # every validation sees the same LQ
    # Image 2 alone (process 1 of 2's rows) gets the LQ it gets in the whole set: seeded by its index.
    np.testing.assert_array_equal(_shard(config, slice(0, 1)).lq[1, 0], first.lq[1, 0])
    config.seed += 1
    assert not np.array_equal(_shard(config).lq[first.mask], first.lq[first.mask])


def test_lpips_and_dists_are_scored_when_their_weights_are_configured(eval_folder, monkeypatch):
    """Wiring only (the metrics are evaluate.py's Scorer, tested in tests/test_evaluate.py): the configured files
    are loaded and their networks score the outputs; a stand-in sampler (0.8 x LQ) replaces the generator."""
    from tadsr_jax import evaluation, parallel
    from tadsr_jax.weights.dists import random_dists
    from tadsr_jax.weights.lpips import random_lpips

    config = _config()
    config.data.eval.path = eval_folder
    config.lpips.path, config.dists.path = "lpips.safetensors", "dists.safetensors"
    nets, loaded = {"lpips": random_lpips(0), "dists": random_dists(0)}, []
    monkeypatch.setattr(evaluation, "load_metric_net", lambda kind, path: loaded.append((kind, path)) or nets[kind])
    sample_fn = jax.jit(lambda state, frozen, rest, batch, timesteps, key: 0.8 * batch["lq"])
    tokenize = lambda prompts: np.zeros((len(prompts), 4), np.int32)
    validator = validation.create(config, sample_fn, parallel.batch_sharding(parallel.make_mesh(-1, 1)), tokenize)
    assert loaded == [("lpips", "lpips.safetensors"), ("dists", "dists.safetensors")]
    means = validator({}, {}, {})
    assert list(means) == [config.train.sample_timestep]  # eval_timesteps empty: the sample timestep
    scorer = evaluation.Scorer(["psnr", "ssim", "lpips", "dists"], **nets)
    mask = validator.shard.mask
    scores = [
        scorer(sr.astype(np.float32) / 255, validator.shard.hq[k].astype(np.float32) / 255)
        for k, sr in enumerate(validator.outputs({}, {}, {}, config.train.sample_timestep))
    ]
    for name, mean in means[config.train.sample_timestep].items():
        expected = np.mean(np.concatenate([s[name][m] for s, m in zip(scores, mask)]))
        assert expected > 0 and abs(mean - expected) <= 1e-12 * expected, name  # the same float64 sums: measured 0
    assert list(means[config.train.sample_timestep]) == ["psnr", "ssim", "lpips", "dists"]


@pytest.mark.slow  # runs launch/train.py
def test_eval_every_without_a_set_is_one_line_before_anything_loads(tmp_path):
    workdir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "launch/train.py",
            "--config=configs/tiny.py",
            f"--workdir={workdir}",
            "--config.model.pretrained=no_sd_here",  # never read: the check comes before anything loads
            "--config.data.path=no_images_here",
            "--config.train.eval_every=5",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert (result.returncode, result.stdout) == (2, ""), result.stderr[-2000:]
    assert result.stderr.splitlines() == [
        "train: error: train.eval_every is 5 but data.eval.path is empty: set it to a held-out image folder, paired "
        "list or tfds name (data.eval.source: hr_folder, paired_list or tfds)"
    ]
    assert not workdir.exists()


# ------------------------------------------------------------------------------------------- the loop end to end


def _events(workdir: Path) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, str]]]:
    """Scalars and texts of the run's TensorBoard event files (TFRecord framing; tensorboardX's protos)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars, texts = {}, {}
    for path in sorted((workdir / "tensorboard").iterdir()):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, {})[event.step] = value.simple_value
                elif value.tensor.string_val:
                    texts.setdefault(value.tag, {})[event.step] = value.tensor.string_val[0].decode()
    return scalars, texts


@pytest.fixture(scope="module")
def trained(eval_folder, tiny_sd, tmp_path_factory):
    """loop.train for 3 steps with validation every 2 (steps 2 and 3) at two timesteps, sample grids at step 2."""
    workdir = tmp_path_factory.mktemp("loop") / "run"
    config = _config(steps=3, eval_every=2, eval_timesteps=TIMESTEPS, sample_every=2)
    config.model.pretrained = tiny_sd
    config.data.path = config.data.eval.path = eval_folder
    seen = {}
    real_build = loop.build

    def moved(state, frozen, rest, batch, neg_context):
        generator = jax.tree.map(lambda x: x + 1e-3, state.generator)
        return dataclasses.replace(state, step=state.step + 1, generator=generator), {
            "loss/generator": jnp.float32(0),
            "loss/fake_score": jnp.float32(0),
            "finite": jnp.bool_(True),
        }

    step_fn = jax.jit(moved)

    def build(config, workdir):
        trainer = real_build(config, workdir)

        def step(*args):
            out = step_fn(*args)
            seen["state"] = out[0]
            return out

        seen["trainer"] = dataclasses.replace(trainer, step_fn=step)
        return seen["trainer"]

    loop.build = build
    try:
        loop.train(config, str(workdir))
    finally:
        loop.build = real_build
    return config, workdir, seen["trainer"], seen["state"]


@pytest.mark.slow
def test_logged_scores_equal_evaluate_py_on_pngs_of_the_outputs(trained, tmp_path):
    config, workdir, trainer, final_state = trained
    scalars, texts = _events(workdir)
    names = [f"eval/{m}_t{t}" for t in TIMESTEPS for m in ("psnr", "ssim")]
    assert sorted(n for n in scalars if n.startswith("eval/")) == sorted(names)
    assert all(sorted(scalars[n]) == [2, 3] for n in names)  # every eval_every steps and at the last one
    # The generator moved between the two validations, and each scored the generator of its step.
    assert all(scalars[n][2] != scalars[n][3] for n in names)

    # Recompute step 3's outputs with its generator, write them (and the HR crops) as PNGs, score with evaluate.py.
    validator = validation.create(config, trainer.sample_fn, trainer.batch_sharding, trainer.tokenize)
    means = validator(final_state, trainer.frozen, trainer.rest)
    sr_dir, hr_dir = tmp_path / "sr", tmp_path / "hr"
    sr_dir.mkdir(), hr_dir.mkdir()
    shard = validator.shard
    for t in TIMESTEPS:
        for k, sr in enumerate(validator.outputs(final_state, trainer.frozen, trainer.rest, t)):
            for r in np.flatnonzero(shard.mask[k]):
                Image.fromarray(sr[r]).save(sr_dir / f"img{k}{r}_t{t}.png")
                Image.fromarray(shard.hq[k, r]).save(hr_dir / f"img{k}{r}.png")
    result = subprocess.run(
        [
            sys.executable,
            "launch/evaluate.py",
            f"--sr={sr_dir}",
            f"--hr={hr_dir}",
            f"--sweep={','.join(map(str, TIMESTEPS))}",
            f"--output={tmp_path / 'report'}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    launcher = json.loads(result.stdout.strip().splitlines()[-1])
    differences = {}
    for t in TIMESTEPS:
        assert launcher[f"t={t}"]["images"] == 3
        for metric in ("psnr", "ssim"):
            ours, theirs = means[t][metric], launcher[f"t={t}"][metric]
            differences[f"{metric}@t{t}"] = abs(ours - theirs)
            # The same uint8 pixels and the same metric code (evaluate.py batches all 3 images, we 2 + 2 with a
            # blank row): measured difference 0. Allowed: float32 noise of the per-image metrics between compiles
            # (up to 2.5e-7 relative, tests/test_parallel.py), x10.
            assert abs(ours - theirs) <= 3e-6 * abs(theirs), (metric, t, ours, theirs)
            # TensorBoard stores float32: the logged value is the mean rounded to float32.
            assert scalars[f"eval/{metric}_t{t}"][3] == np.float32(ours)
    print("validation vs evaluate.py, absolute differences:", differences)
    table = texts["eval/table/text_summary"][3]  # tensorboardX appends /text_summary
    assert "| t=100 | t=200 |" in table and "| Images | 3 | 3 |" in table
    # One compiled sampler served the sample grid (step 2), both validations and the recomputation: the padded last
    # batch has the shape of every other batch.
    assert trainer.sample_fn._cache_size() == 1
