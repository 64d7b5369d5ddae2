"""A tiny random-init TADSR (SD-2.x block structure) that trains and infers on a CPU in seconds: tests, CI, demo.

Nothing can be downloaded offline, so its SD folder and training images are stand-ins that launch/stand_ins.py
(or the demo) writes and passes as --config.model.pretrained and --config.data.path: random weights with a
constructed near-lossless VAE (tadsr_jax/weights/tiny_sd.py), and scikit-image samples. No
pretrained VGG exists offline either, so the LPIPS term is off (loss.lpips = 0); `--config.loss.lpips=2` runs it
on a seeded random VGG (lpips.random_seed), which exercises the code but is not perceptual. Likewise the TA-VSD
term (loss.vsd = 0): its teacher is random, so it carries no knowledge of natural images.

It starts from the paper's config (configs/tadsr_sd21.py, every key) and overrides what makes it tiny.
"""

import pathlib

import ml_collections

from tadsr_jax import cli


def get_config() -> ml_collections.ConfigDict:
    # By path: config files are loaded by path too (the repository root need not be on sys.path).
    config = cli.load_config(str(pathlib.Path(__file__).with_name("tadsr_sd21.py")))
    config.seed = 0
    config.model.dtype = "float32"
    config.model.unet = dict(
        block_out_channels=[32, 64],
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=32,
        # Attention at the lower resolution only: the latents here are image-sized.
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        attention_head_dim=[2, 4],
        use_linear_projection=True,
        sample_size=32,
    )
    # One narrow VAE block without mid attention, GroupNorm groups of 4: the shape weights/tiny_sd.py's nearly
    # lossless stand-in autoencoder needs (latents at full resolution).
    config.model.vae = dict(
        block_out_channels=[16],
        layers_per_block=1,
        norm_num_groups=4,
        mid_block_add_attention=False,
        down_block_types=["DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D"],
        sample_size=64,
    )
    config.model.text_encoder = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
    )
    # Distribution matching against a random teacher pulls SR towards noise (held-out PSNR 20.9 dB with it,
    # 22.2 without, bicubic 21.7): off here; the fake score still trains, as in the reference.
    config.loss.lpips = 0.0
    config.loss.vsd = 0.0
    config.lpips.random_seed = 0

    config.data.source = "hr_folder"
    config.data.path = ""  # required too: launch/stand_ins.py's images/ offline
    config.data.degradation = "bicubic"  # the demo measures x4 bicubic inputs
    config.data.crop_size = 32
    config.data.num_workers = 0
    config.data.read_threads = 2

    config.train.steps = 200
    config.train.max_student_timestep = 200  # the fidelity end of the knob: what PSNR measures
    config.train.batch_size = 4
    config.train.lr = 1e-3
    config.train.log_every = 25
    config.train.checkpoint_every = 100
    config.train.sample_every = 100
    config.sr.timestep = 100
    config.sr.process_size = 128  # the tiny model's working images stay small
    config.sr.bucket = 32
    return config
