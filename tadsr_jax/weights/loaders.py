"""Load each network from a standard diffusers/transformers model folder.

Large models are instantiated abstractly (`nnx.eval_shape`) and filled tensor by tensor, so the host never
holds two full copies of the weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from tadsr_jax import storage
from tadsr_jax.diffusion import NoiseSchedule
from tadsr_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from tadsr_jax.models.unet import UNet2DConditionModel, UNetConfig
from tadsr_jax.models.vae import TIME_EMBED_CHANNELS, AutoencoderKL, VAEConfig, time_sinusoid_dim
from tadsr_jax.nn import TimestepEmbedding
from tadsr_jax.nn.naming import path_to_torch_key
from tadsr_jax.weights.convert import WeightsError, load_tensors
from tadsr_jax.weights.files import TRANSFORMERS_BIN, TRANSFORMERS_SAFETENSORS, read_config, read_tensors, weight_files

if TYPE_CHECKING:
    from transformers import CLIPTokenizer


def _config(folder: str, config_cls):
    raw = read_config(folder)
    try:
        return config_cls.from_dict(raw)
    except (TypeError, ValueError) as e:
        raise WeightsError(f"{os.path.join(folder, 'config.json')}: {e}") from None


def load_unet(folder: str, *, dtype=jnp.float32, variant: str | None = None) -> UNet2DConditionModel:
    """A diffusers `unet/` folder -> UNet2DConditionModel with weights in `dtype`."""
    cfg = _config(folder, UNetConfig)
    abstract = nnx.eval_shape(lambda: UNet2DConditionModel(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    files = weight_files(folder, variant=variant)
    return load_tensors(abstract, read_tensors(files), source=folder, dtype=dtype)


# diffusers' legacy VAE attention names (as in SD checkpoints and TADSR's time_vae/).
LEGACY_VAE_ATTENTION = (
    (r"\.query\.", ".to_q."),
    (r"\.key\.", ".to_k."),
    (r"\.value\.", ".to_v."),
    (r"\.proj_attn\.", ".to_out.0."),
)


def _initial_time_layers(cfg: VAEConfig, seed: int):
    """`fill_missing` for a time-aware VAE loaded from a stock folder: zero `time_emb_proj` (so the encoder
    starts as SD's) and a PyTorch-default `time_embedding` MLP (the reference's init is unknown)."""
    mlp = TimestepEmbedding(time_sinusoid_dim(cfg), TIME_EMBED_CHANNELS, rngs=nnx.Rngs(seed))
    fresh = {f"encoder.time_embedding.{path_to_torch_key(p)}": v[...] for p, v in nnx.to_flat_state(nnx.state(mlp))}

    def fill(key: str, leaf: jax.ShapeDtypeStruct):
        if not key.startswith("encoder.") or "time" not in key:
            return None
        if "time_emb_proj" in key:
            return jnp.zeros(leaf.shape, leaf.dtype)
        return fresh[key]

    return fill


def load_vae(
    folder: str, *, time_aware: bool = False, dtype=jnp.float32, variant: str | None = None, seed: int = 0
) -> AutoencoderKL:
    """A diffusers `vae/` folder, or TADSR's `time_vae/` with `time_aware=True`, -> AutoencoderKL.

    A time-aware VAE may be loaded from a stock SD `vae/` folder: the time layers it lacks start as the
    reference recommends (zero `time_emb_proj`, PyTorch-default `time_embedding` from `seed`), so the encoder
    starts out identical to the stock one.
    """
    cfg = _config(folder, VAEConfig)
    files = weight_files(folder, variant=variant)
    abstract = nnx.eval_shape(lambda: AutoencoderKL(cfg, time_aware=time_aware, dtype=dtype, rngs=nnx.Rngs(0)))
    return load_tensors(
        abstract,
        read_tensors(files),
        source=folder,
        rename=LEGACY_VAE_ATTENTION,
        dtype=dtype,
        fill_missing=_initial_time_layers(cfg, seed) if time_aware else None,
    )


def load_schedule(folder: str) -> NoiseSchedule:
    """A diffusers `scheduler/` folder (scheduler_config.json) -> NoiseSchedule."""
    path = os.path.join(folder, "scheduler_config.json")
    try:
        with storage.open_file(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: unreadable scheduler config ({e})") from None
    try:
        return NoiseSchedule.from_config(config)
    except ValueError as e:
        raise WeightsError(f"{path}: {e}") from None


def load_text_encoder(folder: str, *, dtype=jnp.float32) -> CLIPTextModel:
    """A transformers `CLIPTextModel` folder (config.json + model.safetensors or pytorch_model.bin).

    Accepts both key layouts: transformers 5 saves `embeddings.…`, older checkpoints (e.g. SD-2.1's
    text_encoder) `text_model.embeddings.…` plus a `position_ids` buffer.
    """
    cfg = _config(folder, CLIPTextConfig)
    abstract = nnx.eval_shape(lambda: CLIPTextModel(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    files = weight_files(folder, stems=(TRANSFORMERS_SAFETENSORS, TRANSFORMERS_BIN))
    return load_tensors(
        abstract,
        read_tensors(files),
        source=folder,
        rename=[(r"^text_model\.", "")],
        ignore=[r".*position_ids"],
        dtype=dtype,
    )


def load_tokenizer(folder: str) -> CLIPTokenizer:
    """transformers' CLIPTokenizer from a `tokenizer/` folder (vocab.json + merges.txt); a URL's folder is read from
    a temporary local copy, as transformers would take the URL for a Hub repository."""
    from transformers import CLIPTokenizer

    if not storage.isfile(os.path.join(folder, "vocab.json")):
        raise WeightsError(f"{folder}: no vocab.json (expected a CLIP tokenizer folder)")
    with storage.local_copy(folder) as local:
        return CLIPTokenizer.from_pretrained(local)


@dataclasses.dataclass
class Networks:
    """Everything TADSR builds on, loaded from one SD-style folder."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL  # time-aware
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    schedule: NoiseSchedule


def load_networks(folder: str, *, dtype=jnp.float32, text_encoder_dtype=None) -> Networks:
    """unet/, time_vae/ (or a stock vae/, whose encoder then starts without time conditioning), text_encoder/,
    tokenizer/ and scheduler/ of `folder`; the text encoder in `text_encoder_dtype` if given, else `dtype`."""
    if not storage.isdir(folder):
        raise WeightsError(f"{folder}: pretrained model folder does not exist")
    vae_folder = os.path.join(folder, "time_vae")
    if not storage.isdir(vae_folder):
        vae_folder = os.path.join(folder, "vae")
    return Networks(
        unet=load_unet(os.path.join(folder, "unet"), dtype=dtype),
        vae=load_vae(vae_folder, time_aware=True, dtype=dtype),
        text_encoder=load_text_encoder(os.path.join(folder, "text_encoder"), dtype=text_encoder_dtype or dtype),
        tokenizer=load_tokenizer(os.path.join(folder, "tokenizer")),
        schedule=load_schedule(os.path.join(folder, "scheduler")),
    )
