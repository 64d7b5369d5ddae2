"""The benchmarks' FLOP count: matmuls and convolutions of a jaxpr, equal to torch's FlopCounterMode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.models.attention_processor import AttnProcessor
from flax import nnx
from torch.utils.flop_counter import FlopCounterMode
from torch_utils import randomize_

from tadsr_jax import flops
from tadsr_jax.flops import matmul_flops
from tadsr_jax.weights.loaders import load_unet

UNET = dict(  # SD-2.x structure; 32x32 latents give 1024-token self-attention, four query blocks on CPU
    sample_size=32,
    layers_per_block=1,
    block_out_channels=(32, 64),
    cross_attention_dim=24,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    norm_num_groups=8,
)


def test_unet_flops_equal_torch_flop_counter(tmp_path):
    """Our count of our UNet's jaxpr (attention a loop over query blocks) equals torch's count of diffusers'
    UNet, whose attention runs as explicit matmuls so that FlopCounterMode sees it."""
    torch_unet = randomize_(TorchUNet(**UNET), seed=0)
    torch_unet.save_pretrained(tmp_path)
    torch_unet.set_attn_processor(AttnProcessor())
    latents, t, context = torch.zeros(2, 4, 32, 32), torch.tensor([10, 20]), torch.zeros(2, 7, 24)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        torch_unet(latents, t, context)
    graphdef, params = nnx.split(load_unet(str(tmp_path)))
    jaxpr = jax.make_jaxpr(lambda p, z, t, c: nnx.merge(graphdef, p)(z, t, c))(
        params, jnp.zeros((2, 32, 32, 4)), jnp.asarray(t.numpy()), jnp.zeros((2, 7, 24))
    )
    assert "scan" in str(jaxpr)  # the blocked attention is counted through its loop
    assert matmul_flops(jaxpr) == counter.get_total_flops()


def test_loop_bodies_count_once_per_step_and_gradients_count():
    x, w = jnp.ones((5, 8, 16)), jnp.ones((16, 4))
    mapped = jax.make_jaxpr(lambda x, w: jax.lax.map(lambda row: row @ w, x))(x, w)
    assert matmul_flops(mapped) == 5 * 2 * 8 * 16 * 4
    conv = lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    ).sum()
    image, kernel = jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 5))
    forward = 2 * 2 * 6 * 6 * 5 * 3 * 3 * 3
    assert matmul_flops(jax.make_jaxpr(conv)(image, kernel)) == forward
    # backward: one convolution for the input gradient, one for the kernel gradient, each as large
    assert matmul_flops(jax.make_jaxpr(jax.grad(conv, argnums=(0, 1)))(image, kernel)) == 3 * forward
    np.testing.assert_equal(matmul_flops(jax.make_jaxpr(lambda a: jnp.tanh(a) + 1)(x)), 0)


def test_input_dilation_holes_do_not_count():
    """A stride-2 convolution's input gradient is a convolution over the output gradient dilated by 2: every
    multiply-add of the forward pass has one partner there, so forward + input gradient + kernel gradient is 3x
    the forward (up to taps on padding, which count as in torch). Counting the holes would make it 6x."""
    conv = lambda x, k: jax.lax.conv_general_dilated(
        x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    ).sum()
    image, kernel = jnp.ones((2, 16, 16, 3)), jnp.ones((3, 3, 3, 5))
    forward = 2 * 2 * 8 * 8 * 5 * 3 * 3 * 3
    assert matmul_flops(jax.make_jaxpr(conv)(image, kernel)) == forward
    both = matmul_flops(jax.make_jaxpr(jax.grad(conv, argnums=(0, 1)))(image, kernel))
    assert both == pytest.approx(3 * forward, rel=0.05)
    # a transposed convolution (input dilated by 2, 4x4 kernel): 2 of the 4 taps land in each direction
    up = lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), ((2, 2), (2, 2)), lhs_dilation=(2, 2), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    small = jnp.ones((2, 8, 8, 3))
    assert matmul_flops(jax.make_jaxpr(up)(small, jnp.ones((4, 4, 3, 5)))) == 2 * 2 * 16 * 16 * 5 * 3 * 2 * 2


def test_op_profile_counts_a_strided_convolution_gradient_as_the_jaxpr_count_does():
    """The profile's FLOPs come from the compiled HLO, the MFU's from the jaxpr: both leave out the holes of the
    dilated input a stride-2 convolution's input gradient runs on (counting them would make it 4x)."""
    from benchmarks import op_profile

    conv = lambda x, k: jax.lax.conv_general_dilated(
        x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    ).sum()
    image, kernel = jnp.ones((2, 16, 16, 3)), jnp.ones((3, 3, 3, 5))
    grad = jax.jit(jax.grad(conv, argnums=(0, 1)))
    instructions, computations = op_profile._instructions(grad.lower(image, kernel).compile().as_text())
    counted = [op_profile._conv_flops(i, instructions, computations) for i in instructions.values()]
    counted = [c for c in counted if c is not None]
    assert len(counted) == 2  # the input gradient and the kernel gradient (XLA drops the unused forward)
    forward = matmul_flops(jax.make_jaxpr(conv)(image, kernel))
    assert matmul_flops(jax.make_jaxpr(grad)(image, kernel)) == pytest.approx(3 * forward)
    assert sum(counted) == pytest.approx(2 * forward)


