"""SR speed: our jitted one-step super-resolution against the same math in PyTorch eager, on the same weights.

The model is the SD-2.1-base architecture (UNet 320..1280, VAE 128..512, the full CLIP text encoder; a
tokenizer-sized vocabulary), random weights written once into a cache folder in the diffusers/transformers
layout. Both sides load that folder and run, per image: text encoder, time-aware VAE encoder at t = 500,
posterior sample, one UNet call, the student x0 rule, VAE decoder, clamp.

- ours: `tadsr_jax.infer.model.load_sr_model` + the `Upscaler`'s jitted forward (compiled ahead of time and
  timed separately), on a working image of the output size; FLOPs counted on its jaxpr (matmuls and
  convolutions, `matmul_flops`).
- the DAPE tagger (ours only; the reference runs RAM in PyTorch before the SR pass): RAM Swin-L/384 + the
  tagging head at DAPE's size, random weights, on the same working image, timed and counted separately.
- torch: diffusers `UNet2DConditionModel` / `AutoencoderKL` (the time-aware encoder restated on its stock
  modules, see torch_reference), transformers `CLIPTextModel`, under `torch.inference_mode()`.

Each (side, dtype) runs in its own subprocess, one after the other, the resolutions in the given order;
peak memory is the process's peak resident set size after each resolution.
`python -m benchmarks.sr --side=ours|torch|prepare ...` is the worker entry point.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from typing import Any

from benchmarks import common
from tadsr_jax.flops import matmul_flops

WORKER = "benchmarks.sr"
FORMAT = 1  # bump when the weights folder's contents change
RESOLUTIONS = (256, 512)  # default output sides
TIMESTEP = 500
SEED = 0
PROMPT = "a photo of a cat sitting on a sofa"
META_FILE = "bench.json"  # written last: the folder is complete


def architectures() -> dict[str, dict]:
    from tadsr_jax.models.architectures import SD21_TEXT_ENCODER, SD21_UNET, SD21_VAE

    text = {k: v for k, v in SD21_TEXT_ENCODER.items() if k != "vocab_size"}  # sized to the tokenizer
    return {"unet": dict(SD21_UNET), "vae": dict(SD21_VAE), "text_encoder": text}


def weights_folder(cache_dir: str | None = None) -> str:
    return common.weights_folder("sr", {"format": FORMAT, "arch": architectures(), "seed": SEED}, cache_dir)


def prepare(folder: str) -> None:
    from tadsr_jax.weights.tiny import write_random_sd_folder

    def fill(staging: str) -> None:
        arch = architectures()
        write_random_sd_folder(
            staging, unet=arch["unet"], vae=arch["vae"], text_encoder=arch["text_encoder"], seed=SEED
        )
        common.write_result(os.path.join(staging, META_FILE), {"architectures": arch})

    common.write_folder(folder, fill)


def ensure_weights(cache_dir: str | None = None) -> str:
    folder = weights_folder(cache_dir)
    return common.ensure_weights(
        folder, WORKER, META_FILE, f"bench sr: writing random SD-2.1-size weights to {folder} (once, ~5 GB)"
    )


def make_image(size: int):
    """A (1, size, size, 3) float32 working image in [-1, 1]: a photograph's x4 bicubic upscale."""
    import numpy as np
    from PIL import Image

    from tadsr_jax.data.samples import sample_image

    low = sample_image("chelsea", size).resize((size // 4, size // 4), Image.BICUBIC)
    return (np.asarray(low.resize((size, size), Image.BICUBIC), np.float32) / 127.5 - 1.0)[None]


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------------- ours


def _sizes(sizes: str) -> list[int]:
    return [int(s) for s in sizes.split(",")]


def run_ours(folder: str, dtype: str, sizes: str, steps: int, warmup: int) -> dict[str, Any]:
    import jax
    from flax import nnx

    from configs import tadsr_sd21
    from tadsr_jax.infer.model import DTYPES, WeightsSource, load_sr_model
    from tadsr_jax.infer.pipeline import SRSettings, Upscaler
    from tadsr_jax.infer.tagger import Tagger, ram_tag_data
    from tadsr_jax.models.ram import DAPE_CONFIG, RAMTagger

    jax.config.update("jax_enable_compilation_cache", False)  # compilation is measured
    start = time.perf_counter()
    config = tadsr_sd21.get_config()
    config.sr.dtype, config.sr.timestep, config.sr.seed = dtype, TIMESTEP, SEED
    model = load_sr_model(config, folder, WeightsSource())
    upscaler = Upscaler(model, SRSettings.from_config(config.sr))
    jax.block_until_ready(upscaler.params)
    load_s = time.perf_counter() - start
    tagger = Tagger(RAMTagger(DAPE_CONFIG, dtype=DTYPES[dtype], rngs=nnx.Rngs(SEED)), *ram_tag_data())
    per_size = {}
    for size in _sizes(sizes):
        lq = make_image(size)
        working = [(lq[0] + 1) / 2]
        compile_start = time.perf_counter()
        tagger.on(working)  # compiles
        tagger_compile_s = time.perf_counter() - compile_start
        tagger_timing = common.time_calls(lambda w=working: tagger.on(w), steps=steps, warmup=warmup)
        compile_before = upscaler.compile_seconds
        upscaler(lq, [PROMPT], [TIMESTEP])  # compiles
        compile_s = upscaler.compile_seconds - compile_before
        flops = matmul_flops(upscaler.trace(lq, [PROMPT], [TIMESTEP]))
        timing = common.time_calls(lambda lq=lq: upscaler(lq, [PROMPT], [TIMESTEP]), steps=steps, warmup=warmup)
        per_size[str(size)] = {
            "timing": timing.as_dict(),
            "compile_s": compile_s,
            "flops": flops,
            "peak_rss_bytes": peak_rss_bytes(),
            "tagger": {
                "timing": tagger_timing.as_dict(),
                "compile_s": tagger_compile_s,
                "flops": matmul_flops(tagger.trace(working)),
            },
        }
    return {
        "load_s": load_s,
        "sizes": per_size,
        "peak_flops": common.measure_matmul_peak(dtype),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }


# --------------------------------------------------------------------------------------------------- torch


def run_torch(folder: str, dtype: str, sizes: str, steps: int, warmup: int) -> dict[str, Any]:

    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from benchmarks.torch_reference import load_time_vae, time_aware_moments

    torch_dtype = getattr(torch, dtype)
    start = time.perf_counter()
    unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).eval().to(torch_dtype)
    vae, time_tensors = load_time_vae(os.path.join(folder, "time_vae"))
    time_tensors = {k: v.to(torch_dtype) for k, v in time_tensors.items()}
    vae = vae.eval().to(torch_dtype)
    text = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder")).eval().to(torch_dtype)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    alpha = float(np.cumprod(1.0 - betas)[TIMESTEP])
    load_s = time.perf_counter() - start
    scale = vae.config.scaling_factor
    t = torch.tensor([TIMESTEP])
    ids = tokenizer(
        [PROMPT],
        padding="max_length",
        max_length=text.config.max_position_embeddings,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    gen = torch.Generator().manual_seed(SEED)

    def super_resolve(lq):
        with torch.inference_mode():
            context = text(ids)[0]
            mean, logvar = time_aware_moments(vae, time_tensors, lq, t)
            z = (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen, dtype=mean.dtype)) * scale
            residual = unet(z, t, context).sample
            x0 = z / alpha**0.5 - residual
            return vae.decode(x0 / scale).sample.clamp(-1, 1)

    per_size = {}
    for size in _sizes(sizes):
        lq = torch.tensor(make_image(size)).permute(0, 3, 1, 2).contiguous().to(torch_dtype)
        timing = common.time_calls(lambda lq=lq: super_resolve(lq), steps=steps, warmup=warmup, sync=lambda x: x)
        per_size[str(size)] = {"timing": timing.as_dict(), "peak_rss_bytes": peak_rss_bytes()}
    return {
        "load_s": load_s,
        "sizes": per_size,
        "peak_flops": common.measure_torch_matmul_peak(dtype),
        "threads": torch.get_num_threads(),
    }


# -------------------------------------------------------------------------------------------------- report


def run(
    steps: int = 3,
    warmup: int = 1,
    cache_dir: str | None = None,
    dtypes: tuple[str, ...] = ("float32",),
    sizes: tuple[int, ...] = RESOLUTIONS,
) -> common.Report:
    """Write (once) the weights, then time ours and torch per dtype, each in its own subprocess.

    Where our worker finds an accelerator (GPU/TPU), bfloat16 is measured too, even if not asked for.
    """
    folder = ensure_weights(cache_dir)
    args = [f"--folder={folder}", f"--steps={steps}", f"--warmup={warmup}", f"--sizes={','.join(map(str, sizes))}"]
    sides, dtypes = {}, list(dtypes)
    for dtype in dtypes:  # may grow by bfloat16 below
        for side, label in (("ours", "ours (JAX)"), ("torch", "torch eager")):
            common.progress(f"bench sr: {label} {dtype}, {warmup} warmup + {steps} timed calls per resolution")
            sides[side, dtype] = common.run_worker(
                WORKER, [f"--side={side}", f"--dtype={dtype}", *args], label=f"{label} {dtype}", timeout=7200
            )
            common.progress(
                f"bench sr: {label} {dtype}: "
                + ", ".join(
                    f"{size}: {v['timing']['median_s']:.2f} s" for size, v in sides[side, dtype]["sizes"].items()
                )
            )
        if sides["ours", dtype]["backend"] != "cpu" and "bfloat16" not in dtypes:
            dtypes.append("bfloat16")
    result: dict[str, Any] = {
        "what": "sr",
        "steps": steps,
        "warmup": warmup,
        "cpu_count": os.cpu_count(),
        "timestep": TIMESTEP,
        "architecture": "SD-2.1-base",
    }
    rows = []
    for dtype in dtypes:
        ours, ref = sides["ours", dtype], sides["torch", dtype]
        for size in sizes:
            o, r = ours["sizes"][str(size)], ref["sizes"][str(size)]
            ours_s, torch_s = o["timing"]["median_s"], r["timing"]["median_s"]
            flops, peak = o["flops"], max(ours["peak_flops"], ref["peak_flops"])
            entry = {
                "ours_s": ours_s,
                "torch_s": torch_s,
                "speedup": torch_s / ours_s,
                "images_per_s": 1 / ours_s,
                "peak_fraction": flops / ours_s / peak,
                "torch_peak_fraction": flops / torch_s / peak,
                "compile_s": o["compile_s"],
                "flops": flops,
                "peak_flops": peak,
                "jax_matmul_peak_flops": ours["peak_flops"],
                "torch_matmul_peak_flops": ref["peak_flops"],
                "ours_peak_rss_gib": o["peak_rss_bytes"] / 2**30,
                "torch_peak_rss_gib": r["peak_rss_bytes"] / 2**30,
            }
            key = str(size) if dtype == "float32" else f"{size}_{dtype}"
            result[key] = entry
            tag = o["tagger"]
            tag_s = tag["timing"]["median_s"]
            result[f"{key}_tagger"] = {
                "ours_s": tag_s,
                "compile_s": tag["compile_s"],
                "flops": tag["flops"],
                "flops_fraction_of_sr": tag["flops"] / flops,
                "time_fraction_of_sr": tag_s / ours_s,
                "peak_fraction": tag["flops"] / tag_s / peak,
            }
            rows.append(
                (
                    f"{size}x{size} {dtype}",
                    common.seconds(ours_s),
                    common.seconds(torch_s),
                    f"{entry['speedup']:.2f}x",
                    common.seconds(o["compile_s"]),
                    common.si(flops, "FLOP"),
                    common.percent(entry["peak_fraction"]),
                    common.percent(entry["torch_peak_fraction"]),
                    f"{entry['ours_peak_rss_gib']:.1f} / {entry['torch_peak_rss_gib']:.1f} GiB",
                )
            )
            rows.append(
                (
                    f"{size}x{size} {dtype} DAPE tagger",
                    common.seconds(tag_s),
                    "-",
                    "-",
                    common.seconds(tag["compile_s"]),
                    f"{common.si(tag['flops'], 'FLOP')} ({common.percent(tag['flops'] / flops)} of SR)",
                    common.percent(result[f"{key}_tagger"]["peak_fraction"]),
                    "-",
                    "(in the SR row's)",
                )
            )
    peaks = ", ".join(
        f"{d}: ours {common.si(sides['ours', d]['peak_flops'], 'FLOP/s')}, torch "
        f"{common.si(sides['torch', d]['peak_flops'], 'FLOP/s')}"
        for d in dtypes
    )
    notes = [
        f"median of {steps} calls after {warmup} warmup per resolution; {os.cpu_count()} CPU cores; "
        f"FLOP/image counts matmuls and convolutions (2 per multiply-add); % peak is against the better of "
        f"the two measured matmul peaks ({peaks}); peak RSS is the process's high-water mark (weights "
        f"included); weights {folder}"
    ]
    header = (
        "output, dtype",
        "ours",
        "torch eager",
        "speedup",
        "compile",
        "FLOP/image",
        "ours % peak",
        "torch % peak",
        "peak RSS ours / torch",
    )
    return common.Report(
        title="x4 SR, one image, SD-2.1-base architecture, t = 500",
        header=header,
        rows=rows,
        result=result,
        notes=notes,
    )


if __name__ == "__main__":
    common.worker_main(
        sys.argv[1:],
        WORKER,
        prepare,
        {"ours": run_ours, "torch": run_torch},
        dtype="float32",
        sizes=",".join(map(str, RESOLUTIONS)),
    )
