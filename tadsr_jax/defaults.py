"""Defaults shared by every experiment config (configs/*.py start from `base_config()` and override)."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = ml_collections.ConfigDict()
    # An SD-style folder (unet/, time_vae/ or vae/, text_encoder/, tokenizer/, scheduler/). Empty: write a
    # random-weight model of the architectures below into <workdir>/random_sd once and use that.
    config.model.pretrained = ""
    config.model.dtype = "float32"  # or "bfloat16": weights and activations of the frozen networks
    config.model.unet = ml_collections.ConfigDict()
    config.model.vae = ml_collections.ConfigDict()
    config.model.text_encoder = ml_collections.ConfigDict()

    config.sr = ml_collections.ConfigDict()
    config.sr.timestep = 500  # the fidelity (low) / realism (high) knob, 1..999
    config.sr.prompt = ""
    config.sr.sample_posterior = True
    return config
