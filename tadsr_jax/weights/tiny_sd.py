"""A tiny Stable-Diffusion stand-in for offline runs (tests, CI, the demo; `tadsr_jax/stand_ins.py` writes it).

Random weights alone cannot super-resolve anything: TADSR keeps the VAE decoder frozen, and a random decoder
maps every latent to noise. So the stand-in gets the two things pretraining gives real SD weights: its VAE is
(nearly) lossless, and the UNet's output is small (its output convolution scaled by UNET_OUT_SCALE: the student
then starts by decoding its own latent and learns its residual from there, while gradients still reach the
layers before it, e.g. the fake score's mid-block LoRA). Everything else (UNet, text encoder, time layers) is
random. The result is a standard diffusers/transformers folder.

Training a small autoencoder to that quality takes far longer than the demo may, so the VAE is constructed:
every ResNet's second convolution is zero (each block passes its input through), and each image channel x is
carried through GroupNorm + SiLU by a group of four channels (x, -x, K, -K). The constant pair dominates the
group's statistics, so GroupNorm scales x by nearly the same factor for every image, and
silu(u) - silu(-u) = u undoes SiLU exactly; the output convolution restores the scale. Latent channel c is image
channel c (the spare latent channels are zero), to within a relative 1e-3, plus the posterior's small noise.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile

import ml_collections
import numpy as np
from absl import logging
from safetensors.numpy import load_file

from tadsr_jax import storage
from tadsr_jax.models.vae import VAEConfig
from tadsr_jax.weights.convert import WeightsError
from tadsr_jax.weights.files import read_config, write_model_folder
from tadsr_jax.weights.tiny import write_random_sd_folder

# The constant pair's magnitude: GroupNorm's scale is off by at most mean(x^2) / (2 K^2) <= 1/800 for |x| <= 1.
CARRIER = 20.0
# A pretrained SD VAE's posterior is narrow; std exp(-5) = 0.0067 here.
POSTERIOR_LOGVAR = -10.0
RGB = 3
UNET_OUT_SCALE = 0.01


def _carry(
    conv_in_w: np.ndarray, conv_in_b: np.ndarray, conv_out_w: np.ndarray, conv_out_b: np.ndarray, channels: int
) -> None:
    """conv_in puts (x_c, -x_c, K, -K) in group c; conv_out reads (silu(.) - silu(-.)) * K/sqrt(2) of it."""
    for arr in (conv_in_w, conv_in_b, conv_out_w, conv_out_b):
        arr[...] = 0
    for c in range(channels):
        conv_in_w[4 * c, c, 1, 1], conv_in_w[4 * c + 1, c, 1, 1] = 1.0, -1.0
        conv_in_b[4 * c + 2], conv_in_b[4 * c + 3] = CARRIER, -CARRIER
        conv_out_w[c, 4 * c, 1, 1], conv_out_w[c, 4 * c + 1, 1, 1] = CARRIER / math.sqrt(2), -CARRIER / math.sqrt(2)


def _checked_vae_config(vae: dict) -> VAEConfig:
    cfg = VAEConfig.from_dict(vae)
    width = cfg.block_out_channels
    if (
        len(width) != 1
        or cfg.mid_block_add_attention
        or width[0] < 4 * RGB
        or cfg.norm_num_groups * 4 != width[0]
        or cfg.latent_channels < RGB
    ):
        raise WeightsError(
            "config.model.vae: the tiny stand-in's VAE must have one block (no downsampling), "
            "mid_block_add_attention=False, >= 12 channels in GroupNorm groups of 4 and >= 3 "
            f"latent channels; got {vae}"
        )
    return cfg


def _identity_vae(folder: str, latent: int) -> None:
    """Rewrite the VAE in `folder` (shaped as `_checked_vae_config` requires) as the near-identity autoencoder
    above; `latent` is its number of latent channels."""
    t = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    for name, value in t.items():
        if name.endswith(("conv2.weight", "conv2.bias")):
            value[...] = 0
    _carry(
        t["encoder.conv_in.weight"],
        t["encoder.conv_in.bias"],
        t["encoder.conv_out.weight"],
        t["encoder.conv_out.bias"],
        RGB,
    )
    _carry(
        t["decoder.conv_in.weight"],
        t["decoder.conv_in.bias"],
        t["decoder.conv_out.weight"],
        t["decoder.conv_out.bias"],
        RGB,
    )
    t["quant_conv.weight"][...] = np.eye(2 * latent, dtype=np.float32)[:, :, None, None]
    t["quant_conv.weight"][latent:] = 0
    t["quant_conv.bias"][...] = 0
    t["quant_conv.bias"][latent:] = POSTERIOR_LOGVAR
    t["post_quant_conv.weight"][...] = np.eye(latent, dtype=np.float32)[:, :, None, None]
    t["post_quant_conv.bias"][...] = 0
    write_model_folder(folder, read_config(folder), t)


def write_tiny_sd(folder: str, model_config: ml_collections.ConfigDict, *, seed: int = 0) -> str:
    """Write the stand-in into `folder` (atomically: built beside it, then renamed). Returns `folder`.

    A URL's stand-in is built in a local temporary folder and uploaded file by file: not atomic (object stores
    cannot rename a folder atomically); a partial upload fails to load with a one-line error naming the file.
    """
    vae = _checked_vae_config(model_config.vae.to_dict())
    logging.info("writing the tiny SD stand-in to %s", folder)
    if storage.is_url(folder):
        with tempfile.TemporaryDirectory(prefix="tadsr_jax-") as tmp:
            storage.upload_tree(write_tiny_sd(os.path.join(tmp, "tiny_sd"), model_config, seed=seed), folder)
        return folder
    staging = folder + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    write_random_sd_folder(
        staging,
        unet=model_config.unet.to_dict(),
        vae=model_config.vae.to_dict(),
        text_encoder=model_config.text_encoder.to_dict(),
        seed=seed,
    )
    _identity_vae(os.path.join(staging, "time_vae"), vae.latent_channels)
    unet_folder = os.path.join(staging, "unet")
    tensors = load_file(os.path.join(unet_folder, "diffusion_pytorch_model.safetensors"))
    tensors["conv_out.weight"] *= UNET_OUT_SCALE
    tensors["conv_out.bias"] *= UNET_OUT_SCALE
    write_model_folder(unet_folder, read_config(unet_folder), tensors)
    os.replace(staging, folder)
    return folder
