"""CLIP text encoder parity against transformers' CLIPTextModel on identical random weights."""

import copy
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file
from torch_utils import randomize_, rel_err

from tadsr_jax.models.architectures import SD21_TEXT_ENCODER
from tadsr_jax.models.clip_text import CLIPTextConfig, CLIPTextModel, encode_prompts, tokenize
from tadsr_jax.weights.convert import WeightsError, count_params
from tadsr_jax.weights.loaders import load_text_encoder, load_tokenizer
from tadsr_jax.weights.tiny import write_tiny_clip_tokenizer

MAX_LENGTH = 16
TINY = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=MAX_LENGTH
)
# Empty, short, and longer than MAX_LENGTH tokens (so truncated); "the"/"of" exercise the tiny merges.
PROMPTS = ["", "a cat", "the photograph of an astronaut riding a horse"]
FP32_TOL = 1e-4  # measured up to 1.6e-6 (2 seeds, both activations): 60x
# bf16 keeps 8 significant bits: every weight, the residual stream (entries up to ~4) and the output
# (unit variance after the final LayerNorm, entries up to ~4 std) are rounded by up to 2**-9 relative,
# i.e. ~1e-2 std at the output alone, and the rounding of the residual stream adds to that through two
# layers. transformers' own bf16 run of these models errs by 2.3e-2 to 4.0e-2, ours by 3.2e-2 to 4.6e-2 (at
# most 1.3x transformers'; 4 runs), so allow 1e-1 and at most twice transformers' own error; a real mismatch
# gives order 1. bf16 rounding leaves no room for a 10x margin below that.
BF16_TOL = 1e-1


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory) -> tuple[str, int]:
    folder = str(tmp_path_factory.mktemp("clip_tokenizer"))
    return folder, write_tiny_clip_tokenizer(folder)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_folder):
    return load_tokenizer(tokenizer_folder[0])


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def torch_model(request, tmp_path_factory, tokenizer_folder, tokenizer):
    """(folder saved by transformers, the transformers model, its last_hidden_state on PROMPTS)."""
    config = transformers.CLIPTextConfig(
        vocab_size=tokenizer_folder[1],
        hidden_act=request.param,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY,
    )
    model = transformers.CLIPTextModel(config).eval()
    randomize_(model, seed=len(request.param))
    folder = str(tmp_path_factory.mktemp(f"clip_text_{request.param}"))
    model.save_pretrained(folder)
    ids = tokenizer(
        PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        reference = model(input_ids=ids).last_hidden_state.numpy()
    return folder, model, reference


def _copy_with_tensors(src: str, dst: str, transform) -> str:
    os.makedirs(dst)
    shutil.copy(os.path.join(src, "config.json"), dst)
    tensors = transform(load_file(os.path.join(src, "model.safetensors")))
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_tokenize_matches_transformers(tokenizer, tokenizer_folder):
    assert len(tokenizer) == tokenizer_folder[1]
    ids = tokenize(tokenizer, PROMPTS, MAX_LENGTH)
    assert ids.shape == (len(PROMPTS), MAX_LENGTH) and ids.dtype == np.int32
    theirs = tokenizer(PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
    np.testing.assert_array_equal(ids, np.array(theirs))
    # SD's layout, built independently: <|startoftext|> text[:max-2] <|endoftext|> then padding.
    for row, prompt in zip(ids, PROMPTS):
        text = tokenizer(prompt, add_special_tokens=False).input_ids[: MAX_LENGTH - 2]
        expected = [tokenizer.bos_token_id, *text, tokenizer.eos_token_id]
        expected += [tokenizer.pad_token_id] * (MAX_LENGTH - len(expected))
        np.testing.assert_array_equal(row, expected)
    assert len(tokenizer(PROMPTS[-1]).input_ids) > MAX_LENGTH
    assert tokenizer.tokenize("the of") == ["the</w>", "of</w>"]


def test_matches_transformers_fp32(torch_model, tokenizer):
    folder, _, reference = torch_model
    model = load_text_encoder(folder)
    ours = encode_prompts(model, tokenizer, PROMPTS)
    assert ours.shape == reference.shape and ours.dtype == jnp.float32
    err = rel_err(ours, reference)
    print(f"\nCLIP text fp32 ({model.config.hidden_act}): max|ours - theirs| / std(theirs) = {err:.2e}")
    assert err <= FP32_TOL


def test_bf16_within_tolerance(torch_model, tokenizer):
    folder, torch_fp32, reference = torch_model
    model = load_text_encoder(folder, dtype=jnp.bfloat16)
    assert model.encoder.layers[0].mlp.fc1.kernel[...].dtype == jnp.bfloat16
    ours = encode_prompts(model, tokenizer, PROMPTS)
    assert ours.dtype == jnp.bfloat16
    ids = torch.from_numpy(tokenize(tokenizer, PROMPTS, MAX_LENGTH)).long()
    with torch.no_grad():
        theirs = copy.deepcopy(torch_fp32).to(torch.bfloat16)(input_ids=ids).last_hidden_state.float().numpy()
    err, their_err = rel_err(ours, reference), rel_err(theirs, reference)
    print(
        f"\nCLIP text bf16 ({model.config.hidden_act}): max|ours - fp32| / std(fp32) = {err:.2e} "
        f"(transformers in bf16: {their_err:.2e})"
    )
    assert err <= BF16_TOL and err <= 2 * their_err


def test_loads_legacy_key_layout(torch_model, tmp_path, tokenizer):
    """Older checkpoints (SD-2.1's text_encoder) prefix keys with `text_model.` and store `position_ids`."""
    folder, _, reference = torch_model

    def legacy(tensors):
        tensors = {f"text_model.{k}": v for k, v in tensors.items()}
        tensors["text_model.embeddings.position_ids"] = np.arange(MAX_LENGTH, dtype=np.int64)[None]
        return tensors

    legacy_folder = _copy_with_tensors(folder, str(tmp_path / "legacy"), legacy)
    ours = encode_prompts(load_text_encoder(legacy_folder), tokenizer, PROMPTS)
    assert rel_err(ours, reference) <= FP32_TOL


def test_missing_tensor_is_named(torch_model, tmp_path):
    folder = torch_model[0]
    key = "encoder.layers.1.mlp.fc2.bias"

    def drop(tensors):
        del tensors[key]
        return tensors

    broken = _copy_with_tensors(folder, str(tmp_path / "broken"), drop)
    with pytest.raises(WeightsError, match=key.replace(".", r"\.")):
        load_text_encoder(broken)


def test_config_from_dict(torch_model, tmp_path):
    with open(os.path.join(torch_model[0], "config.json")) as f:
        raw = json.load(f)
    config = CLIPTextConfig.from_dict(raw)
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (
        raw["vocab_size"],
        raw["hidden_size"],
        raw["num_hidden_layers"],
    )
    with pytest.raises(ValueError, match="unsupported hidden_act 'relu'"):
        CLIPTextConfig.from_dict({**raw, "hidden_act": "relu"})
    bad = str(tmp_path / "bad")
    os.makedirs(bad)
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump({**raw, "hidden_act": "relu"}, f)
    with pytest.raises(WeightsError, match="hidden_act"):
        load_text_encoder(bad)


def test_sd21_text_encoder_size():
    model = nnx.eval_shape(lambda: CLIPTextModel(CLIPTextConfig.from_dict(SD21_TEXT_ENCODER), rngs=nnx.Rngs(0)))
    ours = count_params(model)
    with torch.device("meta"):
        theirs = transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD21_TEXT_ENCODER))
    assert ours == sum(p.numel() for p in theirs.parameters()) == 340_387_840
