"""DAPE weights: RAM's checkpoint plus SeeSR's LoRA, merged into one safetensors file with a manifest, and loaded.

DAPE is built as SeeSR's `ram(pretrained='ram_swin_large_14m.pth', pretrained_condition='DAPE.pth')`: RAM's
checkpoint (`{'model': state_dict}`; its `vision_multi.*` keys are the tagging head's, renamed on load) loaded
non-strictly, then `DAPE.pth` loaded non-strictly over it. DAPE.pth carries loralib factors (`<module>.lora_A`,
`<module>.lora_B`; rank 8, lora_alpha 1, so scale alpha/r) on the Swin `attn.qkv` (a MergedLinear adapting q and
v) and on the tagging head's `query` and `key`; any plain tensor in it replaces RAM's. `convert_dape_weights`
folds each factor pair into its weight (W += scale * B @ A, per adapted slice of qkv), keeps only the tensors
the tagging path uses (RAM's `tagging_head.*` copies of the tensors it shares with `tag_encoder`; no text BERTs),
in PyTorch layout and RAM's names, and writes them with a manifest holding the architecture.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from tadsr_jax import storage
from tadsr_jax.models.ram import DAPE_CONFIG, RAMConfig, RAMTagger
from tadsr_jax.nn.naming import BASE_PARAMS, path_to_torch_key
from tadsr_jax.weights.convert import WeightsError, load_tensors
from tadsr_jax.weights.files import read_manifest, read_tensors, torch_load, write_manifest, write_safetensors

FORMAT, VERSION = "tadsr-jax-dape", 1
LORA_ALPHA = 1.0  # loralib's default, which SeeSR keeps: the delta is scaled by 1 / rank
# Which thirds (q, k, v) of a Swin `attn.qkv` weight SeeSR's MergedLinear adapts (enable_lora=[True, False, True]).
QKV_ADAPTED = (True, False, True)
# RAM's bare nn.Parameters, held here by Embedding modules (whose leaf maps to `<name>.weight`).
BARE_PARAMETERS = ("relative_position_bias_table", "label_embed")
RENAME = tuple((rf"(^|\.)({name})$", r"\1\2.weight") for name in BARE_PARAMETERS)


def _abstract(config: RAMConfig, dtype=jnp.float32) -> RAMTagger:
    return nnx.eval_shape(lambda: RAMTagger(config, dtype=dtype, rngs=nnx.Rngs(0)))


def tagging_keys(config: RAMConfig) -> list[str]:
    """RAM's state-dict keys of the tensors the tagging path uses."""
    keys = []
    for path, _ in nnx.to_flat_state(nnx.state(_abstract(config), BASE_PARAMS)):
        key = path_to_torch_key(path)
        keys.append(key.removesuffix(".weight") if path[-2] in BARE_PARAMETERS else key)
    return keys


def _state_dict(path: str, what: str, nested: str | None) -> dict[str, np.ndarray]:
    """A torch checkpoint's tensors as float32 arrays; `nested`: the key under which the state dict may sit."""
    if not storage.isfile(path):
        raise WeightsError(f"{path}: file does not exist")
    import torch

    state = torch_load(path, f"not a {what}")
    if isinstance(state, dict) and nested and isinstance(state.get(nested), dict):
        state = state[nested]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: not a {what} (a {type(state).__name__}, not a state dict)")
    return {k: v.detach().float().numpy() for k, v in state.items() if isinstance(v, torch.Tensor)}


def read_ram(path: str) -> dict[str, np.ndarray]:
    """ram_swin_large_14m.pth -> {key: array}, `vision_multi.*` renamed to `tagging_head.*` as RAM's loader does."""
    state = _state_dict(path, "RAM checkpoint", "model")
    return {re.sub(r"^vision_multi\.", "tagging_head.", k): v for k, v in state.items()}


