"""Ahead-of-time compilation of the train step for devices that need not be attached, and what XLA says of it.

A Cloud TPU slice's devices come from its topology name (`jax.experimental.topologies`, needs libtpu: the `tpu`
extra), on any host. The step is built by the same functions `train/loop.py` uses (`make_model`, `split_model`,
`init_state`, `step_program`), on abstract networks: shapes and dtypes only, so no weights are read and no device
memory is used. The compiled program then tells, per chip: the bytes of arguments, outputs and temporaries
(`memory_analysis`), FLOPs and bytes accessed and XLA's run-time estimate (`cost_analysis`), and its collectives.
Beside XLA's FLOPs stands our count on the jaxpr (`tadsr_jax.flops.matmul_flops`, the MFU convention), and beside
XLA's time estimate the roofline bound, since XLA's estimate is not always usable (it can be negative).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import io
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from tadsr_jax import parallel
from tadsr_jax.diffusion import NoiseSchedule
from tadsr_jax.flops import matmul_flops
from tadsr_jax.infer.model import SRModel
from tadsr_jax.infer.pipeline import SRSettings, Upscaler
from tadsr_jax.method.tadsr import LossConfig, generator_loss
from tadsr_jax.models.architectures import SD21_TEXT_ENCODER, SD21_UNET, SD21_VAE
from tadsr_jax.models.clip_text import CLIPTextConfig, CLIPTextModel
from tadsr_jax.models.lpips import LPIPS
from tadsr_jax.models.unet import UNet2DConditionModel, UNetConfig
from tadsr_jax.models.vae import AutoencoderKL, VAEConfig
from tadsr_jax.nn.attention import set_implementation as set_attention_implementation
from tadsr_jax.train.step import init_state, make_model, optimizer, split_model, step_program

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """Public per-chip figures of a Cloud TPU generation (dense bf16 peak, HBM size and bandwidth)."""

    name: str
    peak_flops: float
    hbm_bytes: float
    hbm_bandwidth: float


CHIPS = {  # by jax.Device.device_kind
    "TPU v4": ChipSpec("v4", 275e12, 32 * GiB, 1228e9),
    "TPU v5 lite": ChipSpec("v5e", 197e12, 16 * GiB, 819e9),
    "TPU v5": ChipSpec("v5p", 459e12, 95 * GiB, 2765e9),
    "TPU v6 lite": ChipSpec("v6e", 918e12, 32 * GiB, 1640e9),
}

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# Bytes per element by the dtype names of HLO text (pred, s32) and of jax's short array types (bool, i32).
_BYTES = {
    "pred": 1,
    "bool": 1,
    "s8": 1,
    "i8": 1,
    "u8": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "i16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "i32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "i64": 8,
    "u64": 8,
}


def topology_devices(name: str) -> list[jax.Device]:
    """The devices of a Cloud TPU slice, e.g. 'v5p:2x2x4' (16 chips, 4 hosts) or 'v5e:16x16' (256 chips)."""
    from jax.experimental import topologies

    # Several processes may compile for TPU on one host (tests, sweeps): no single-process libtpu lock.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except (RuntimeError, ValueError) as e:
        raise ValueError(
            f"--topology={name}: not a TPU topology this libtpu knows ({str(e).splitlines()[0]}); "
            "names look like v5e:2x2, v5p:2x2x4, v6e:4x4"
        ) from None


def architectures(config: ml_collections.ConfigDict) -> tuple[UNetConfig, VAEConfig, CLIPTextConfig]:
    """The networks' configs: `config.model.unet/vae/text_encoder` where set (tiny configs), else SD-2.1-base's
    (what configs/tadsr_sd21.py loads from its pretrained folder)."""
    model = config.model
    return (
        UNetConfig.from_dict(model.unet.to_dict() or SD21_UNET),
        VAEConfig.from_dict(model.vae.to_dict() or SD21_VAE),
        CLIPTextConfig.from_dict(model.text_encoder.to_dict() or SD21_TEXT_ENCODER),
    )


def abstract_model(config: ml_collections.ConfigDict, platform: str | None = None):
    """TADSR as training builds it (adapters, remat policies, attention kernel for `platform`, LPIPS when its loss
    is on), shapes only."""
    unet_cfg, vae_cfg, text_cfg = architectures(config)
    dtype = jnp.dtype(config.model.dtype)

    def build():
        rngs = nnx.Rngs(0)
        lpips = LPIPS(dtype=dtype, rngs=rngs) if config.loss.lpips else None
        return make_model(
            config,
            UNet2DConditionModel(unet_cfg, dtype=dtype, rngs=rngs),
            AutoencoderKL(vae_cfg, time_aware=True, dtype=dtype, rngs=rngs),
            CLIPTextModel(text_cfg, dtype=dtype, rngs=rngs),
            lpips,
            platform,
        )

    return nnx.eval_shape(build), text_cfg


def _with_sharding(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class DoesNotFit(Exception):
    """XLA refused to compile a program for a chip: its buffers need more HBM than the chip has."""


def compile_for_chip(traced: jax.stages.Traced) -> jax.stages.Compiled:
    """`traced`, lowered and compiled; DoesNotFit with XLA's one line when it cannot fit the chip's HBM."""
    try:
        return traced.lower().compile()
    except jax.errors.JaxRuntimeError as e:
        if not str(e).startswith("RESOURCE_EXHAUSTED"):
            raise
        raise DoesNotFit(str(e).splitlines()[0]) from None


@dataclasses.dataclass
class CompiledProgram:
    """A compiled program and what the report needs beside XLA's own analyses."""

    compiled: jax.stages.Compiled
    model_flops: float  # per call, all chips: the model's FLOPs (no recomputation), the MFU numerator
    executed_flops: float  # per call, all chips, as compiled (remat and flash attention recompute some)
    num_devices: int
    num_hosts: int
    mesh_shape: dict[str, int]
    global_batch: int  # images per call
    crop_size: int  # their side, pixels


