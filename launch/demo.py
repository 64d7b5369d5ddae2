"""python launch/demo.py [--config=configs/tiny.py] [--workdir=out/demo]

Trains the config (tiny: a few hundred CPU steps), then super-resolves held-out scikit-image samples x4 through
the inference pipeline (the generator from the workdir's latest checkpoint, as `launch/sr.py --workdir` does),
saying what it is doing at each stage: before the training bar moves, a CPU spends most of a minute writing the
stand-in model and compiling the train step. Writes LQ | bicubic | SR | HR panels to <workdir>/demo/; the last
line printed is a JSON object with psnr_bicubic and psnr_sr.
"""

import json
import os
import sys
from typing import TextIO

import ml_collections
import numpy as np
from absl import flags
from PIL import Image

from tadsr_jax import cli, runtime, storage

_CONFIG = cli.define_config("configs/tiny.py")
_WORKDIR = flags.DEFINE_string("workdir", "out/demo", "Where the model, checkpoints and outputs go.")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of uint8 RGB images in dB."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / max(mse, 1e-12)))


def _say(log: TextIO, message: str) -> None:
    print(f"demo: {message}", file=log, flush=True)


def run(config: ml_collections.ConfigDict, workdir: str, *, hr_size: int = 128, log: TextIO = sys.stderr) -> dict:
    """Train, then super-resolve the held-out samples; returns the figures printed as JSON."""
    from tadsr_jax.data.samples import HELD_OUT_SAMPLES, sample_image
    from tadsr_jax.images import write_png_atomic
    from tadsr_jax.infer.model import WeightsSource, load_sr_model
    from tadsr_jax.infer.pipeline import SRSettings, Upscaler, bicubic_upscale
    from tadsr_jax.infer.session import pretrained_folder
    from tadsr_jax.stand_ins import write_stand_ins
    from tadsr_jax.train import loop

    if not config.model.pretrained:  # configs/tiny.py offline: stand-in weights and training images
        stand_ins = write_stand_ins(os.path.join(workdir, "stand_ins"), config)
        _say(log, f"offline stand-ins: SD model {stand_ins.pretrained}, training images {stand_ins.images}")
        stand_ins.apply(config)
    _say(
        log,
        f"training to step {config.train.steps} in {workdir}; the bar starts moving once the train step is compiled",
    )
    train_metrics = loop.train(config, workdir)
    settings = SRSettings.from_config(config.sr)
    scale = settings.scale
    _say(
        log,
        f"super-resolving {len(HELD_OUT_SAMPLES)} held-out samples x{scale} at t={config.sr.timestep} "
        "(compiling the SR program first)",
    )
    model = load_sr_model(config, pretrained_folder(config), WeightsSource(workdir=workdir))
    upscaler = Upscaler(model, settings)

    hr_size -= hr_size % scale  # HR = scale x LQ exactly
    hr = [np.asarray(sample_image(name, hr_size)) for name in HELD_OUT_SAMPLES]
    lq = [np.asarray(Image.fromarray(im).resize((hr_size // scale,) * 2, Image.BICUBIC)) for im in hr]
    bicubic = [bicubic_upscale(im, scale) for im in lq]
    sr = upscaler.super_resolve(lq, [config.sr.prompt] * len(lq))

    out_dir = os.path.join(workdir, "demo")
    storage.makedirs(out_dir)
    psnr_bicubic, psnr_sr = [], []
    for name, hr_im, lq_im, bic, sr_im in zip(HELD_OUT_SAMPLES, hr, lq, bicubic, sr):
        lq_big = np.repeat(np.repeat(lq_im, scale, axis=0), scale, axis=1)
        write_png_atomic(os.path.join(out_dir, f"{name}.png"), np.concatenate([lq_big, bic, sr_im, hr_im], axis=1))
        psnr_bicubic.append(psnr(bic, hr_im))
        psnr_sr.append(psnr(sr_im, hr_im))
    _say(log, f"wrote LQ | bicubic | SR | HR panels to {out_dir}")
    return {
        "output_dir": out_dir,
        "images": list(HELD_OUT_SAMPLES),
        "timestep": config.sr.timestep,
        "color_fix": config.sr.color_fix,
        "train_steps": config.train.steps,
        "final_l2": round(train_metrics.get("loss/l2", float("nan")), 5),
        "psnr_bicubic": round(float(np.mean(psnr_bicubic)), 3),
        "psnr_sr": round(float(np.mean(psnr_sr)), 3),
    }


def main(argv):
    del argv
    runtime.set_xla_cpu_flags()
    runtime.enable_compilation_cache()
    from tadsr_jax.train.loop import TrainingError
    from tadsr_jax.weights.convert import WeightsError

    try:
        print(json.dumps(run(_CONFIG.value, _WORKDIR.value)))
    except (TrainingError, WeightsError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # a setting that cannot work, e.g. data.path empty beside a real model.pretrained
        cli.usage_error(str(e))
    return 0


if __name__ == "__main__":
    cli.run(main)
