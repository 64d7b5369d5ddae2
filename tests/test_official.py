"""The reference's tadsr.pkl (docs/method.md 2.4) and our generator export: a checkpoint made by real PEFT on
diffusers models loads into our TADSR and gives the same networks; exports round-trip exactly; bad files fail
in one line naming the file and the key."""

import copy
import math
import os
import pickle
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from diffusers import UNet2DConditionModel as TorchUNet
from flax import nnx
from peft import LoraConfig
from torch_utils import nchw_to_nhwc, nhwc_to_nchw, rel_err

from benchmarks.torch_reference import time_aware_moments
from configs.tiny import get_config
from tadsr_jax.method import official
from tadsr_jax.method.lora_targets import unet_lora_groups, vae_encoder_lora_targets
from tadsr_jax.method.tadsr import GENERATOR, GENERATOR_ADAPTERS, TADSR
from tadsr_jax.nn import lora
from tadsr_jax.weights.convert import WeightsError
from tadsr_jax.weights.loaders import load_networks

RANK, ALPHA = 4, 8
student_unet = nnx.jit(lambda unet, conv_in, z, t, ctx: unet(z, t, ctx, conv_in=conv_in))
UNET_ADAPTERS = {"encoder": "default_encoder", "decoder": "default_decoder", "others": "default_others"}

# --- The reference's target selection (docs/method.md 2.1), restated on PyTorch parameter names.
UNET_PATTERNS = (
    "to_k",
    "to_q",
    "to_v",
    "to_out.0",
    "conv",
    "conv1",
    "conv2",
    "conv_in",
    "conv_shortcut",
    "conv_out",
    "proj_out",
    "proj_in",
    "ff.net.2",
    "ff.net.0.proj",
)
VAE_PATTERNS = ("conv1", "conv2", "conv_in", "conv_shortcut", "conv", "conv_out", "to_k", "to_q", "to_v", "to_out.0")


def _weight_names(module: torch.nn.Module) -> list[str]:
    return [n for n, _ in module.named_parameters() if "bias" not in n and "norm" not in n]


def reference_unet_groups(unet: torch.nn.Module) -> dict[str, list[str]]:
    groups = {group: [] for group in UNET_ADAPTERS}
    for name in _weight_names(unet):
        if any(p in name for p in UNET_PATTERNS):
            group = (
                "encoder"
                if "down_blocks" in name or "conv_in" in name
                else "decoder"
                if "up_blocks" in name or "conv_out" in name
                else "others"
            )
            groups[group].append(name.replace(".weight", ""))
    return groups


def reference_vae_modules(vae: torch.nn.Module) -> list[str]:
    """With the reference's duplicates: one entry per matching pattern."""
    modules = []
    for name in _weight_names(vae):
        modules += [
            name.replace(".weight", "") for p in VAE_PATTERNS if p in name and "encoder" in name and "time" not in name
        ]
        if name == "quant_conv.weight":
            modules.append("quant_conv")
    return modules


