"""What the backward pass keeps: GroupNorm and LPIPS keep no more than they must (the 512x512 train step's
memory is mostly these saved activations), and the per-source listing `launch/compile.py` prints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.tiny import get_config
from tadsr_jax.models.lpips import LPIPS
from tadsr_jax.nn import ResnetBlock2D
from tadsr_jax.train import aot


def _kept_bytes(fn, *args, dtype: str | None = None) -> float:
    return sum(e["bytes"] for e in aot.residuals_by_source(fn, *args) if dtype in (None, e["dtype"]))


def test_bf16_resnet_block_keeps_no_float32_map():
    """GroupNorm's statistics are float32; its float32 copies of the map were the largest saved activations (22 of
    72 GiB in the SD-2.1 step at 4 images). Only bf16 maps (and per-group statistics, if any) may be kept."""
    block = ResnetBlock2D(
        32, 64, groups=8, eps=1e-5, temb_channels=16, time_mode="scale_shift", dtype=jnp.bfloat16, rngs=nnx.Rngs(0)
    )
    graphdef, params = nnx.split(block)
    x = jnp.ones((2, 16, 16, 32), jnp.bfloat16)
    temb = jnp.ones((2, 16), jnp.bfloat16)
    fn = lambda params, x, temb: nnx.merge(graphdef, params)(x, temb).astype(jnp.float32).sum()
    map_bytes = 2 * 16 * 16 * 32 * 4  # one float32 map of the block's input
    assert _kept_bytes(fn, params, x, temb, dtype="f32") < map_bytes / 8
    assert _kept_bytes(fn, params, x, temb, dtype="bf16") > 0  # the conv inputs the kernel gradients need


def test_lpips_keeps_nothing_of_the_targets_pass():
    """A loss against a target differentiates one image: the target's VGG pass must keep nothing."""
    lpips = LPIPS(rngs=nnx.Rngs(0))  # closed over: its weights are constants, as frozen weights are in training
    rng = np.random.default_rng(0)
    x, y = (jnp.asarray(rng.uniform(-1, 1, (1, 32, 32, 3)), jnp.float32) for _ in range(2))
    both = _kept_bytes(lambda x, y: lpips(x, y).sum(), x, y)
    one = _kept_bytes(lambda x, y: lpips(x, jax.lax.stop_gradient(y)).sum(), x, y)
    assert 0 < one < 0.6 * both


@pytest.mark.slow  # traces the train step three times
def test_saved_activations_of_the_train_step_shrink_with_remat():
    """The listing of launch/compile.py: sources inside the package, largest first, and it sees a remat policy."""
    config = get_config()
    plain = aot.saved_activations(config, batch=2)
    assert plain and all(e["source"].startswith("tadsr_jax/") for e in plain)
    assert [e["bytes"] for e in plain] == sorted((e["bytes"] for e in plain), reverse=True)
    config.model.remat.unet = config.model.remat.vae_encoder = config.model.remat.vae_decoder = "full"
    remat = aot.saved_activations(config, batch=2)
    assert sum(e["bytes"] for e in remat) < 0.5 * sum(e["bytes"] for e in plain)
