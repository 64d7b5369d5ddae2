"""The tiny TADSR of configs/tiny.py with a trained-looking generator, shared by conftest.py's session fixture and
the tests that need the model in memory."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs.tiny import get_config
from tadsr_jax.infer.model import build_tadsr
from tadsr_jax.method.tadsr import GENERATOR


def trained_tadsr(folder: str, seed: int = 1):
    """(model, tokenizer, schedule): a TADSR on the SD folder whose generator leaves (LoRA factors, B included,
    conv_in, VAE time layers) are moved by seeded noise, as if trained."""
    model, tokenizer, schedule = build_tadsr(folder, get_config().model)
    rng = np.random.default_rng(seed)
    state = nnx.state(model, GENERATOR)
    nnx.update(
        model,
        jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + 0.05 * rng.standard_normal(x.shape, np.float32)), state),
    )
    return model, tokenizer, schedule
