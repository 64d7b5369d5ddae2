"""Loading diffusers folders: formats (safetensors, .bin), round trips, and one-line errors naming the tensor."""

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx
from safetensors.numpy import load_file, save_file
from torch_utils import randomize_

from tadsr_jax.weights.convert import WeightsError, state_to_torch
from tadsr_jax.weights.loaders import load_unet

TINY_UNET = dict(
    sample_size=8,
    layers_per_block=1,
    block_out_channels=(16, 32),
    cross_attention_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2,
    norm_num_groups=8,
    use_linear_projection=True,
)
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def torch_unet():
    return randomize_(TorchUNet(**TINY_UNET), seed=9)


@pytest.fixture(scope="module")
def folder(torch_unet, tmp_path_factory):
    path = tmp_path_factory.mktemp("unet")
    torch_unet.save_pretrained(path)
    return str(path)


def _edited_copy(src: str, dst, edit) -> str:
    dst = str(dst)
    shutil.copytree(src, dst)
    path = os.path.join(dst, WEIGHTS)
    save_file(edit(load_file(path)), path, metadata={"format": "pt"})
    return dst


def test_round_trip_reproduces_the_torch_state_dict(torch_unet, folder):
    ours = state_to_torch(load_unet(folder))
    theirs = {k: v.numpy() for k, v in torch_unet.state_dict().items()}
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)


def test_bin_checkpoint_loads_like_safetensors(torch_unet, folder, tmp_path):
    torch_unet.save_pretrained(tmp_path, safe_serialization=False)
    assert os.path.isfile(tmp_path / "diffusion_pytorch_model.bin")
    ours = state_to_torch(load_unet(str(tmp_path)))
    reference = state_to_torch(load_unet(folder))
    for key, value in reference.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=key)


def test_bf16_load_casts_every_parameter(folder):
    unet = load_unet(folder, dtype=jnp.bfloat16)
    dtypes = {v.dtype for v in state_to_torch(unet, dtype=None).values()}
    assert dtypes == {np.dtype(jnp.bfloat16)}


def test_missing_tensor_is_named(folder, tmp_path):
    key = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    broken = _edited_copy(folder, tmp_path / "b", lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(WeightsError, match=f"missing tensor '{key}'"):
        load_unet(broken)


def test_unexpected_tensor_is_named(folder, tmp_path):
    broken = _edited_copy(folder, tmp_path / "b", lambda t: {**t, "mid_block.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(WeightsError, match="unexpected tensor 'mid_block.extra.weight'"):
        load_unet(broken)


def test_misshaped_tensor_is_named(folder, tmp_path):
    key = "conv_in.weight"
    broken = _edited_copy(folder, tmp_path / "b", lambda t: {**t, key: np.zeros((16, 5, 3, 3), np.float32)})
    with pytest.raises(WeightsError, match=r"'conv_in.weight' has shape \(3, 3, 5, 16\).*expects \(3, 3, 4, 16\)"):
        load_unet(broken)


def test_folder_problems_are_one_line_errors(folder, tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_unet(str(tmp_path / "nowhere"))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(os.path.join(folder, "config.json"), no_weights)
    with pytest.raises(WeightsError, match="no weight file"):
        load_unet(str(no_weights))
    truncated = _edited_copy(folder, tmp_path / "truncated", lambda t: t)
    with open(os.path.join(truncated, WEIGHTS), "r+b") as f:
        f.truncate(1000)
    with pytest.raises(WeightsError, match="unreadable safetensors"):
        load_unet(truncated)
    unsupported = _edited_copy(folder, tmp_path / "unsupported", lambda t: t)
    with open(os.path.join(unsupported, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(unsupported, "config.json"), "w") as f:
        json.dump({**config, "class_embed_type": "timestep"}, f)
    with pytest.raises(WeightsError, match="class_embed_type='timestep' is not supported"):
        load_unet(unsupported)


@pytest.mark.slow  # a fresh Python process
def test_import_pulls_in_neither_torch_nor_tensorflow():
    code = (
        "import sys, tadsr_jax, tadsr_jax.nn, tadsr_jax.models.unet, tadsr_jax.models.vae, "
        "tadsr_jax.models.clip_text, tadsr_jax.weights.loaders, tadsr_jax.diffusion; "
        "print(sorted(m for m in ('torch', 'tensorflow', 'diffusers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_random_folder_loads_in_diffusers_and_transformers(tmp_path):
    """Folders we write are standard: the PyTorch classes read them and compute what our loaders' models do."""
    import torch
    import transformers
    from torch_utils import nchw_to_nhwc, nhwc_to_nchw, rel_err

    from tadsr_jax.models.clip_text import encode_prompts
    from tadsr_jax.weights.loaders import load_networks
    from tadsr_jax.weights.tiny import write_random_sd_folder

    text_cfg = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=12,
        hidden_act="gelu",
    )
    vae_cfg = dict(
        block_out_channels=[16],
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"],
    )
    folder = write_random_sd_folder(
        str(tmp_path / "sd"), unet={**TINY_UNET, "cross_attention_dim": 16}, vae=vae_cfg, text_encoder=text_cfg, seed=3
    )
    nets = load_networks(folder)

    torch_unet = TorchUNet.from_pretrained(os.path.join(folder, "unet")).eval()
    latents, context = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 16)
    with torch.no_grad():
        ref = torch_unet(latents, 5, context).sample.numpy()
    # Jitted: one program, where an eager call compiles every layer's operations one by one.
    ours = nnx.jit(lambda unet, *args: unet(*args))(
        nets.unet, jnp.asarray(nchw_to_nhwc(latents)), 5, jnp.asarray(context.numpy())
    )
    assert rel_err(nhwc_to_nchw(ours), ref) <= 1e-4  # measured 2.2e-6 (float32, two summation orders): 46x

    torch_text = transformers.CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder")).eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    ids = tokenizer(["a cat"], padding="max_length", max_length=12, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = torch_text(ids).last_hidden_state.numpy()
    assert rel_err(encode_prompts(nets.text_encoder, nets.tokenizer, ["a cat"]), ref) <= 1e-4  # measured 4.8e-7
    np.testing.assert_array_equal(nets.schedule.alphas_cumprod, load_networks(folder).schedule.alphas_cumprod)
