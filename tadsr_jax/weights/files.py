"""Diffusers/transformers model folders: config.json and weight files (safetensors or .bin, sharded or not), read
and written; weight files are written atomically. Folders and files may be local or URLs (gs://...): see
`tadsr_jax.storage`."""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from tadsr_jax import storage
from tadsr_jax.weights.convert import WeightsError

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
TRANSFORMERS_SAFETENSORS, TRANSFORMERS_BIN = "model", "pytorch_model"


def read_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not storage.isdir(folder):
        raise WeightsError(f"{folder}: model folder does not exist")
    if not storage.isfile(path):
        raise WeightsError(f"{folder}: no config.json (expected a diffusers/transformers model folder)")
    try:
        with storage.open_file(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: unreadable config ({e})") from None


def weight_files(folder: str, stems: Sequence[str] = (DIFFUSERS_WEIGHTS,), variant: str | None = None) -> list[str]:
    """The weight files of a model folder, preferring safetensors; sharded checkpoints via their index."""
    if not storage.isdir(folder):
        raise WeightsError(f"{folder}: model folder does not exist")
    suffix = f".{variant}" if variant else ""
    for ext in (".safetensors", ".bin"):
        for stem in stems:
            single = os.path.join(folder, f"{stem}{suffix}{ext}")
            if storage.isfile(single):
                return [single]
            index = single + ".index.json"
            if storage.isfile(index):
                with storage.open_file(index) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
                return [os.path.join(folder, s) for s in shards]
    names = ", ".join(f"{s}{suffix}.safetensors/.bin" for s in stems)
    raise WeightsError(f"{folder}: no weight file ({names})")


def _read_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors import SafetensorError, safe_open

    try:
        with storage.local_copy(path) as local, safe_open(local, framework="np") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    except SafetensorError as e:
        raise WeightsError(f"{path}: unreadable safetensors file ({e})") from None


def _refusal(error: Exception) -> str:
    """A short reason why `torch.load(weights_only=True)` refused a file. Its own message advises loading the file
    with weights_only=False, which runs any code the file holds: that advice is left out."""
    text = str(error)
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if detail:  # e.g. "Unsupported operand 231", "Unsupported global: GLOBAL os.system was not an allowed global..."
        text = detail.group(1)
    first = re.split(r"\.\s+(?=[A-Z])", text.strip().splitlines()[0])[0] if text.strip() else "empty or truncated"
    if "weights_only" in first:
        first = "not a weights-only pickle"
    return f"{type(error).__name__}: {first[:160]}"


def torch_load(path: str, not_what: str, **kwargs) -> Any:
    """`torch.load(path, weights_only=True)` (never runs code from the file); a file it cannot read raises
    WeightsError `<path>: <not_what> (<short reason>)`. A URL is read from a temporary local copy (a memory-mapped
    load's tensors stay valid after the copy is removed)."""
    import torch

    try:
        with warnings.catch_warnings(), storage.local_copy(path) as local:
            warnings.simplefilter("ignore", UserWarning)  # its pickle-protocol notes are noise when it refuses
            return torch.load(local, map_location="cpu", weights_only=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - torch raises many types for files that are not (safe) pickles
        raise WeightsError(f"{path}: {not_what} ({_refusal(e)})") from None


def _read_torch_bin(path: str) -> Iterator[tuple[str, np.ndarray]]:
    try:
        import torch
    except ImportError:
        raise WeightsError(
            f"{path}: reading .bin checkpoints needs PyTorch (pip install torch); or convert the folder to safetensors"
        ) from None
    state = torch_load(path, "not a PyTorch checkpoint", mmap=True)
    for key in list(state):
        tensor = state.pop(key)
        yield key, (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def read_tensors(files: Sequence[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(key, array) pairs, one tensor at a time."""
    for path in files:
        yield from (_read_safetensors(path) if path.endswith(".safetensors") else _read_torch_bin(path))


def write_safetensors(path: str, tensors: dict[str, np.ndarray], fmt: str = "pt") -> None:
    """An atomic safetensors file (parent folders created); `fmt` is its "format" metadata."""
    from safetensors.numpy import save_file

    storage.makedirs(os.path.dirname(storage.absolute(path)))
    storage.atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": fmt}))


def write_model_folder(
    folder: str, config: dict, tensors: dict[str, np.ndarray], stem: str = DIFFUSERS_WEIGHTS
) -> None:
    """Write config.json and `<stem>.safetensors` as diffusers/transformers do; each file appears atomically."""
    storage.makedirs(folder)

    def write_config(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)

    storage.atomic_write(os.path.join(folder, "config.json"), write_config)
    write_safetensors(os.path.join(folder, f"{stem}.safetensors"), tensors)


def write_manifest(path: str, manifest: Mapping[str, Any]) -> None:
    """A weights file's JSON manifest, `<path>.json`, written atomically."""
    storage.atomic_write_text(path + ".json", json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(path: str, writer: str) -> dict[str, Any]:
    """The JSON object in `<path>.json`; WeightsError if it is missing (`writer` says what writes it) or unreadable."""
    manifest_path = path + ".json"
    if not storage.isfile(manifest_path):
        raise WeightsError(f"{manifest_path}: manifest missing ({writer} writes it next to the weights file)")
    try:
        with storage.open_file(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        lines = str(e).strip().splitlines()
        raise WeightsError(
            f"{manifest_path}: unreadable manifest ({type(e).__name__}: {lines[0] if lines else ''})"
        ) from None
    if not isinstance(manifest, dict):
        raise WeightsError(f"{manifest_path}: unreadable manifest (not a JSON object)")
    return manifest
