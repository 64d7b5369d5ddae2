"""The Stable Diffusion 2.1-base architectures, as plain config dicts in diffusers/transformers config.json format."""

# transformers CLIPTextConfig of SD-2.1's OpenCLIP ViT-H/14 text encoder (its last layer dropped: 23 of 24).
SD21_TEXT_ENCODER = {
    "vocab_size": 49408,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}
