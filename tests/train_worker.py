"""Subprocess worker for tests/test_training.py: every training run there is one of these processes.

python tests/train_worker.py cli [launch/train.py flags...]
    launch/train.py itself, except that the persistent compilation cache is the test session's
    (JAX_COMPILATION_CACHE_DIR, every program cached) instead of ~/.cache/tadsr_jax/xla; that with
    several processes the train step is compiled before its first call and the processes meet at a barrier
    before running it (see `_CompileThenBarrier`); and that with $TRAIN_WORKER_PLACEMENT set, the first train
    step writes where its arguments live to that file (see `_record_placement`).
python tests/train_worker.py steps --config=configs/tiny.py --workdir=W --out=OUT --steps=N
    [--save_steps=K,...] [--sample_step=S] [--nan_checks] [--config.X=Y ...]
    `loop.build` + the jitted step on the pipeline's first N global batches (the very program launch/train.py
    compiles: with the launchers' XLA:CPU options); writes every step's metrics to OUT.metrics.json, and the train
    state (flattened) after step N and after each step K to OUT.npz (`state<step>/...`), with the sample image
    launch/train.py would write after step S (`sample`: LQ | SR | HR rows, uint8).
    With --nan_checks, then (same process, same compiled step): a step on a batch with a NaN (the state
    must come back unchanged), and `loop.train` from the initial state with a data iterator that yields a
    NaN batch at step 3 after the step-2 checkpoint, then again with NaN batches at steps 5 and 7, between
    check points (counting the host's reads of device values per step); writes what happened to
    OUT.nan.json.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import runpy
import sys
from pathlib import Path

import jax

REPO = Path(__file__).resolve().parents[1]


def _use_session_cache() -> None:
    """Every compiled program goes to (and comes from) the test session's cache directory."""
    from tadsr_jax import runtime

    directory = os.environ["JAX_COMPILATION_CACHE_DIR"]
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    runtime.enable_compilation_cache = lambda directory=None: os.environ["JAX_COMPILATION_CACHE_DIR"]


def flat_state(tree) -> dict:
    """{'generator/...': array, ...} of a TrainState (or of the same tree restored as nested dicts)."""
    import numpy as np

    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)
        flat[name] = np.asarray(leaf.addressable_data(0) if isinstance(leaf, jax.Array) else leaf)
    return flat


class _CompileThenBarrier:
    """The jitted step, compiled ahead of its first call, then a barrier of all processes before it runs.

    XLA:CPU's cross-process collectives (gloo) give up after 30 s when one process reaches the first
    collective that much earlier than another; on a loaded test machine the two processes' compile times of
    the train step can differ by more than that. The coordination service's barrier waits as long as needed.
    """

    def __init__(self, step_fn):
        self.step_fn, self.compiled = step_fn, None

    def __call__(self, *args):
        if self.compiled is None:
            from jax._src import distributed

            self.compiled = self.step_fn.lower(*args).compile()
            distributed.global_state.client.wait_at_barrier("train_worker_step_compiled", 30 * 60 * 1000)
        return self.compiled(*args)


def _wrap_step(wrapper) -> None:
    """loop.build's trainer with its step function replaced by `wrapper(step_fn)`."""
    import dataclasses

    from tadsr_jax.train import loop

    real_build = loop.build

    def build(config, workdir):
        trainer = real_build(config, workdir)
        return dataclasses.replace(trainer, step_fn=wrapper(trainer.step_fn))

    loop.build = build


def _placement(state, frozen, batch) -> dict:
    """Where the train step's arguments live: the mesh, which frozen weights are FSDP-split (and one example with
    its shard shapes), the state's partition specs and the batch's shard shapes."""
    from flax import nnx

    flat_frozen = nnx.to_flat_state(frozen)
    sharded = [
        (".".join(map(str, path)), list(v[...].shape), sorted({tuple(s.data.shape) for s in v[...].addressable_shards}))
        for path, v in flat_frozen
        if "fsdp" in str(v[...].sharding.spec)
    ]
    return {
        "device_count": jax.device_count(),
        "mesh": dict(batch["lq"].sharding.mesh.shape),
        "frozen_leaves": len(flat_frozen),
        "frozen_sharded": len(sharded),
        "sharded_example": sharded[:1],
        "state_specs": sorted({str(x.sharding.spec) for x in jax.tree.leaves(state)}),
        "batch_shard_shapes": sorted({tuple(s.data.shape) for s in batch["lq"].addressable_shards}),
    }


