"""At SD-2.1-base size our modules hold exactly as many parameters as the diffusers/transformers classes."""

import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx

from tadsr_jax.models.architectures import SD21_UNET, SD21_VAE
from tadsr_jax.models.unet import UNet2DConditionModel, UNetConfig
from tadsr_jax.models.vae import AutoencoderKL, VAEConfig
from tadsr_jax.weights.convert import count_params


def _torch_count(cls, config: dict) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in cls(**config).parameters())


def test_sd21_unet_size():
    unet = nnx.eval_shape(lambda: UNet2DConditionModel(UNetConfig.from_dict(SD21_UNET), rngs=nnx.Rngs(0)))
    assert count_params(unet) == _torch_count(TorchUNet, SD21_UNET) == 865_910_724


def test_sd21_vae_and_time_aware_encoder_sizes():
    cfg = VAEConfig.from_dict(SD21_VAE)
    vae = nnx.eval_shape(lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0)))
    time_vae = nnx.eval_shape(lambda: AutoencoderKL(cfg, time_aware=True, rngs=nnx.Rngs(0)))
    assert count_params(vae) == _torch_count(TorchVAE, SD21_VAE) == 83_653_863
    assert count_params(time_vae) - count_params(vae) == 2_072_576
    time_leaves = [p for p, _ in nnx.to_flat_state(nnx.state(time_vae, nnx.Param)) if "time" in ".".join(map(str, p))]
    assert len(time_leaves) == 24
