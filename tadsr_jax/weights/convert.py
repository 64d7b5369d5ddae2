"""PyTorch state-dict tensors -> NNX state, by rule.

Our modules mirror the PyTorch module tree, so a key maps onto a path mechanically:
`a.b.0.c.weight` -> ('a', 'b', 0, 'c', leaf) where leaf is whichever of kernel/scale/embedding the module
owns. Kernel layouts follow from the target's rank: Linear (out, in) -> (in, out), Conv OIHW -> HWIO,
and a 1x1 conv stored for a Linear target (legacy VAE attention) is squeezed. Model-specific differences
are regex renames applied first (data, not code), e.g. legacy `query` -> `to_q`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tadsr_jax.nn.naming import BASE_PARAMS, Path, path_to_torch_key

RenameRule = tuple[str, str]
_WEIGHT_LEAVES = ("kernel", "scale", "embedding")


class WeightsError(ValueError):
    """A weight file or folder does not fit the model; the message is one line naming the tensor or file."""


def _module_path(name: str) -> Path:
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


def torch_to_jax_layout(array: np.ndarray, target_ndim: int) -> np.ndarray:
    """A Linear or Conv weight in PyTorch layout -> our kernel layout (other leaves need no change)."""
    if target_ndim == 2 and array.ndim == 4 and array.shape[2:] == (1, 1):
        array = array[:, :, 0, 0]
    if target_ndim == 2 and array.ndim == 2:
        return array.T
    if target_ndim == 4 and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    return array


def jax_to_torch_layout(array: np.ndarray) -> np.ndarray:
    """Inverse of `torch_to_jax_layout` for kernels."""
    if array.ndim == 2:
        return array.T
    if array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    return array


def load_tensors(
    model: nnx.Module,
    tensors: Iterable[tuple[str, np.ndarray]],
    *,
    source: str,
    rename: Sequence[RenameRule] = (),
    ignore: Sequence[str] = (),
    fill_missing: Callable[[str, jax.ShapeDtypeStruct], jax.Array | None] | None = None,
    dtype=None,
    variable_filter=BASE_PARAMS,
) -> nnx.Module:
    """Fill `model`'s base parameters (or `variable_filter`'s leaves) from (torch key, array) pairs; returns the
    new module.

    `model` may be abstract (from `nnx.eval_shape`): tensors are converted one at a time, so only one full
    copy of the weights is ever held. A leaf missing from the file is an error unless
    `fill_missing(key, abstract_leaf)` returns its value (in our layout). `dtype` casts every leaf.
    Raises WeightsError naming the first missing, unexpected or mis-shaped tensor.
    """
    graphdef, state, rest = nnx.split(model, variable_filter, ...)
    flat = dict(nnx.to_flat_state(state))
    rename = [(re.compile(p), r) for p, r in rename]
    ignore = [re.compile(p) for p in ignore]
    loaded: set[Path] = set()
    unexpected: list[str] = []
    for key, array in tensors:
        if any(p.fullmatch(key) for p in ignore):
            continue
        name = key
        for pattern, replacement in rename:
            name = pattern.sub(replacement, name)
        *module, leaf = _module_path(name)
        candidates = ("bias",) if leaf == "bias" else _WEIGHT_LEAVES if leaf == "weight" else ()
        path = next((tuple(module) + (c,) for c in candidates if tuple(module) + (c,) in flat), None)
        if path is None:
            unexpected.append(key)
            continue
        variable = flat[path]
        array = np.asarray(array)
        if path[-1] == "kernel":
            array = torch_to_jax_layout(array, len(variable.shape))
        if array.shape != tuple(variable.shape):
            raise WeightsError(
                f"{source}: tensor {key!r} has shape {tuple(np.asarray(array).shape)} after "
                f"layout conversion, the model expects {tuple(variable.shape)}"
            )
        flat[path] = variable.replace(jnp.asarray(array, dtype or variable.dtype))
        loaded.add(path)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise WeightsError(f"{source}: unexpected tensor {unexpected[0]!r}{more}; is this the right folder?")
    missing = []
    for path in [p for p in flat if p not in loaded]:
        variable = flat[path]
        value = fill_missing and fill_missing(
            path_to_torch_key(path), jax.ShapeDtypeStruct(variable.shape, variable.dtype)
        )
        if value is None:
            missing.append(path_to_torch_key(path))
        else:
            flat[path] = variable.replace(jnp.asarray(value, dtype or variable.dtype))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"{source}: missing tensor {missing[0]!r}{more}")
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


def state_to_torch(model: nnx.Module, variable_filter=BASE_PARAMS, dtype=np.float32) -> dict[str, np.ndarray]:
    """Our parameters as a PyTorch-layout state dict (for saving diffusers-format folders)."""
    state = nnx.state(model, variable_filter)
    tensors = {}
    for path, var in nnx.to_flat_state(state):
        array = np.asarray(var[...], dtype)
        tensors[path_to_torch_key(path)] = np.ascontiguousarray(
            jax_to_torch_layout(array) if path[-1] == "kernel" else array
        )
    return tensors


def count_params(model: nnx.Module, variable_filter=BASE_PARAMS) -> int:
    """Number of scalars in the filtered leaves (works on abstract models)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, variable_filter)))