def test_op_profile_finds_every_convolution_of_a_train_step_and_its_flops():
    """The profile by op kind (`launch/bench.py --what=train --profile_steps=N`) on a real trace: the forward,
    input-gradient and kernel-gradient convolutions are all found, with their exact FLOPs, in the right pass."""
    from benchmarks import op_profile

    b, h, w, cin, cout = 2, 24, 24, 16, 8
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(b, h, w, cin)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, cin, cout)), jnp.float32)
    conv = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    step = jax.jit(jax.grad(lambda x, k: jnp.sum(jnp.tanh(conv(x, k)) ** 2), argnums=(0, 1)))
    compiled = step.lower(x, kernel).compile()
    result = op_profile.profile(lambda: compiled(x, kernel), compiled.as_text(), steps=3)
    print(f"\nop profile: {result}")
    one_conv = 2 * b * h * w * cin * cout * 9
    assert result["convolution_flop"] == 3 * one_conv  # forward, input gradient, kernel gradient, per step
    by_kind = result["by_kind_s"]
    assert by_kind["convolution, forward"] > 0 and by_kind["convolution, backward"] > 0
    assert set(by_kind) == {f"{k}, {d}" for k in op_profile.KINDS for d in ("forward", "backward")}
    assert result["step_s"] == pytest.approx(sum(by_kind.values()))


def test_uncounted_matmuls_are_left_out_under_transforms():
    """A matmul under `flops.uncounted` counts nothing, in its forward and its gradient, inside a cond too; the
    same matmul outside counts."""
    x, w = jnp.ones((3, 8)), jnp.ones((8, 4))

    def f(x, w):
        with flops.uncounted():
            hidden = x @ w
        return jnp.sum(hidden @ w.T)

    counted = 2 * 3 * 4 * 8  # hidden @ w.T only
    assert matmul_flops(jax.make_jaxpr(f)(x, w)) == counted
    # forward, and the cotangent of `hidden` through it; x's cotangent (through the uncounted product) is left out
    assert matmul_flops(jax.make_jaxpr(jax.grad(f))(x, w)) == 2 * counted
    branched = jax.make_jaxpr(lambda x, w: jax.lax.cond(True, f, lambda x, w: jnp.sum(x @ w), x, w))(x, w)
    assert matmul_flops(branched) == counted  # the larger branch: the other one's 2 x 3 x 8 x 4 equals counted too