def randomize_lora_(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Every LoRA factor (B too, which PEFT zero-initialises) and the UNet conv_in base the reference trains."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name or name.startswith("conv_in.base_layer."):
                p.copy_(torch.randn(p.shape, generator=gen) * (p[0].numel() ** -0.5 if p.ndim > 1 else 0.1))


def time_tensors(encoder: torch.nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random values for the time-aware encoder's new tensors (docs/method.md 1.1), named from the torch tree."""
    rand = lambda *shape: torch.randn(*shape, generator=gen) / math.sqrt(shape[-1])
    resnets = [f"down_blocks.{i}.resnets.{j}" for i, b in enumerate(encoder.down_blocks) for j in range(len(b.resnets))]
    resnets += [f"mid_block.resnets.{j}" for j in range(len(encoder.mid_block.resnets))]
    tensors = {
        "encoder.time_embedding.linear_1.weight": rand(256, 128),
        "encoder.time_embedding.linear_1.bias": rand(256),
        "encoder.time_embedding.linear_2.weight": rand(256, 256),
        "encoder.time_embedding.linear_2.bias": rand(256),
    }
    for name in resnets:
        channels = encoder.get_submodule(name).norm2.num_channels  # conv1 is PEFT-wrapped
        tensors[f"encoder.{name}.time_emb_proj.weight"] = rand(2 * channels, 256)
        tensors[f"encoder.{name}.time_emb_proj.bias"] = rand(2 * channels)
    return tensors


# --- Fixtures: one tiny SD folder, a PEFT-made reference checkpoint of it, our model loaded from that.


@pytest.fixture(scope="module")
def folder(tiny_sd):
    return tiny_sd


def build(folder: str, seed: int) -> TADSR:
    nets = load_networks(folder)
    return TADSR(nets.unet, nets.vae, nets.text_encoder, None, rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(seed))


def generator_values(model: TADSR) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, GENERATOR))}


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory):
    """What the reference's training saves, made with diffusers + PEFT: the torch networks, the dict, its file."""
    gen = torch.Generator().manual_seed(0)
    unet = TorchUNet.from_pretrained(os.path.join(folder, "unet")).eval()
    groups = reference_unet_groups(unet)
    for group, adapter in UNET_ADAPTERS.items():
        unet.add_adapter(
            LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=groups[group]),
            adapter_name=adapter,
        )
    unet.set_adapters(list(UNET_ADAPTERS.values()))
    randomize_lora_(unet, gen)

    vae = TorchVAE.from_pretrained(os.path.join(folder, "time_vae")).eval()  # drops the time tensors: fine
    vae_modules = reference_vae_modules(vae)
    vae.add_adapter(
        LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=vae_modules),
        adapter_name="default_encoder",
    )
    randomize_lora_(vae, gen)
    time = time_tensors(vae.encoder, gen)

    checkpoint = {
        "state_dict_unet": {k: v for k, v in unet.state_dict().items() if "lora" in k or "conv_in" in k},
        "state_dict_vae": {k: v for k, v in vae.state_dict().items() if "lora" in k},
        "state_dict_vae_time": time,
        **{f"unet_lora_{group}_modules": modules for group, modules in groups.items()},
        "vae_lora_encoder_modules": vae_modules,
        "rank_unet": RANK,
        "rank_vae": RANK,
    }
    path = str(tmp_path_factory.mktemp("reference") / "tadsr.pkl")
    torch.save(checkpoint, path)
    return types.SimpleNamespace(unet=unet, vae=vae, checkpoint=checkpoint, path=path)


@pytest.fixture(scope="module")
def loaded(folder, reference):
    model = build(folder, seed=1)
    official.load_reference_checkpoint(model, reference.path)
    return model


@pytest.fixture(scope="module")
def fresh(folder):
    """A second model, for round trips (different seed)."""
    return build(folder, seed=7)


# --- 1. Real-PEFT parity.


def test_reference_target_rule_matches_ours(reference, loaded):
    checkpoint = reference.checkpoint
    assert unet_lora_groups(loaded.unet) == {g: sorted(checkpoint[f"unet_lora_{g}_modules"]) for g in UNET_ADAPTERS}
    assert vae_encoder_lora_targets(loaded.vae) == sorted(set(checkpoint["vae_lora_encoder_modules"]))
    assert len(checkpoint["vae_lora_encoder_modules"]) > len(set(checkpoint["vae_lora_encoder_modules"]))  # dups


def test_student_unet_matches_peft(reference, loaded):
    unet = reference.unet
    gen = torch.Generator().manual_seed(1)
    z, t, ctx = torch.randn(2, 4, 16, 16, generator=gen), torch.tensor([1, 999]), torch.randn(2, 8, 32, generator=gen)
    with torch.no_grad():
        ref = unet(z, t, encoder_hidden_states=ctx).sample.numpy()
        unet.disable_adapters()
        without_lora = unet(z, t, encoder_hidden_states=ctx).sample.numpy()
        unet.enable_adapters()
    with lora.active_adapters(loaded.unet, GENERATOR_ADAPTERS):
        ours = student_unet(
            loaded.unet,
            loaded.student_conv_in,
            jnp.asarray(nchw_to_nhwc(z)),
            jnp.asarray(t.numpy()),
            jnp.asarray(ctx.numpy()),
        )
    assert rel_err(without_lora, ref) > 0.1  # the LoRA matters, so matching it proves it was loaded
    err = rel_err(nhwc_to_nchw(ours), ref)
    print(f"student UNet vs PEFT: rel err {err:.2e}")
    # float32 UNet in two summation orders: measured 5.5e-5 and 1.0e-4 (2 seeds), 20x below; without the LoRA: > 0.1
    assert err <= 2e-3