def _train_step_trace(
    config: ml_collections.ConfigDict, devices: Sequence[jax.Device], mesh: jax.sharding.Mesh
) -> jax.stages.Traced:
    model, text_cfg = abstract_model(config, devices[0].platform)
    graphdef, generator, fake_score, frozen, rest = split_model(model)
    state = jax.eval_shape(
        functools.partial(init_state, tx=optimizer(config.train), seed=config.seed), generator, fake_score
    )
    program = step_program(config, graphdef, NoiseSchedule.stable_diffusion(), mesh, state, frozen, rest)

    batch, size = config.train.batch_size, config.data.crop_size
    parallel.process_rows(batch, num_processes=len({d.process_index for d in devices}), num_devices=len(devices))
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32, sharding=program.batch_sharding)
    tokens = jax.ShapeDtypeStruct((batch, text_cfg.max_position_embeddings), jnp.int32, sharding=program.batch_sharding)
    neg_context = jax.ShapeDtypeStruct(
        (1, text_cfg.max_position_embeddings, text_cfg.hidden_size),
        jnp.dtype(config.model.dtype),
        sharding=program.replicated,
    )
    args = (
        _with_sharding(state, program.state_sharding),
        _with_sharding(frozen, program.frozen_sharding),
        _with_sharding(rest, program.rest_sharding),
        {"lq": images, "hq": images, "input_ids": tokens},
        neg_context,
    )
    return program.step_fn.trace(*args)


