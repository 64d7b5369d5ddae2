"""The training loop: build, resume, step, log, sample, checkpoint, validate (validation.py); stops cleanly on
SIGTERM or a NaN.

Steps are dispatched without reading anything back from the devices: a non-finite loss is recorded on the devices
(`_first_failure`) and noticed at the next log, sample, checkpoint or validation step, before anything is logged or
saved.

One run per workdir (`lock.hold`); resuming skips damaged checkpoints (`Checkpointer.restore_latest`). The workdir
may be a URL (gs://...; see `tadsr_jax.storage`); TensorBoard events go there through tensorboardX, which needs
google-cloud-storage for gs://.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import signal
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from PIL import Image

from tadsr_jax import parallel, storage
from tadsr_jax.checkpoints import Checkpointer, abstract_like, has_saved_steps
from tadsr_jax.data.pipeline import components, make_train_iterator
from tadsr_jax.data.prefetch import DevicePrefetch
from tadsr_jax.infer.model import WeightsSource, load_generator_weights
from tadsr_jax.method.tadsr import GENERATOR, TADSR
from tadsr_jax.models.clip_text import tokenize
from tadsr_jax.train import lock, validation
from tadsr_jax.train.step import (
    TrainState,
    check_config,
    host_metrics,
    init_state,
    make_model,
    optimizer,
    split_model,
    step_program,
    trained_timesteps,
)
from tadsr_jax.weights.loaders import load_networks
from tadsr_jax.weights.lpips import load_lpips, random_lpips

# Steps dispatched ahead of the newest finished one. The loop reads nothing back from the device between log,
# sample and checkpoint steps; this bound keeps the batches of queued steps from piling up on the devices while
# the devices always have the next step queued.
MAX_STEPS_IN_FLIGHT = 2


class TrainingError(RuntimeError):
    """Training stopped for a reason the user must see (e.g. a non-finite loss); the message says which."""


class Interrupted(Exception):
    """SIGTERM stopped training before `train.steps`, after saving a checkpoint; rerunning resumes."""

    # EX_TEMPFAIL of sysexits.h: the job is not done, retry it. Schedulers can requeue on it (README).
    exit_status = 75


@dataclasses.dataclass
class Trainer:
    """Everything one training run needs, built once by `build`."""

    config: ml_collections.ConfigDict
    state: TrainState
    frozen: nnx.State
    rest: nnx.State
    neg_context: jax.Array
    step_fn: Callable  # jitted (state, frozen, rest, batch, neg_context) -> (state, metrics), state donated
    sample_fn: Callable  # jitted (state, frozen, rest, batch, timesteps, key) -> SR images
    batch_sharding: jax.sharding.NamedSharding
    tokenize: Callable[[list[str]], np.ndarray]


def _place(tree, shardings):
    """Host values (identical on every process) -> global arrays with the given shardings."""
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i: np.asarray(x[i])), tree, shardings
    )


def _lpips(config: ml_collections.ConfigDict):
    """The LPIPS network of the loss, in the frozen networks' dtype (`config.model.dtype`)."""
    if not config.loss.lpips:
        return None
    dtype = jnp.dtype(config.model.dtype)
    if config.lpips.path:
        return load_lpips(config.lpips.path, dtype=dtype)
    if config.lpips.random_seed >= 0:
        return random_lpips(config.lpips.random_seed, dtype=dtype)
    raise TrainingError(
        "loss.lpips > 0 needs lpips.path (convert VGG16 + LPIPS weights with launch/convert.py "
        "--what=lpips) or, for offline tests only, lpips.random_seed >= 0"
    )


def build(config: ml_collections.ConfigDict, workdir: str) -> Trainer:
    """Load the networks, attach the adapters, shard everything over the mesh and compile nothing yet."""
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    check_config(config, mesh.size)  # before the slow part
    # Fine-tuning starts from model.init_generator; a resumed run restores its own generator (and never reads it).
    init = None
    if config.model.init_generator and not has_saved_steps(workdir):
        init = init_generator_source(config.model.init_generator)
    nets = load_networks(config.model.pretrained, dtype=jnp.dtype(config.model.dtype))
    model = make_model(config, nets.unet, nets.vae, nets.text_encoder, _lpips(config))
    if init:
        load_init_generator(model, init, config)
    graphdef, generator, fake_score, frozen, rest = split_model(model)
    state = init_state(generator, fake_score, optimizer(config.train), config.seed)
    program = step_program(config, graphdef, nets.schedule, mesh, state, frozen, rest)

    tokenize_fn = _Tokenizer(nets.tokenizer, nets.text_encoder.config.max_position_embeddings)
    neg_ids = jnp.asarray(tokenize_fn([config.train.negative_prompt]))
    neg_context = nnx.jit(lambda te, ids: te(ids))(nets.text_encoder, neg_ids)
    return Trainer(
        config=config,
        state=_place(state, program.state_sharding),
        frozen=_place(frozen, program.frozen_sharding),
        rest=_place(rest, program.rest_sharding),
        neg_context=_place(neg_context, program.replicated),
        step_fn=program.step_fn,
        sample_fn=program.sample_fn,
        batch_sharding=program.batch_sharding,
        tokenize=tokenize_fn,
    )


