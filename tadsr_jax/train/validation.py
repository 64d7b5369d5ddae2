"""Validation during training (`train.eval_every`): the current generator on the held-out set `config.data.eval` at
`train.eval_timesteps`, scored by `tadsr_jax.evaluation.Scorer`, the code of launch/evaluate.py (PSNR/SSIM on Y;
LPIPS/DISTS when `lpips.path`/`dists.path` are set), on 8-bit images as evaluate.py scores PNG files.

Eval batch k holds images kB..(k+1)B-1 of the set (B = train.batch_size, the global batch); each process loads and
scores only its rows of it (`parallel.process_row_slice`, the rows it feeds in training). The last batch is padded
with blank rows that are masked out of the means, so the loop's jitted sampler (`StepProgram.sample_fn`, which also
draws the sample grids, on batches of the same shape) serves every batch with one compiled program. Score sums and
image counts are added over the processes (`parallel.process_sum`): every image weighs the same whatever the
process count.

One image: the central data.crop_size crop (smaller images upscaled first), no flip, its listed (or tfds) LR or one
made by data.degradation with an rng seeded by (seed, image index), so every validation sees the same LQ. The SR
is the raw generator output (no colour fix, unlike launch/sr.py) rounded to 8 bits as a PNG of it would be; batch
k's posterior noise comes from `jax.random.key(k)`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging

from tadsr_jax import evaluation, parallel
from tadsr_jax.data.pipeline import make_eval_source, make_eval_transform
from tadsr_jax.data.transforms import to_float
from tadsr_jax.infer import pipeline


def timesteps(train_config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """`train.eval_timesteps`, or the sample grids' timestep when it is empty."""
    return tuple(train_config.eval_timesteps) or (train_config.sample_timestep,)


def check_config(config: ml_collections.ConfigDict) -> None:
    """ValueError naming the key when validation is asked for but cannot run: call it before anything loads."""
    every = config.train.eval_every
    if every < 0:
        raise ValueError(f"train.eval_every must be >= 0 (0: no validation), got {every}")
    if not every:
        return
    if not config.data.eval.path:
        raise ValueError(
            f"train.eval_every is {every} but data.eval.path is empty: set it to a held-out image "
            f"folder, paired list or tfds name (data.eval.source: hr_folder, paired_list or tfds)"
        )
    outside = [t for t in timesteps(config.train) if not 1 <= t <= 999]
    if outside:
        raise ValueError(f"train.eval_timesteps must be in 1..999, got {outside[0]}")


def metric_names(config: ml_collections.ConfigDict) -> list[str]:
    """PSNR and SSIM, plus LPIPS and DISTS when their weights are configured."""
    return ["psnr", "ssim"] + [
        name for name, path in (("lpips", config.lpips.path), ("dists", config.dists.path)) if path
    ]


def to_uint8(images) -> np.ndarray:
    """Images in [-1, 1] -> uint8, rounded as the SR pipeline rounds its outputs: the pixels of a PNG of them."""
    return pipeline.to_uint8((np.asarray(images, np.float32) + 1) * np.float32(0.5))


