"""Rematerialisation: recompute a block's activations in the backward pass instead of keeping them.

A policy name says what the backward pass may keep from the block's forward pass; everything else is recomputed.
The block runs as a pure function of its state (split, `jax.checkpoint`, merge inside), not through `nnx.remat`:
`nnx.remat` writes the block's state back to the calling module afterwards, which fails ("Cannot mutate Param from
a different trace level") when the model was merged inside another JAX transformation, as the train step's
`jax.value_and_grad` merges it. Blocks do not change their own state when called, so nothing is lost.
"""

from __future__ import annotations

import jax
from flax import nnx

POLICIES = {
    "none": None,  # no remat: every activation the backward pass needs is kept
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only the block's inputs
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs (attention, projections); recompute convs
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls only
}


def check_policy(name: str) -> str:
    if name not in POLICIES:
        raise ValueError(f"unknown remat policy {name!r} (one of {', '.join(POLICIES)})")
    return name


def call(module: nnx.Module, policy: str, *args, **static):
    """`module(*args, **static)`, its activations recomputed in the backward pass as `policy` says."""
    if check_policy(policy) == "none":
        return module(*args, **static)
    graphdef, state = nnx.split(module)

    def pure(state: nnx.State, *args):
        return nnx.merge(graphdef, state)(*args, **static)

    return jax.checkpoint(pure, policy=POLICIES[policy])(state, *args)
