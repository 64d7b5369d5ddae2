"""Orbax checkpoints of the train state and each process's data-iterator position, verified at restore.

Layout: <workdir>/checkpoints/<step>/{state, data, sha256.json}. `state` is the train state (training saves its
trainable parameters, both optimizer states, step and PRNG key; never the frozen base), any pytree here, and a
reader may restore part of it (inference takes the generator alone, without building an optimizer). `data` holds every
process's grain iterator state, so a resumed run continues the same example stream. Orbax writes each step to a
temporary directory and renames it when complete, so an interrupted save never leaves a half-written checkpoint.

Integrity: Orbax 0.12 (zarr3 via TensorStore) checksums only the shard index (`crc32c` among its
`index_codecs`), not the array chunks, and exposes no option for more; a flipped byte in a weight restores
without a word. So process 0 writes `sha256.json` (size and SHA-256 of every file of the step) once the step is
finalized (a background thread waits for the asynchronous save, so a kill leaves a step without digests only
while they are computed), and every restore checks it first. A step that fails the check, or that has no digest
file (saved by an older version) and fails to restore, is skipped with one line and the next older step is
tried. When training falls back, the skipped steps are moved (never deleted) into <workdir>/checkpoints_damaged/,
so that the run can save those step numbers again.

The workdir may be a URL (gs://...): Orbax writes there itself, the digests go through `tadsr_jax.storage`.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from tadsr_jax import storage

DIGESTS = "sha256.json"
QUARANTINE = "checkpoints_damaged"


class CheckpointError(RuntimeError):
    """No checkpoint restores, or a verified one does not fit the model; the message says which and why."""


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _files(step_dir: str) -> list[str]:
    """Every file of a step directory (relative paths, sorted), the digest file excepted."""
    return [f for f in storage.files_under(step_dir) if f != DIGESTS]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with storage.open_file(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_digests(step_dir: str) -> None:
    """{relative path: [size, sha256]} of every file of a finalized step, to `<step_dir>/sha256.json`."""
    digests = {
        f: [storage.size(os.path.join(step_dir, f)), _sha256(os.path.join(step_dir, f))] for f in _files(step_dir)
    }

    def write(tmp: str) -> None:
        with open(tmp, "w") as out:
            json.dump(digests, out, indent=1, sort_keys=True)

    storage.atomic_write(os.path.join(step_dir, DIGESTS), write)


def verify(step_dir: str) -> str | None:
    """The first difference between a step directory and its digest file, None when they agree.

    Raises FileNotFoundError when the step has no digest file (it cannot be verified).
    """
    with storage.open_file(os.path.join(step_dir, DIGESTS), "rb") as f:
        text = f.read()
    try:
        recorded = {name: (int(size), str(digest)) for name, (size, digest) in json.loads(text).items()}
    except (ValueError, TypeError, AttributeError) as e:  # not JSON, or not {name: [size, digest]}
        return f"{DIGESTS} unreadable ({_first_line(e)})"
    for name, (size, digest) in sorted(recorded.items()):
        path = os.path.join(step_dir, name)
        if not storage.isfile(path):
            return f"{name} is missing"
        if storage.size(path) != size:
            return f"{name} has {storage.size(path)} bytes, {size} when saved"
        if _sha256(path) != digest:
            return f"{name} differs from its SHA-256 when saved"
    return None


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(
            storage.absolute(os.path.join(workdir, "checkpoints")), options=options, item_names=("state", "data")
        )
        self._digester: threading.Thread | None = None  # writes the pending save's digests once it is done
        self._digest_error: BaseException | None = None

    @property
    def directory(self) -> str:
        return str(self._manager.directory)

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(
        self, step: int, state: Any, data_iterator, *, force: bool = False, metadata: Mapping | None = None
    ) -> bool:
        """Start saving `step` (asynchronously); `metadata` (JSON) is stored with it, see `metadata`."""
        self.wait()  # Orbax would wait for the previous save here anyway
        saved = self._manager.save(
            step,
            force=force,
            custom_metadata=dict(metadata or {}),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)
            ),
        )
        if saved:
            self._digester = threading.Thread(
                target=self._digest_when_saved, args=(step,), daemon=True, name=f"checkpoint-digests-{step}"
            )
            self._digester.start()
        return saved

    def _digest_when_saved(self, step: int) -> None:
        """(Background thread.) Wait for the save of `step` to finish on every process, then write its digests
        (process 0). `save`, `wait` and `close` join this thread before using the manager."""
        try:
            self._manager.wait_until_finished()
            if jax.process_index() == 0 and storage.isdir(self._step_dir(step)):  # not already removed by keep
                write_digests(self._step_dir(step))
        except BaseException as e:  # re-raised by `wait`, in the caller's thread
            self._digest_error = e

    def metadata(self, step: int) -> dict:
        """The `metadata` saved with `step` (empty for steps saved without)."""
        return dict(self._manager.metadata(step).custom_metadata or {})

    def restore(self, abstract_state: Any, data_iterator=None, step: int | None = None) -> Any:
        """The state at `step` (default: latest), laid out like `abstract_state` (shapes and shardings), after
        checking its digests; a given data iterator is moved to the saved position in place."""
        step = self._manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        try:
            problem = verify(self._step_dir(step))
        except FileNotFoundError:
            problem = None
        if problem:
            raise CheckpointError(f"{self._step_dir(step)}: damaged: {problem}")
        return self._restore(step, abstract_state, data_iterator)

    def _restore(self, step: int, abstract_state: Any, data_iterator, partial: bool = False) -> Any:
        if partial:  # only the subtrees `abstract_state` names
            restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
            items = {"state": ocp.args.PyTreeRestore(abstract_state, restore_args=restore_args, partial_restore=True)}
        else:
            items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self._manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def restore_latest(
        self, abstract_state: Any, data_iterator=None, *, quarantine: bool = False, partial: bool = False
    ) -> tuple[int, Any] | None:
        """(step, state) of the newest step that passes its digest check and restores; None without checkpoints.

        Each skipped step gets one warning line saying why. With `quarantine` (training, which saves those
        step numbers again), the skipped steps are then moved into <workdir>/checkpoints_damaged/. With `partial`,
        `abstract_state` may name a part of the saved state (e.g. {"generator": ...}), and only that is read. A verified
        step that does not restore (e.g. a config that changed the model) raises CheckpointError, as does
        finding no step that restores (nothing is moved then).
        """
        skipped = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                problem = verify(self._step_dir(step))
                verified = problem is None
            except FileNotFoundError:
                problem, verified = None, False
                logging.warning(
                    "checkpoint step %d has no %s (saved by an older version, or stopped before it "
                    "was written): restoring it unverified",
                    step,
                    DIGESTS,
                )
            if not problem:
                try:
                    state = self._restore(step, abstract_state, data_iterator, partial)
                except Exception as e:  # Orbax/TensorStore raise many types for unreadable files
                    if verified:
                        raise CheckpointError(
                            f"{self._step_dir(step)}: does not restore into this model ({_first_line(e)})"
                        ) from None
                    problem = f"does not restore ({_first_line(e)})"
                else:
                    if skipped and quarantine:
                        self._quarantine([s for s, _ in skipped])
                    return step, state
            logging.warning("checkpoint step %d skipped: %s", step, problem)
            skipped.append((step, problem))
        if skipped:
            reasons = "; ".join(f"step {s}: {p}" for s, p in skipped)
            raise CheckpointError(f"{self.directory}: no checkpoint restores ({reasons})")
        return None

    def _quarantine(self, steps: list[int]) -> None:
        """Move `steps` out of the manager's directory into checkpoints_damaged/ beside it (process 0). On an object
        store a move copies and deletes each object: a kill midway leaves the step in both places."""
        folder = os.path.join(os.path.dirname(self.directory), QUARANTINE)
        if jax.process_index() == 0:
            storage.makedirs(folder)
            for step in steps:
                target = os.path.join(folder, str(step))
                if storage.exists(target):
                    target += time.strftime("_%Y%m%d_%H%M%S")
                storage.rename(self._step_dir(step), target)
                logging.warning("damaged checkpoint step %d moved to %s (kept for inspection)", step, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("tadsr_checkpoint_quarantine")
        self._manager.reload()

    def wait(self) -> None:
        """Wait for the pending save and its digest file."""
        if self._digester is not None:
            self._digester.join()
            self._digester = None
        error, self._digest_error = self._digest_error, None
        if error is not None:
            raise error
        self._manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self._manager.close()


def has_saved_steps(workdir: str) -> bool:
    """Whether `workdir` holds a saved step (intact or not): a run there resumes from it (or stops), never starts
    anew. Orbax names a finished step's directory by its number."""
    folder = os.path.join(workdir, "checkpoints")
    return storage.isdir(folder) and any(name.isdigit() for name in storage.listdir(folder))


def abstract_like(state: Any) -> Any:
    """Shapes, dtypes and shardings of `state`, to restore into."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
