"""The offline SD stand-in (weights/tiny_sd.py): its constructed VAE is nearly lossless on real images, at every t."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.tiny import get_config
from tadsr_jax.data.samples import HELD_OUT_SAMPLES, sample_image
from tadsr_jax.weights.convert import WeightsError
from tadsr_jax.weights.loaders import load_unet, load_vae
from tadsr_jax.weights.tiny_sd import write_tiny_sd


def test_stand_in_vae_is_nearly_lossless(tiny_sd):
    vae = load_vae(f"{tiny_sd}/time_vae", time_aware=True)
    images = np.stack([np.asarray(sample_image(n, 64), np.float32) / 127.5 - 1 for n in HELD_OUT_SAMPLES])
    for t in (1, 500, 999):
        posterior = vae.encode(jnp.asarray(images), jnp.full((len(images),), t))
        assert float(jnp.abs(posterior.mean[..., :3] - images).max()) <= 2e-3  # latent channel c = image channel c
        assert float(jnp.abs(posterior.mean[..., 3:]).max()) == 0.0
        recon = np.asarray(vae.decode(posterior.sample(jax.random.key(t))))
        psnr = 10 * np.log10(4.0 / np.mean((recon - images) ** 2))
        assert psnr >= 40.0, (t, psnr)


def test_stand_in_unet_output_is_small_but_not_zero(tiny_sd):
    kernel = np.asarray(load_unet(f"{tiny_sd}/unet").conv_out.kernel[...])
    assert 0 < np.abs(kernel).max() <= 0.01


def test_stand_in_rejects_vae_it_cannot_make_lossless(tmp_path):
    model = get_config().model
    model.vae.block_out_channels = [16, 32]
    model.vae.down_block_types = ["DownEncoderBlock2D"] * 2
    model.vae.up_block_types = ["UpDecoderBlock2D"] * 2
    with pytest.raises(WeightsError, match="one block"):
        write_tiny_sd(str(tmp_path / "tiny_sd"), model)
