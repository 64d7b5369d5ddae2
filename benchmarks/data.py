"""Input-pipeline throughput: degraded 512x512 training examples per second per CPU core.

Scikit-image photos written once as 512x512 PNGs, the reference's training layout (SeeSR-style 512x512 HR
patches), in an HR folder whose LRs are made on the fly with the reference's Real-ESRGAN parameters. Figures: the
per-example transform alone on one core (decode, crop, flip, degrade, scale), and the whole grain pipeline
(batches of `BATCH`) with decoding threads in this process and with one worker process per core, each divided by
the cores. OpenCV runs one thread per process (the pipeline parallelises over examples).
"""

from __future__ import annotations

import os
import time

import numpy as np

from benchmarks.common import Report, progress, weights_folder, write_folder

CROP = 512
SIDE = 512
BATCH = 8


def _images(cache_dir: str | None) -> str:
    from tadsr_jax.data.samples import TRAIN_SAMPLES, write_sample_images

    folder = weights_folder("hr_images", {"side": SIDE, "names": TRAIN_SAMPLES}, cache_dir)
    if not os.path.isdir(folder):
        progress(f"writing {len(TRAIN_SAMPLES)} {SIDE}x{SIDE} sample images to {folder}")
        write_folder(folder, lambda tmp: write_sample_images(tmp, TRAIN_SAMPLES, size=SIDE))
    return folder


def _config(folder: str, workers: int, threads: int):
    from configs import tadsr_sd21

    config = tadsr_sd21.get_config().data
    config.update(
        source="hr_folder",
        path=folder,
        crop_size=CROP,
        degradation="realesrgan",
        num_workers=workers,
        read_threads=threads,
        prefetch=4,
    )
    return config


def _single_core(folder: str, examples: int, warmup: int) -> float:
    """Examples/s of MakeTrainPair alone in this process (one core, one OpenCV thread)."""
    from tadsr_jax.data.pipeline import SOURCES, make_transform

    config = _config(folder, 0, 1)
    source = SOURCES["hr_folder"](config)
    transform = make_transform(config)
    rng = np.random.default_rng(0)
    for i in range(warmup):
        transform.random_map(source[i % len(source)], rng)
    start = time.perf_counter()
    for i in range(examples):
        transform.random_map(source[i % len(source)], rng)
    return examples / (time.perf_counter() - start)


def _pipeline(folder: str, workers: int, threads: int, batches: int, warmup: int) -> float:
    """Examples/s of the whole grain pipeline with `workers` worker processes of `threads` decoding threads."""
    from tadsr_jax.data import make_train_iterator

    iterator = make_train_iterator(
        _config(folder, workers, threads), global_batch_size=BATCH, seed=0, process_index=0, process_count=1
    )
    try:
        for _ in range(warmup):
            next(iterator)
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        return batches * BATCH / (time.perf_counter() - start)
    finally:
        iterator.close()


def run(*, steps: int, warmup: int, cache_dir: str | None) -> Report:
    os.environ["OMP_NUM_THREADS"] = "1"  # numpy's BLAS, here and in the worker processes
    cores = len(os.sched_getaffinity(0))
    folder = _images(cache_dir)
    progress("timing the per-example transform on one core")
    single = _single_core(folder, examples=16 * steps, warmup=max(1, warmup))
    layouts = {f"pipeline, {2 * cores} threads": (0, 2 * cores), f"pipeline, {cores} worker processes": (cores, 1)}
    totals = {}
    for name, (workers, threads) in layouts.items():
        progress(f"timing the {name}")
        totals[name] = _pipeline(folder, workers, threads, batches=4 * steps, warmup=max(1, warmup) * cores)
    best = max(totals, key=totals.get)
    result = {
        "examples_per_s_per_core": round(totals[best] / cores, 2),
        "examples_per_s": round(totals[best], 2),
        "layout": best,
        "cores": cores,
        "single_core_examples_per_s": round(single, 2),
        "crop": CROP,
        "source_side": SIDE,
        "degradation": "realesrgan",
        "batch": BATCH,
    }
    rows = [
        ["transform alone, 1 core", f"{single:.1f}", f"{single:.1f}"],
        *([name, f"{total:.1f}", f"{total / cores:.1f}"] for name, total in totals.items()),
    ]
    return Report(
        title=f"Training input: {CROP}x{CROP} HR crops + Real-ESRGAN LR ({SIDE}x{SIDE} PNG sources)",
        header=["measure", "examples/s", "examples/s/core"],
        rows=rows,
        result=result,
        notes=["target: >= 20 examples/s per core"],
    )
