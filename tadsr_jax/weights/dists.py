"""DISTS weights: conversion of the two PyTorch files into one safetensors file, loading, and a random stand-in
for offline configs.

The pretrained DISTS needs torchvision's ImageNet VGG16 (`vgg16-397923af.pth`, `features.N.*` and
`classifier.*`) and DISTS_pytorch's `weights.pt` (`alpha`, `beta`, each (1, 1475, 1, 1)).
`convert_dists_weights` merges the kept tensors, in PyTorch layout, into one safetensors file that
`load_dists` reads without PyTorch.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tadsr_jax import storage
from tadsr_jax.models.dists import CHANNELS, DISTS
from tadsr_jax.nn.naming import path_to_torch_key
from tadsr_jax.weights.convert import WeightsError, load_tensors
from tadsr_jax.weights.files import read_tensors, write_safetensors
from tadsr_jax.weights.lpips import _read_pth

WEIGHT_NAMES = ("alpha", "beta")
WEIGHT_SHAPE = (1, sum(CHANNELS), 1, 1)  # PyTorch layout of alpha and beta
# The trunk's parameters; `alpha` / `beta` are set apart, as they are not `<module>.weight` tensors.
TRUNK = nnx.All(nnx.Param, nnx.PathContains("features"))


def _abstract(dtype=jnp.float32) -> DISTS:
    return nnx.eval_shape(lambda: DISTS(dtype=dtype, rngs=nnx.Rngs(0)))


def _checked_weights(weights: dict[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """alpha and beta, present, (1, 1475, 1, 1) and finite -> {name: (1475,) float32}."""
    out = {}
    for name in WEIGHT_NAMES:
        if name not in weights:
            raise WeightsError(f"{source}: missing tensor {name!r}")
        value = np.asarray(weights[name], np.float32)
        if value.shape != WEIGHT_SHAPE:
            raise WeightsError(f"{source}: tensor {name!r} has shape {value.shape}, DISTS expects {WEIGHT_SHAPE}")
        if not np.isfinite(value).all():
            raise WeightsError(f"{source}: tensor {name!r} has non-finite values")
        out[name] = value.reshape(-1)
    return out


def _assemble(
    trunk: Iterable[tuple[str, np.ndarray]], weights: dict[str, np.ndarray], *, source: str, dtype, fill_missing=None
) -> DISTS:
    """The model from trunk tensors (torch keys, PyTorch layout) and checked alpha / beta."""
    weights = _checked_weights(weights, source)
    model = load_tensors(
        _abstract(dtype), trunk, source=source, fill_missing=fill_missing, dtype=dtype, variable_filter=TRUNK
    )
    for name, value in weights.items():
        getattr(model, name).set_value(jnp.asarray(value, dtype))
    return model


def convert_dists_weights(vgg16_path: str, dists_path: str, out_path: str) -> None:
    """torchvision `vgg16-*.pth` + DISTS_pytorch `weights.pt` -> one safetensors file (PyTorch layout).

    Keeps `features.*` (VGG convolutions) and `alpha` / `beta`; drops `classifier.*`. The result is checked
    against the model before it is written (atomically). Raises WeightsError on a missing/unreadable file or a
    missing/unexpected/mis-shaped tensor.
    """
    vgg = {k: v for k, v in _read_pth(vgg16_path).items() if not k.startswith("classifier.")}
    if not any(k.startswith("features.") for k in vgg):
        raise WeightsError(f"{vgg16_path}: no 'features.*' tensors; expected torchvision's VGG16 state dict")
    weights = _read_pth(dists_path)
    extra = sorted(set(weights) - set(WEIGHT_NAMES))
    if extra:
        raise WeightsError(
            f"{dists_path}: unexpected tensor {extra[0]!r}; expected DISTS_pytorch's weights.pt (alpha, beta)"
        )
    _assemble(vgg.items(), weights, source=f"{vgg16_path} + {dists_path}", dtype=jnp.float32)  # validate only
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in {**vgg, **weights}.items()}
    write_safetensors(out_path, tensors)


def load_dists(path: str, *, dtype=jnp.float32) -> DISTS:
    """The DISTS model from a file written by `convert_dists_weights`, weights in `dtype`."""
    if not storage.isfile(path):
        raise WeightsError(f"{path}: DISTS weights file does not exist (convert it with convert_dists_weights)")
    tensors = dict(read_tensors([path]))
    weights = {name: tensors.pop(name) for name in WEIGHT_NAMES if name in tensors}
    return _assemble(tensors.items(), weights, source=path, dtype=dtype)


def random_dists(seed: int, *, dtype=jnp.float32) -> DISTS:
    """An offline stand-in for tiny configs: random VGG convolutions and positive random alpha / beta.

    Convolutions get PyTorch's default init U(-1/sqrt(fan_in), 1/sqrt(fan_in)), alpha / beta DISTS_pt's
    N(0.1, 0.01^2) (absolute value), all drawn with numpy from (seed, tensor name): deterministic, no XLA
    compilation. It is a distance (0 for identical images) but not a perceptual one.
    """
    kernels = {path_to_torch_key(path): tuple(v.shape) for path, v in nnx.to_flat_state(nnx.state(_abstract(), TRUNK))}

    def rng(key: str) -> np.random.Generator:
        return np.random.default_rng([seed, zlib.crc32(key.encode())])

    def draw(key: str, leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        bound = 1.0 / np.sqrt(np.prod(kernels[key.rsplit(".", 1)[0] + ".weight"][:3]))  # HWIO fan-in
        return rng(key).uniform(-bound, bound, leaf.shape).astype(np.float32)

    weights = {name: np.abs(rng(name).normal(0.1, 0.01, WEIGHT_SHAPE)).astype(np.float32) for name in WEIGHT_NAMES}
    return _assemble((), weights, source=f"random_dists({seed})", dtype=dtype, fill_missing=draw)
