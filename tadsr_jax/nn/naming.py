"""How parameters are named: our NNX paths and the PyTorch state-dict keys they mirror.

Our modules mirror the PyTorch module tree, so a parameter's path and its PyTorch key differ only in the leaf
name (kernel/scale/embedding here, weight there). LoRA targeting (method/) and weight conversion (weights/) both
name modules this way.
"""

from flax import nnx

from tadsr_jax.nn.lora import LoRAParam

# The frozen base weights: every Param that is not a LoRA factor.
BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(LoRAParam))

Path = tuple[str | int, ...]


def path_to_torch_key(path: Path) -> str:
    """Inverse of the key mapping, for the parameters of our modules."""
    *module, leaf = path
    leaf = "bias" if leaf == "bias" else "weight"
    return ".".join(str(p) for p in (*module, leaf))
