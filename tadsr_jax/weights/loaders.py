"""Load each network from a standard diffusers/transformers model folder.

Large models are instantiated abstractly (`nnx.eval_shape`) and filled tensor by tensor, so the host never
holds two full copies of the weights.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from tadsr_jax.models.unet import UNet2DConditionModel, UNetConfig
from tadsr_jax.weights.convert import WeightsError, load_tensors
from tadsr_jax.weights.files import read_config, read_tensors, weight_files


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