def _without_recomputation(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with no remat and XLA's attention: the same model, its FLOPs counted once (MFU's convention)."""
    config = copy.deepcopy(config)
    with config.unlocked():
        config.model.remat = ml_collections.ConfigDict({name: "none" for name in config.model.remat})
        config.model.attention = "xla"
    return config


def compile_train_step(config: ml_collections.ConfigDict, devices: Sequence[jax.Device]) -> CompiledProgram:
    """Build the train step of `config` for `devices` (a mesh from `config.mesh`) and compile it."""
    mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
    traced = _train_step_trace(config, devices, mesh)
    return CompiledProgram(
        compiled=compile_for_chip(traced),
        model_flops=matmul_flops(_train_step_trace(_without_recomputation(config), devices, mesh)),
        executed_flops=matmul_flops(traced),
        num_devices=len(devices),
        num_hosts=len({d.process_index for d in devices}),
        mesh_shape=dict(mesh.shape),
        global_batch=config.train.batch_size,
        crop_size=config.data.crop_size,
    )


def compile_sr(config: ml_collections.ConfigDict, device: jax.Device, *, size: int) -> CompiledProgram:
    """The SR program of `launch/sr.py` (`Upscaler`, settings from `config.sr`) for `sr.batch_size` working images
    of `size` x `size` pixels, networks in `sr.dtype`, on one chip."""
    unet_cfg, vae_cfg, text_cfg = architectures(config)
    jdtype = jnp.dtype(config.sr.dtype)
    batch = config.sr.batch_size

    def build():
        rngs = nnx.Rngs(0)
        unet = UNet2DConditionModel(unet_cfg, dtype=jdtype, rngs=rngs)
        vae = AutoencoderKL(vae_cfg, time_aware=True, dtype=jdtype, rngs=rngs)
        return unet, vae, CLIPTextModel(text_cfg, dtype=jdtype, rngs=rngs)

    def trace(implementation: str) -> jax.stages.Traced:
        unet, vae, text_encoder = nnx.eval_shape(build)
        for net in (unet, vae):
            set_attention_implementation(net, implementation, device.platform)
        upscaler = Upscaler(
            SRModel(unet, vae, text_encoder, tokenizer=None, schedule=NoiseSchedule.stable_diffusion()),
            SRSettings.from_config(config.sr),
        )
        on_chip = jax.sharding.SingleDeviceSharding(device)
        keys = jax.eval_shape(lambda: jnp.stack([jax.random.key(0)] * batch))
        args = (
            upscaler.params,
            jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
            jax.ShapeDtypeStruct((batch, text_cfg.max_position_embeddings), jnp.int32),
            jax.ShapeDtypeStruct((batch,), jnp.int32),
            keys,
        )
        args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_chip), args)
        return upscaler.forward.trace(*args)

    traced = trace(config.model.attention)
    return CompiledProgram(
        compiled=compile_for_chip(traced),
        model_flops=matmul_flops(trace("xla")),
        executed_flops=matmul_flops(traced),
        num_devices=1,
        num_hosts=1,
        mesh_shape={},
        global_batch=batch,
        crop_size=size,
    )


def saved_activations(
    config: ml_collections.ConfigDict, platform: str | None = None, batch: int | None = None
) -> list[dict[str, Any]]:
    """What the generator's backward pass keeps from its forward pass, by source line, largest first.

    These saved activations are what grows a train step's temporaries with the batch (the frozen weights and
    the train state do not), so this says where memory goes and what a remat policy or a kernel would free.
    Counted on the jaxpr of the generator loss (the fake-score update keeps far less: one UNet pass at most,
    its LoRA on the mid block by default) for `batch` images (default: the global batch), abstract, in seconds.
    """
    model, text_cfg = abstract_model(config, platform)
    graphdef, generator, fake_score, frozen, rest = split_model(model)
    generator = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), generator)
    batch = batch or config.train.batch_size
    size, tokens = config.data.crop_size, text_cfg.max_position_embeddings
    inputs = {
        "lq": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
        "hq": jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
        "input_ids": jax.ShapeDtypeStruct((batch, tokens), jnp.int32),
        "neg_context": jax.ShapeDtypeStruct((1, tokens, text_cfg.hidden_size), jnp.dtype(config.model.dtype)),
        "student_t": jax.ShapeDtypeStruct((batch,), jnp.int32),
    }
    loss_cfg = LossConfig(**config.loss.to_dict())

    def loss(generator, fake_score, frozen, rest, inputs):
        # Everything but the generator is a constant of the differentiation, as in the train step.
        fake_score, frozen, rest, inputs = jax.lax.stop_gradient((fake_score, frozen, rest, inputs))
        model = nnx.merge(graphdef, generator, fake_score, frozen, rest)
        return generator_loss(
            model,
            NoiseSchedule.stable_diffusion(),
            inputs,
            inputs["neg_context"],
            inputs["student_t"],
            jax.random.key(0),
            loss_cfg,
        )[0]

    return [
        e
        for e in residuals_by_source(loss, generator, fake_score, frozen, rest, inputs)
        if "saved_activations" not in e["source"]
    ]  # the stop_gradient copies of arguments above


def residuals_by_source(fn: Callable, *args: Any) -> list[dict[str, Any]]:
    """The arrays `jax.grad(fn)` keeps from the forward pass for the backward pass, grouped by the source line
    that made them, largest first: [{"source", "dtype", "count", "bytes"}]. Arguments and constants (weights
    closed over) are left out."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # jax's public residual listing prints one line per saved array
        print_saved_residuals(fn, *args)
    by_source: dict[str, dict[str, Any]] = {}
    for line in printed.getvalue().splitlines():
        match = re.match(r"(\w+)\[([\d,]*)\] (.*)", line)
        if not match or re.match(r"from (the argument|a constant|a literal)", match.group(3)):
            continue
        dtype, dims, source = match.groups()
        source = re.sub(r"^.*?from |\S*(?=tadsr_jax/)", "", source)
        entry = by_source.setdefault(f"{dtype} {source}", {"source": source, "dtype": dtype, "count": 0, "bytes": 0.0})
        entry["count"] += 1
        entry["bytes"] += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return sorted(by_source.values(), key=lambda e: -e["bytes"])


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
    """Collective ops of an optimised HLO module by kind: how many and the bytes of their results."""
    ops: Counter = Counter()
    sizes: Counter = Counter()
    pattern = re.compile(r"=\s*(\(?[^=]*?\)?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
    for match in pattern.finditer(hlo_text):
        kind = match.group(2)
        ops[kind] += 1
        for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", match.group(1)):
            if dtype in _BYTES:
                sizes[kind] += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return {kind: {"count": ops[kind], "bytes": float(sizes[kind])} for kind in sorted(ops)}


# A fusion in the cycle listing is named by the first of these ops its fused computation holds.
_FUSED_KINDS = (("convolution", "convolution("), ("dot", " dot("), ("reduce", " reduce("))


def estimated_cycles(hlo_text: str) -> list[dict[str, Any]]:
    """What a compiled TPU program spends XLA's time estimate on: the `estimated_cycles` XLA's TPU backend writes
    into each top-level instruction's backend config, summed by kind (a fusion is named by the convolution, dot or
    reduction it holds), result shape and the source line of its innermost stack frame; largest first, as
    [{"kind", "shape", "source", "cycles", "share"}]. Empty for a program without those estimates (CPU, GPU).

    This is how to find what to change in a program XLA estimates slower than its roofline: a kind or a shape
    that takes far more of the cycles than of the FLOPs (relayout copies, pads, reductions). Loop bodies count
    once, whatever their trip count.
    """

    def table(name: str, pattern: str) -> dict[str, Any]:
        section = re.search(rf"^{name}\n((?:\d+ .*\n)+)", hlo_text, re.M)
        return {m[0]: m[1:] for m in re.findall(pattern, section.group(1), re.M)} if section else {}

    files = {k: v[0] for k, v in table("FileNames", r'^(\d+) "(?:.*/)?([^"/]+)"').items()}
    functions = {k: v[0] for k, v in table("FunctionNames", r'^(\d+) "([^"]+)"').items()}
    locations = table("FileLocations", r"^(\d+) \{file_name_id=(\d+) function_name_id=(\d+) line=(\d+)")
    frames = {k: v[0] for k, v in table("StackFrames", r"^(\d+) \{file_location_id=(\d+)").items()}

    computations: dict[str, list[str]] = {}
    body: list[str] = []
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        if header:
            body = computations.setdefault(header.group(1), [])
        elif line.startswith("  "):
            body.append(line)
    fused = {c for lines in computations.values() for line in lines for c in re.findall(r"calls=%([\w.\-]+)", line)}
    totals: Counter = Counter()
    for name, lines in computations.items():
        if name in fused:
            continue
        for line in lines:
            cycles = re.search(r'"estimated_cycles":"(\d+)"', line)
            instruction = re.match(r"\s+(?:ROOT )?%\S+ = \(?(\w+\[[\d,]*\])?.*? ([a-z][\w\-]*)\(", line)
            if not cycles or not instruction:
                continue
            shape, kind = instruction.group(1) or "tuple", instruction.group(2)
            called = re.search(r"calls=%([\w.\-]+)", line)
            if called:
                inner = "\n".join(computations.get(called.group(1), []))
                kind = next((k for k, op in _FUSED_KINDS if op in inner), kind)
            frame = re.search(r"stack_frame_id=(\d+)", line)
            location = locations.get(frames.get(frame.group(1), ""), None) if frame else None
            source = (
                f"{files.get(location[0], '?')}:{location[2]} ({functions.get(location[1], '?')})" if location else "?"
            )
            totals[(kind, shape, source)] += int(cycles.group(1))
    total = sum(totals.values())
    return [
        {"kind": kind, "shape": shape, "source": source, "cycles": cycles, "share": cycles / total}
        for (kind, shape, source), cycles in totals.most_common()
    ]


# XLA's TPU cost model prices each ConcatBitcast custom-call (how memory-space assignment reassembles a weight it
# prefetched into on-chip memory in slices) at -1 s, a placeholder: a program holding N of them comes back with an
# estimate N seconds low, most often negative (v5e and v6e programs, where the tight HBM makes XLA slice its
# prefetches). With sliced prefetch off (LIBTPU_INIT_ARGS=--xla_tpu_sliced_prefetch_max_slices=0) a v5e ResNet
# block's estimate is what adding the N seconds back gives: 2.036 against 2.034 ms forward, 7.24 against 7.15 ms
# with gradients (8 x 128x128x256, bf16).
PLACEHOLDER_PRICED = 'custom_call_target="ConcatBitcast"'


def xla_time_estimate(cost: dict[str, Any], hlo_text: str) -> tuple[float, float, int]:
    """(XLA's time estimate with its -1 s placeholder prices added back, its raw figure, the placeholders)."""
    raw = float(cost.get("optimal_seconds", -1.0))
    placeholders = hlo_text.count(PLACEHOLDER_PRICED)
    return raw + placeholders, raw, placeholders


def report(program: CompiledProgram, chip: ChipSpec) -> dict[str, Any]:
    """Per-chip memory, FLOPs, time estimates, images/s and MFU of a compiled program (all XLA's estimates).

    The roofline bound is max(FLOPs / peak, bytes accessed / HBM bandwidth) with our count of the FLOPs as
    compiled: XLA's own count leaves out most of a Pallas kernel's work (it sees only the cost estimate the
    kernel declares). XLA's time estimate (`xla_time_estimate`) is used where it is positive, else the roofline.
    """
    memory = program.compiled.memory_analysis()
    cost = program.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    total = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        - memory.alias_size_in_bytes
        + memory.temp_size_in_bytes
    )
    chips = program.num_devices
    xla_flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    roofline = max(program.executed_flops / chips / chip.peak_flops, accessed / chip.hbm_bandwidth)
    hlo_text = program.compiled.as_text()
    xla_seconds, xla_raw_seconds, placeholders = xla_time_estimate(cost, hlo_text)
    seconds, source = (xla_seconds, "xla") if xla_seconds > 0 else (roofline, "roofline")
    per_chip = program.global_batch / chips
    return {
        "chip": chip.name,
        "chips": chips,
        "hosts": program.num_hosts,
        "mesh": program.mesh_shape,
        "global_batch": program.global_batch,
        "images_per_chip": per_chip,
        "crop_size": program.crop_size,
        "hbm_gib": chip.hbm_bytes / GiB,
        "arguments_gib": memory.argument_size_in_bytes / GiB,
        "outputs_gib": memory.output_size_in_bytes / GiB,
        "aliased_gib": memory.alias_size_in_bytes / GiB,
        "temporaries_gib": memory.temp_size_in_bytes / GiB,
        "total_gib": total / GiB,
        "fits": total <= chip.hbm_bytes,
        "model_tflop": program.model_flops / 1e12,
        "executed_tflop": program.executed_flops / 1e12,
        "xla_tflop_per_chip": xla_flops / 1e12,
        "bytes_accessed_per_chip_gb": accessed / 1e9,
        "xla_estimate_s": xla_seconds,
        "xla_raw_estimate_s": xla_raw_seconds,
        "xla_placeholder_prices": placeholders,
        "roofline_s": roofline,
        "time_s": seconds,
        "time_from": source,
        "ms_per_image": 1e3 * seconds / per_chip,
        "images_per_s_per_chip": per_chip / seconds,
        "mfu": program.model_flops / (chips * chip.peak_flops * seconds),
        "collectives": collectives(hlo_text),
    }


