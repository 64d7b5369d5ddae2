"""Super-resolve files: read, batch by shape, write atomically; a bad input costs one line, not the run."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TextIO

import numpy as np
from tqdm import tqdm

from tadsr_jax import storage
from tadsr_jax.images import ImageError, LoadedImage, read_rgb, write_png_atomic
from tadsr_jax.infer.contact_sheet import contact_sheet
from tadsr_jax.infer.pipeline import Upscaler, bicubic_upscale, padded_shape, working_size


@dataclasses.dataclass
class RunReport:
    written: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)  # one line each: "<path>: <problem>"

    def summary(self) -> dict:
        return {"written": len(self.written), "failed": len(self.failed)}


def _load(path: str, report: RunReport, log: TextIO) -> LoadedImage | None:
    try:
        image = read_rgb(path)
    except ImageError as e:
        report.failed.append(str(e))
        tqdm.write(f"error: {e}", file=log)
        return None
    for note in image.notes:
        tqdm.write(f"note: {path}: {note}", file=log)
    return image


def super_resolve_files(
    upscaler: Upscaler,
    outputs: Mapping[str, str],
    prompt_for: Callable[[str], str],
    *,
    save_prompts: bool = False,
    log: TextIO = sys.stderr,
) -> RunReport:
    """Each readable input image -> its output path (`outputs`, from outputs.plan_outputs) at x settings.scale;
    same-shape images share a batch. `save_prompts`: each image's prompt (tags included) goes to `<output>.txt`.

    Images are read as they come and held until their shape's batch is full (or the inputs end), so memory is
    bounded by the number of distinct shapes times the batch size, not by the number of files.
    """
    report = RunReport()
    pending: dict[tuple[int, int], list[LoadedImage]] = {}
    settings = upscaler.settings
    bar = tqdm(total=len(outputs), unit="img", desc="super-resolving", file=log, disable=not outputs)

    def flush(shape: tuple[int, int]) -> None:
        batch = pending.pop(shape, [])
        if not batch:
            return
        start, compiled = time.perf_counter(), upscaler.compile_seconds
        results, prompts = upscaler.super_resolve_with_prompts(
            [im.pixels for im in batch], [prompt_for(im.path) for im in batch]
        )
        compiled = upscaler.compile_seconds - compiled
        seconds = (time.perf_counter() - start - compiled) / len(batch)
        compile_note = f" (+ {compiled:.1f} s compiling for this shape, once)" if compiled else ""
        for image, out, prompt in zip(batch, results, prompts):
            if not _write(outputs[image.path], out, report, log):
                continue
            if save_prompts:
                _write_prompt(outputs[image.path], prompt, report, log)
            h, w = image.pixels.shape[:2]
            tqdm.write(
                f"{image.path}: {w}x{h} -> {out.shape[1]}x{out.shape[0]} in {seconds:.2f} s{compile_note}", file=log
            )
        bar.update(len(batch))

    for path in outputs:
        image = _load(path, report, log)
        if image is None:
            bar.update(1)
            continue
        shape = padded_shape(
            working_size(*image.pixels.shape[:2], settings.process_size, settings.scale), settings.bucket
        )
        pending.setdefault(shape, []).append(image)
        if len(pending[shape]) == settings.batch_size:
            flush(shape)
    for shape in list(pending):
        flush(shape)
    bar.close()
    return report


def sweep_files(
    upscaler: Upscaler,
    outputs: Mapping[str, Sequence[str]],
    prompt_for: Callable[[str], str],
    timesteps: Sequence[int],
    *,
    log: TextIO = sys.stderr,
) -> RunReport:
    """Each input image at every timestep -> its output paths (`outputs`, from outputs.plan_outputs with
    sweep_suffixes): one per timestep, written as it comes, then the contact sheet (the bicubic input, then one
    labelled panel per timestep). The progress bar advances per (image, timestep)."""
    report = RunReport()
    bar = tqdm(total=len(outputs) * len(timesteps), unit="output", desc="timestep sweep", file=log, disable=not outputs)
    for path, targets in outputs.items():
        image = _load(path, report, log)
        if image is None:
            bar.update(len(timesteps))
            continue
        start = time.perf_counter()
        scale = upscaler.settings.scale
        panels = [(f"input (bicubic x{scale})", bicubic_upscale(image.pixels, scale))]
        for (t, out), target in zip(upscaler.sweep(image.pixels, prompt_for(path), timesteps), targets):
            _write(target, out, report, log)
            panels.append((f"t = {t}", out))
            bar.update(1)
        _write(targets[-1], contact_sheet(panels), report, log)
        (h, w), (out_h, out_w) = image.pixels.shape[:2], panels[0][1].shape[:2]
        tqdm.write(
            f"{path}: {w}x{h} -> {out_w}x{out_h} at {len(timesteps)} timesteps in {time.perf_counter() - start:.1f} s",
            file=log,
        )
    bar.close()
    return report


def _write_prompt(target: str, prompt: str, report: RunReport, log: TextIO) -> None:
    """`<target without extension>.txt` holds the prompt the image was run with (the reference's --save_prompts)."""
    path = os.path.splitext(target)[0] + ".txt"
    try:
        storage.atomic_write_text(path, prompt + "\n")
    except OSError as e:
        report.failed.append(f"{path}: cannot write: {e.strerror or e}")
        tqdm.write(f"error: {report.failed[-1]}", file=log)


def _write(target: str, pixels: np.ndarray, report: RunReport, log: TextIO) -> bool:
    """Writes one output; a failure costs one line in `report.failed` and the log."""
    try:
        write_png_atomic(target, pixels)
    except OSError as e:
        report.failed.append(f"{target}: cannot write: {e.strerror or e}")
        tqdm.write(f"error: {report.failed[-1]}", file=log)
        return False
    report.written.append(target)
    return True
