"""Strip-wise VAE encode/decode against the untiled network (tadsr_jax/infer/vae_tiling.py)."""

import gc
import time
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from skimage import data as skdata
from skimage.transform import resize

from tadsr_jax.infer.vae_tiling import tiled_decode, tiled_encode
from tadsr_jax.models.vae import AutoencoderKL, VAEConfig
from tadsr_jax.nn import Attention, GroupNorm, ResnetBlock2D, attention

# Three blocks; the encoder downsamples 45 -> 22 (odd input). Each test runs with an unbounded memory budget (every
# map stored) and with none (upsampled maps recomputed by their readers, ResNets with conv1 recomputed and written
# over their input where the channels allow).
CONFIG = {
    "block_out_channels": (16, 32, 32),
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "norm_num_groups": 8,
    "latent_channels": 4,
    "layers_per_block": 1,
}
IMAGE_SIZE = (90, 126)  # latents 22x31: partial last strips everywhere, partial attention windows below
STRIP_ROWS = 7  # >= 4 strips per map above the latent size; odd, so the even rounding of lazy reads runs
TIMESTEPS = np.array([250, 999])
# max|tiled - untiled| / std(untiled). The untiled network's own float32 noise on these models (jit against eager)
# reaches 1e-5 (encode) and 2.5e-5 (decode); the tiled results measured 0.8-1.5e-5 and 2.7-3.8e-5. In float64
# (GroupNorm included) tiled ResNets agree to 5e-14, so this bound only absorbs rounding (13x the worst measured,
# 3.8e-5); halo, border or statistics bugs give > 0.3.
EXACT = 5e-4
UNBOUNDED = 2**62
BUDGETS = pytest.mark.parametrize("budget", [UNBOUNDED, 0], ids=["stored", "recomputed"])
WINDOW = 8  # latent pixels: 3x4 windows on the 22x31 latents, the last row and column of windows partial
# Against the global-attention network the 8x8 windows measured 1.3 (encode mean) and 4.8 (decode) on this random
# VAE, whose attention is nearly uniform, so windows change it by about the spread of the values; the exact check
# is against the same network with windowed attention (`_WindowedAttention`).
WINDOWED_BOUND = 10.0

encode = nnx.jit(lambda vae, x, t: vae.encode(x, t))
decode = nnx.jit(lambda vae, z: vae.decode(z))


def _rel_err(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / ref.std())


