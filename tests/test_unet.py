"""UNet2DConditionModel parity against diffusers on identical random weights (SD 2.x and SD 1.x structures)."""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx
from torch_utils import nchw_to_nhwc, nhwc_to_nchw, randomize_, rel_err

from tadsr_jax.nn import lora
from tadsr_jax.weights.loaders import load_unet

SD2_LIKE = dict(  # linear projections, per-block head counts, upcast attention, as SD-2.1-base
    sample_size=16,
    layers_per_block=2,
    block_out_channels=(32, 64, 64),
    cross_attention_dim=24,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(2, 4, 4),
    use_linear_projection=True,
    upcast_attention=True,
    norm_num_groups=8,
)
SD1_LIKE = dict(  # 1x1-conv projections, one head count for all blocks, attention in the last block too
    sample_size=16,
    layers_per_block=1,
    block_out_channels=(32, 48, 64),
    cross_attention_dim=16,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4,
    use_linear_projection=False,
    norm_num_groups=16,
    transformer_layers_per_block=2,
    freq_shift=1,
    flip_sin_to_cos=False,
)


# One compiled call per model structure, shared by the tests below.
run = nnx.jit(lambda model, *args: model(*args))


@pytest.fixture(scope="module", params=["sd2", "sd1"])
def unet_pair(request, tmp_path_factory):
    cfg = SD2_LIKE if request.param == "sd2" else SD1_LIKE
    torch_unet = randomize_(TorchUNet(**cfg), seed=1)
    folder = tmp_path_factory.mktemp(f"unet_{request.param}")
    torch_unet.save_pretrained(folder)
    return torch_unet, load_unet(str(folder)), str(folder)


def _inputs(cross_dim: int):
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 24, generator=gen)  # batch 2, non-square
    context = torch.randn(2, 7, cross_dim, generator=gen)
    return latents, torch.tensor([10, 700]), context


def test_unet_matches_diffusers(unet_pair):
    torch_unet, unet, _ = unet_pair
    latents, t, context = _inputs(torch_unet.config.cross_attention_dim)
    with torch.no_grad():
        ref = torch_unet(latents, t, context).sample.numpy()
    ours = run(unet, jnp.asarray(nchw_to_nhwc(latents)), jnp.asarray(t.numpy()), jnp.asarray(context.numpy()))
    assert rel_err(nhwc_to_nchw(ours), ref) <= 3e-4  # measured 7.3e-6, 9.9e-6 (float32, two summation orders): 30x


@pytest.mark.slow  # diffusers' bfloat16 UNet on the CPU, and ours
def test_unet_bf16_close_to_fp32(unet_pair):
    """bf16 weights and activations (norm statistics and softmax in fp32). Tolerance: the mean error may be
    at most 6% of the fp32 output's std (measured 1.5e-2 and 2.0e-2: bf16 rounding leaves no room for 10x) and at
    most twice the error of diffusers' own bf16 run of the same weights (measured 1.05x, 1.08x); a wrong layer or
    mapping gives errors of order 1."""
    torch_unet, _, folder = unet_pair
    unet_bf16 = load_unet(folder, dtype=jnp.bfloat16)
    assert unet_bf16.conv_in.kernel.dtype == jnp.bfloat16
    latents, t, context = _inputs(torch_unet.config.cross_attention_dim)
    with torch.no_grad():
        ref = torch_unet(latents, t, context).sample.numpy()
        theirs = (
            copy.deepcopy(torch_unet)
            .to(torch.bfloat16)(latents.bfloat16(), t, context.bfloat16())
            .sample.float()
            .numpy()
        )
    ours = run(unet_bf16, jnp.asarray(nchw_to_nhwc(latents)), jnp.asarray(t.numpy()), jnp.asarray(context.numpy()))
    assert ours.dtype == jnp.bfloat16
    ours_err = np.abs(nhwc_to_nchw(ours) - ref).mean() / ref.std()
    their_err = np.abs(theirs - ref).mean() / ref.std()
    print(f"\nUNet bf16 mean error / std: ours {ours_err:.2e}, diffusers {their_err:.2e}")
    assert ours_err <= 6e-2 and ours_err <= 2 * their_err


class _LoRA(lora.LoRAParam):
    pass


@pytest.mark.slow  # compiles the UNet's gradient under each policy
# SD-2.x's structure only: remat wraps every block the same way whatever its type, and SD-2.1 is the UNet we train.
@pytest.mark.parametrize("unet_pair", ["sd2"], indirect=True)
@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_changes_memory_not_results(unet_pair, policy):
    """Recomputing block activations in the backward pass gives the same outputs and gradients, also as the train
    step uses the UNet: merged inside `jax.value_and_grad`, with an adapter switched on for the call."""
    torch_unet, unet, _ = unet_pair
    latents, t, context = _inputs(torch_unet.config.cross_attention_dim)
    args = (jnp.asarray(nchw_to_nhwc(latents)), jnp.asarray(t.numpy()), jnp.asarray(context.numpy()))
    model = nnx.clone(unet)
    lora.add_adapter(
        model,
        "a",
        _LoRA,
        ["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"],
        rank=2,
        alpha=4.0,
        rngs=nnx.Rngs(0),
    )
    graphdef, trained, frozen = nnx.split(model, _LoRA, nnx.Param)

    def grads(remat: str):
        def loss(trained):
            merged = nnx.merge(graphdef, trained, frozen)
            merged.remat = remat
            with lora.active_adapters(merged, ["a"]):
                return jnp.mean(jnp.square(merged(*args)))

        return jax.jit(jax.value_and_grad(loss))(trained)

    (plain_loss, plain), (remat_loss, remat) = grads("none"), grads(policy)
    # Two programs (recomputation reorders float32 sums): the loss measured 2.3e-7 apart, the gradients at most 0.31
    # of rtol=1e-4, atol=1e-7 (494 leaves); these bounds are 20-30x above.
    np.testing.assert_allclose(remat_loss, plain_loss, rtol=5e-6)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-6)
