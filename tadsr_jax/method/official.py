"""The generator's weights on disk: the reference's `tadsr.pkl` (docs/method.md 2.4) and our own export.

Both formats hold exactly the generator's trainables (the GENERATOR variables of `TADSR`): the UNet LoRA
factors of the three groups, the student's conv_in (base tensors and LoRA), the VAE encoder's LoRA factors and
its time layers. Anything else stays as loaded from the SD folder.

- The reference pickle (`torch.save` of a dict; reading and writing it needs PyTorch). One table,
  `reference_entries`, places every generator leaf in it (section, key, PyTorch layout); export and import
  both walk that table, and it works on abstract models, so the key set can be checked at any size.
  The pickle does not store LoRA alpha: import assumes PEFT's default 8 (scale alpha / rank = 2) unless told.
- Our export: a safetensors file of the generator leaves, keyed by NNX path ("unet/.../lora/default_encoder/a"),
  in our layout, plus a JSON manifest `<file>.json` (format, version, rank, alpha, LoRA target lists and any
  caller metadata).

Loading validates everything before writing anything: the model is either fully updated or left untouched,
and nothing is left at its random initialisation. Errors are one-line `WeightsError`s naming the file and key.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from tadsr_jax import storage
from tadsr_jax.method.tadsr import GENERATOR, TADSR
from tadsr_jax.nn.lora import module_name
from tadsr_jax.nn.naming import Path, path_to_torch_key
from tadsr_jax.weights.convert import WeightsError, jax_to_torch_layout, torch_to_jax_layout
from tadsr_jax.weights.files import read_manifest, torch_load, write_manifest, write_safetensors

UNET_SECTION, VAE_SECTION, VAE_TIME_SECTION = "state_dict_unet", "state_dict_vae", "state_dict_vae_time"
SECTIONS = (UNET_SECTION, VAE_SECTION, VAE_TIME_SECTION)
MODULE_LISTS = (
    "unet_lora_encoder_modules",
    "unet_lora_decoder_modules",
    "unet_lora_others_modules",
    "vae_lora_encoder_modules",
)
RANK_KEYS = ("rank_unet", "rank_vae")
PEFT_DEFAULT_ALPHA = 8.0  # the reference's LoraConfig leaves lora_alpha at PEFT's default
GENERATOR_FORMAT, GENERATOR_VERSION = "tadsr-jax-generator", 1


@dataclasses.dataclass(frozen=True)
class ReferenceEntry:
    """Where one generator leaf lives in the reference pickle."""

    path: Path  # the leaf's NNX path in TADSR
    shape: tuple[int, ...]  # our shape
    conv_lora_b: bool  # a conv LoRA's B factor: PEFT stores it as a 1x1 conv (out, r, 1, 1)
    section: str  # the pickle's dict holding it
    key: str  # its key in that dict
    target: tuple[str, str] | None  # (module list, module) naming its LoRA target; None for a full tensor

    def to_torch(self, array: np.ndarray) -> np.ndarray:
        array = jax_to_torch_layout(array)
        return array[:, :, None, None] if self.conv_lora_b else array

    def from_torch(self, array: np.ndarray) -> np.ndarray:
        return torch_to_jax_layout(array, len(self.shape))

    @property
    def torch_shape(self) -> tuple[int, ...]:
        # A zero-stride view has the shape without the memory.
        return self.to_torch(np.broadcast_to(np.float32(0), self.shape)).shape


# Network name (for the module list names) and section of LoRA factors, and section of full tensors, by the
# generator leaf's top-level attribute of TADSR.
_LORA_PLACES = {"unet": ("unet", UNET_SECTION), "student_conv_in": ("unet", UNET_SECTION), "vae": ("vae", VAE_SECTION)}
_FULL_TENSOR_SECTIONS = {"student_conv_in": UNET_SECTION, "vae": VAE_TIME_SECTION}


def _reference_place(path: Path) -> tuple[str, str, tuple[str, str] | None]:
    """(section, key, LoRA target) of a generator leaf, following the reference's PEFT-wrapped module names."""
    root, *inner = path
    is_lora = "lora" in inner
    if root not in (_LORA_PLACES if is_lora else _FULL_TENSOR_SECTIONS):
        raise ValueError(f"generator leaf {'/'.join(map(str, path))} has no place in the reference checkpoint")
    if root == "student_conv_in":  # the reference trains the UNet's conv_in itself: PEFT's base_layer + LoRA
        inner = ["conv_in", *(inner if is_lora else ["base_layer", *inner])]
    if not is_lora:
        return _FULL_TENSOR_SECTIONS[root], path_to_torch_key(tuple(inner)), None
    at = inner.index("lora")
    module, (adapter, factor) = module_name(inner[:at]), inner[at + 1 :]
    network, section = _LORA_PLACES[root]
    target = (f"{network}_lora_{adapter.removeprefix('default_')}_modules", module)
    return section, f"{module}.lora_{factor.upper()}.{adapter}.weight", target


