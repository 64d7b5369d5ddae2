"""Checkpoints: digests catch a flipped byte or a truncated file, restore falls back past damaged steps, training
can save a quarantined step number again; the workdir lock. All in-process on a small pytree (seconds)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tadsr_jax.checkpoints import DIGESTS, QUARANTINE, Checkpointer, CheckpointError, abstract_like
from tadsr_jax.train import lock
from tadsr_jax.train.step import TrainState

REPO = Path(__file__).resolve().parents[1]


def make_state(step: int) -> TrainState:
    """A small train state whose every leaf depends on `step` (random weights: a flipped byte changes one)."""
    rng = np.random.default_rng(step)
    weights = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
    return TrainState(
        step=jnp.int32(step),
        generator={"w": weights(128, 64), "b": weights(64)},
        fake_score={"w": weights(32, 32)},
        generator_opt={"mu": weights(128, 64)},
        fake_score_opt={"mu": weights(32, 32)},
        key=jnp.asarray([step, 7], jnp.uint32),
    )


def data_iterator():
    return iter(grain.MapDataset.range(1000).to_iter_dataset())


def assert_state_equal(got: TrainState, want: TrainState) -> None:
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture
def three_steps(tmp_path) -> Path:
    """A workdir with steps 1, 2, 3 saved asynchronously as training does; the data iterator advanced 10 per
    step; each step recorded with its trained timestep range."""
    checkpointer = Checkpointer(str(tmp_path), keep=3)
    data = data_iterator()
    for step in (1, 2, 3):
        for _ in range(10):
            next(data)
        checkpointer.save(step, make_state(step), data, force=True, metadata={"trained_timesteps": [1, 100 * step]})
    checkpointer.close()
    return tmp_path


def largest_array_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
    return max(files, key=lambda p: p.stat().st_size)


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_saved_steps_carry_digests_and_metadata_and_restore_exactly(three_steps):
    checkpointer = Checkpointer(str(three_steps), keep=3)
    for step in (1, 2, 3):
        digests = json.loads((three_steps / "checkpoints" / str(step) / DIGESTS).read_text())
        assert any(name.startswith("state/") for name in digests) and any(n.startswith("data/") for n in digests)
        assert checkpointer.metadata(step) == {"trained_timesteps": [1, 100 * step]}
    data = data_iterator()
    step, state = checkpointer.restore_latest(abstract_like(make_state(0)), data, quarantine=True)
    checkpointer.close()
    assert step == 3
    assert_state_equal(state, make_state(3))
    assert next(data) == 30  # the data iterator continues where step 3 left it


def test_a_reader_restores_the_generator_alone(three_steps):
    """Inference reads only the generator: no optimizer state is described, built or read."""
    want = make_state(3).generator
    abstract = {"generator": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), want)}
    checkpointer = Checkpointer(str(three_steps), keep=3, async_save=False)
    step, state = checkpointer.restore_latest(abstract, partial=True)
    checkpointer.close()
    assert step == 3 and set(state) == {"generator"}
    assert_state_equal(state["generator"], want)
    # Without `partial` the same request is refused: the saved state holds more than the generator.
    checkpointer = Checkpointer(str(three_steps), keep=3, async_save=False)
    with pytest.raises(CheckpointError, match="does not restore"):
        checkpointer.restore_latest(abstract)
    checkpointer.close()


def test_digests_are_written_as_soon_as_the_asynchronous_save_is_done(tmp_path):
    """Not at the next save: a run killed between two saves leaves its newest step verifiable."""
    checkpointer = Checkpointer(str(tmp_path), keep=3)
    checkpointer.save(1, make_state(1), data_iterator(), force=True)
    digests = tmp_path / "checkpoints" / "1" / DIGESTS
    deadline = time.monotonic() + 120
    while not digests.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert digests.is_file()
    checkpointer.close()


@pytest.mark.parametrize("damage", [flip_byte, truncate])
def test_damaged_newest_falls_back_to_the_previous_step_and_is_quarantined(three_steps, damage, caplog):
    damaged = largest_array_file(three_steps / "checkpoints" / "3")
    damage(damaged)
    checkpointer = Checkpointer(str(three_steps), keep=3)
    data = data_iterator()
    with caplog.at_level(logging.WARNING):
        step, state = checkpointer.restore_latest(abstract_like(make_state(0)), data, quarantine=True)
    assert step == 2
    assert_state_equal(state, make_state(2))
    assert next(data) == 20
    lines = warnings(caplog)
    skipped = [line for line in lines if "step 3 skipped" in line]
    assert len(skipped) == 1 and str(damaged.relative_to(three_steps / "checkpoints" / "3")) in skipped[0]
    assert ("bytes" if damage is truncate else "SHA-256") in skipped[0]
    quarantined = three_steps / QUARANTINE / "3"
    assert [line for line in lines if f"moved to {quarantined}" in line]
    assert (quarantined / damaged.relative_to(three_steps / "checkpoints" / "3")).is_file()  # kept, not deleted
    assert sorted(p.name for p in (three_steps / "checkpoints").iterdir()) == ["1", "2"]
    # Training goes on and saves step 3 again; it is the one restored next.
    checkpointer.save(3, make_state(33), data, force=True)
    checkpointer.close()
    again = Checkpointer(str(three_steps), keep=3)
    step, state = again.restore_latest(abstract_like(make_state(0)))
    again.close()
    assert step == 3
    assert_state_equal(state, make_state(33))


def test_read_only_restore_skips_without_moving(three_steps, caplog):
    """launch/sr.py --workdir: the same fallback, but the workdir is left as it is."""
    flip_byte(largest_array_file(three_steps / "checkpoints" / "3"))
    checkpointer = Checkpointer(str(three_steps), keep=3, async_save=False)
    with caplog.at_level(logging.WARNING):
        step, state = checkpointer.restore_latest(abstract_like(make_state(0)))
    checkpointer.close()
    assert step == 2
    assert_state_equal(state, make_state(2))
    assert [line for line in warnings(caplog) if "step 3 skipped" in line]
    assert sorted(p.name for p in (three_steps / "checkpoints").iterdir()) == ["1", "2", "3"]
    assert not (three_steps / QUARANTINE).exists()


def test_every_step_damaged_raises_one_line_and_moves_nothing(three_steps):
    for step in (1, 2, 3):
        truncate(largest_array_file(three_steps / "checkpoints" / str(step)))
    checkpointer = Checkpointer(str(three_steps), keep=3)
    with pytest.raises(CheckpointError, match=r"no checkpoint restores \(step 3: .*; step 2: .*; step 1: ") as e:
        checkpointer.restore_latest(abstract_like(make_state(0)), quarantine=True)
    checkpointer.close()
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in (three_steps / "checkpoints").iterdir()) == ["1", "2", "3"]


def test_step_without_digests_restores_with_a_note(three_steps, caplog):
    (three_steps / "checkpoints" / "3" / DIGESTS).unlink()
    checkpointer = Checkpointer(str(three_steps), keep=3)
    with caplog.at_level(logging.WARNING):
        step, state = checkpointer.restore_latest(abstract_like(make_state(0)))
    checkpointer.close()
    assert step == 3
    assert_state_equal(state, make_state(3))
    notes = warnings(caplog)
    assert len(notes) == 1 and "step 3 has no sha256.json" in notes[0] and "unverified" in notes[0]


def test_unverified_step_that_does_not_restore_is_skipped(three_steps, caplog):
    """A checkpoint saved before digests existed and then truncated: Orbax's error becomes the reason."""
    step_dir = three_steps / "checkpoints" / "3"
    (step_dir / DIGESTS).unlink()
    (step_dir / "state" / "_METADATA").write_text("{")
    checkpointer = Checkpointer(str(three_steps), keep=3)
    with caplog.at_level(logging.WARNING):
        step, _ = checkpointer.restore_latest(abstract_like(make_state(0)), quarantine=True)
    checkpointer.close()
    assert step == 2
    assert [line for line in warnings(caplog) if "step 3 skipped: does not restore" in line]
    assert (three_steps / QUARANTINE / "3").is_dir()


