"""LoRA adapters as in PEFT: several named adapter sets on one copy of the frozen base weights.

Each adapter set stores its factors in its own `LoRAParam` subclass, so `nnx.state(model, MyLoRA)` and
optimizers see exactly that set. Which sets take part in a call is chosen per call with
`active_adapters(model, names)` (or `set_active_adapters`), so one base model serves several roles
(the TADSR student, the teacher and the fake score) without duplicating its weights.

Math (PEFT defaults used by TADSR): delta = (alpha / rank) * B A with A ~ N(0, (1/rank)^2) and B = 0.
For convolutions A has the base kernel's size, stride and padding and B is a 1x1 convolution.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tadsr_jax import prng


class LoRAParam(nnx.Param):
    """Base variable type of LoRA factors; define one subclass per adapter set."""


class LoRAAdapter(nnx.Module):
    def __init__(self, a: LoRAParam, b: LoRAParam, scale: float):
        self.a, self.b, self.scale = a, b, scale


class LoRAHost(nnx.Module):
    """Mixin of layers that accept adapters; subclasses define the factor shapes and the merged delta."""

    def __init__(self):
        self.lora = nnx.Dict()
        self.active_adapters: tuple[str, ...] = ()

    def active_lora(self) -> Iterator[LoRAAdapter]:
        for name in self.active_adapters:
            if name in self.lora:
                yield self.lora[name]

    def lora_factor_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def lora_delta(self, adapter: LoRAAdapter) -> jax.Array:
        raise NotImplementedError


def module_name(path: Sequence[str | int]) -> str:
    """The PyTorch-style dotted name of a module path, e.g. ('to_out', 0) -> 'to_out.0'."""
    return ".".join(str(p) for p in path)


def lora_hosts(model: nnx.Module) -> dict[str, LoRAHost]:
    """Every layer that can take an adapter, by PyTorch-style module name."""
    return {module_name(path): m for path, m in nnx.iter_modules(model) if isinstance(m, LoRAHost)}


def add_adapter(
    model: nnx.Module,
    name: str,
    param_type: type[LoRAParam],
    targets: Iterable[str],
    *,
    rank: int = 4,
    alpha: float = 8.0,
    rngs: nnx.Rngs,
) -> int:
    """Attach adapter `name` to each target module (by dotted name). Returns the number of modules adapted."""
    if not issubclass(param_type, LoRAParam):
        raise TypeError(f"adapter {name!r}: {param_type.__name__} is not a LoRAParam subclass")
    hosts = lora_hosts(model)
    targets = sorted(set(targets))
    unknown = [t for t in targets if t not in hosts]
    if unknown:
        raise ValueError(
            f"adapter {name!r}: no LoRA-capable module named {unknown[0]!r} ({len(unknown)} unknown targets)"
        )
    for target in targets:
        host = hosts[target]
        if name in host.lora:
            raise ValueError(f"adapter {name!r} already exists on {target!r}")
        a_shape, b_shape = host.lora_factor_shapes(rank)
        a = param_type(prng.normal(rngs.params(), a_shape) / rank)
        b = param_type(jnp.zeros(b_shape, jnp.float32))
        host.lora[name] = LoRAAdapter(a, b, alpha / rank)
    return len(targets)


def set_active_adapters(model: nnx.Module, names: Sequence[str]) -> None:
    """Make exactly `names` take part in the following calls (an empty list disables LoRA)."""
    for host in lora_hosts(model).values():
        host.active_adapters = tuple(names)


@contextlib.contextmanager
def active_adapters(model: nnx.Module, names: Sequence[str]):
    """Context manager form of `set_active_adapters`; restores the previous choice on exit."""
    hosts = lora_hosts(model).values()
    previous = [h.active_adapters for h in hosts]
    for host in hosts:
        host.active_adapters = tuple(names)
    try:
        yield model
    finally:
        for host, prev in zip(hosts, previous):
            host.active_adapters = prev


def merge_adapters(model: nnx.Module, names: Sequence[str]) -> int:
    """Fold the named adapters into the base kernels (W + scale * B A) and remove them. Returns modules merged."""
    merged = 0
    for host in lora_hosts(model).values():
        for name in names:
            if name in host.lora:
                adapter = host.lora[name]
                kernel = host.kernel[...]
                host.kernel.set_value((kernel.astype(jnp.float32) + host.lora_delta(adapter)).astype(kernel.dtype))
                del host.lora[name]
                merged += 1
        host.active_adapters = tuple(n for n in host.active_adapters if n not in names)
    return merged


def remove_adapters(model: nnx.Module, names: Sequence[str]) -> None:
    """Delete the named adapters without merging them (e.g. the fake score's, which inference never runs)."""
    for host in lora_hosts(model).values():
        for name in names:
            if name in host.lora:
                del host.lora[name]
        host.active_adapters = tuple(n for n in host.active_adapters if n not in names)