def _lora_delta(source: str, module: str, a: np.ndarray, b: np.ndarray, out_features: int) -> np.ndarray:
    """loralib's delta for `module`'s (out, in) weight: B @ A * alpha/r; for a MergedLinear (A: (g*r, in),
    B: (g*out/3, r), g adapted thirds) each group's product is placed in its third."""
    if a.ndim != 2 or b.ndim != 2:
        raise WeightsError(f"{source}: {module!r} LoRA factors must be matrices, got {a.shape} and {b.shape}")
    rank = b.shape[1]
    if b.shape[0] == out_features and a.shape[0] == rank:
        return (b.astype(np.float64) @ a) * (LORA_ALPHA / rank)
    groups = sum(QKV_ADAPTED)
    third = out_features // len(QKV_ADAPTED)
    if not module.endswith("attn.qkv") or a.shape[0] != groups * rank or b.shape[0] != groups * third:
        raise WeightsError(
            f"{source}: {module!r} LoRA factors A {a.shape} and B {b.shape} do not fit its weight's {out_features} rows"
        )
    delta = np.zeros((out_features, a.shape[1]))
    slots = [i for i, adapted in enumerate(QKV_ADAPTED) if adapted]
    for g, slot in enumerate(slots):
        b_g, a_g = b[g * third : (g + 1) * third], a[g * rank : (g + 1) * rank]
        delta[slot * third : (slot + 1) * third] = (b_g.astype(np.float64) @ a_g) * (LORA_ALPHA / rank)
    return delta


def merge_dape(ram: Mapping[str, np.ndarray], dape: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
    """RAM's tensors with DAPE.pth loaded over them and its LoRA factors folded into the weights they adapt."""
    factors = {k.rsplit(".", 1)[0] for k in dape if k.endswith((".lora_A", ".lora_B"))}
    if not factors:
        raise WeightsError(f"{source}: no LoRA tensors (*.lora_A / *.lora_B); expected SeeSR's DAPE.pth")
    merged = {**ram, **{k: v for k, v in dape.items() if not k.endswith((".lora_A", ".lora_B"))}}
    for module in sorted(factors):
        pair = [dape.get(f"{module}.lora_A"), dape.get(f"{module}.lora_B")]
        if any(f is None for f in pair):
            lacking = "lora_A" if pair[0] is None else "lora_B"
            raise WeightsError(f"{source}: {module}.{lacking} is missing (its pair is there)")
        if f"{module}.weight" not in merged:
            raise WeightsError(f"{source}: {module!r} has LoRA factors but the RAM checkpoint has no {module}.weight")
        weight = merged[f"{module}.weight"]
        delta = _lora_delta(source, module, *pair, weight.shape[0])
        if delta.shape != weight.shape:
            raise WeightsError(f"{source}: {module!r} LoRA delta {delta.shape} does not fit its weight {weight.shape}")
        merged[f"{module}.weight"] = (weight + delta).astype(np.float32)
    return merged


def convert_dape_weights(ram_path: str, dape_path: str, out_path: str, config: RAMConfig = DAPE_CONFIG) -> None:
    """ram_swin_large_14m.pth + SeeSR's DAPE.pth -> `out_path` (safetensors, RAM's names, PyTorch layout) and
    `out_path`.json (format, version, the architecture). Raises WeightsError naming the first missing or
    mis-shaped tensor (the result is loaded into the model before it is written)."""
    merged = merge_dape(read_ram(ram_path), _state_dict(dape_path, "DAPE state dict", None), dape_path)
    source = f"{ram_path} + {dape_path}"
    keys = tagging_keys(config)
    missing = [k for k in keys if k not in merged]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"{source}: missing tensor {missing[0]!r}{more}")
    tensors = {k: np.ascontiguousarray(merged[k], np.float32) for k in keys}
    load_tensors(_abstract(config), tensors.items(), source=source, rename=RENAME)  # validate only
    write_safetensors(out_path, tensors)
    write_manifest(out_path, {"format": FORMAT, "version": VERSION, "config": config.to_json()})


def load_dape(path: str, *, dtype=jnp.float32) -> RAMTagger:
    """The tagger from a file written by `convert_dape_weights`, weights in `dtype`."""
    if not storage.isfile(path):
        raise WeightsError(f"{path}: DAPE weights file does not exist (see launch/convert.py --what=dape)")
    manifest = read_manifest(path, "launch/convert.py --what=dape")
    if (manifest.get("format"), manifest.get("version")) != (FORMAT, VERSION):
        raise WeightsError(
            f"{path}.json: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
            f"expected {FORMAT!r} version {VERSION}"
        )
    try:
        config = RAMConfig.from_json(manifest["config"])
    except (KeyError, TypeError) as e:
        raise WeightsError(f"{path}.json: unreadable 'config' ({type(e).__name__}: {e})") from None
    return load_tensors(_abstract(config, dtype), read_tensors([path]), source=path, rename=RENAME, dtype=dtype)
