"""Which modules get LoRA, exactly as the reference selects them (docs/method.md 2.1).

The reference scans parameter names (ours mirror PyTorch's), skips biases and norms, and matches name
substrings; UNet matches fall into three groups by location. Keeping the rules on names, not module
types, reproduces its choices, quirks included (e.g. every `conv*`, `conv_in` in the encoder group).
"""

from __future__ import annotations

from flax import nnx

from tadsr_jax.nn.lora import lora_hosts
from tadsr_jax.nn.naming import BASE_PARAMS, path_to_torch_key

UNET_PATTERNS = (
    "to_k",
    "to_q",
    "to_v",
    "to_out.0",
    "conv",
    "conv1",
    "conv2",
    "conv_in",
    "conv_shortcut",
    "conv_out",
    "proj_out",
    "proj_in",
    "ff.net.2",
    "ff.net.0.proj",
)
VAE_PATTERNS = ("conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0")
UNET_GROUPS = ("encoder", "decoder", "others")


def _weight_names(model: nnx.Module) -> list[str]:
    """PyTorch-style `<module>.weight` names of every base weight, bias and norm names excluded."""
    names = [path_to_torch_key(p) for p, _ in nnx.to_flat_state(nnx.state(model, BASE_PARAMS))]
    return [n for n in names if n.endswith(".weight") and "bias" not in n and "norm" not in n]


def _checked(model: nnx.Module, modules: set[str]) -> list[str]:
    hosts = lora_hosts(model)
    unsupported = sorted(m for m in modules if m not in hosts)
    if unsupported:
        raise ValueError(f"LoRA target {unsupported[0]!r} is not a LoRA-capable layer")
    return sorted(modules)


def unet_lora_groups(unet: nnx.Module) -> dict[str, list[str]]:
    """{'encoder': [...], 'decoder': [...], 'others': [...]} module names (94/148/16 at SD-2.1 size)."""
    groups: dict[str, set[str]] = {g: set() for g in UNET_GROUPS}
    for name in _weight_names(unet):
        if not any(p in name for p in UNET_PATTERNS):
            continue
        module = name.removesuffix(".weight")
        if "down_blocks" in name or "conv_in" in name:
            groups["encoder"].add(module)
        elif "up_blocks" in name or "conv_out" in name:
            groups["decoder"].add(module)
        else:
            groups["others"].add(module)
    return {g: _checked(unet, m) for g, m in groups.items()}


def vae_encoder_lora_targets(vae: nnx.Module) -> list[str]:
    """The VAE encoder's LoRA modules (32 at SD size): encoder convs/attention, no time layers, plus quant_conv."""
    modules = {
        n.removesuffix(".weight")
        for n in _weight_names(vae)
        if any(p in n for p in VAE_PATTERNS) and "encoder" in n and "time" not in n
    }
    modules.add("quant_conv")
    return _checked(vae, modules)