def format_report(report: dict[str, Any], what: str = "step") -> str:
    """The report as a few readable lines (every time figure labelled as an estimate)."""
    mesh = " x ".join(f"{name} {size}" for name, size in report["mesh"].items()) or "none"
    collectives = (
        ", ".join(f"{kind} {c['count']} ({c['bytes'] / 1e9:.2f} GB)" for kind, c in report["collectives"].items())
        or "none"
    )
    fits = "fits" if report["fits"] else "DOES NOT FIT"
    placeholders = (
        f" (XLA's {report['xla_raw_estimate_s']:.1f} s with {report['xla_placeholder_prices']} ConcatBitcast "
        "placeholders of -1 s added back)"
        if report["xla_placeholder_prices"]
        else ""
    )
    return "\n".join(
        [
            f"{report['chips']} {report['chip']} chip(s) on {report['hosts']} host(s), mesh {mesh}; batch "
            f"{report['global_batch']} of {report['crop_size']}x{report['crop_size']} ({report['images_per_chip']:g} "
            "per chip)",
            f"HBM per chip: {report['total_gib']:.2f} of {report['hbm_gib']:.0f} GiB, {fits} (arguments "
            f"{report['arguments_gib']:.2f}, outputs {report['outputs_gib']:.2f}, aliased {report['aliased_gib']:.2f}, "
            f"temporaries {report['temporaries_gib']:.2f})",
            f"FLOPs per {what} (all chips): model {report['model_tflop']:.2f} TFLOP, as compiled (with recomputation) "
            f"{report['executed_tflop']:.2f}; XLA counts {report['xla_tflop_per_chip']:.2f} TFLOP and "
            f"{report['bytes_accessed_per_chip_gb']:.1f} GB accessed per chip",
            f"{what} time (estimates): XLA {report['xla_estimate_s']:.4f} s{placeholders}, roofline "
            f"{report['roofline_s']:.4f} s; "
            f"using {report['time_from']}: {report['ms_per_image']:.1f} ms per image, "
            f"{report['images_per_s_per_chip']:.2f} images/s per chip, MFU {100 * report['mfu']:.1f}%",
            f"collectives per {what}: {collectives}",
        ]
    )
