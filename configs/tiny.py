"""A tiny random-init TADSR (SD-2.x block structure) that runs in seconds on a CPU: tests, CI and the demo."""

from tadsr_jax.defaults import base_config


def get_config():
    config = base_config()
    config.model.unet = dict(
        block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
        attention_head_dim=[2, 4], use_linear_projection=True, sample_size=32)
    config.model.vae = dict(
        block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, sample_size=64)
    config.model.text_encoder = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu")
    return config