def test_time_aware_encoder_matches_peft(reference, loaded):
    vae, checkpoint = reference.vae, reference.checkpoint
    gen = torch.Generator().manual_seed(2)
    x, t = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1, torch.tensor([1, 999])
    with torch.no_grad():  # the PEFT-wrapped modules are called through their forward: LoRA included
        mean, logvar = time_aware_moments(vae, checkpoint["state_dict_vae_time"], x, t)
    ours = loaded.vae.encode(jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t.numpy()))
    with lora.active_adapters(loaded.vae, []):
        without_lora = loaded.vae.encode(jnp.asarray(nchw_to_nhwc(x)), jnp.asarray(t.numpy()))
    assert rel_err(nhwc_to_nchw(without_lora.mean), mean.numpy()) > 0.1
    errs = rel_err(nhwc_to_nchw(ours.mean), mean.numpy()), rel_err(nhwc_to_nchw(ours.logvar), logvar.numpy())
    print(f"time-aware encoder vs PEFT: rel err mean {errs[0]:.2e}, logvar {errs[1]:.2e}")
    assert max(errs) <= 1e-4  # measured up to 7.2e-6 (2 seeds): 14x


# --- 2. Round trips.


def test_reference_export_reproduces_the_peft_checkpoint(reference, loaded):
    """Import then export gives back the reference's key names, module lists and tensors, bit for bit."""
    checkpoint, exported = reference.checkpoint, official.reference_checkpoint(loaded)
    assert set(exported) == set(checkpoint)
    for section in ("state_dict_unet", "state_dict_vae", "state_dict_vae_time"):
        assert sorted(exported[section]) == sorted(checkpoint[section]), section
        for key, tensor in exported[section].items():
            assert tensor.dtype == torch.float32 and tensor.is_contiguous(), key
            assert torch.equal(tensor, checkpoint[section][key]), key
    for name in (
        "unet_lora_encoder_modules",
        "unet_lora_decoder_modules",
        "unet_lora_others_modules",
        "vae_lora_encoder_modules",
    ):
        assert exported[name] == sorted(set(checkpoint[name])), name
    assert exported["rank_unet"] == exported["rank_vae"] == RANK


def fill_generator(model: TADSR, value: float) -> None:
    """Every generator leaf set to `value`: a leaf a loader forgets to write stays so."""
    nnx.update(model, jax.tree.map(lambda x: jnp.full_like(x, value), nnx.state(model, GENERATOR)))


@pytest.mark.parametrize("fmt", ["reference", "generator"])
def test_round_trip_into_a_fresh_model(loaded, fresh, tmp_path, fmt):
    fill_generator(fresh, np.nan)
    path = str(tmp_path / "generator")
    if fmt == "reference":
        official.save_reference_checkpoint(loaded, path)
        official.load_reference_checkpoint(fresh, path)
    else:
        official.save_generator(loaded, path, metadata={"step": 12})
        manifest = official.load_generator(fresh, path)
        assert manifest["format"] == "tadsr-jax-generator" and manifest["version"] == 1
        assert manifest["rank"] == RANK and manifest["alpha"] == ALPHA and manifest["metadata"] == {"step": 12}
        assert manifest["lora_modules"]["unet_lora_others_modules"] == unet_lora_groups(fresh.unet)["others"]
    got, expected = generator_values(fresh), generator_values(loaded)
    assert sorted(got) == sorted(expected)
    assert [k for k in expected if not np.array_equal(got[k], expected[k])] == []
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # no temporary file left


