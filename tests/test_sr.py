"""Inference: merged LoRA == adapters, latent tiling (reference rules, blending, error), the SR pipeline and CLI,
the memory of bfloat16 serving."""

import gc
import io
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from skimage import data
from tiny_models import trained_tadsr

from configs import tiny
from tadsr_jax.infer.colorfix import color_fix
from tadsr_jax.infer.model import SRModel, WeightsSource, build_tadsr, cast, load_sr_model, merge_generator
from tadsr_jax.infer.pipeline import SRSettings, Upscaler, prepare
from tadsr_jax.infer.tiling import gaussian_weights, tile_starts, tiled_call
from tadsr_jax.method import official
from tadsr_jax.method.generator import generate
from tadsr_jax.method.tadsr import FAKE_SCORE, GENERATOR_ADAPTERS
from tadsr_jax.nn import lora

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = tiny.get_config()


def sr_config(**sr) -> ml_collections.ConfigDict:
    """A copy of CONFIG with these `sr` values."""
    config = CONFIG.copy_and_resolve_references()
    config.sr.update(sr)
    return config


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / b.std())


@pytest.fixture(scope="module")
def sr_model(tiny_sd):
    model, tokenizer, schedule = trained_tadsr(tiny_sd)
    merge_generator(model)
    return SRModel(model.unet, model.vae, model.text_encoder, tokenizer, schedule)


def sample(name: str, size: tuple[int, int]) -> np.ndarray:
    """A scikit-image sample as uint8 RGB of (width, height) `size`."""
    image = getattr(data, name)()
    image = image if image.ndim == 3 else np.stack([image] * 3, -1)
    return np.asarray(Image.fromarray(image[..., :3]).resize(size, Image.BICUBIC))


@nnx.jit(static_argnames="adapters")
def _student_unet(model, z, t, ctx, adapters=True):
    with lora.active_adapters(model.unet, GENERATOR_ADAPTERS if adapters else []):
        return model.unet(z, t, ctx, conv_in=model.student_conv_in if adapters else None)


_unet = nnx.jit(lambda unet, z, t, ctx: unet(z, t, ctx))
_encode = nnx.jit(lambda vae, x, t: vae.encode(x, t))


@pytest.mark.slow  # compiles the student UNet with and without adapters, and the VAE encoder
def test_merged_lora_equals_adapters(tiny_sd):
    model, _, _ = trained_tadsr(tiny_sd)
    merged = nnx.clone(model)
    merge_generator(merged)
    assert not lora.lora_hosts(merged.unet)["conv_in"].lora, "the student's conv_in adapter was not merged"
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.normal(size=(2, 16, 16, 4)), jnp.float32)
    ctx = jnp.asarray(rng.normal(size=(2, 77, 32)), jnp.float32)
    t = jnp.array([100, 700])
    want = _student_unet(model, z, t, ctx)
    # merged kernels vs separate LoRA paths in float32: measured 1.2e-5 (UNet), 1.9e-5 (VAE), so 25x below
    assert rel_err(_unet(merged.unet, z, t, ctx), want) <= 5e-4
    x = jnp.asarray(rng.uniform(-1, 1, size=(2, 32, 24, 3)), jnp.float32)
    a, b = _encode(merged.vae, x, t), _encode(model.vae, x, t)
    assert rel_err(a.mean, b.mean) <= 5e-4 and rel_err(a.logvar, b.logvar) <= 5e-4
    # The adapters matter: without them the outputs differ.
    assert rel_err(_student_unet(model, z, t, ctx, adapters=False), want) > 1e-2


def _reference_offsets(size: int, tile: int, overlap: int) -> list[int]:
    """docs/method.md 5: stride tile - overlap, the smallest count covering `size`, the last snapped to the edge."""
    stride, n = tile - overlap, 1
    while (n - 1) * stride + tile < size:
        n += 1
    return [size - tile if i == n - 1 else i * stride for i in range(n)]


def test_tile_offsets_follow_the_reference():
    for size in range(96, 400, 7):
        assert tile_starts(size, 96, 32) == _reference_offsets(size, 96, 32), size
    assert tile_starts(50, 96, 32) == [0]


def test_gaussian_weights_are_the_reference_x_profile_on_both_axes():
    tile = 40
    x = np.arange(tile)
    profile = np.exp(-((x - (tile - 1) / 2) ** 2) / (2 * 0.01 * tile**2)) / np.sqrt(2 * np.pi * 0.01)
    np.testing.assert_allclose(gaussian_weights(tile), np.outer(profile, profile), rtol=1e-6)  # measured 5.5e-8