def reference_entries(model: TADSR) -> list[ReferenceEntry]:
    """Every generator leaf's place in the reference pickle (works on abstract models from `nnx.eval_shape`)."""
    flat = dict(nnx.to_flat_state(nnx.state(model, GENERATOR)))
    entries = []
    for path, variable in flat.items():
        conv_lora_b = "lora" in path and path[-1] == "b" and len(flat[path[:-1] + ("a",)].shape) == 4
        entries.append(ReferenceEntry(path, tuple(variable.shape), conv_lora_b, *_reference_place(path)))
    return entries


def _module_lists(entries: list[ReferenceEntry]) -> dict[str, list[str]]:
    lists: dict[str, set[str]] = {name: set() for name in MODULE_LISTS}
    for entry in entries:
        if entry.target is not None:
            list_name, module = entry.target
            lists[list_name].add(module)
    return {name: sorted(modules) for name, modules in lists.items()}


def _rank_and_alpha(model: TADSR) -> tuple[int, float]:
    adapter = model.student_conv_in.lora["default_encoder"]
    rank = int(adapter.a.shape[-1])
    return rank, adapter.scale * rank


def _generator_values(model: TADSR) -> dict[Path, np.ndarray]:
    return {path: np.asarray(v[...], np.float32) for path, v in nnx.to_flat_state(nnx.state(model, GENERATOR))}


def _update_generator(model: TADSR, values: Mapping[Path, np.ndarray]) -> None:
    """Write every generator leaf of `model` in place, cast to the leaf's dtype."""
    flat = [
        (path, variable.replace(jnp.asarray(values[path], variable.dtype)))
        for path, variable in nnx.to_flat_state(nnx.state(model, GENERATOR))
    ]
    nnx.update(model, nnx.from_flat_state(flat))


# ---------------------------------------------------------------------------------------- shared checks


