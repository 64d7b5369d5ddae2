"""The README's demo: train the configured model briefly, then super-resolve held-out scikit-image samples x4.

Writes LQ | bicubic | SR | HR panels to <workdir>/demo/ and returns PSNRs of bicubic and SR against HR.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from PIL import Image

from tadsr_jax import parallel
from tadsr_jax.data.samples import HELD_OUT_SAMPLES, sample_image
from tadsr_jax.train import loop
from tadsr_jax.train.checkpoint import Checkpointer, abstract_like

SCALE = 4


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of uint8 RGB images in dB."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


def _to_uint8(x) -> np.ndarray:
    return np.asarray(np.round((np.clip(np.asarray(x, np.float32), -1, 1) + 1) * 127.5), np.uint8)


def run(config: ml_collections.ConfigDict, workdir: str, *, hr_size: int = 128) -> dict:
    train_metrics = loop.train(config, workdir)
    trainer = loop.build(config, workdir)
    state = Checkpointer(workdir, keep=config.train.keep_checkpoints).restore(abstract_like(trainer.state))

    hr = [sample_image(name, hr_size) for name in HELD_OUT_SAMPLES]
    lq = [im.resize((hr_size // SCALE,) * 2, Image.BICUBIC) for im in hr]
    bicubic = [im.resize((hr_size,) * 2, Image.BICUBIC) for im in lq]
    n = len(hr)
    batch = parallel.global_batch({
        "lq": np.stack([np.asarray(im, np.float32) / 127.5 - 1 for im in bicubic]),
        "input_ids": trainer.tokenize([config.sr.prompt] * n),
        "t": np.full((n,), config.sr.timestep, np.int32)}, trainer.batch_sharding)
    sr = _to_uint8(trainer.sample_fn(state, trainer.frozen, trainer.rest, batch, batch["t"], jax.random.key(config.seed)))

    out_dir = os.path.join(workdir, "demo")
    os.makedirs(out_dir, exist_ok=True)
    psnr_bicubic, psnr_sr = [], []
    for name, hr_im, lq_im, bic, sr_im in zip(HELD_OUT_SAMPLES, hr, lq, bicubic, sr):
        hr_np, bic_np = np.asarray(hr_im), np.asarray(bic)
        lq_big = np.asarray(lq_im.resize((hr_size,) * 2, Image.NEAREST))
        Image.fromarray(np.concatenate([lq_big, bic_np, sr_im, hr_np], axis=1)).save(os.path.join(out_dir, f"{name}.png"))
        psnr_bicubic.append(psnr(bic_np, hr_np))
        psnr_sr.append(psnr(sr_im, hr_np))
    return {"output_dir": out_dir, "images": list(HELD_OUT_SAMPLES), "timestep": config.sr.timestep,
            "train_steps": config.train.steps, "final_l2": round(train_metrics.get("loss/l2", float("nan")), 5),
            "psnr_bicubic": round(float(np.mean(psnr_bicubic)), 3), "psnr_sr": round(float(np.mean(psnr_sr)), 3)}