@pytest.mark.parametrize("shape", [(1, 40, 72, 3), (1, 64, 50, 2)])
def test_tiled_call_blends_to_the_untiled_result_for_a_pointwise_function(shape):
    z = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
    fn = lambda x: jnp.tanh(2 * x) + 1
    # values in [0, 2] (an ulp: 2.4e-7) blended and renormalised: measured 4.8e-7, 20x below; a wrong blend errs by 1e-1
    np.testing.assert_allclose(tiled_call(fn, z, 24, 8), fn(z), atol=1e-5)


@pytest.mark.slow  # compiles the UNet per tile shape
def test_tiled_unet_one_tile_is_exact_and_several_tiles_are_close(sr_model):
    rng = np.random.default_rng(2)
    z = jnp.asarray(rng.normal(size=(1, 48, 64, 4)), jnp.float32)
    ctx = jnp.asarray(rng.normal(size=(1, 77, 32)), jnp.float32)
    t = jnp.array([500])
    untiled = _unet(sr_model.unet, z, t, ctx)
    one = tiled_call(lambda x: _unet(sr_model.unet, x, t, ctx), z, 64, 16)
    assert rel_err(one, untiled) == 0.0
    several = nnx.jit(lambda unet, x: tiled_call(lambda tile: unet(tile, t, ctx), x, 32, 16))(sr_model.unet, z)
    diff = np.asarray(several, np.float64) - np.asarray(untiled, np.float64)
    rms, peak = (float(v / np.std(untiled)) for v in (np.sqrt(np.mean(diff**2)), np.abs(diff).max()))
    print(
        f"\ntiled UNet (48x64 latent, 32-pixel tiles, overlap 16) vs untiled, relative to std: rms {rms:.3g}, "
        f"max {peak:.3g}"
    )
    # README (tiling): attention and convolutions see one tile; measured rms 0.14, max 1.1 on this random UNet.
    assert 0 < rms <= 0.25


@pytest.fixture(scope="module")
def compilation_cache():
    """The run's persistent compilation cache (conftest.py), every program written to it while this module runs:
    the CLI subprocesses reuse the programs the in-process tests compiled (same model, shapes and settings)."""
    previous = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield os.environ["JAX_COMPILATION_CACHE_DIR"]
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)


@pytest.fixture(scope="module")
def upscaler(sr_model, compilation_cache):
    return Upscaler(sr_model, SRSettings.from_config(CONFIG.sr))


@pytest.mark.slow  # compiles SR programs (first use of the upscaler)
def test_output_is_exactly_x4_and_reproducible(upscaler):
    images = [sample("astronaut", (32, 32)), sample("coffee", (21, 30)), sample("chelsea", (32, 32))]
    first = upscaler.super_resolve(images, ["", "", ""])
    assert [o.shape for o in first] == [(128, 128, 3), (120, 84, 3), (128, 128, 3)]
    again = upscaler.super_resolve(images, ["", "", ""])
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    # Per-image noise keys: an image's output does not depend on its batch companions.
    pair = upscaler.replace(batch_size=2).super_resolve([images[0], images[2]], ["", ""])
    for alone, batched in zip((first[0], first[2]), pair):
        assert np.abs(alone.astype(int) - batched.astype(int)).max() <= 1


def _reference_working_image(pixels: np.ndarray, process_size: int, scale: int) -> np.ndarray:
    """The reference's preprocessing at `--upscale=scale` (test_tadsr.py), restated with PIL: an image with a side
    below process_size // scale is resized so its short side is that, then everything is resized x scale."""
    image = Image.fromarray(pixels)
    w, h = image.size
    short = process_size // scale
    if w < short or h < short:
        factor = short / min(w, h)
        image = image.resize((int(factor * w), int(factor * h)), Image.BICUBIC)
    return np.asarray(image.resize((image.size[0] * scale, image.size[1] * scale), Image.BICUBIC))