def test_intact_step_of_another_model_is_an_error_not_damage(three_steps):
    """A verified step that does not fit (e.g. the config changed the LoRA rank) must not be skipped or moved."""
    other = make_state(0)
    other.generator["w"] = jnp.zeros((128, 32))
    checkpointer = Checkpointer(str(three_steps), keep=3)
    with pytest.raises(CheckpointError, match="3: does not restore into this model"):
        checkpointer.restore_latest(abstract_like(other), quarantine=True)
    checkpointer.close()
    assert sorted(p.name for p in (three_steps / "checkpoints").iterdir()) == ["1", "2", "3"]


# ------------------------------------------------------------------------------------------------ workdir lock


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_second_holder_is_refused_with_the_first_named(tmp_path):
    first = lock.WorkdirLock(str(tmp_path))
    assert first.acquire() is None
    with pytest.raises(lock.WorkdirLocked) as e:
        lock.WorkdirLock(str(tmp_path)).acquire()
    message = str(e.value)
    assert "in use by another training run" in message and "\n" not in message
    assert f"host {socket.gethostname()}, pid {os.getpid()}, started {first.record['started']}" in message
    first.release()
    assert not (tmp_path / lock.LOCK_FILE).exists()
    second = lock.WorkdirLock(str(tmp_path))
    assert second.acquire() is None
    second.release()