def _record_placement(path: str):
    """A step wrapper that writes `_placement` of its first call's arguments to `path`."""

    def wrapper(step_fn):
        recorded = False

        def step(state, frozen, rest, batch, neg_context):
            nonlocal recorded
            if not recorded:
                with open(path, "w") as f:
                    json.dump(_placement(state, frozen, batch), f)
                recorded = True
            return step_fn(state, frozen, rest, batch, neg_context)

        return step

    return wrapper


def _cli(argv: list[str]) -> None:
    _use_session_cache()
    if any(a.startswith("--num_processes=") and a != "--num_processes=1" for a in argv):
        _wrap_step(_CompileThenBarrier)
    if os.environ.get("TRAIN_WORKER_PLACEMENT"):
        _wrap_step(_record_placement(os.environ["TRAIN_WORKER_PLACEMENT"]))
    sys.argv = [str(REPO / "launch" / "train.py"), *argv]
    runpy.run_path(str(REPO / "launch" / "train.py"), run_name="__main__")


def _host_iterator(trainer, config):
    """The training pipeline of this (single) process, as the loop builds it."""
    from tadsr_jax.data.pipeline import make_train_iterator

    return make_train_iterator(
        config.data,
        global_batch_size=config.train.batch_size,
        seed=config.seed,
        process_index=0,
        process_count=1,
        tokenize=trainer.tokenize,
    )


def _batches(trainer, config, count: int):
    """The first `count` global batches as host arrays."""
    iterator = _host_iterator(trainer, config)
    return [next(iterator) for _ in range(count)]


def _host_copy(tree):
    """Host (numpy) copies of every leaf: the step donates its state argument."""
    import numpy as np

    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def _steps(
    config, workdir: str, out: str, steps: int, save_steps: set[int], sample_step: int, nan_checks: bool
) -> None:
    import numpy as np

    from tadsr_jax import parallel
    from tadsr_jax.train import loop, validation
    from tadsr_jax.train.step import host_metrics

    trainer = loop.build(config, workdir)
    initial = _host_copy(trainer.state)
    state, per_step, saved = trainer.state, [], {}
    batches = _batches(trainer, config, steps + 1)
    for step, host_batch in enumerate(batches[:steps], 1):
        batch = parallel.global_batch(host_batch, trainer.batch_sharding)
        state, metrics = trainer.step_fn(state, trainer.frozen, trainer.rest, batch, trainer.neg_context)
        values = host_metrics(metrics)
        assert values["finite"] == 1.0, values
        per_step.append(values)
        if step in save_steps | {steps}:
            saved.update({f"state{step}/{k}": v for k, v in flat_state(state).items()})
        if step == sample_step:  # as loop.train samples
            t = validation.global_timesteps(config.train.sample_timestep, trainer.batch_sharding, batch["lq"].shape[0])
            sr = trainer.sample_fn(state, trainer.frozen, trainer.rest, batch, t, jax.random.key(0))
            saved["sample"] = loop._grid(batch, sr)
    np.savez(out + ".npz", **saved)
    with open(out + ".metrics.json", "w") as f:
        json.dump(per_step, f)
    if nan_checks:
        _nan_checks(trainer, state, initial, batches[steps], config, workdir, out + ".nan.json")


