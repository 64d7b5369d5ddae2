"""LoRA adapters (tadsr_jax.nn.lora): parity with PEFT's layer math (docs/method.md 2.2) re-stated in torch,
initialisation, merging, and several adapter sets chosen per call."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from torch_utils import nchw_to_nhwc, nhwc_to_nchw, rel_err

from tadsr_jax.nn import Conv2d, Linear, ResnetBlock2D, Transformer2DModel, lora

RANK, ALPHA = 4, 8.0
# max |ours - theirs| / std(theirs) of float32 layers computed in different orders (XLA vs torch, merged kernel vs
# separate LoRA path): measured up to 2.2e-6 (merged vs unmerged transformer block), so ~20x below; the LoRA terms
# move the outputs by > 1e-1 (asserted beside each check), so a wrong scale, factor layout or merge fails.
TOL = 5e-5

run = nnx.jit(lambda model, *args: model(*args))


class LoRAA(lora.LoRAParam):
    pass


class LoRAB(lora.LoRAParam):
    pass


def _randomize_b(model, name: str, seed: int, std: float = 0.5) -> None:
    """B starts at zero, which would hide any error in the LoRA path; give it random values."""
    rng = np.random.default_rng(seed)
    for host in lora.lora_hosts(model).values():
        if name in host.lora:
            b = host.lora[name].b
            b[...] = jnp.asarray(std * rng.standard_normal(b[...].shape), jnp.float32)


def _t(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x, np.float32))


def test_linear_lora_matches_peft_formula():
    layer = Linear(24, 20, rngs=nnx.Rngs(0))
    assert lora.add_adapter(layer, "default", LoRAA, [""], rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(1)) == 1
    _randomize_b(layer, "default", seed=2)
    x = np.random.default_rng(0).standard_normal((2, 7, 24)).astype(np.float32)
    with lora.active_adapters(layer, ["default"]):
        ours = run(layer, jnp.asarray(x))
    adapter = layer.lora["default"]
    w, bias = _t(layer.kernel[...]).T, _t(layer.bias[...])  # (out, in)
    a, b = _t(adapter.a[...]).T, _t(adapter.b[...]).T  # (r, in), (out, r)
    xt = torch.from_numpy(x)
    ref = F.linear(xt, w, bias) + (ALPHA / RANK) * F.linear(F.linear(xt, a), b)
    assert rel_err(ours, ref.numpy()) <= TOL
    # the LoRA term is not negligible, so a wrong scale or factor layout fails the check above
    assert rel_err(F.linear(xt, w, bias).numpy(), ref.numpy()) > 0.1
    # merging (eagerly here) folds the same delta into the kernel
    assert lora.merge_adapters(layer, ["default"]) == 1 and not layer.lora
    assert rel_err(run(layer, jnp.asarray(x)), ref.numpy()) <= TOL


@pytest.mark.parametrize("kernel_size,stride,padding", [(3, 2, 1), (1, 1, 0)])
def test_conv_lora_matches_peft_formula(kernel_size, stride, padding):
    cin, cout = 6, 10
    layer = Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, rngs=nnx.Rngs(0))
    lora.add_adapter(layer, "default", LoRAA, [""], rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(1))
    _randomize_b(layer, "default", seed=3)
    x = torch.randn(2, cin, 9, 11, generator=torch.Generator().manual_seed(0))  # odd, non-square
    with lora.active_adapters(layer, ["default"]):
        ours = run(layer, jnp.asarray(nchw_to_nhwc(x)))
    adapter = layer.lora["default"]
    w = _t(layer.kernel[...]).permute(3, 2, 0, 1)  # HWIO -> OIHW
    a = _t(adapter.a[...]).permute(3, 2, 0, 1)  # (kh, kw, in, r) -> (r, in, kh, kw)
    b = _t(adapter.b[...]).T[:, :, None, None]  # (r, out) -> (out, r, 1, 1)
    base = F.conv2d(x, w, _t(layer.bias[...]), stride, padding)
    ref = base + 2.0 * F.conv2d(F.conv2d(x, a, None, stride, padding), b)
    assert rel_err(nhwc_to_nchw(ours), ref.numpy()) <= TOL
    assert rel_err(base.numpy(), ref.numpy()) > 0.1


def test_init_b_zero_keeps_output_and_a_std_is_one_over_rank():
    layer = Conv2d(64, 48, 3, padding=1, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 6, 6, 64)), jnp.float32)
    before = np.asarray(run(layer, x))
    lora.add_adapter(layer, "default", LoRAA, [""], rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(1))
    linear = Linear(512, 384, rngs=nnx.Rngs(2))
    lora.add_adapter(linear, "default", LoRAA, [""], rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(3))
    for host in (layer, linear):
        adapter = host.lora["default"]
        assert isinstance(adapter.a, LoRAA) and isinstance(adapter.b, LoRAA)
        assert not np.any(np.asarray(adapter.b[...]))
        a = np.asarray(adapter.a[...])
        assert abs(a.std() / (1.0 / RANK) - 1) < 0.1, a.std()  # 2304 / 2048 samples: ~1.5% noise
        assert abs(a.mean()) < 0.02
    with lora.active_adapters(layer, ["default"]):
        after = np.asarray(run(layer, x))
    np.testing.assert_array_equal(after, before)


@pytest.fixture(scope="module")
def transformer():
    """A small SD spatial transformer with 1x1-conv projections (Conv2d and Linear LoRA hosts); tests clone it."""
    return Transformer2DModel(
        16, heads=2, cross_attention_dim=12, norm_groups=4, use_linear_projection=False, rngs=nnx.Rngs(0)
    )


def _transformer_inputs():
    rng = np.random.default_rng(1)
    return (
        jnp.asarray(rng.standard_normal((2, 4, 6, 16)), jnp.float32),
        jnp.asarray(rng.standard_normal((2, 5, 12)), jnp.float32),
    )


CONV_AND_LINEAR = [
    "proj_in",
    "proj_out",
    "transformer_blocks.0.attn1.to_q",
    "transformer_blocks.0.attn2.to_k",
    "transformer_blocks.0.attn2.to_out.0",
    "transformer_blocks.0.ff.net.0.proj",
    "transformer_blocks.0.ff.net.2",
]


@nnx.jit
def _base_unmerged_merged(model, *args):
    """Outputs without adapters, with adapter "default", and after merging it; the merge (nnx.jit carries
    the removal of the factors back to `model`) and the three calls compile together."""
    with lora.active_adapters(model, []):
        base = model(*args)
    with lora.active_adapters(model, ["default"]):
        unmerged = model(*args)
    count = lora.merge_adapters(model, ["default"])
    return base, unmerged, model(*args), count


def test_transformer_merged_equals_unmerged_and_merge_removes_factors(transformer):
    model = nnx.clone(transformer)
    hosts = lora.lora_hosts(model)
    assert isinstance(hosts["proj_in"], Conv2d) and isinstance(hosts["transformer_blocks.0.ff.net.2"], Linear)
    assert lora.add_adapter(model, "default", LoRAA, CONV_AND_LINEAR, rngs=nnx.Rngs(1)) == len(CONV_AND_LINEAR)
    _randomize_b(model, "default", seed=4, std=0.2)
    assert len(jax.tree.leaves(nnx.state(model, LoRAA))) == 2 * len(CONV_AND_LINEAR)
    base, unmerged, merged, count = _base_unmerged_merged(model, *_transformer_inputs())
    assert rel_err(base, unmerged) > 1e-2  # the adapters change the output
    assert rel_err(merged, unmerged) <= TOL
    assert int(count) == len(CONV_AND_LINEAR)
    assert jax.tree.leaves(nnx.state(model, lora.LoRAParam)) == []
    assert all(not h.lora and h.active_adapters == () for h in lora.lora_hosts(model).values())


def test_resnet_merged_equals_unmerged():
    block = ResnetBlock2D(8, 12, groups=4, eps=1e-5, temb_channels=10, rngs=nnx.Rngs(0))
    targets = ["conv1", "conv2", "conv_shortcut", "time_emb_proj"]  # 3x3 and 1x1 convs, and a Linear
    lora.add_adapter(block, "default", LoRAA, targets, rngs=nnx.Rngs(1))
    _randomize_b(block, "default", seed=5, std=0.2)
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 7, 5, 8)), jnp.float32)
    temb = jnp.asarray(rng.standard_normal((2, 10)), jnp.float32)
    base, unmerged, merged, count = _base_unmerged_merged(block, x, temb)
    assert rel_err(base, unmerged) > 1e-2
    assert rel_err(merged, unmerged) <= TOL
    assert int(count) == len(targets)
    assert jax.tree.leaves(nnx.state(block, lora.LoRAParam)) == []


TARGETS_A = ["proj_in", "transformer_blocks.0.attn1.to_q", "transformer_blocks.0.ff.net.2"]
TARGETS_B = ["proj_out", "transformer_blocks.0.attn1.to_q", "transformer_blocks.0.ff.net.2"]  # overlaps A


def _two_adapter_model(transformer):
    model = nnx.clone(transformer)
    lora.add_adapter(model, "a", LoRAA, TARGETS_A, rngs=nnx.Rngs(1))
    lora.add_adapter(model, "b", LoRAB, TARGETS_B, rngs=nnx.Rngs(2))
    _randomize_b(model, "a", seed=6, std=0.2)
    _randomize_b(model, "b", seed=7, std=0.2)
    return model


CHOICES = [(), ("a",), ("b",), ("a", "b")]


@nnx.jit
def _choice_outputs(model, x, ctx):
    """For each choice of active adapters: the output under `active_adapters`, and the reference output of a
    copy with exactly those adapters merged into the kernels and none active. One compilation for all."""
    outputs = {}
    for names in CHOICES:
        with lora.active_adapters(model, names):
            outputs[names] = model(x, ctx)
        merged = nnx.clone(model)
        lora.merge_adapters(merged, names)
        lora.set_active_adapters(merged, [])
        outputs["merged", names] = merged(x, ctx)
    return outputs


def test_adapter_sets_are_distinct_variable_types(transformer):
    model = _two_adapter_model(transformer)
    state_a = nnx.to_flat_state(nnx.state(model, LoRAA))
    paths_a = {".".join(map(str, path)) for path, _ in state_a}
    assert len(paths_a) == 2 * len(TARGETS_A)
    assert all(".lora.a." in p for p in paths_a), paths_a
    assert {p.split(".lora.")[0] for p in paths_a} == set(TARGETS_A)
    assert len(jax.tree.leaves(nnx.state(model, LoRAB))) == 2 * len(TARGETS_B)
    assert len(jax.tree.leaves(nnx.state(model, lora.LoRAParam))) == 2 * (len(TARGETS_A) + len(TARGETS_B))


def test_active_adapters_context_selects_sets(transformer):
    x, ctx = _transformer_inputs()
    base = run(transformer, x, ctx)
    model = _two_adapter_model(transformer)
    out = _choice_outputs(model, x, ctx)
    assert rel_err(out[()], base) <= TOL  # no adapters: the base model
    for names in CHOICES:
        assert rel_err(out[names], out["merged", names]) <= TOL, names
    # the choices really differ from each other and from the base model
    for u, v in [(("a",), ()), (("b",), ()), (("a",), ("b",)), (("a", "b"), ("a",)), (("a", "b"), ("b",))]:
        assert rel_err(out[u], out[v]) > 1e-2, (u, v)
    # the jitted call (which merged copies) left the model's adapters and active choice as they were
    hosts = lora.lora_hosts(model)
    assert {n: set(h.lora) for n, h in hosts.items() if h.lora} == {
        "proj_in": {"a"},
        "proj_out": {"b"},
        "transformer_blocks.0.attn1.to_q": {"a", "b"},
        "transformer_blocks.0.ff.net.2": {"a", "b"},
    }
    assert all(h.active_adapters == () for h in hosts.values())


def test_linear_two_adapters_sum_matches_formula():
    layer = Linear(16, 12, rngs=nnx.Rngs(0))
    lora.add_adapter(layer, "a", LoRAA, [""], rank=4, alpha=8.0, rngs=nnx.Rngs(1))
    lora.add_adapter(layer, "b", LoRAB, [""], rank=2, alpha=1.0, rngs=nnx.Rngs(2))  # different scale
    _randomize_b(layer, "a", seed=8)
    _randomize_b(layer, "b", seed=9)
    x = np.random.default_rng(1).standard_normal((3, 16)).astype(np.float32)
    xt = torch.from_numpy(x)
    base = F.linear(xt, _t(layer.kernel[...]).T, _t(layer.bias[...]))

    def delta(name):
        ad = layer.lora[name]
        return ad.scale * F.linear(F.linear(xt, _t(ad.a[...]).T), _t(ad.b[...]).T)

    assert layer.lora["a"].scale == 2.0 and layer.lora["b"].scale == 0.5
    for names, ref in [
        ([], base),
        (["a"], base + delta("a")),
        (["b"], base + delta("b")),
        (["a", "b"], base + delta("a") + delta("b")),
    ]:
        with lora.active_adapters(layer, names):
            assert rel_err(run(layer, jnp.asarray(x)), ref.numpy()) <= TOL, names


def test_active_adapters_context_restores_previous_choice(transformer):
    model = _two_adapter_model(transformer)
    lora.set_active_adapters(model, ["b"])
    hosts = lora.lora_hosts(model).values()
    with lora.active_adapters(model, ["a"]):
        assert all(h.active_adapters == ("a",) for h in hosts)
        with lora.active_adapters(model, []):
            assert all(h.active_adapters == () for h in hosts)
        assert all(h.active_adapters == ("a",) for h in hosts)
    assert all(h.active_adapters == ("b",) for h in hosts)
    with pytest.raises(RuntimeError):
        with lora.active_adapters(model, ["a", "b"]):
            raise RuntimeError("inside")
    assert all(h.active_adapters == ("b",) for h in hosts)


def test_add_adapter_unknown_target_raises(transformer):
    model = nnx.clone(transformer)
    with pytest.raises(ValueError, match="transformer_blocks.0.attn1.to_nothing"):
        lora.add_adapter(model, "a", LoRAA, ["proj_in", "transformer_blocks.0.attn1.to_nothing"], rngs=nnx.Rngs(0))
    assert jax.tree.leaves(nnx.state(model, lora.LoRAParam)) == []  # nothing half-added
