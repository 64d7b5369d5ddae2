"""Rematerialisation: recompute a block's activations in the backward pass instead of keeping them.

A policy name says what the backward pass may keep from the block's forward pass; everything else is recomputed.
`LAYERS` moves the boundary inside the blocks of the models that support it (the VAE's encoder and decoder).
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


# `full` at each layer of a block (ResNet block, attention, resampler) instead of at the block: the backward pass
# keeps every layer's input, more than `full` keeps, but recomputes one layer at a time, so its peak holds one
# layer's activations instead of a whole block's. Under `full` the VAE decoder's backward pass recomputes its last
# block, three ResNet blocks at 512x512, at once (the decoder alone at 8 images on v5e: 6.7 GiB of temporaries).
LAYERS = "layers"


def check_policy(name: str, *, per_layer: bool = True) -> str:
    """`name`, if it is a policy: one of POLICIES, or LAYERS where `per_layer` (the model has layered blocks)."""
    names = (*POLICIES, LAYERS) if per_layer else tuple(POLICIES)
    if name not in names:
        raise ValueError(f"unknown remat policy {name!r} (one of {', '.join(names)})")
    return name


def block_and_layer_policies(name: str) -> tuple[str, str]:
    """The policies a model with layered blocks applies to each block and to each layer inside it."""
    return ("none", "full") if check_policy(name) == LAYERS else (name, "none")


def call(module: nnx.Module, policy: str, *args, **static):
    """`module(*args, **static)`, its activations recomputed in the backward pass as `policy` (one of POLICIES)
    says."""
    if check_policy(policy, per_layer=False) == "none":
        return module(*args, **static)
    graphdef, state = nnx.split(module)

    def pure(state: nnx.State, *args):
        return nnx.merge(graphdef, state)(*args, **static)

    return jax.checkpoint(pure, policy=POLICIES[policy])(state, *args)