def init_generator_source(path: str) -> WeightsSource:
    """`model.init_generator` by its kind: the reference's tadsr.pkl, our .safetensors export, a training workdir."""
    if path.endswith(".pkl"):
        return WeightsSource(tadsr_ckpt=path)
    if path.endswith(".safetensors"):
        return WeightsSource(generator=path)
    if storage.isdir(path):
        return WeightsSource(workdir=path)
    raise ValueError(
        f"model.init_generator={path}: not a .pkl (the reference's tadsr.pkl), a .safetensors export "
        f"(launch/convert.py --what=generator) or a training workdir"
    )


def load_init_generator(model: TADSR, source: WeightsSource, config: ml_collections.ConfigDict) -> None:
    """Fine-tuning: `model`'s generator from `source`, in float32 (a bfloat16 base would round the loaded weights);
    the train state built from it starts at step 0 with fresh optimizer states."""
    nnx.update(model, jax.tree.map(lambda x: x.astype(jnp.float32), nnx.state(model, GENERATOR)))
    load_generator_weights(model, source, config)
    logging.info("step 0: the generator of %s, fresh optimizer states", source.describe())


class _Tokenizer:
    """Picklable prompt -> ids callable for the input pipeline's workers."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, prompts: list[str]) -> np.ndarray:
        return tokenize(self.tokenizer, prompts, self.max_length)


def _grid(batch: dict[str, jax.Array], sr: jax.Array, rows: int = 4) -> np.ndarray:
    """LQ | SR | HR rows as uint8."""
    lq, sr, hq = (validation.to_uint8(v[:rows]) for v in (batch["lq"], sr, batch["hq"]))
    return np.concatenate([np.concatenate([a, b, c], axis=1) for a, b, c in zip(lq, sr, hq)], axis=0)


class _Logger:
    """stdout + TensorBoard (tensorboardX) on process 0; silent elsewhere."""

    def __init__(self, workdir: str):
        self.active = jax.process_index() == 0
        self.writer = None
        if self.active:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.active:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        logging.info("step %d: %s", step, json.dumps({k: round(v, 6) for k, v in values.items()}))

    def text(self, step: int, name: str, text: str) -> None:
        if not self.active:
            return
        self.writer.add_text(name, text, step)
        logging.info("step %d: %s\n%s", step, name, text)

    def image(self, step: int, name: str, image: np.ndarray, path: str) -> None:
        if not self.active:
            return
        self.writer.add_image(name, image, step, dataformats="HWC")
        storage.makedirs(os.path.dirname(path))
        storage.atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def check_inputs(config: ml_collections.ConfigDict) -> None:
    """ValueError naming the key when the weights or the training data are not set: a forgotten flag must not
    start a run (the offline stand-ins are written and passed explicitly: tadsr_jax/stand_ins.py)."""
    if not config.model.pretrained:
        raise ValueError(
            "model.pretrained is empty: set it to the SD-2.1-base diffusers folder (offline, for configs/tiny.py: "
            "launch/stand_ins.py writes a tiny stand-in and prints the flags)"
        )
    for name, entry in components(config.data):
        if not entry.path:
            raise ValueError(
                f"{name}.path is empty: set it to the training data ({name}.source={entry.source!r}: "
                "hr_folder, paired_list, tfds or mixture)"
            )


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train to `config.train.steps`, resuming from the latest checkpoint in `workdir`; returns last metrics.

    Raises lock.WorkdirLocked when another run holds `workdir`, Interrupted when SIGTERM stopped it early,
    ValueError on a bad setting (naming its key).
    """
    check_inputs(config)
    _check_tensorboard(workdir)
    validation.check_config(config)
    storage.makedirs(workdir)
    with lock.hold(workdir) as note:
        if note:
            logging.warning("%s", note)
        return _train(config, workdir)


def _check_tensorboard(workdir: str) -> None:
    """tensorboardX writes a gs:// workdir's events itself, through google-cloud-storage: refuse before anything
    loads rather than when the first step is logged."""
    if not workdir.startswith("gs://"):
        return
    from tensorboardX import record_writer

    if not record_writer.GCS_ENABLED:
        raise TrainingError(
            f"--workdir {workdir}: TensorBoard logging to gs:// needs google-cloud-storage "
            f"(pip install google-cloud-storage)"
        )


