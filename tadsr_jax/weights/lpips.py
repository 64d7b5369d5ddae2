"""LPIPS (v0.1; VGG16 or AlexNet trunk) weights: conversion of the two PyTorch files into one safetensors file,
loading, and a random stand-in for offline configs.

A pretrained LPIPS needs two files: torchvision's ImageNet trunk (`vgg16-397923af.pth` or `alexnet-owt-*.pth`,
a state dict with `features.N.*` and `classifier.*`) and the lpips package's linear heads for that trunk
(`lpips/weights/v0.1/vgg.pth` or `alex.pth`, `lin{k}.model.1.weight`). `convert_lpips_weights` merges the kept
tensors, in PyTorch layout, into one safetensors file that `load_lpips` reads without PyTorch.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tadsr_jax import storage
from tadsr_jax.models.lpips import LPIPS
from tadsr_jax.nn.naming import path_to_torch_key
from tadsr_jax.weights.convert import WeightsError, load_tensors
from tadsr_jax.weights.files import read_tensors, torch_load, write_safetensors


def _read_pth(path: str) -> dict[str, np.ndarray]:
    """A PyTorch state-dict file -> {key: float32 array}."""
    if not storage.isfile(path):
        raise WeightsError(f"{path}: file does not exist")
    try:
        import torch
    except ImportError:
        raise WeightsError(f"{path}: reading .pth files needs PyTorch (pip install torch)") from None
    state = torch_load(path, "not a PyTorch state dict")
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: not a state dict (a {type(state).__name__})")
    return {key: t.detach().float().numpy() for key, t in state.items() if isinstance(t, torch.Tensor)}


# Per trunk: torchvision's model name and the `launch/convert.py --what` that writes its LPIPS file.
TRUNK_NAMES = {"vgg": ("VGG16", "lpips"), "alex": ("AlexNet", "lpips_alex")}


def _abstract(dtype=jnp.float32, net: str = "vgg") -> LPIPS:
    return nnx.eval_shape(lambda: LPIPS(net=net, dtype=dtype, rngs=nnx.Rngs(0)))


def convert_lpips_weights(trunk_path: str, lpips_path: str, out_path: str, *, net: str = "vgg") -> None:
    """torchvision `vgg16-*.pth` (net="vgg") or `alexnet-owt-*.pth` (net="alex") + the lpips package's
    `weights/v0.1/<net>.pth` -> one safetensors file (PyTorch layout).

    Keeps `features.*` (the trunk's convolutions) and `lin*` (heads); drops `classifier.*` and the constant
    `scaling_layer.*` buffers. The result is checked against the model before it is written (atomically).
    Raises WeightsError on a missing/unreadable file or a missing/unexpected/mis-shaped tensor.
    """
    trunk_name = TRUNK_NAMES[net][0]
    trunk = {k: v for k, v in _read_pth(trunk_path).items() if not k.startswith("classifier.")}
    heads = {k: v for k, v in _read_pth(lpips_path).items() if not k.startswith("scaling_layer.")}
    if not any(k.startswith("features.") for k in trunk):
        raise WeightsError(f"{trunk_path}: no 'features.*' tensors; expected torchvision's {trunk_name} state dict")
    if not any(k.startswith("lin") for k in heads):
        raise WeightsError(f"{lpips_path}: no 'lin*' tensors; expected the lpips package's weights/v0.1/{net}.pth")
    tensors = {**trunk, **heads}
    load_tensors(_abstract(net=net), tensors.items(), source=f"{trunk_path} + {lpips_path}")  # validate only
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}
    write_safetensors(out_path, tensors)


def load_lpips(path: str, *, net: str = "vgg", dtype=jnp.float32) -> LPIPS:
    """The LPIPS model with trunk `net` from a file written by `convert_lpips_weights`, weights in `dtype`."""
    if not storage.isfile(path):
        raise WeightsError(
            f"{path}: LPIPS weights file does not exist (see launch/convert.py --what={TRUNK_NAMES[net][1]})"
        )
    return load_tensors(_abstract(dtype, net), read_tensors([path]), source=path, dtype=dtype)


def random_lpips(seed: int, *, dtype=jnp.float32) -> LPIPS:
    """An offline stand-in for tiny configs: random VGG convolutions and non-negative random heads.

    Every tensor is PyTorch's default init U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (heads: its absolute value, as
    LPIPS heads are non-negative), drawn with numpy from (seed, tensor name), so it is deterministic and
    needs no XLA compilation. It is a distance (0 for identical images, never negative) but not perceptual.
    """
    abstract = _abstract(dtype)
    params = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    shapes = {path_to_torch_key(path): tuple(v.shape) for path, v in params}

    def draw(key: str, leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        kernel = shapes[key.rsplit(".", 1)[0] + ".weight"]  # HWIO
        bound = 1.0 / np.sqrt(np.prod(kernel[:3]))
        rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
        value = rng.uniform(-bound, bound, leaf.shape).astype(np.float32)
        return np.abs(value) if key.startswith("lin") else value

    return load_tensors(abstract, (), source=f"random_lpips({seed})", fill_missing=draw, dtype=dtype)