@pytest.mark.parametrize("scale", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("size", [(40, 24), (13, 90), (200, 150)], ids=["small", "thin", "large"])
def test_working_image_is_the_references_upscale_at_every_scale(scale, size):
    """The short-side rule uses process_size // scale, the upscale is x scale, the output size scale x the input."""
    pixels = sample("astronaut", size)
    prepared = prepare(pixels, 128, scale)
    working = np.rint((prepared.lq + 1.0) * 127.5).astype(np.uint8)  # exact: the lq is uint8 / 127.5 - 1
    np.testing.assert_array_equal(working, _reference_working_image(pixels, 128, scale))
    assert prepared.output_size == (scale * size[1], scale * size[0])


@pytest.fixture(scope="module")
def direct_generator(sr_model):
    """The one-step generator alone, jitted: (vae, unet, lq, t, context, key) -> SR images in [-1, 1]."""
    return nnx.jit(lambda vae, unet, lq, t, ctx, key: generate(vae, unet, sr_model.schedule, lq, t, ctx, key)[1])


@pytest.mark.slow  # an SR program per scale
@pytest.mark.parametrize("scale,side", [(1, 64), (2, 32), (3, 32)])
def test_other_scales_equal_the_generator_on_the_bicubic_upscaled_input(
    sr_model, upscaler, direct_generator, scale, side
):
    """Output exactly scale x the input, and equal to the one-step generator run directly on the input's bicubic
    x scale upscale (same posterior key, the same colour fix against that upscale). process_size = scale keeps
    the short-side rule out of it (tested above); working sizes of 64 and 96 need no padding or tiling."""
    image = sample("coffee", (side, side))
    settings = upscaler.replace(scale=scale, process_size=scale)
    out = settings.super_resolve([image], [""])[0]
    assert out.shape == (scale * side, scale * side, 3)

    bicubic = np.asarray(Image.fromarray(image).resize((scale * side,) * 2, Image.BICUBIC), np.float32) / 127.5 - 1
    ids = jnp.asarray(upscaler.tokens([""]))
    t = jnp.asarray([settings.settings.timestep], jnp.int32)
    direct = direct_generator(
        sr_model.vae,
        sr_model.unet,
        jnp.asarray(bicubic[None]),
        t,
        sr_model.text_encoder(ids),
        jax.random.key(settings.settings.seed),
    )[0]
    ours = settings(bicubic[None], [""], [settings.settings.timestep])[0]
    err = rel_err(ours, direct)
    fixed = color_fix((direct + 1) / 2, jnp.asarray((bicubic + 1) / 2), settings.settings.color_fix)
    want = np.asarray(np.round(np.clip(np.asarray(fixed), 0, 1) * 255), np.uint8)
    diff = np.abs(out.astype(int) - want.astype(int))
    print(
        f"x{scale}: pipeline vs direct generator rel err {err:.2e}; uint8 max diff {diff.max()}, "
        f"{np.mean(diff > 0):.2%} of values differ"
    )
    assert err <= 3e-4  # float32, two compilations of one computation: measured 2.1e-5 .. 3.2e-5 (x1, x2, x3)
    assert diff.max() <= 1


@pytest.mark.slow  # an SR program
def test_seed_changes_the_posterior_sample(upscaler):
    image = [sample("astronaut", (32, 32))]
    a, b = (upscaler.replace(seed=s).super_resolve(image, [""])[0] for s in (1, 2))
    assert not np.array_equal(a, b)


@pytest.mark.slow  # SR programs at two batch sizes
def test_sweep_equals_single_runs_and_the_knob_matters(upscaler):
    image = sample("astronaut", (32, 32))
    single = upscaler.replace(timestep=900).super_resolve([image], [""])[0]
    programs = dict(upscaler.compiled)
    outs = dict(upscaler.sweep(image, "", [50, 900, 300]))
    # The timestep is an argument of the single-run program: a sweep compiles nothing of its own (issue 15.16).
    assert upscaler.compiled == programs
    assert list(outs) == [50, 900, 300] and np.array_equal(outs[900], single)
    assert np.abs(outs[50].astype(int) - outs[900].astype(int)).mean() > 0.5
    # Batched, with a short last batch: the same images.
    pairs = dict(upscaler.replace(batch_size=2).sweep(image, "", [50, 900, 300]))
    assert list(pairs) == [50, 900, 300]
    assert all(np.abs(pairs[t].astype(int) - outs[t].astype(int)).max() <= 1 for t in outs)


@pytest.mark.slow  # a bfloat16 SR program
def test_bfloat16_is_close_to_float32(tiny_sd, upscaler):
    model, tokenizer, schedule = trained_tadsr(tiny_sd)
    merge_generator(model)
    for network in (model.unet, model.vae, model.text_encoder):
        cast(network, jnp.bfloat16)
    bf16 = Upscaler(SRModel(model.unet, model.vae, model.text_encoder, tokenizer, schedule), upscaler.settings)
    image = [sample("astronaut", (32, 32))]
    a, b = upscaler.super_resolve(image, [""])[0], bf16.super_resolve(image, [""])[0]
    diff = np.abs(a.astype(int) - b.astype(int))
    print(f"\nbf16 vs fp32 SR (uint8): mean |diff| {diff.mean():.2f}, max {diff.max()}")
    assert diff.mean() <= 3.0


def _live_bytes(dtype=None) -> int:
    return sum(a.nbytes for a in jax.live_arrays() if dtype is None or a.dtype == dtype)


def _served_params(model: SRModel) -> list[jax.Array]:
    return jax.tree.leaves(nnx.state((model.unet, model.vae, model.text_encoder), nnx.Param))


def test_bfloat16_load_holds_one_float32_copy_at_most_and_matches_the_float32_load_cast(tiny_sd, monkeypatch):
    """load_sr_model in bfloat16 casts one parameter at a time (and loads the adapter-free text encoder in
    bfloat16 directly): the live arrays never exceed a float32 copy of the network by more than a quarter
    (measured 1.08x; the whole-state cast held the float32 and bfloat16 copies together: 1.42x), no float32
    weight outlives the load, and every weight is bit for bit the float32 model's, cast."""
    from jax._src.array import ArrayImpl  # every cast goes through it: the moment to count the live arrays

    reference = _served_params(load_sr_model(sr_config(dtype="float32"), tiny_sd, WeightsSource()))
    peak, astype = [0], ArrayImpl.astype

    def counting_astype(self, *args, **kwargs):
        out = astype(self, *args, **kwargs)
        peak[0] = max(peak[0], _live_bytes())
        return out

    gc.collect()
    before, before_f32 = _live_bytes(), _live_bytes(jnp.float32)
    monkeypatch.setattr(ArrayImpl, "astype", counting_astype)
    model = load_sr_model(sr_config(dtype="bfloat16"), tiny_sd, WeightsSource())
    monkeypatch.undo()
    params = _served_params(model)
    float32_copy = 2 * sum(p.nbytes for p in params)
    assert peak[0] - before <= 1.25 * float32_copy, f"{(peak[0] - before) / float32_copy:.2f}x a float32 copy"
    assert _live_bytes(jnp.float32) - before_f32 < 0.01 * float32_copy  # what stays: the noise schedule
    assert len(params) == len(reference)
    for ours, want in zip(params, reference):
        assert ours.dtype == jnp.bfloat16
        np.testing.assert_array_equal(
            np.asarray(ours).view(np.uint16), np.asarray(want.astype(jnp.bfloat16)).view(np.uint16)
        )


@pytest.mark.slow  # compiles the SR program twice
def test_bfloat16_program_holds_no_float32_copy_of_the_weights(tiny_sd):
    """XLA:CPU computes bfloat16 convolutions and dots in float32. With its default scheduler every weight was
    converted before the first layer ran, so the bfloat16 program's scratch held a float32 copy of all weights
    (here 7.2 MB against 3.3 MB in float32, for 4.7 MB of float32 weights; 1.2 GiB in a half-width SD-2.1)."""
    lq, scratch = np.zeros((1, 32, 32, 3), np.float32), {}
    for dtype in ("float32", "bfloat16"):
        model = load_sr_model(sr_config(dtype=dtype), tiny_sd, WeightsSource())
        upscaler = Upscaler(model, SRSettings.from_config(CONFIG.sr))
        compiled = upscaler.trace(lq, [""], [CONFIG.sr.timestep]).lower().compile()
        scratch[dtype] = compiled.memory_analysis().temp_size_in_bytes
    float32_weights = 2 * sum(p.nbytes for p in _served_params(model))
    assert scratch["bfloat16"] - scratch["float32"] < float32_weights / 2, scratch


def test_merge_drops_the_fake_score_adapters(tiny_sd):
    """A workdir's model carries the fake score's adapters; inference never runs them, so serving keeps none."""
    model, _, _ = build_tadsr(tiny_sd, CONFIG.model, fake_score_groups=CONFIG.model.fake_score_groups)
    assert jax.tree.leaves(nnx.state(model.unet, FAKE_SCORE))
    merge_generator(model)
    assert jax.tree.leaves(nnx.state(model.unet, lora.LoRAParam)) == []
    assert all(h.active_adapters == () for h in lora.lora_hosts(model.unet).values())


def _bad_inputs(folder) -> dict[str, str]:
    """Files that must fail, by name -> a word their error line must contain."""
    open(folder / "empty.png", "wb").close()
    (folder / "notes.png").write_text("not an image")
    buf = folder / "full.png"
    Image.fromarray(sample("rocket", (32, 32))).save(buf)
    (folder / "truncated.png").write_bytes(buf.read_bytes()[: buf.stat().st_size // 2])
    buf.unlink()
    Image.new("RGB", (1, 1)).save(folder / "dot.png")
    return {"empty.png": "empty", "notes.png": "not an image", "truncated.png": "truncated", "dot.png": "small"}


def _converted_inputs(folder) -> list[str]:
    """Files that are converted with a note: 16-bit, RGBA, palette, grayscale, CMYK."""
    rgb = Image.fromarray(sample("chelsea", (32, 32)))
    Image.fromarray(np.asarray(rgb.convert("L"), np.uint16) * 257).save(folder / "deep.png")
    rgb.convert("RGBA").save(folder / "alpha.png")
    rgb.convert("P").save(folder / "palette.png")
    rgb.convert("L").save(folder / "gray.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    return ["deep", "alpha", "palette", "gray", "cmyk"]


@pytest.mark.slow
def test_cli_end_to_end(tmp_path, tiny_sd, tiny_generator, compilation_cache):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(sample("astronaut", (32, 32))).save(inputs / "astronaut.png")
    Image.fromarray(sample("coffee", (32, 32))).save(inputs / "coffee.jpg")
    bad = _bad_inputs(inputs)
    converted = _converted_inputs(inputs)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        os.path.join(REPO, "launch", "sr.py"),
        "--config",
        os.path.join(REPO, "configs/tiny.py"),
        f"--config.model.pretrained={tiny_sd}",
        f"--generator={tiny_generator}",
        f"--input={inputs}",
        f"--output={out}",
        "--config.sr.timestep=300",
    ]
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=compilation_cache)
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env=env, check=False)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(bad), errors
    for name, word in bad.items():
        assert sum(str(inputs / name) in line and word in line for line in errors) == 1, (name, errors)
    for stem in converted:
        assert any(line.startswith("note: ") and f"{stem}." in line for line in result.stderr.splitlines()), stem
    written = sorted(os.listdir(out))
    assert written == sorted(["astronaut.png", "coffee.png"] + [f"{s}.png" for s in converted])
    for name in written:
        assert Image.open(out / name).size == (128, 128)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["written"] == len(written) and summary["failed"] == len(bad)

    sweep = subprocess.run(
        cmd[:-1] + [f"--input={inputs / 'astronaut.png'}", "--sweep=100,700"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env=env,
        check=False,
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert "timestep sweep:  50%" in sweep.stderr and "1/2" in sweep.stderr  # progress per timestep
    sheet = Image.open(out / "astronaut_sweep.png")
    assert sheet.height > 128 and sheet.width > 3 * 128
    a, b = (np.asarray(Image.open(out / f"astronaut_t{t}.png"), int) for t in (100, 700))
    assert np.abs(a - b).mean() > 0.5


@pytest.mark.slow  # launchers end to end
def test_evaluate_sweep_runs_sr_at_each_timestep_then_scores_and_plots(
    tmp_path, tiny_sd, tiny_generator, compilation_cache
):
    from tadsr_jax import metrics

    lq, hr = tmp_path / "lq", tmp_path / "hr"
    lq.mkdir()
    hr.mkdir()
    for name in ("astronaut", "coffee"):
        Image.fromarray(sample(name, (128, 128))).save(hr / f"{name}.png")
        Image.fromarray(sample(name, (32, 32))).save(lq / f"{name}.png")
    out = tmp_path / "sweep"
    cmd = [
        sys.executable,
        os.path.join(REPO, "launch", "evaluate.py"),
        "--config",
        os.path.join(REPO, "configs/tiny.py"),
        f"--config.model.pretrained={tiny_sd}",
        f"--generator={tiny_generator}",
        f"--lq={lq}",
        f"--hr={hr}",
        f"--output={out}",
        "--sweep=100,700",
    ]
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=compilation_cache)
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600, env=env, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(summary) == {"t=100", "t=700"}
    for t in (100, 700):
        psnrs = []
        for name in ("astronaut", "coffee"):
            a = np.asarray(Image.open(out / "sr" / f"{name}_t{t}.png"), np.float32)[None] / 255
            b = np.asarray(Image.open(hr / f"{name}.png"), np.float32)[None] / 255
            psnrs.append(float(metrics.psnr_y(a, b)[0]))
        np.testing.assert_allclose(summary[f"t={t}"]["psnr"], np.mean(psnrs), rtol=1e-6)
    assert summary["t=100"]["psnr"] != summary["t=700"]["psnr"]
    assert (out / "metrics.md").read_text().splitlines()[0] == "| Dataset | Metric | t=100 | t=700 |"
    with Image.open(out / "sweep.png") as plot:
        assert plot.format == "PNG"
    again = subprocess.run(
        [*cmd[:1], cmd[1], f"--sr={out / 'sr'}", f"--hr={hr}", f"--output={tmp_path / 'again'}", "--sweep=100,700"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        check=False,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1]) == summary


@pytest.mark.slow  # launchers end to end
def test_convert_to_the_reference_format_then_sr_gives_the_same_image(
    tmp_path, tiny_sd, tiny_generator, compilation_cache
):
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=compilation_cache)
    config = ["--config", os.path.join(REPO, "configs/tiny.py"), f"--config.model.pretrained={tiny_sd}"]
    pkl = tmp_path / "tadsr.pkl"
    convert = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "launch", "convert.py"),
            "--what=generator",
            *config,
            f"--generator={tiny_generator}",
            f"--out={pkl}",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        env=env,
        check=False,
    )
    assert convert.returncode == 0 and pkl.is_file(), convert.stderr[-3000:]
    image = tmp_path / "astronaut.png"
    Image.fromarray(sample("astronaut", (32, 32))).save(image)
    outputs = {}
    for flag in (f"--generator={tiny_generator}", f"--tadsr_ckpt={pkl}"):
        out = tmp_path / flag.split("=")[0].strip("-")
        run = subprocess.run(
            [
                sys.executable,
                os.path.join(REPO, "launch", "sr.py"),
                *config,
                flag,
                f"--input={image}",
                f"--output={out}",
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=600,
            env=env,
            check=False,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        outputs[flag] = np.asarray(Image.open(out / "astronaut.png"))
    first, second = outputs.values()
    assert np.array_equal(first, second)


@pytest.mark.slow  # SR programs of both VAE paths
def test_stripwise_vae_path_equals_the_one_pass_path(upscaler):
    """Above `vae_strip_above` pixels the VAE runs strip-wise on the host and the UNet one jitted tile at a time
    (the one-pass path maps over the tiles inside its program); the result is the same image. The tiny VAE does
    not downsample, so the 192x128 latent takes 3x2 tiles and both tile loops and their blending run."""
    image = [sample("coffee", (32, 24))]
    assert upscaler.settings.latent_tile < 128
    one_pass = upscaler.super_resolve(image, [""])[0]
    stripwise = upscaler.replace(vae_strip_above=0).super_resolve(image, [""])[0]
    assert np.abs(one_pass.astype(int) - stripwise.astype(int)).max() <= 1


@pytest.mark.slow  # an SR program
def test_timesteps_outside_the_trained_range_get_one_warning(tmp_path, tiny_sd, tiny_generator):
    """An export recording trained timesteps 1..200 (configs/tiny.py): t = 900 or a sweep reaching past 200 gets
    one warning line, t = 100 none, and weights that record no range (the reference's tadsr.pkl) none either."""
    from tadsr_jax.infer import session
    from tadsr_jax.infer.model import WeightsSource

    model, _, _ = trained_tadsr(tiny_sd)
    recorded = str(tmp_path / "generator.safetensors")
    official.save_generator(model, recorded, metadata={"trained_timesteps": [1, 200]})
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "broken.png").write_bytes(b"not an image")  # fails on reading: nothing is compiled
    config = tiny.get_config()
    config.model.pretrained = tiny_sd

    def warnings(weights: str, timestep: int = 100, sweep: list[int] | None = None) -> list[str]:
        config.sr.timestep = timestep
        log = io.StringIO()
        report = session.run(
            config, str(inputs), str(tmp_path / "out"), WeightsSource(generator=weights), sweep=sweep, log=log
        )
        assert len(report.failed) == 1
        return [line for line in log.getvalue().splitlines() if "trained" in line]

    (line,) = warnings(recorded, timestep=900)
    assert line.startswith("warning: timestep 900 is outside") and "(1..200, train.max_student_timestep)" in line
    (line,) = warnings(recorded, sweep=[100, 300, 900])
    assert line.startswith("warning: timestep 300, 900 is outside")
    assert session.timestep_warning([1, 200], [100, 200]) is None
    assert warnings(tiny_generator, timestep=900) == []
