"""What launch/sr.py runs: config + weights + inputs -> written outputs and a report."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import TextIO

import ml_collections

from tadsr_jax.images import list_images, read_captions
from tadsr_jax.infer.batch import RunReport, super_resolve_files, sweep_files
from tadsr_jax.infer.model import WeightsSource, load_sr_model, serving_dtype
from tadsr_jax.infer.outputs import plan_outputs, sweep_suffixes
from tadsr_jax.infer.pipeline import SRSettings, Upscaler
from tadsr_jax.infer.tagger import load_tagger
from tadsr_jax.weights.convert import WeightsError


def pretrained_folder(config: ml_collections.ConfigDict) -> str:
    """config.model.pretrained, which must be set (the SD folder holds the frozen networks)."""
    if not config.model.pretrained:
        raise WeightsError(
            "no SD folder: set --config.model.pretrained=/path/to/stable-diffusion-2-1-base (for configs/tiny.py, "
            "the stand-in folder the run was trained with)"
        )
    return config.model.pretrained


def prompts(default: str, captions_path: str = ""):
    """path -> prompt: the captions file's line for the file's name, else `default`."""
    captions = read_captions(captions_path) if captions_path else {}
    return lambda path: captions.get(os.path.basename(path), default)


def timestep_warning(trained: Sequence[int] | None, requested: Sequence[int]) -> str | None:
    """One line when a requested timestep lies outside the [lowest, highest] one the generator was trained at
    (outside it the output is unreliable, e.g. false colours); None when all are inside or nothing is recorded."""
    if not trained:
        return None
    low, high = trained
    outside = sorted({int(t) for t in requested if not low <= t <= high})
    if not outside:
        return None
    return (
        f"warning: timestep {', '.join(map(str, outside))} is outside the range this generator was trained at "
        f"({low}..{high}, train.max_student_timestep): expect unreliable output (e.g. false colours)"
    )


def run(
    config: ml_collections.ConfigDict,
    input_path: str,
    output_dir: str,
    source: WeightsSource,
    *,
    captions: str = "",
    sweep: Sequence[int] | None = None,
    log: TextIO = sys.stderr,
) -> RunReport:
    """Super-resolve `input_path` (a file or directory) into `output_dir` with the settings of `config.sr`.

    Everything that can be checked without the model is checked before it loads: settings, inputs, and every
    output path (outputs.plan_outputs).
    """
    settings = SRSettings.from_config(config.sr)
    for t in sweep or ():
        if not 1 <= t <= 999:
            raise ValueError(f"sweep timesteps must be in 1..999, got {t}")
        if sweep.count(t) > 1:
            raise ValueError(f"sweep timesteps must differ, got {t} {sweep.count(t)} times")
    paths = list_images(input_path)
    plan = plan_outputs(input_path, paths, output_dir, sweep_suffixes(sweep) if sweep else ("",))
    tagger = load_tagger(config.sr.tagger, dtype=serving_dtype(config)) if config.sr.tagger else None
    model = load_sr_model(config, pretrained_folder(config), source)
    print(f"loaded SR model ({source.describe()}); {len(paths)} input(s)", file=log)
    warning = timestep_warning(model.trained_timesteps, sweep or [settings.timestep])
    if warning:
        print(warning, file=log)
    upscaler = Upscaler(model, settings, tagger)
    prompt_for = prompts(config.sr.prompt, captions)
    if sweep:
        return sweep_files(upscaler, plan, prompt_for, sweep, log=log)
    firsts = {path: targets[0] for path, targets in plan.items()}
    return super_resolve_files(upscaler, firsts, prompt_for, save_prompts=config.sr.save_prompts, log=log)