class _NaNAt:
    """Wraps a grain iterator (and its checkpointing) and puts a NaN into the batches of `bad_steps`."""

    def __init__(self, inner, bad_steps: set[int]):
        self.inner, self.bad_steps, self.calls = inner, bad_steps, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = dict(next(self.inner))
        self.calls += 1
        if self.calls in self.bad_steps:
            batch["lq"] = batch["lq"].copy()
            batch["lq"][0, 0, 0, 0] = float("nan")
        return batch

    def get_state(self) -> bytes:  # grain's checkpoint handler takes bytes from non-grain iterators
        return json.dumps(self.inner.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        self.inner.set_state(json.loads(state))

    def start_prefetch(self) -> None:
        self.inner.start_prefetch()


class _HostReads:
    """Counts, per train step, the main thread's reads of jax.Array values on the host: `reads[k]` are those after
    step k is dispatched and before step k + 1 is. bool(), float(), .item() go through ArrayImpl._value; on the
    CPU, np.asarray and np.array read through the buffer protocol instead, so those two are counted too."""

    def __init__(self, step_fn):
        self.step_fn, self.step, self.reads = step_fn, 0, {}

    def __call__(self, *args):
        self.step += 1
        self.reads[self.step] = 0
        return self.step_fn(*args)

    def _count(self) -> None:
        import threading

        if threading.current_thread() is threading.main_thread() and self.step:
            self.reads[self.step] += 1

    @contextlib.contextmanager
    def counting(self):
        import numpy as np
        from jax._src.array import ArrayImpl

        value, asarray, array = ArrayImpl._value, np.asarray, np.array

        def counted_value(x):
            self._count()
            return value.fget(x)

        def counted(read):
            def wrapper(x, *args, **kwargs):
                if isinstance(x, jax.Array):
                    self._count()
                return read(x, *args, **kwargs)

            return wrapper

        ArrayImpl._value, np.asarray, np.array = property(counted_value), counted(asarray), counted(array)
        try:
            yield self
        finally:
            ArrayImpl._value, np.asarray, np.array = value, asarray, array


def _nan_checks(trainer, state, initial, host_batch, config, workdir: str, out: str) -> None:
    import dataclasses

    import numpy as np

    from tadsr_jax import parallel
    from tadsr_jax.checkpoints import Checkpointer, abstract_like
    from tadsr_jax.train import loop
    from tadsr_jax.train.step import host_metrics

    result = {}
    # 1. The jitted step on a batch with one NaN pixel: not finite, state returned unchanged.
    bad = dict(host_batch)
    bad["lq"] = bad["lq"].copy()
    bad["lq"][1, 3, 5, 2] = np.nan
    before = flat_state(state)
    new, metrics = trainer.step_fn(
        state, trainer.frozen, trainer.rest, parallel.global_batch(bad, trainer.batch_sharding), trainer.neg_context
    )
    values = host_metrics(metrics)
    after = flat_state(new)
    result["bad_finite"] = values["finite"]
    result["bad_loss_is_nan"] = bool(np.isnan(values["loss/generator"]))
    result["same_leaves"] = sorted(before) == sorted(after)
    result["changed_leaves"] = sorted(k for k in before if not np.array_equal(before[k], after.get(k)))
    result["state_leaves"] = len(before)
    result["step_before"], result["step_after"] = int(before["step"]), int(after["step"])
    # ... and a good batch afterwards trains normally again.
    _, metrics = trainer.step_fn(
        new,
        trainer.frozen,
        trainer.rest,
        parallel.global_batch(host_batch, trainer.batch_sharding),
        trainer.neg_context,
    )
    result["next_finite"] = host_metrics(metrics)["finite"]

    # 2. Through the loop: checkpoint at step 2, a NaN batch at step 3. `build` is the one already done
    # (same networks, same compiled step) with the initial state placed again, to compile nothing twice.
    shardings = jax.tree.map(lambda x: x.sharding, trainer.state)
    fresh = lambda: dataclasses.replace(trainer, state=jax.device_put(initial, shardings))
    real_iterator, real_build = loop.make_train_iterator, loop.build
    loop.make_train_iterator = lambda *args, **kwargs: _NaNAt(real_iterator(*args, **kwargs), bad_steps={3})
    loop.build = lambda config, workdir: fresh()
    train_dir = os.path.join(workdir, "nan_run")
    try:
        loop.train(config, train_dir)
        result["error"] = None
    except loop.TrainingError as e:
        result["error"] = str(e)
    finally:
        loop.make_train_iterator, loop.build = real_iterator, real_build
    result["checkpoint_entries"] = sorted(os.listdir(os.path.join(train_dir, "checkpoints")))
    checkpointer = Checkpointer(train_dir, keep=3, async_save=False)
    result["latest_step"] = checkpointer.latest_step()
    data = _host_iterator(trainer, config)  # loop.make_train_iterator is the real one again here
    restored = flat_state(checkpointer.restore(abstract_like(fresh().state), data, 2))
    checkpointer.close()
    result["restored_step"] = int(restored["step"])
    result["restored_finite"] = all(bool(np.all(np.isfinite(v))) for k, v in restored.items() if k != "key")
    initial_flat = flat_state(initial)
    result["restored_trained"] = any(
        not np.array_equal(v, initial_flat[k]) for k, v in restored.items() if k.startswith("generator/")
    )

    # 3. A NaN between check points: nothing logged before the end, a checkpoint every 4 steps, NaN batches at
    # steps 5 and 7 (6 is finite). Checked at step 8 only, the error names step 5, and nothing is read back from
    # the devices after the steps in between.
    late = copy.deepcopy(config)
    late.train.steps, late.train.log_every, late.train.checkpoint_every = 8, 100, 4
    counter = _HostReads(trainer.step_fn)
    loop.make_train_iterator = lambda *args, **kwargs: _NaNAt(real_iterator(*args, **kwargs), bad_steps={5, 7})
    loop.build = lambda config, workdir: dataclasses.replace(fresh(), step_fn=counter)
    late_dir = os.path.join(workdir, "nan_late")
    try:
        with counter.counting():
            loop.train(late, late_dir)
        result["late_error"] = None
    except loop.TrainingError as e:
        result["late_error"] = str(e)
    finally:
        loop.make_train_iterator, loop.build = real_iterator, real_build
    result["late_reads"] = counter.reads
    result["late_checkpoint_entries"] = sorted(os.listdir(os.path.join(late_dir, "checkpoints")))
    checkpointer = Checkpointer(late_dir, keep=3, async_save=False)
    restored = flat_state(checkpointer.restore(abstract_like(fresh().state), data, 4))
    checkpointer.close()
    result["late_restored_step"] = int(restored["step"])
    result["late_restored_finite"] = all(bool(np.all(np.isfinite(v))) for k, v in restored.items() if k != "key")
    with open(out, "w") as f:
        json.dump(result, f)


def _main_flags() -> None:
    from absl import app, flags
    from ml_collections import config_flags

    from tadsr_jax import runtime

    config_flag = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "Work directory.", required=True)
    out = flags.DEFINE_string("out", None, "Output path prefix.", required=True)
    steps = flags.DEFINE_integer("steps", 3, "Steps (steps mode).")
    save_steps = flags.DEFINE_list("save_steps", [], "Also save the state after these steps (steps mode).")
    sample_step = flags.DEFINE_integer("sample_step", 0, "Save the sample image after this step (steps mode).")
    nan_checks = flags.DEFINE_bool("nan_checks", False, "Then the NaN checks (steps mode).")
    sys.argv.pop(1)

    def main(argv):
        del argv
        runtime.set_xla_cpu_flags()  # launch/train.py's options (part of the cache key), before JAX's backend starts
        _use_session_cache()
        os.makedirs(workdir.value, exist_ok=True)
        _steps(
            config_flag.value,
            workdir.value,
            out.value,
            steps.value,
            set(map(int, save_steps.value)),
            sample_step.value,
            nan_checks.value,
        )

    app.run(main)


def _child_setup() -> None:
    """Die with the test process (whatever kills it), and yield the CPU to more urgent runs if asked to."""
    parent = os.environ.get("TRAIN_WORKER_PARENT_PID")
    if parent and sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != int(parent):  # the parent is already gone
            os._exit(1)
    os.nice(int(os.environ.get("TRAIN_WORKER_NICE", "0")))


if __name__ == "__main__":
    _child_setup()
    if sys.argv[1] == "cli":
        _cli(sys.argv[2:])
    elif sys.argv[1] == "steps":
        _main_flags()
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
