"""The README's demo: super-resolve a scikit-image sample x4 with the configured model and save a comparison."""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image

from tadsr_jax.method.generator import generate
from tadsr_jax.models.clip_text import encode_prompts
from tadsr_jax.weights.loaders import load_networks
from tadsr_jax.weights.tiny import resolve_pretrained

SCALE = 4


def _to_unit(image: Image.Image) -> jax.Array:
    return jnp.asarray(np.asarray(image, np.float32) / 127.5 - 1.0)[None]


def _to_uint8(x: jax.Array) -> np.ndarray:
    return np.asarray(jnp.round((jnp.clip(x[0], -1, 1) + 1) * 127.5), np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))


def run(config: ml_collections.ConfigDict, workdir: str, *, hr_size: int = 128) -> dict:
    """Degrade skimage's astronaut by bicubic /4, super-resolve it, write LQ | bicubic | SR to workdir/demo.png."""
    from skimage import data

    os.makedirs(workdir, exist_ok=True)
    nets = load_networks(resolve_pretrained(config.model, workdir), dtype=jnp.dtype(config.model.dtype))
    hr = Image.fromarray(data.astronaut()).resize((hr_size, hr_size), Image.BICUBIC)
    lq = hr.resize((hr_size // SCALE, hr_size // SCALE), Image.BICUBIC)
    bicubic = lq.resize((hr_size, hr_size), Image.BICUBIC)

    context = encode_prompts(nets.text_encoder, nets.tokenizer, [config.sr.prompt])
    timesteps = jnp.full((1,), config.sr.timestep, jnp.int32)
    sr_fn = nnx.jit(lambda vae, unet, lq, key: generate(vae, unet, nets.schedule, lq, timesteps, context, key,
                                                        sample_posterior=config.sr.sample_posterior)[1])
    start = time.perf_counter()
    sr = _to_uint8(sr_fn(nets.vae, nets.unet, _to_unit(bicubic), jax.random.key(config.seed)))
    seconds = time.perf_counter() - start

    panel = np.concatenate([np.asarray(lq.resize((hr_size, hr_size), Image.NEAREST)), np.asarray(bicubic), sr], 1)
    output = os.path.join(workdir, "demo.png")
    Image.fromarray(panel).save(output)
    hr_np = np.asarray(hr)
    return {"output": output, "seconds_with_compile": round(seconds, 2),
            "psnr_bicubic": round(psnr(np.asarray(bicubic), hr_np), 3), "psnr_sr": round(psnr(sr, hr_np), 3)}