def _train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    trainer = build(config, workdir)
    cfg = config.train
    validator = (
        validation.create(config, trainer.sample_fn, trainer.batch_sharding, trainer.tokenize)
        if cfg.eval_every
        else None
    )
    host_batches = make_train_iterator(
        config.data,
        global_batch_size=cfg.batch_size,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        tokenize=trainer.tokenize,
    )
    data = DevicePrefetch(
        host_batches,
        functools.partial(parallel.global_batch, sharding=trainer.batch_sharding),
        size=config.data.device_prefetch,
    )
    checkpointer = Checkpointer(workdir, keep=cfg.keep_checkpoints)
    state, start = trainer.state, 0
    restored = checkpointer.restore_latest(abstract_like(state), data, quarantine=True)
    started_from = config.model.init_generator
    if restored:
        start, state = restored
        logging.info("resumed from step %d", start)
        started_from = checkpointer.metadata(start).get("init_generator", "")
        if config.model.init_generator not in ("", started_from):
            logging.warning(
                "model.init_generator=%s not used: the run resumes its own step %d (it started from %s)",
                config.model.init_generator,
                start,
                started_from or "fresh adapters",
            )
    saved_with = {"trained_timesteps": trained_timesteps(cfg), "init_generator": started_from}
    logger = _Logger(workdir)
    stop = {"signal": None}
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
    metrics, last_saved, window_start, window_steps = {}, start, time.perf_counter(), 0
    failure, in_flight = None, collections.deque()
    progress = _progress(start, cfg.steps)
    try:
        for step in range(start + 1, cfg.steps + 1):
            batch = next(data)
            state, step_metrics = trainer.step_fn(state, trainer.frozen, trainer.rest, batch, trainer.neg_context)
            failure = _first_failure(failure, step_metrics, step)
            if step < cfg.steps:
                data.fill()  # the next batches' host work and copies overlap this step
            in_flight.append(failure["step"])
            if len(in_flight) > MAX_STEPS_IN_FLIGHT:
                in_flight.popleft().block_until_ready()
            window_steps += 1
            progress.update(1)
            stopping = stop["signal"] is not None  # read once: a SIGTERM now must not save unchecked
            log = step % cfg.log_every == 0 or step == cfg.steps
            sample = bool(cfg.sample_every) and step % cfg.sample_every == 0
            save = step % cfg.checkpoint_every == 0 or step == cfg.steps or stopping
            evaluate = validator is not None and (step % cfg.eval_every == 0 or step == cfg.steps) and not stopping
            if log or sample or save or evaluate:
                _raise_on_failure(failure, step, last_saved)
            if log:
                metrics = host_metrics(step_metrics)
                elapsed = time.perf_counter() - window_start
                metrics["step_time_s"] = elapsed / window_steps
                metrics["images_per_s"] = cfg.batch_size * window_steps / elapsed
                logger.scalars(step, metrics)
                progress.set_postfix(loss=f"{metrics['loss/generator']:.4f}")
                window_start, window_steps = time.perf_counter(), 0
            if sample:
                t = validation.global_timesteps(cfg.sample_timestep, trainer.batch_sharding, batch["lq"].shape[0])
                sr = trainer.sample_fn(state, trainer.frozen, trainer.rest, batch, t, jax.random.key(0))
                logger.image(
                    step, "samples/lq_sr_hq", _grid(batch, sr), os.path.join(workdir, "samples", f"step_{step:08d}.png")
                )
            if save:
                checkpointer.save(step, state, data, force=True, metadata=saved_with)
                last_saved = step
            if evaluate:
                scalars, table = validation.summary(
                    validator(state, trainer.frozen, trainer.rest), config.data.eval.path, validator.images
                )
                logger.scalars(step, scalars)
                logger.text(step, "eval/table", table)
            if stopping:
                logging.warning("SIGTERM: saved step %d, exiting", step)
                break
    finally:
        checkpointer.wait()
        checkpointer.close()
        logger.close()
        progress.close()
        signal.signal(signal.SIGTERM, previous)
    if stop["signal"] and last_saved < cfg.steps:
        raise Interrupted(f"stopped by SIGTERM at step {last_saved} of {cfg.steps} (saved; rerun to resume)")
    return metrics


@jax.jit
def _first_failure(
    failure: dict[str, jax.Array] | None, metrics: dict[str, jax.Array], step: int
) -> dict[str, jax.Array]:
    """The first non-finite step so far (`step` 0: none yet) and its losses, after this step's `metrics`.

    Computed on the devices, so that no step waits for the previous one to be read back; the loop looks at it
    only before it logs, samples or saves. Steps after a non-finite one still run (the step leaves the state
    unchanged only for the non-finite step itself), but nothing is logged or saved from them.
    """
    now = {
        "step": jnp.where(metrics["finite"], 0, step),
        "loss/generator": metrics["loss/generator"],
        "loss/fake_score": metrics["loss/fake_score"],
    }
    if failure is None:
        return now
    return jax.tree.map(lambda first, new: jnp.where(failure["step"] > 0, first, new), failure, now)


def _raise_on_failure(failure: dict[str, jax.Array], step: int, last_saved: int) -> None:
    """TrainingError naming the first non-finite step and its losses, if there was one."""
    values = host_metrics(failure)
    if values["step"]:
        raise TrainingError(
            f"non-finite loss at step {int(values['step'])} (generator {values['loss/generator']}, "
            f"fake score {values['loss/fake_score']}); stopped at step {step}, nothing saved "
            f"since; last good checkpoint: step {last_saved}"
        )


def _progress(start: int, total: int):
    from tqdm import tqdm

    return tqdm(initial=start, total=total, disable=jax.process_index() != 0, desc="train", unit="step")
