"""Offline stand-ins for pretrained assets, for tests, CI and the demo (nothing can be downloaded there).

`write_random_sd_folder` writes a Stable-Diffusion-style folder with random weights from our own modules,
in the standard diffusers/transformers layout, so every later stage loads it exactly like real weights.
"""

from __future__ import annotations

import json
import os

from flax import nnx

from tadsr_jax.models.architectures import SD21_SCHEDULER
from tadsr_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from tadsr_jax.models.unet import UNet2DConditionModel, UNetConfig
from tadsr_jax.models.vae import AutoencoderKL, VAEConfig
from tadsr_jax.weights.convert import state_to_torch
from tadsr_jax.weights.files import TRANSFORMERS_SAFETENSORS, write_model_folder


def _bytes_to_unicode() -> list[str]:
    """CLIP/GPT-2's printable stand-in for each of the 256 byte values, in byte order of their ids."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


_TINY_MERGES = (("t", "h"), ("th", "e</w>"), ("o", "f</w>"))


def write_tiny_clip_tokenizer(folder: str) -> int:
    """Write an offline CLIP tokenizer folder with a byte-level vocabulary and a few merges; return its size.

    Every string is representable (one token per byte, `</w>` marking word ends), so it tokenises like
    CLIP's own tokenizer in structure, with far fewer ids: a tiny text model needs `vocab_size >=` the
    returned size. The special tokens come last, as in CLIP's vocabulary.
    """
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    tokens = [
        *chars,
        *(c + "</w>" for c in chars),
        *(a + b for a, b in _TINY_MERGES),
        "<|startoftext|>",
        "<|endoftext|>",
    ]
    os.makedirs(folder, exist_ok=True)
    vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(merges_file, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _TINY_MERGES))
    tokenizer = CLIPTokenizer(vocab_file, merges_file)
    tokenizer.save_pretrained(folder)
    return len(tokenizer)


def write_random_sd_folder(folder: str, *, unet: dict, vae: dict, text_encoder: dict, seed: int = 0) -> str:
    """Write unet/, time_vae/ (time-aware, zero time projections), text_encoder/, tokenizer/ and scheduler/.

    Architectures are config.json dicts; the text encoder's vocabulary is grown to fit the tiny tokenizer.
    Returns `folder`.
    """
    rngs = nnx.Rngs(seed)
    vocab = write_tiny_clip_tokenizer(os.path.join(folder, "tokenizer"))
    text_encoder = {
        **text_encoder,
        "vocab_size": max(text_encoder.get("vocab_size", 0), vocab),
        "bos_token_id": vocab - 2,
        "eos_token_id": vocab - 1,
        "pad_token_id": vocab - 1,
    }
    write_model_folder(
        os.path.join(folder, "unet"),
        {"_class_name": "UNet2DConditionModel", **unet},
        state_to_torch(UNet2DConditionModel(UNetConfig.from_dict(unet), rngs=rngs)),
    )
    write_model_folder(
        os.path.join(folder, "time_vae"),
        {"_class_name": "TimeAwareAutoencoderKL", **vae},
        state_to_torch(AutoencoderKL(VAEConfig.from_dict(vae), time_aware=True, rngs=rngs)),
    )
    write_model_folder(
        os.path.join(folder, "text_encoder"),
        {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", **text_encoder},
        state_to_torch(CLIPTextModel(CLIPTextConfig.from_dict(text_encoder), rngs=rngs)),
        stem=TRANSFORMERS_SAFETENSORS,
    )
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": "DDPMScheduler", **SD21_SCHEDULER}, f, indent=2)
    return folder