def _check_tensors(source: str, where: str, found: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Raise on the first missing, mis-shaped or unexpected tensor of `found` (anything with a `.shape`)."""
    for key, shape in expected.items():
        if key not in found:
            raise WeightsError(f"{source}: missing tensor {key!r}{where}")
        if tuple(found[key].shape) != shape:
            raise WeightsError(
                f"{source}: tensor {key!r}{where} has shape {tuple(found[key].shape)}, the model expects {shape}"
            )
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise WeightsError(f"{source}: unexpected tensor {unexpected[0]!r}{where} (the model has no such leaf)")


def _check_module_lists(source: str, found: Mapping[str, Any], expected: Mapping[str, list[str]]) -> None:
    """The stored LoRA target lists must name exactly the model's targets (duplicates and order aside)."""
    for name, modules in expected.items():
        got = found.get(name)
        if not isinstance(got, (list, tuple)) or not all(isinstance(m, str) for m in got):
            raise WeightsError(f"{source}: {name!r} is missing or not a list of module names")
        lacking, extra = sorted(set(modules) - set(got)), sorted(set(got) - set(modules))
        if lacking:
            raise WeightsError(f"{source}: {name!r} lacks {lacking[0]!r}, which the model adapts")
        if extra:
            raise WeightsError(f"{source}: {name!r} lists {extra[0]!r}, which the model does not adapt")


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


# ---------------------------------------------------------------------------------------- reference pickle


def _torch(message: str):
    try:
        import torch
    except ImportError:
        raise WeightsError(message) from None
    return torch


def reference_checkpoint(model: TADSR) -> dict[str, Any]:
    """The model's generator as the reference's `save_model` dict: float32 contiguous tensors, its key names.

    Readers assume LoRA alpha 8 (the pickle does not store it), so a model with another alpha is refused.
    """
    torch = _torch("writing the official TADSR .pkl needs PyTorch (pip install torch)")
    rank, alpha = _rank_and_alpha(model)
    if not math.isclose(alpha, PEFT_DEFAULT_ALPHA):
        raise WeightsError(
            f"the official TADSR .pkl implies LoRA alpha {PEFT_DEFAULT_ALPHA:g} (it does not store "
            f"alpha); this model's is {alpha:g}: export it with save_generator instead"
        )
    entries = reference_entries(model)
    values = _generator_values(model)
    checkpoint: dict[str, Any] = {section: {} for section in SECTIONS}
    for entry in entries:
        tensor = np.array(entry.to_torch(values[entry.path]), np.float32, order="C")  # a writable copy
        checkpoint[entry.section][entry.key] = torch.from_numpy(tensor)
    return {**checkpoint, **_module_lists(entries), **{key: rank for key in RANK_KEYS}}


def save_reference_checkpoint(model: TADSR, path: str) -> None:
    """Write the reference's `tadsr.pkl` format (docs/method.md 2.4), atomically."""
    torch = _torch(f"{path}: writing the official TADSR .pkl needs PyTorch (pip install torch)")
    checkpoint = reference_checkpoint(model)
    storage.atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def _read_reference(path: str) -> dict[str, Any]:
    torch = _torch(f"{path}: reading the official TADSR .pkl needs PyTorch (pip install torch)")
    if not storage.isfile(path):
        raise WeightsError(f"{path}: no such file")
    checkpoint = torch_load(path, "not a TADSR checkpoint")
    if not isinstance(checkpoint, dict):
        raise WeightsError(f"{path}: not a TADSR checkpoint (holds a {type(checkpoint).__name__}, not a dict)")
    for key in (*SECTIONS, *MODULE_LISTS, *RANK_KEYS):
        if key not in checkpoint:
            raise WeightsError(f"{path}: not a TADSR checkpoint: no {key!r} entry")
    for section in SECTIONS:
        tensors = checkpoint[section]
        if not isinstance(tensors, dict):
            raise WeightsError(f"{path}: {section!r} is a {type(tensors).__name__}, not a dict of tensors")
        bad = next((k for k, v in tensors.items() if not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise WeightsError(f"{path}: {bad!r} in {section!r} is a {type(tensors[bad]).__name__}, not a tensor")
    return checkpoint


def _check_rank_and_alpha(model: TADSR, path: str, checkpoint: Mapping[str, Any], alpha: float) -> None:
    rank, model_alpha = _rank_and_alpha(model)
    for key in RANK_KEYS:
        if checkpoint[key] != rank:
            raise WeightsError(
                f"{path}: {key!r} is {checkpoint[key]!r} but the model's LoRA rank is {rank} "
                f"(build TADSR with rank={checkpoint[key]!r})"
            )
    if not math.isclose(model_alpha, alpha):
        raise WeightsError(
            f"{path}: the model's LoRA alpha is {model_alpha:g}, the checkpoint is read with alpha "
            f"{alpha:g} (the pickle does not store it; build TADSR with alpha={alpha:g} or pass alpha=)"
        )


def load_reference_checkpoint(model: TADSR, path: str, *, alpha: float = PEFT_DEFAULT_ALPHA) -> None:
    """Fill the generator of `model` in place from the reference's `tadsr.pkl` (docs/method.md 2.4).

    The pickle does not store LoRA alpha; the reference used PEFT's default 8 (`alpha`), which the model's
    adapters must have been built with. Validates ranks, target lists and every tensor's presence and shape
    before writing anything. Raises WeightsError naming the file and the first problem.
    """
    checkpoint = _read_reference(path)
    entries = reference_entries(model)
    _check_rank_and_alpha(model, path, checkpoint, alpha)
    _check_module_lists(path, checkpoint, _module_lists(entries))
    for section in SECTIONS:
        expected = {e.key: e.torch_shape for e in entries if e.section == section}
        _check_tensors(path, f" in {section!r}", checkpoint[section], expected)
    _update_generator(
        model, {e.path: e.from_torch(checkpoint[e.section][e.key].detach().float().numpy()) for e in entries}
    )


# ---------------------------------------------------------------------------------------- our export


def _flat_name(path: Path) -> str:
    return "/".join(map(str, path))


def generator_manifest(model: TADSR) -> dict[str, Any]:
    """What `save_generator` records about the model, and `load_generator` requires of it."""
    rank, alpha = _rank_and_alpha(model)
    return {
        "format": GENERATOR_FORMAT,
        "version": GENERATOR_VERSION,
        "rank": rank,
        "alpha": alpha,
        "lora_modules": _module_lists(reference_entries(model)),
    }


def save_generator(model: TADSR, path: str, metadata: dict | None = None) -> None:
    """Write the generator's leaves (float32, our layout) to safetensors `path` and its manifest to `path`.json.

    Each file is written atomically; `metadata` (JSON-serialisable) is stored in the manifest under "metadata".
    """
    manifest = {**generator_manifest(model), "metadata": dict(metadata or {})}
    tensors = {_flat_name(p): np.ascontiguousarray(v) for p, v in _generator_values(model).items()}
    write_safetensors(path, tensors, fmt=GENERATOR_FORMAT)
    write_manifest(path, manifest)


def _check_manifest(source: str, manifest: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    for field in ("format", "version", "rank", "alpha"):
        if manifest.get(field) != expected[field]:
            raise WeightsError(f"{source}: {field!r} is {manifest.get(field)!r}, the model needs {expected[field]!r}")
    lists = manifest.get("lora_modules")
    _check_module_lists(source, lists if isinstance(lists, dict) else {}, expected["lora_modules"])


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not storage.isfile(path):
        raise WeightsError(f"{path}: no such file")
    try:
        with storage.local_copy(path) as local:
            return load_file(local)
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{path}: unreadable safetensors file ({_first_line(e)})") from None


def load_generator(model: TADSR, path: str) -> dict[str, Any]:
    """Fill the generator of `model` in place from `save_generator`'s files; returns the manifest.

    The manifest must match the model (format, version, rank, alpha, LoRA targets) and the file must hold
    every generator leaf with its shape and nothing else; raises WeightsError naming the first problem.
    """
    manifest_path = path + ".json"
    manifest = read_manifest(path, "save_generator")
    _check_manifest(manifest_path, manifest, generator_manifest(model))
    tensors = _read_safetensors(path)
    leaves = nnx.to_flat_state(nnx.state(model, GENERATOR))
    _check_tensors(path, "", tensors, {_flat_name(p): tuple(v.shape) for p, v in leaves})
    _update_generator(model, {p: tensors[_flat_name(p)] for p, _ in leaves})
    return manifest
