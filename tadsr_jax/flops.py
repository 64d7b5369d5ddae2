"""Model FLOPs of a traced JAX function, counted on its jaxpr: the numerator of every MFU and %-of-peak figure."""

from __future__ import annotations

import math
from typing import Any

import jax

_UNCOUNTED = "uncounted_flops"  # the name scope of `uncounted`


def uncounted():
    """A name scope whose matmuls and convolutions `matmul_flops` leaves out: for a matmul that computes, for speed
    on one platform, what the model itself does with other ops (GroupNorm's group totals, Blur_t's banded
    matrices), so that the form chosen never inflates an MFU figure."""
    return jax.named_scope(_UNCOUNTED)


def matmul_flops(traced: Any) -> float:
    """FLOPs of the matmuls and convolutions of a traced JAX function (a `jax.stages.Traced` or a jaxpr):
    2 per multiply-add, a scan's body times its length, a Pallas kernel's body times its grid, a shard_map's body
    times its devices, the larger branch of a cond; nothing traced under `uncounted`.

    The model-FLOP convention of MFU figures and of torch's FlopCounterMode: elementwise work is not counted.
    Counted on the jaxpr because XLA's cost analysis counts a loop body once whatever its trip count, and
    XLA:CPU's attention is a loop over query blocks.
    """
    jaxpr = traced
    while hasattr(jaxpr, "jaxpr"):  # Traced -> ClosedJaxpr -> Jaxpr
        jaxpr = jaxpr.jaxpr
    total = 0.0
    for eqn in jaxpr.eqns:
        if _UNCOUNTED in str(eqn.source_info.name_stack):
            continue
        name = eqn.primitive.name
        if name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contracting)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        else:
            inner = [
                matmul_flops(value)
                for param in eqn.params.values()
                for value in (param if isinstance(param, (tuple, list)) else (param,))
                if hasattr(value, "eqns")
            ]
            if name == "cond":
                total += max(inner, default=0.0)
            elif name == "pallas_call":  # a kernel's body runs once per grid point
                total += sum(inner) * math.prod(eqn.params["grid_mapping"].grid)
            elif name == "shard_map":  # the body sees one device's shard, and every device runs it
                total += sum(inner) * eqn.params["mesh"].size
            else:
                total += sum(inner) * (eqn.params["length"] if name == "scan" else 1)
    return total


def landed_taps(positions: int, taps: int, stride: int, rhs_dilation: int, low_pad: int, lhs_dilation: int) -> int:
    """How many (output position, kernel tap) pairs of one spatial dimension of a convolution land on the input,
    not on the holes of an input dilation (`lhs_dilation`: how a strided convolution's input gradient and a
    transposed convolution run; counting the holes would count a stride-2 convolution's input gradient 4x).
    Taps on padding count, as in torch's FlopCounterMode."""
    if lhs_dilation == 1:
        return positions * taps
    return sum(
        (o * stride + t * rhs_dilation - low_pad) % lhs_dilation == 0 for o in range(positions) for t in range(taps)
    )


def _conv_flops(eqn: Any) -> float:
    """2 x output elements x input channels per group x the kernel taps per output position that land on the
    input (`landed_taps`)."""
    params = eqn.params
    dimension_numbers = params["dimension_numbers"]
    kernel, out = eqn.invars[1].aval.shape, eqn.outvars[0].aval.shape
    per_output = math.prod(kernel) // kernel[dimension_numbers.rhs_spec[0]]
    for i, (out_dim, kernel_dim) in enumerate(zip(dimension_numbers.out_spec[2:], dimension_numbers.rhs_spec[2:])):
        taps, positions = kernel[kernel_dim], out[out_dim]
        landed = landed_taps(
            positions,
            taps,
            params["window_strides"][i],
            params["rhs_dilation"][i],
            params["padding"][i][0],
            params["lhs_dilation"][i],
        )
        per_output = per_output * landed / (taps * positions)
    return 2.0 * math.prod(out) * per_output
