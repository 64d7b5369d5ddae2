"""A tiny random-init TADSR (SD-2.x block structure) that trains and infers on a CPU in seconds: tests, CI, demo.

Nothing can be downloaded offline, so the "pretrained" SD folder is written with random weights into the
workdir, the training images are scikit-image samples, and LPIPS runs on a seeded random VGG (not perceptual;
set lpips.path to real converted weights for anything else).
"""

from tadsr_jax.defaults import base_config


def get_config():
    config = base_config()
    config.seed = 0
    config.model.unet = dict(
        block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        attention_head_dim=[2, 4], use_linear_projection=True, sample_size=32)
    # One VAE block: latents at full resolution, so the briefly trained stand-in autoencoder is nearly lossless.
    config.model.vae = dict(
        block_out_channels=[32], layers_per_block=1, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"], sample_size=64)
    config.model.text_encoder = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu")
    config.lpips.random_seed = 0

    config.data.source = "hr_folder"
    config.data.path = ""  # scikit-image samples written into the workdir
    config.data.crop_size = 32
    config.data.read_threads = 2

    config.train.steps = 300
    config.train.batch_size = 4
    config.train.lr = 1e-3
    config.train.log_every = 25
    config.train.checkpoint_every = 100
    config.train.sample_every = 100
    return config