# --- 3. Key counts at SD-2.1 size, from shapes only.


def test_sd21_reference_keys_from_shapes():
    from tadsr_jax.models.architectures import SD21_UNET, SD21_VAE
    from tadsr_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
    from tadsr_jax.models.unet import UNet2DConditionModel, UNetConfig
    from tadsr_jax.models.vae import AutoencoderKL, VAEConfig

    # One abstract trace per network: tracing cost grows faster than linearly with the trace's length. The text
    # encoder has no generator leaves, so the tiny one does.
    unet = nnx.eval_shape(lambda: UNet2DConditionModel(UNetConfig.from_dict(SD21_UNET), rngs=nnx.Rngs(0)))
    vae = nnx.eval_shape(lambda: AutoencoderKL(VAEConfig.from_dict(SD21_VAE), time_aware=True, rngs=nnx.Rngs(0)))
    text = CLIPTextConfig.from_dict(get_config().model.text_encoder.to_dict())
    text_encoder = nnx.eval_shape(lambda: CLIPTextModel(text, rngs=nnx.Rngs(0)))
    model = nnx.eval_shape(lambda u, v, c: TADSR(u, v, c, None, rngs=nnx.Rngs(1)), unet, vae, text_encoder)
    entries = official.reference_entries(model)
    shapes = {(e.section, e.key): e.torch_shape for e in entries}
    assert len(shapes) == len(entries) == 606
    count = lambda section: sum(s == section for s, _ in shapes)
    assert (count("state_dict_vae_time"), count("state_dict_vae"), count("state_dict_unet")) == (24, 64, 518)
    unet = {k: v for (s, k), v in shapes.items() if s == "state_dict_unet"}
    assert unet["conv_in.base_layer.weight"] == (320, 4, 3, 3) and unet["conv_in.base_layer.bias"] == (320,)
    assert unet["conv_in.lora_A.default_encoder.weight"] == (4, 4, 3, 3)
    assert unet["conv_in.lora_B.default_encoder.weight"] == (320, 4, 1, 1)
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    assert unet[f"{attn}.lora_A.default_encoder.weight"] == (4, 1024)
    assert unet[f"{attn}.lora_B.default_encoder.weight"] == (320, 4)
    time = {k: v for (s, k), v in shapes.items() if s == "state_dict_vae_time"}
    assert time["encoder.time_embedding.linear_1.weight"] == (256, 128)
    assert time["encoder.mid_block.resnets.1.time_emb_proj.weight"] == (1024, 256)
    assert sum(math.prod(s) for s in time.values()) == 2_072_576
    assert shapes[("state_dict_vae", "encoder.mid_block.attentions.0.to_q.lora_B.default_encoder.weight")] == (512, 4)
    assert shapes[("state_dict_vae", "quant_conv.lora_A.default_encoder.weight")] == (4, 8, 1, 1)


# --- 4. Errors: one line, naming the file and the key; the model is left untouched.


def _drop(section: str, key: str):
    return lambda c: c[section].pop(key)


def _set(section: str, key: str, value):
    return lambda c: c[section].__setitem__(key, value)


