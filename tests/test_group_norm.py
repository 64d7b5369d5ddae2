"""GroupNorm -> modulation -> SiLU and its hand-written backward pass, against torch autograd in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch_utils import nhwc_to_nchw, rel_err

from tadsr_jax.nn import layers
from tadsr_jax.nn.layers import GroupNorm

GROUPS, EPS = 8, 1e-6


def _torch_reference(x, scale, bias, scale_shift, silu):
    """F.group_norm, then `* (1 + s) + t`, then SiLU: diffusers' ResnetBlock2D with time_embedding_norm
    'scale_shift' and its SiLU, on NCHW float64 tensors."""
    y = torch.nn.functional.group_norm(x, GROUPS, scale, bias, EPS)
    if scale_shift is not None:
        y = y * (1 + scale_shift[0]) + scale_shift[1]
    return torch.nn.functional.silu(y) if silu else y


def _case(seed: int, dtype, with_scale_shift: bool):
    rng = np.random.default_rng(seed)
    b, h, w, c = 2, 12, 10, 32
    x = rng.normal(0.7, 2.0, (b, h, w, c))  # an offset mean: cancellation in a one-pass variance would show
    scale, bias = 1 + 0.2 * rng.normal(size=c), 0.1 * rng.normal(size=c)
    scale_shift = (0.3 * rng.normal(size=(b, 1, 1, c)), rng.normal(size=(b, 1, 1, c))) if with_scale_shift else None
    cotangent = rng.normal(size=(b, h, w, c))
    # the float64 reference sees the inputs as rounded to the dtype under test
    rounded = lambda a: np.asarray(jnp.asarray(a, dtype).astype(jnp.float32), np.float64)
    x, cotangent = rounded(x), rounded(cotangent)
    scale_shift = None if scale_shift is None else tuple(rounded(a) for a in scale_shift)
    return x, scale, bias, scale_shift, cotangent


@pytest.mark.parametrize("implementation", ["two_pass", "recomputed"])
@pytest.mark.parametrize("with_scale_shift", [False, True])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_values_and_gradients_match_torch_autograd(dtype, silu, with_scale_shift, implementation):
    """Both backward passes: the hand-written one (CPU programs) and autodiff of the recomputed forward (others)."""
    x, scale, bias, scale_shift, cotangent = _case(0, dtype, with_scale_shift)
    fn = getattr(layers, f"_group_norm_{implementation}")
    jx = jnp.asarray(x, dtype)
    jss = None if scale_shift is None else tuple(jnp.asarray(a, dtype) for a in scale_shift)
    out, vjp = jax.vjp(
        lambda x, scale, bias, scale_shift: fn(x, scale, bias, scale_shift, GROUPS, EPS, silu),
        jx,
        jnp.asarray(scale, jnp.float32),
        jnp.asarray(bias, jnp.float32),
        jss,
    )
    dx, dscale, dbias, dss = vjp(jnp.asarray(cotangent, dtype))
    assert out.dtype == dx.dtype == dtype

    tt = lambda a: torch.tensor(nhwc_to_nchw(a) if a.ndim == 4 else a, dtype=torch.float64, requires_grad=True)
    tx, tscale, tbias = tt(x), tt(scale), tt(bias)
    tss = None if scale_shift is None else tuple(tt(a) for a in scale_shift)
    ref = _torch_reference(tx, tscale, tbias, tss, silu)
    ref.backward(torch.tensor(nhwc_to_nchw(cotangent), dtype=torch.float64))

    errors = {
        "out": rel_err(nhwc_to_nchw(out.astype(jnp.float32)), ref.detach().numpy()),
        "dx": rel_err(nhwc_to_nchw(dx.astype(jnp.float32)), tx.grad.numpy()),
        "dscale": rel_err(dscale, tscale.grad.numpy()),
        "dbias": rel_err(dbias, tbias.grad.numpy()),
    }
    if scale_shift is not None:
        errors["ds"] = rel_err(nhwc_to_nchw(dss[0].astype(jnp.float32)), tss[0].grad.numpy())
        errors["dt"] = rel_err(nhwc_to_nchw(dss[1].astype(jnp.float32)), tss[1].grad.numpy())
    print(
        f"\nGroupNorm {implementation} {jnp.dtype(dtype).name} silu={silu} scale_shift={with_scale_shift}: "
        + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
    )
    # float32: measured at most 1.7e-6, as torch's own float32 autograd against float64 on these inputs (1.5e-6):
    # ~12x. bfloat16: measured at most 6.5e-2 (the bf16 output's and the forward's bf16 modulation's rounding; the
    # recomputed backward runs part of its math in bf16): torch's own bf16 autograd errs by up to 8.3e-2 here.
    # A dropped term of the backward errs by 0.3 or more.
    bound = 2e-5 if dtype == jnp.float32 else 0.15
    assert max(errors.values()) < bound, errors


def test_scale_and_shift_must_be_per_sample_and_channel():
    norm = GroupNorm(GROUPS, 32, eps=EPS)
    x = jnp.ones((2, 4, 4, 32))
    with pytest.raises(ValueError, match=r"scale and shift must have shape \(2, 1, 1, 32\)"):
        norm(x, scale_shift=(jnp.ones((2, 4, 4, 32)), jnp.ones((2, 4, 4, 32))))


@pytest.mark.parametrize("implementation", ["two_pass", "recomputed"])
def test_one_pass_statistics_hold_for_a_mean_far_from_zero(implementation):
    """The statistics come from one pass of shifted sums: a mean 300 spreads away from zero (a plain one-pass
    E[x^2] - E[x]^2 in float32 loses most of the variance's digits there) still normalises to float32 accuracy."""
    rng = np.random.default_rng(1)
    x = 300.0 + rng.normal(size=(2, 16, 16, 32)) * np.linspace(0.5, 2.0, 32)  # groups of unequal spread
    x = np.asarray(np.float32(x), np.float64)
    scale, bias = np.ones(32), np.zeros(32)
    out = getattr(layers, f"_group_norm_{implementation}")(
        jnp.asarray(x, jnp.float32),
        jnp.asarray(scale, jnp.float32),
        jnp.asarray(bias, jnp.float32),
        None,
        GROUPS,
        EPS,
        False,
    )
    ref = torch.nn.functional.group_norm(torch.tensor(nhwc_to_nchw(x), dtype=torch.float64), GROUPS, None, None, EPS)
    error = rel_err(nhwc_to_nchw(out), ref.numpy())
    print(f"\nGroupNorm {implementation}, mean 300: out error {error:.1e}")
    # measured 4.6e-5 (float32 rounding of x a + b, terms near 500): ~40x; the unshifted one-pass variance gets
    # the groups' std wrong by up to 7% on these inputs, an output error of ~1e-1
    assert error <= 2e-3
