"""A tiny Stable-Diffusion stand-in for offline runs (tests, CI, the demo), written once into the workdir.

Random weights alone cannot super-resolve anything: TADSR keeps the VAE decoder frozen, and a random decoder
maps every latent to noise. So the stand-in gets the two things pretraining gives real SD weights: its VAE is
trained briefly as an autoencoder on scikit-image samples, and the UNet's output convolution starts at zero
(the student then starts by decoding its own latent, and learns its residual from there). Everything else
(UNet, text encoder, time layers) is random. The result is a standard diffusers/transformers folder.
"""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from safetensors.numpy import load_file

from tadsr_jax.data.samples import TRAIN_SAMPLES, sample_image
from tadsr_jax.weights.convert import WeightsError, state_to_torch
from tadsr_jax.weights.files import read_config, write_model_folder
from tadsr_jax.weights.loaders import load_vae
from tadsr_jax.weights.tiny import write_random_sd_folder

VAE_LR = 2e-3


def _train_autoencoder(folder: str, images: np.ndarray, *, steps: int, crop: int, batch: int, seed: int) -> None:
    """Fit time_vae/ to reconstruct random crops of `images` (N,H,W,3 in [-1,1]) through a posterior sample."""
    vae = load_vae(folder, time_aware=True)
    graphdef, params = nnx.split(vae, nnx.Param)
    tx = optax.adam(VAE_LR)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, key):
        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            z = model.encode(x, jnp.zeros((x.shape[0],), jnp.int32)).sample(key)
            return jnp.mean(jnp.square(model.decode(z) - x))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    for i in range(steps):
        idx = rng.integers(0, len(images), batch)
        top, left = rng.integers(0, images.shape[1] - crop + 1, 2)
        x = jnp.asarray(images[idx, top:top + crop, left:left + crop])
        params, opt_state, loss = step(params, opt_state, x, jax.random.key(i))
    logging.info("tiny SD stand-in: VAE reconstruction MSE %.4f after %d steps", float(loss), steps)
    write_model_folder(folder, read_config(folder), state_to_torch(nnx.merge(graphdef, params)))


def write_tiny_sd(folder: str, model_config: ml_collections.ConfigDict, *, seed: int = 0, vae_steps: int = 300,
                  image_size: int = 128, crop: int = 32, batch: int = 8) -> str:
    """Write the stand-in into `folder` (atomically: built beside it, then renamed). Returns `folder`."""
    staging = folder + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    write_random_sd_folder(staging, unet=model_config.unet.to_dict(), vae=model_config.vae.to_dict(),
                           text_encoder=model_config.text_encoder.to_dict(), seed=seed)
    images = np.stack([np.asarray(sample_image(n, image_size), np.float32) / 127.5 - 1 for n in TRAIN_SAMPLES])
    _train_autoencoder(os.path.join(staging, "time_vae"), images, steps=vae_steps, crop=crop, batch=batch, seed=seed)
    unet_folder = os.path.join(staging, "unet")
    tensors = load_file(os.path.join(unet_folder, "diffusion_pytorch_model.safetensors"))
    tensors["conv_out.weight"][...] = 0
    tensors["conv_out.bias"][...] = 0
    write_model_folder(unet_folder, read_config(unet_folder), tensors)
    os.replace(staging, folder)
    return folder


def resolve_pretrained(model_config: ml_collections.ConfigDict, workdir: str) -> str:
    """`model_config.pretrained`, or the tiny stand-in of its architectures, written once under `workdir`."""
    if model_config.pretrained:
        return model_config.pretrained
    if not model_config.unet:
        raise WeightsError("config.model.pretrained is empty: set it to the SD-2.1-base diffusers folder")
    folder = os.path.join(workdir, "tiny_sd")
    if not os.path.isdir(folder):
        logging.info("writing the tiny SD stand-in to %s (once)", folder)
        write_tiny_sd(folder, model_config)
    return folder