BAD_CHECKPOINTS = {
    "missing tensor": (_drop("state_dict_unet", "conv_in.base_layer.bias"), "missing tensor 'conv_in.base_layer.bias'"),
    "wrong shape": (
        _set("state_dict_vae", "quant_conv.lora_A.default_encoder.weight", torch.zeros(4, 8, 3, 3)),
        "tensor 'quant_conv.lora_A.default_encoder.weight' in 'state_dict_vae' has shape (4, 8, 3, 3)",
    ),
    "wrong rank": (lambda c: c.__setitem__("rank_vae", 8), "'rank_vae' is 8 but the model's LoRA rank is 4"),
    "unexpected key": (
        _set("state_dict_vae_time", "encoder.time_embedding.linear_3.weight", torch.zeros(2, 2)),
        "unexpected tensor 'encoder.time_embedding.linear_3.weight' in 'state_dict_vae_time'",
    ),
    "module list": (
        lambda c: c["unet_lora_decoder_modules"].remove("conv_out"),
        "'unet_lora_decoder_modules' lacks 'conv_out'",
    ),
    "not a dict": (lambda c: c.__setitem__("state_dict_vae", [1, 2]), "'state_dict_vae' is a list"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_reference_checkpoint(reference, loaded, tmp_path, case):
    mutate, message = BAD_CHECKPOINTS[case]
    checkpoint = copy.deepcopy(reference.checkpoint)
    mutate(checkpoint)
    path = str(tmp_path / "bad.pkl")
    torch.save(checkpoint, path)
    _assert_fails_untouched(loaded, lambda: official.load_reference_checkpoint(loaded, path), path, message)


NOT_CHECKPOINTS = {
    "text": (b"this is not a pickle\n" * 3, ""),  # the reason depends on the bytes
    "random bytes": (np.random.default_rng(0).bytes(4096), "UnpicklingError: Unsupported operand"),
    "a pickle that calls os.system": (pickle.dumps({"f": os.system}), "UnpicklingError: Unsupported"),
    "empty": (b"", "EOFError: empty or truncated"),
}


@pytest.mark.parametrize("case", list(NOT_CHECKPOINTS))
def test_not_a_checkpoint_gets_a_short_reason_and_no_unsafe_advice(loaded, tmp_path, case):
    """torch's own message for a refused pickle suggests weights_only=False, which would run the file's code."""
    content, reason = NOT_CHECKPOINTS[case]
    path = tmp_path / "tadsr.pkl"
    path.write_bytes(content)
    _assert_fails_untouched(
        loaded,
        lambda: official.load_reference_checkpoint(loaded, str(path)),
        str(path),
        f"{path}: not a TADSR checkpoint ({reason}",
    )
    with pytest.raises(WeightsError) as error:
        official.load_reference_checkpoint(loaded, str(path))
    assert "weights_only" not in str(error.value) and len(str(error.value)) < len(str(path)) + 120, error.value


def test_reading_the_pickle_without_torch(loaded, reference, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    _assert_fails_untouched(
        loaded,
        lambda: official.load_reference_checkpoint(loaded, reference.path),
        reference.path,
        "reading the official TADSR .pkl needs PyTorch (pip install torch)",
    )


def test_alpha_is_checked(loaded, reference):
    _assert_fails_untouched(
        loaded,
        lambda: official.load_reference_checkpoint(loaded, reference.path, alpha=16.0),
        reference.path,
        "the model's LoRA alpha is 8, the checkpoint is read with alpha 16",
    )


def test_reference_export_refuses_another_alpha(loaded, monkeypatch):
    monkeypatch.setattr(loaded.student_conv_in.lora["default_encoder"], "scale", 16.0 / RANK)
    with pytest.raises(WeightsError, match="implies LoRA alpha 8 .* this model's is 16"):
        official.reference_checkpoint(loaded)


def test_generator_without_manifest(loaded, tmp_path):
    path = str(tmp_path / "generator.safetensors")
    official.save_generator(loaded, path)
    os.remove(path + ".json")
    _assert_fails_untouched(loaded, lambda: official.load_generator(loaded, path), path + ".json", "manifest missing")


def test_generator_with_missing_tensor(loaded, tmp_path):
    from safetensors.numpy import load_file, save_file

    path = str(tmp_path / "generator.safetensors")
    official.save_generator(loaded, path)
    tensors = load_file(path)
    key = "vae/quant_conv/lora/default_encoder/b"
    del tensors[key]
    save_file(tensors, path)
    _assert_fails_untouched(loaded, lambda: official.load_generator(loaded, path), path, f"missing tensor '{key}'")


def _assert_fails_untouched(model: TADSR, load, path: str, message: str) -> None:
    before = generator_values(model)
    with pytest.raises(WeightsError, match=re.escape(message)) as error:
        load()
    text = str(error.value)
    assert text.startswith(f"{path}: ") and "\n" not in text, text
    after = generator_values(model)
    assert all(np.array_equal(after[k], v) for k, v in before.items())