def _randomized_vae(add_attention: bool) -> AutoencoderKL:
    """A time-aware VAE whose zero/one-initialised tensors (time projections, norms) are random too."""
    vae = AutoencoderKL(VAEConfig(mid_block_add_attention=add_attention, **CONFIG), time_aware=True, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    for _, module in nnx.iter_modules(vae):
        if isinstance(module, GroupNorm):
            module.scale.set_value(jnp.asarray(1 + 0.2 * rng.standard_normal(module.scale.shape), jnp.float32))
            module.bias.set_value(jnp.asarray(0.2 * rng.standard_normal(module.bias.shape), jnp.float32))
        if isinstance(module, ResnetBlock2D) and module.time_emb_proj is not None:
            proj = module.time_emb_proj
            proj.kernel.set_value(jnp.asarray(0.05 * rng.standard_normal(proj.kernel.shape), jnp.float32))
            proj.bias.set_value(jnp.asarray(0.2 * rng.standard_normal(proj.bias.shape), jnp.float32))
    return vae


@pytest.fixture(scope="module", params=[True, False], ids=["attention", "no_attention"])
def vae(request):
    return _randomized_vae(request.param)


@pytest.fixture(scope="module")
def images():
    pictures = [skdata.astronaut(), skdata.coffee()]
    return np.stack([resize(p, IMAGE_SIZE, anti_aliasing=True) * 2 - 1 for p in pictures]).astype(np.float32)


@pytest.fixture(scope="module")
def untiled(vae, images):
    posterior = encode(vae, jnp.asarray(images), jnp.asarray(TIMESTEPS))
    return posterior, np.asarray(decode(vae, posterior.mean))


@BUDGETS
def test_encode_equals_untiled(vae, images, untiled, budget):
    posterior = tiled_encode(vae, images, TIMESTEPS, strip_rows=STRIP_ROWS, memory_budget=budget)
    errors = (_rel_err(posterior.mean, untiled[0].mean), _rel_err(posterior.logvar, untiled[0].logvar))
    print(f"encode, global attention: mean {errors[0]:.2e}, logvar {errors[1]:.2e}")
    assert max(errors) <= EXACT


@BUDGETS
def test_decode_equals_untiled(vae, untiled, budget):
    image = tiled_decode(vae, untiled[0].mean, strip_rows=STRIP_ROWS, memory_budget=budget)
    assert image.shape == untiled[1].shape and image.dtype == np.float32
    error = _rel_err(image, untiled[1])
    print(f"decode, global attention: {error:.2e}")
    assert error <= EXACT


class _WindowedAttention(nnx.Module):
    """The VAE attention with its softmax restricted to WINDOW x WINDOW windows, GroupNorm over the whole map."""

    def __init__(self, attn: Attention):
        self.attn = attn

    def __call__(self, x: jax.Array) -> jax.Array:
        a, (b, height, width, channels) = self.attn, x.shape
        normed = a.group_norm(x)
        bands = []
        for i in range(0, height, WINDOW):
            windows = []
            for j in range(0, width, WINDOW):
                window = normed[:, i : i + WINDOW, j : j + WINDOW]
                tokens = window.reshape(b, -1, channels)
                h = attention(a.to_q(tokens), a.to_k(tokens), a.to_v(tokens), a.heads, float32_logits=a.upcast)
                windows.append(a.to_out[0](h).reshape(window.shape))
            bands.append(jnp.concatenate(windows, axis=2))
        return jnp.concatenate(bands, axis=1) + x


def test_windowed_attention_is_the_only_difference(images):
    vae = _randomized_vae(True)
    posterior = tiled_encode(vae, images, TIMESTEPS, strip_rows=STRIP_ROWS, attention_window=WINDOW)
    global_posterior = encode(vae, jnp.asarray(images), jnp.asarray(TIMESTEPS))
    image = tiled_decode(vae, global_posterior.mean, strip_rows=STRIP_ROWS, attention_window=WINDOW)
    global_image = decode(vae, global_posterior.mean)
    changed = _rel_err(posterior.mean, global_posterior.mean), _rel_err(image, global_image)
    print(
        f"{WINDOW}x{WINDOW} attention windows against global attention: encode mean {changed[0]:.2e}, "
        f"decode {changed[1]:.2e}"
    )
    assert all(EXACT < e <= WINDOWED_BOUND for e in changed)

    # Encoder and decoder share the attention code path; checking the decoder keeps one compile out of the file.
    mid_block = vae.decoder.mid_block
    mid_block.attentions[0] = _WindowedAttention(mid_block.attentions[0])
    error = _rel_err(image, decode(vae, global_posterior.mean))
    print(f"decode against windowed attention: {error:.2e}")
    assert error <= EXACT


def test_tall_decode_without_budget_keeps_one_and_a_half_output_maps():
    """With no memory budget a 1024-row decode holds at most a 16-channel output-size map plus the 32-channel
    half-size map it is computed from (1.5 output maps) and a few strips.

    Tall rather than 1024x1024 so that it reuses the strip functions compiled above (same widths). Storing
    everything peaks at 3 maps (the 32-channel upsampled map and its ResNet's conv1 output); storing the
    ResNets' conv1 outputs alone at 2. A short decode first compiles the strip functions (compile-time Python
    allocations would count too); the bound leaves room for strips.
    """
    vae = _randomized_vae(True)
    latents = np.random.default_rng(0).standard_normal((1, 256, 31, 4)).astype(np.float32)
    map_bytes = 1024 * 124 * 16 * 4
    tiled_decode(vae, latents[:, :16], strip_rows=STRIP_ROWS, memory_budget=0)
    gc.collect()
    tracemalloc.start()
    start = time.perf_counter()
    image = tiled_decode(vae, latents, strip_rows=STRIP_ROWS, memory_budget=0)
    seconds = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"1024x124 decode: {seconds:.1f} s, host peak {peak / map_bytes:.2f} output maps")
    assert image.shape == (1, 1024, 124, 3) and np.isfinite(image).all()
    assert peak <= 1.7 * map_bytes