def global_timesteps(t: int, sharding: jax.sharding.NamedSharding, global_batch: int) -> jax.Array:
    """The sampler's `timesteps` argument: `t` for each of `global_batch` rows, sharded as batches are."""
    return parallel.global_batch({"t": np.full(global_batch // jax.process_count(), t, np.int32)}, sharding)["t"]


@dataclasses.dataclass(frozen=True)
class EvalShard:
    """This process's rows of every eval batch. Blank rows (padding, or an image that failed to decode) are zeros
    with `mask` False."""

    lq: np.ndarray  # (batches, rows, H, W, 3) uint8
    hq: np.ndarray  # (batches, rows, H, W, 3) uint8
    input_ids: np.ndarray  # (batches, rows, T) int32
    mask: np.ndarray  # (batches, rows) bool: a real image


def load_shard(
    data_config: ml_collections.ConfigDict,
    seed: int,
    global_batch: int,
    rows: slice,
    tokenize: Callable[[list[str]], np.ndarray],
) -> EvalShard:
    """Rows `rows` of every global batch of `data_config.eval` (see the module docstring)."""
    source, transform = make_eval_source(data_config), make_eval_transform(data_config)
    batches, local = -(-len(source) // global_batch), rows.stop - rows.start
    size = data_config.crop_size
    lq, hq = (np.zeros((batches, local, size, size, 3), np.uint8) for _ in range(2))
    mask = np.zeros((batches, local), bool)
    prompts = [[""] * local for _ in range(batches)]
    for k in range(batches):
        for r in range(local):
            index = k * global_batch + rows.start + r
            example = (
                transform.random_map(source[index], np.random.default_rng((seed, index)))
                if index < len(source)
                else None
            )
            if example is not None:
                lq[k, r], hq[k, r], mask[k, r] = to_uint8(example["lq"]), to_uint8(example["hq"]), True
                prompts[k][r] = example["prompt"]
    input_ids = np.stack([np.asarray(tokenize(p), np.int32) for p in prompts])
    return EvalShard(lq=lq, hq=hq, input_ids=input_ids, mask=mask)


def mean_over_processes(sums: dict[str, float], count: int) -> dict[str, float]:
    """Each metric's mean over all processes' images, from this process's score sums and image count."""
    totals = parallel.process_sum(np.array([*sums.values(), count], np.float64))
    return {name: float(total / totals[-1]) for name, total in zip(sums, totals[:-1])}


class Validator:
    """`validator(state, frozen, rest)` -> {timestep: {metric: mean}}, the same on every process."""

    def __init__(
        self,
        shard: EvalShard,
        scorer: evaluation.Scorer,
        sample_fn: Callable,
        batch_sharding: jax.sharding.NamedSharding,
        eval_timesteps: tuple[int, ...],
    ):
        self.shard, self.scorer, self.sample_fn = shard, scorer, sample_fn
        self.batch_sharding, self.timesteps = batch_sharding, eval_timesteps
        self.global_batch = shard.mask.shape[1] * jax.process_count()
        self.images = int(parallel.process_sum(np.array([shard.mask.sum()]))[0])

    def _batch(self, k: int) -> dict[str, jax.Array]:
        """Global eval batch k, with the keys, dtypes and shapes of a training batch (the sampler's argument)."""
        local = {
            "hq": to_float(self.shard.hq[k]),
            "lq": to_float(self.shard.lq[k]),
            "input_ids": self.shard.input_ids[k],
        }
        return parallel.global_batch(local, self.batch_sharding)

    def outputs(self, state, frozen, rest, t: int) -> Iterator[np.ndarray]:
        """This process's rows of each eval batch super-resolved at `t`, as uint8 (blank rows included)."""
        rows = parallel.process_row_slice(self.batch_sharding, self.global_batch)
        timesteps_arg = global_timesteps(t, self.batch_sharding, self.global_batch)
        for k in range(self.shard.mask.shape[0]):
            sr = self.sample_fn(state, frozen, rest, self._batch(k), timesteps_arg, jax.random.key(k))
            yield to_uint8(np.asarray(sr)[rows])

    def __call__(self, state, frozen, rest) -> dict[int, dict[str, float]]:
        means = {}
        for t in self.timesteps:
            sums = dict.fromkeys(self.scorer.names, 0.0)
            for k, sr in enumerate(self.outputs(state, frozen, rest, t)):
                scores = self.scorer(sr.astype(np.float32) / 255.0, self.shard.hq[k].astype(np.float32) / 255.0)
                for name, values in scores.items():
                    sums[name] += float(np.sum(values[self.shard.mask[k]]))
            means[t] = mean_over_processes(sums, int(self.shard.mask.sum()))
        return means


def create(
    config: ml_collections.ConfigDict,
    sample_fn: Callable,
    batch_sharding: jax.sharding.NamedSharding,
    tokenize: Callable[[list[str]], np.ndarray],
) -> Validator:
    """Load this process's part of `config.data.eval` and the metric networks."""
    rows = parallel.process_row_slice(batch_sharding, config.train.batch_size)
    shard = load_shard(config.data, config.seed, config.train.batch_size, rows, tokenize)
    scorer = evaluation.Scorer(
        metric_names(config),
        lpips=evaluation.load_metric_net("lpips", config.lpips.path),
        dists=evaluation.load_metric_net("dists", config.dists.path),
    )
    validator = Validator(shard, scorer, sample_fn, batch_sharding, timesteps(config.train))
    logging.info(
        "validation: %d images of %s in %d batches, at t=%s: %s",
        validator.images,
        config.data.eval.path,
        shard.mask.shape[0],
        ",".join(map(str, validator.timesteps)),
        ", ".join(scorer.names),
    )
    return validator


def summary(means: dict[int, dict[str, float]], dataset: str, images: int) -> tuple[dict[str, float], str]:
    """Scalars `eval/<metric>_t<T>` (TensorBoard tags cannot hold "@") and the markdown table of launch/evaluate.py
    (one column per timestep)."""
    scalars = {f"eval/{name}_t{t}": value for t, column in means.items() for name, value in column.items()}
    columns = {f"t={t}": column for t, column in means.items()}
    return scalars, evaluation.markdown_table(
        os.path.basename(os.path.normpath(dataset)), columns, dict.fromkeys(columns, images)
    )
