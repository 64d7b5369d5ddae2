"""conv2d (with its matmul form for small maps on CPU), the LoRA A convolution as a matmul and a tap sum, and the
convolution of a nearest-x2 upsampled map (as one input-dilated convolution on TPU): values and both gradients
against torch's autograd in float64."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch_utils import nhwc_to_nchw, rel_err

from tadsr_jax.nn import layers


def _errors_against_torch(
    conv, size: int, channels: int, features: int, kernel_size: int, stride: int, padding, upsample: bool = False
):
    """max |ours - torch float64| / std of the output, the input gradient and the kernel gradient, on an odd,
    non-square map (size x size + 1); with `upsample`, torch's reference convolves the map upsampled x2 (nearest)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, size, size + 1, channels))
    kernel = rng.normal(size=(kernel_size, kernel_size, channels, features)) / np.sqrt(channels * kernel_size**2)
    out, vjp = jax.vjp(
        lambda x, k: conv(x, k, stride, padding), jnp.asarray(x, jnp.float32), jnp.asarray(kernel, jnp.float32)
    )
    cotangent = rng.normal(size=out.shape)
    dx, dkernel = vjp(jnp.asarray(cotangent, jnp.float32))

    (top, bottom), (left, right) = ((padding, padding), (padding, padding)) if isinstance(padding, int) else padding
    tx = torch.tensor(nhwc_to_nchw(x), dtype=torch.float64, requires_grad=True)
    tk = torch.tensor(kernel.transpose(3, 2, 0, 1), dtype=torch.float64, requires_grad=True)
    seen = F.interpolate(tx, scale_factor=2, mode="nearest") if upsample else tx
    ref = F.conv2d(F.pad(seen, (left, right, top, bottom)), tk, stride=stride)
    ref.backward(torch.tensor(nhwc_to_nchw(cotangent), dtype=torch.float64))
    return (
        rel_err(nhwc_to_nchw(out), ref.detach().numpy()),
        rel_err(nhwc_to_nchw(dx), tx.grad.numpy()),
        rel_err(np.asarray(dkernel).transpose(3, 2, 0, 1), tk.grad.numpy()),
    )


@pytest.mark.parametrize(
    "size,stride,padding", [(2, 1, 1), (4, 1, 1), (16, 1, 1), (5, 2, 1), (8, 2, ((0, 1), (0, 1))), (7, 1, 0)]
)
def test_small_map_convolution_and_gradients_match_torch(size, stride, padding):
    errors = _errors_against_torch(layers.conv2d, size, layers.CPU_MATMUL_CONV_MIN_CHANNELS, 10, 3, stride, padding)
    print(f"\nconv2d {size}x{size + 1} s{stride} p{padding}: out, dx, dkernel errors {errors}")
    # measured up to 2.2e-6 (float32 sums of 1,152 products, and of up to 272 positions for the kernel, against
    # float64; 16x17 is past CPU_MATMUL_CONV_MAX_POSITIONS, so XLA's convolution): ~9x; a shifted copy out of
    # order errs by ~1
    assert max(errors) <= 2e-5


@pytest.mark.parametrize(
    "kernel_size,stride,padding", [(3, 1, 1), (3, 2, 1), (3, 2, ((0, 1), (0, 1))), (1, 1, 0), (3, 1, 0)]
)
def test_low_rank_conv_and_its_gradients_match_torch(kernel_size, stride, padding):
    """The LoRA A convolution (rank 4); on CPU a matmul and a sum of taps with a hand-written backward."""
    errors = _errors_against_torch(layers.low_rank_conv2d, 9, 6, 4, kernel_size, stride, padding)
    print(f"\nlow-rank conv k{kernel_size} s{stride} p{padding}: out, dx, dkernel errors {errors}")
    # measured up to 4.9e-7 (float32 sums of at most 54 terms against float64): ~20x; a tap out of place errs by ~1
    assert max(errors) <= 1e-5


@pytest.mark.parametrize(
    "form,features",
    [
        (layers.nearest_x2_conv2d, 5),
        (functools.partial(layers.nearest_x2_conv2d, low_rank=True), 4),
        (layers._upsampling_conv, 5),
    ],
    ids=["platform's (CPU here: phase convolutions)", "platform's low-rank", "TPU's input-dilated"],
)
def test_the_convolution_of_a_nearest_upsampled_map_matches_torch(form, features):
    """Upsample2D's x2 step: the platform's forms (a kernel and a LoRA A factor), and the TPU's input-dilated
    convolution run here on CPU."""
    errors = _errors_against_torch(lambda x, k, stride, padding: form(x, k), 5, 6, features, 3, 1, 1, upsample=True)
    print(f"\nnearest x2 conv: out, dx, dkernel errors {errors}")
    # measured up to 1.1e-6 (float32 sums of at most 54 terms, 216 for the kernel, against float64): ~18x; a block
    # sum of the kernel off by one tap errs by ~1
    assert max(errors) <= 2e-5


def _lowered(
    platform: str, size: int, channels: int = layers.CPU_MATMUL_CONV_MIN_CHANNELS, conv=layers.conv2d, features=8
) -> str:
    x = jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)
    kernel = jax.ShapeDtypeStruct((3, 3, channels, features), jnp.float32)
    fn = jax.jit(lambda x, k: conv(x, k, 1, 1))
    return fn.trace(x, kernel).lower(lowering_platforms=(platform,)).as_text()


def test_the_form_is_chosen_for_the_platform_compiled_for():
    """Small maps with many channels: a matmul in a CPU program, the convolution in a TPU one (even lowered on
    this CPU host); larger maps or fewer channels: the convolution everywhere."""
    small = int(np.sqrt(layers.CPU_MATMUL_CONV_MAX_POSITIONS))
    assert "convolution" not in _lowered("cpu", small)
    assert "convolution" in _lowered("tpu", small)
    assert "convolution" in _lowered("cpu", small + 1)
    assert "convolution" in _lowered("cpu", small, channels=layers.CPU_MATMUL_CONV_MIN_CHANNELS // 2)


def test_the_low_rank_form_is_chosen_for_the_platform_compiled_for():
    """LoRA A: the tap sum in a CPU program, the convolution in a TPU one."""
    assert "convolution" not in _lowered("cpu", 32, conv=layers.low_rank_conv2d, features=4)
    assert "convolution" in _lowered("tpu", 32, conv=layers.low_rank_conv2d, features=4)


def test_the_upsampling_form_is_chosen_for_the_platform_compiled_for():
    """Nearest x2 then conv: one input-dilated convolution in a TPU program, the upsampled map in a CPU one (XLA:CPU
    ran the dilated form 7-11x slower, forward and both gradients, 32-128 pixels, 32-128 channels)."""
    upsample = lambda x, k, stride, padding: layers.nearest_x2_conv2d(x, k)  # noqa: E731
    assert "lhs_dilate = [2, 2]" in _lowered("tpu", 32, conv=upsample)
    assert "lhs_dilate = [2, 2]" not in _lowered("cpu", 32, conv=upsample)