def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    pid = dead_pid()
    (tmp_path / lock.LOCK_FILE).write_text(
        json.dumps({"host": socket.gethostname(), "pid": pid, "started": "2026-01-01T00:00:00+00:00"})
    )
    taker = lock.WorkdirLock(str(tmp_path))
    note = taker.acquire()
    assert note and f"pid {pid}" in note and "gone" in note
    assert json.loads((tmp_path / lock.LOCK_FILE).read_text()) == taker.record
    taker.release()


def test_lock_of_another_host_holds_until_its_lease_expires(tmp_path):
    path = tmp_path / lock.LOCK_FILE
    path.write_text(json.dumps({"host": "other-node", "pid": 1, "started": "2026-01-01T00:00:00+00:00"}))
    with pytest.raises(lock.WorkdirLocked, match="host other-node, pid 1"):
        lock.WorkdirLock(str(tmp_path), lease_s=60).acquire()
    old = path.stat().st_mtime - 120
    os.utime(path, (old, old))
    taker = lock.WorkdirLock(str(tmp_path), lease_s=60)
    assert "lease expired" in taker.acquire()
    taker.release()


def test_holder_renews_its_lease(tmp_path):
    holder = lock.WorkdirLock(str(tmp_path), lease_s=0.4)
    holder.acquire()
    path = tmp_path / lock.LOCK_FILE
    old = path.stat().st_mtime - 100
    os.utime(path, (old, old))
    deadline = time.monotonic() + 10
    while path.stat().st_mtime < old + 50 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.stat().st_mtime > old + 50
    with pytest.raises(lock.WorkdirLocked):
        lock.WorkdirLock(str(tmp_path), lease_s=0.4).acquire()
    holder.release()


@pytest.mark.slow
def test_train_launcher_refuses_a_locked_workdir(tmp_path):
    """Before loading anything: one line naming the holder, exit status 1."""
    holder = lock.WorkdirLock(str(tmp_path))
    holder.acquire()
    try:
        result = subprocess.run(
            [
                sys.executable,
                "launch/train.py",
                "--config=configs/tiny.py",
                f"--workdir={tmp_path}",
                f"--config.model.pretrained={tmp_path / 'sd'}",  # never read: the lock comes first
                f"--config.data.path={tmp_path / 'images'}",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
            env=dict(os.environ, JAX_PLATFORMS="cpu"),
        )
    finally:
        holder.release()
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"pid {os.getpid()}" in errors[0] and "in use by another training run" in errors[0]
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # nothing written (the holder's lock is released above)
