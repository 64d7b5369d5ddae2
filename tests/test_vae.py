"""AutoencoderKL and TADSR's time-aware encoder against diffusers (and a torch re-statement of docs/method.md 1.1)."""

import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from flax import nnx
from safetensors.numpy import load_file, save_file
from torch_utils import nchw_to_nhwc, nhwc_to_nchw, randomize_, rel_err

from benchmarks.torch_reference import time_aware_moments
from tadsr_jax.nn import remat
from tadsr_jax.weights.loaders import load_vae

TINY = dict(
    block_out_channels=(32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    norm_num_groups=8,
    latent_channels=4,
    layers_per_block=2,
)
TIMESTEPS = torch.tensor([1, 999])
# max |ours - theirs| / std(theirs), float32 in two summation orders: measured up to 9.6e-6 (decoder), 1.06e-5
# (time-aware encoder logvar; 1e-4 was 9.4x that), so 28x below; a transposed weight or wrong constant errs by 1e-1.
TOL = 3e-4

encode = nnx.jit(lambda vae, x, t: vae.encode(x, t))
decode = nnx.jit(lambda vae, z: vae.decode(z))


@pytest.fixture(scope="module")
def torch_vae():
    return randomize_(TorchVAE(**TINY), seed=2)


@pytest.fixture(scope="module")
def vae_folder(torch_vae, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    torch_vae.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(3)) * 2 - 1


def _rewrite(src: str, dst: str, transform) -> str:
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    tensors = transform(load_file(os.path.join(src, "diffusion_pytorch_model.safetensors")))
    save_file(tensors, os.path.join(dst, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    return dst


def test_encoder_matches_diffusers(torch_vae, vae_folder, images):
    with torch.no_grad():
        posterior = torch_vae.encode(images).latent_dist
    ours = encode(load_vae(vae_folder), jnp.asarray(nchw_to_nhwc(images)), None)
    assert rel_err(nhwc_to_nchw(ours.mean), posterior.mean.numpy()) <= TOL
    assert rel_err(nhwc_to_nchw(ours.logvar), posterior.logvar.numpy()) <= TOL


def test_decoder_matches_diffusers(torch_vae, vae_folder):
    latents = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = torch_vae.decode(latents).sample.numpy()
    ours = decode(load_vae(vae_folder), jnp.asarray(nchw_to_nhwc(latents)))
    assert rel_err(nhwc_to_nchw(ours), ref) <= TOL


def test_legacy_attention_names_load(torch_vae, vae_folder, images, tmp_path):
    """SD checkpoints and TADSR's time_vae/ name the VAE attention query/key/value/proj_attn."""
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}

    def to_legacy(tensors):
        out = {}
        for key, value in tensors.items():
            for new, old in legacy_names.items():
                key = key.replace(f".{new}.", f".{old}.")
            out[key] = value
        return out

    legacy = _rewrite(vae_folder, str(tmp_path / "legacy"), to_legacy)
    assert any(".query." in k for k in load_file(os.path.join(legacy, "diffusion_pytorch_model.safetensors")))
    with torch.no_grad():
        ref = torch_vae.encode(images).latent_dist.mean.numpy()
    ours = encode(load_vae(legacy), jnp.asarray(nchw_to_nhwc(images)), None)
    assert rel_err(nhwc_to_nchw(ours.mean), ref) <= TOL


def test_posterior_sampling_is_seeded(vae_folder, images):
    posterior = encode(load_vae(vae_folder), jnp.asarray(nchw_to_nhwc(images)), None)
    key = jax.random.key(7)
    a, b = posterior.sample(key), posterior.sample(key)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, posterior.sample(jax.random.key(8)))
    expected = posterior.mean + jnp.exp(0.5 * posterior.logvar) * jax.random.normal(key, posterior.mean.shape)
    np.testing.assert_allclose(a, expected, rtol=1e-6, atol=1e-6)  # the same float32 operations: measured 0
    np.testing.assert_array_equal(posterior.mode(), posterior.mean)


def test_time_aware_with_zero_time_layers_is_the_stock_encoder(torch_vae, vae_folder, images):
    """Loaded from a stock vae/ folder, the time layers start at zero projections: any t gives SD's encoder."""
    vae = load_vae(vae_folder, time_aware=True)
    with torch.no_grad():
        ref = torch_vae.encode(images).latent_dist
    ours = encode(vae, jnp.asarray(nchw_to_nhwc(images)), jnp.asarray(TIMESTEPS.numpy()))
    assert rel_err(nhwc_to_nchw(ours.mean), ref.mean.numpy()) <= TOL
    assert rel_err(nhwc_to_nchw(ours.logvar), ref.logvar.numpy()) <= TOL


# --- A PyTorch re-statement of docs/method.md 1.1 on top of diffusers' stock encoder modules.


def _time_tensors(encoder, seed: int) -> dict[str, torch.Tensor]:
    """The 4 + 2 * (#ResNets) new tensors of a TimeAwareAutoencoderKL, random."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen) / math.sqrt(shape[-1])
    tensors = {
        "encoder.time_embedding.linear_1.weight": rand(256, 128),
        "encoder.time_embedding.linear_1.bias": rand(256),
        "encoder.time_embedding.linear_2.weight": rand(256, 256),
        "encoder.time_embedding.linear_2.bias": rand(256),
    }
    resnets = [
        (f"down_blocks.{i}.resnets.{j}", r)
        for i, block in enumerate(encoder.down_blocks)
        for j, r in enumerate(block.resnets)
    ]
    resnets += [(f"mid_block.resnets.{j}", r) for j, r in enumerate(encoder.mid_block.resnets)]
    for name, resnet in resnets:
        channels = resnet.conv1.out_channels
        tensors[f"encoder.{name}.time_emb_proj.weight"] = rand(2 * channels, 256)
        tensors[f"encoder.{name}.time_emb_proj.bias"] = rand(2 * channels)
    return tensors, resnets


@pytest.fixture(scope="module")
def time_vae(torch_vae, vae_folder, tmp_path_factory):
    """A TADSR-style time_vae/ folder: the stock tensors plus random time tensors."""
    time, resnets = _time_tensors(torch_vae.encoder, seed=5)
    assert len(time) == 4 + 2 * len(resnets)
    folder = _rewrite(
        vae_folder,
        str(tmp_path_factory.mktemp("tv") / "time_vae"),
        lambda tensors: {**tensors, **{k: v.numpy() for k, v in time.items()}},
    )
    return folder, time


@pytest.mark.parametrize("timesteps", [TIMESTEPS, torch.tensor(500)], ids=["per-sample", "scalar"])
def test_time_aware_encoder_matches_restatement(torch_vae, time_vae, images, timesteps):
    folder, time = time_vae
    t_batch = timesteps.expand(images.shape[0]) if timesteps.ndim == 0 else timesteps
    with torch.no_grad():
        mean, logvar = time_aware_moments(torch_vae, time, images, t_batch)
    ours = encode(load_vae(folder, time_aware=True), jnp.asarray(nchw_to_nhwc(images)), jnp.asarray(timesteps.numpy()))
    assert rel_err(nhwc_to_nchw(ours.mean), mean.numpy()) <= TOL
    assert rel_err(nhwc_to_nchw(ours.logvar), logvar.numpy()) <= TOL


def test_time_aware_latents_depend_on_t(time_vae, images):
    vae = load_vae(time_vae[0], time_aware=True)
    x = jnp.asarray(nchw_to_nhwc(images[:1]))
    low, high = encode(vae, x, jnp.asarray([1])).mean, encode(vae, x, jnp.asarray([999])).mean
    assert np.abs(np.asarray(low - high)).max() > 1e-2 * float(np.std(np.asarray(low)))


@pytest.mark.parametrize("policy", ["full", remat.LAYERS])
def test_remat_changes_memory_not_results(time_vae, images, policy):
    """The time-aware encoder and the decoder under a remat policy (block-wise, or layer by layer inside the blocks)
    give the plain run's loss and gradients with respect to every weight and the input."""
    vae = load_vae(time_vae[0], time_aware=True)
    x, t = jnp.asarray(nchw_to_nhwc(images)), jnp.asarray(TIMESTEPS.numpy())
    graphdef, params = nnx.split(vae)

    def grads(policy: str):
        def loss(params, x):
            model = nnx.merge(graphdef, params)
            model.encoder.remat = model.decoder.remat = policy
            return jnp.mean(jnp.square(model.decode(model.encode(x, t).mean)))

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

    (plain_loss, plain), (remat_loss, remat_grads) = grads("none"), grads(policy)
    # Two programs (recomputation reorders float32 sums): the gradients measured at most 0.44 of rtol=1e-4,
    # atol=1e-7 (both policies, 76 leaves); these bounds are 20x above.
    np.testing.assert_allclose(remat_loss, plain_loss, rtol=5e-6)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat_grads), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-6)
