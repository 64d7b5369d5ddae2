"""Train-step speed: our jitted TADSR step against the same step in PyTorch eager, on the same weights.

The model is an SD-2.x-structured stand-in sized to be compute-bound on a CPU (UNet and VAE channels
64/128/256/256, 128x128 HR crops, global batch 2, fp32, LoRA rank 4, fake score on the mid-block group,
LPIPS on a random VGG, a 4-layer CLIP text encoder), written once with random weights into a cache folder
in the diffusers/transformers layout. Both sides load that folder:

- ours: `tadsr_jax.train.loop.build` and its jitted step (compiled once, ahead of time), timed per step;
  FLOPs of one step counted on its jaxpr (matmuls and convolutions, `matmul_flops`). The torch side's
  FlopCounterMode count is reported beside it for reference only: on CPU it does not see
  scaled_dot_product_attention.
- torch: diffusers `UNet2DConditionModel` / `AutoencoderKL` (the time-aware encoder restated on its stock
  modules, as tests/test_vae.py), transformers `CLIPTextModel`, the `lpips` package, PEFT-style LoRA as
  forward hooks on the same target modules, and the reference's step order: generator loss, backward,
  clip, AdamW; then fake-score loss, backward, clip, AdamW.

Each side runs in its own subprocess, one after the other (`run`); the weights folder is written by a
third. `python -m benchmarks.train --side=ours|torch|prepare ...` is that worker entry point.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import sys
import tempfile
import time
from typing import Any

from benchmarks import common, op_profile
from tadsr_jax.flops import matmul_flops

WORKER = "benchmarks.train"
FORMAT = 1  # bump when the weights folder's contents change

HR_SIZE = 128
BATCH = 2
LORA_RANK = 4
LORA_ALPHA = 8.0
FAKE_SCORE_GROUPS = ("others",)
WEIGHTS_SEED = 0
LPIPS_SEED = 0
DATA_SEED = 0
PROMPT = "a photo of a cat sitting on a sofa"
LPIPS_FILE = "lpips_vgg.safetensors"  # the random LPIPS (seed LPIPS_SEED) in PyTorch layout, for the torch side
META_FILE = "bench.json"  # written last: the folder is complete

# Reference hyperparameters (docs/method.md 3.1), the defaults of our config too.
LR, BETAS, WEIGHT_DECAY, ADAM_EPS, MAX_GRAD_NORM = 5e-5, (0.9, 0.999), 1e-2, 1e-8, 1.0
LAMBDA_L2, LAMBDA_LPIPS, LAMBDA_VSD, LAMBDA_FAKE = 1.0, 2.0, 1.0, 1.0
SCALING_FACTOR = 0.18215


def architectures() -> dict[str, dict]:
    """SD-2.x block structure, scaled: channels 64/128/256/256 (SD: 320.. / 128..), 1/2/4/4 heads of 64."""
    from tadsr_jax.models.architectures import SD21_TEXT_ENCODER, SD21_UNET, SD21_VAE

    unet = {
        **SD21_UNET,
        "block_out_channels": [64, 128, 256, 256],
        "attention_head_dim": [1, 2, 4, 4],
        "cross_attention_dim": 256,
        "sample_size": HR_SIZE // 8,
    }
    vae = {**SD21_VAE, "block_out_channels": [64, 128, 256, 256], "sample_size": HR_SIZE}
    text = {k: v for k, v in SD21_TEXT_ENCODER.items() if k != "vocab_size"}  # sized to the tiny tokenizer
    text.update(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4)
    return {"unet": unet, "vae": vae, "text_encoder": text}


def summary() -> dict[str, Any]:
    arch = architectures()
    return {
        "unet_channels": arch["unet"]["block_out_channels"],
        "unet_heads": arch["unet"]["attention_head_dim"],
        "vae_channels": arch["vae"]["block_out_channels"],
        "text_encoder": f"{arch['text_encoder']['hidden_size']}x{arch['text_encoder']['num_hidden_layers']}",
        "hr_size": HR_SIZE,
        "global_batch": BATCH,
        "dtype": "float32",
        "lora_rank": LORA_RANK,
        "fake_score_groups": list(FAKE_SCORE_GROUPS),
        "losses": ["l2", "lpips", "vsd", "fake"],
    }


def weights_folder(cache_dir: str | None = None) -> str:
    """Where the random-weight folder of `architectures()` lives (a hash of its contents in the name)."""
    key = {
        "format": FORMAT,
        "arch": architectures(),
        "seed": WEIGHTS_SEED,
        "lpips": LPIPS_SEED,
        "rank": LORA_RANK,
        "fake": FAKE_SCORE_GROUPS,
    }
    return common.weights_folder("train", key, cache_dir)


def bench_config(folder: str):
    """Our config for the benchmark: the paper's, with these architectures (the reference's losses)."""
    from configs import tadsr_sd21

    arch = architectures()
    config = tadsr_sd21.get_config()
    config.seed = 0
    config.model.pretrained = folder  # so no tiny-SD stand-in is written
    config.model.dtype = "float32"
    config.model.unet = arch["unet"]
    config.model.vae = arch["vae"]
    config.model.text_encoder = arch["text_encoder"]
    config.model.lora_rank = LORA_RANK
    config.model.lora_alpha = LORA_ALPHA
    config.model.fake_score_groups = FAKE_SCORE_GROUPS
    config.lpips.random_seed = LPIPS_SEED
    config.train.batch_size = BATCH
    config.data.crop_size = HR_SIZE
    return config


def make_images() -> tuple[Any, Any]:
    """(lq, hq) float32 (BATCH, HR, HR, 3) in [-1, 1]: sample photographs and their x4 bicubic down-up copies."""
    import numpy as np
    from PIL import Image

    from tadsr_jax.data.samples import TRAIN_SAMPLES, sample_image

    hq, lq = [], []
    for name in TRAIN_SAMPLES[:BATCH]:
        image = sample_image(name, HR_SIZE)
        low = image.resize((HR_SIZE // 4, HR_SIZE // 4), Image.BICUBIC).resize((HR_SIZE, HR_SIZE), Image.BICUBIC)
        hq.append(np.asarray(image, np.float32) / 127.5 - 1)
        lq.append(np.asarray(low, np.float32) / 127.5 - 1)
    return np.stack(lq), np.stack(hq)


# ------------------------------------------------------------------------------------------------ weights


def prepare(folder: str) -> None:
    """Write the SD folder, the LPIPS weights (PyTorch layout) and the LoRA target names, atomically."""
    from flax import nnx
    from safetensors.numpy import save_file

    from tadsr_jax.method.lora_targets import unet_lora_groups, vae_encoder_lora_targets
    from tadsr_jax.models.unet import UNet2DConditionModel, UNetConfig
    from tadsr_jax.models.vae import AutoencoderKL, VAEConfig
    from tadsr_jax.weights.convert import state_to_torch
    from tadsr_jax.weights.lpips import random_lpips
    from tadsr_jax.weights.tiny import write_random_sd_folder

    arch = architectures()

    def fill(staging: str) -> None:
        write_random_sd_folder(
            staging, unet=arch["unet"], vae=arch["vae"], text_encoder=arch["text_encoder"], seed=WEIGHTS_SEED
        )
        save_file(
            state_to_torch(random_lpips(LPIPS_SEED)), os.path.join(staging, LPIPS_FILE), metadata={"format": "pt"}
        )
        unet = nnx.eval_shape(lambda: UNet2DConditionModel(UNetConfig.from_dict(arch["unet"]), rngs=nnx.Rngs(0)))
        vae = nnx.eval_shape(lambda: AutoencoderKL(VAEConfig.from_dict(arch["vae"]), time_aware=True, rngs=nnx.Rngs(0)))
        meta = {
            "unet_lora_groups": unet_lora_groups(unet),
            "vae_lora_targets": vae_encoder_lora_targets(vae),
            "architectures": arch,
        }
        common.write_result(os.path.join(staging, META_FILE), meta)

    common.write_folder(folder, fill)


def ensure_weights(cache_dir: str | None = None) -> str:
    folder = weights_folder(cache_dir)
    return common.ensure_weights(folder, WORKER, META_FILE, f"bench train: writing random weights to {folder} (once)")


# ---------------------------------------------------------------------------------------------------- ours


def run_ours(folder: str, steps: int, warmup: int, profile_steps: str = "0") -> dict[str, Any]:
    import jax
    import numpy as np

    from tadsr_jax import parallel
    from tadsr_jax.train.loop import build

    # Compilation is part of what is measured: never take the step from a persistent cache.
    jax.config.update("jax_enable_compilation_cache", False)
    config = bench_config(folder)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tadsr_bench_workdir_") as workdir:
        trainer = build(config, workdir)
    jax.block_until_ready((trainer.state, trainer.frozen, trainer.rest, trainer.neg_context))
    build_s = time.perf_counter() - start

    lq, hq = make_images()
    batch = parallel.global_batch(
        {"lq": lq, "hq": hq, "input_ids": trainer.tokenize([PROMPT] * BATCH)}, trainer.batch_sharding
    )
    start = time.perf_counter()
    traced = trainer.step_fn.trace(trainer.state, trainer.frozen, trainer.rest, batch, trainer.neg_context)
    lowered = traced.lower()
    lower_s = time.perf_counter() - start
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    step_flops = matmul_flops(traced)

    box = {"state": trainer.state, "metrics": None}

    def call():
        box["state"], box["metrics"] = compiled(box["state"], trainer.frozen, trainer.rest, batch, trainer.neg_context)
        return box["state"], box["metrics"]

    timing = common.time_calls(call, steps=steps, warmup=warmup)
    metrics = {k: float(np.asarray(v)) for k, v in box["metrics"].items()}  # of the step torch's are compared to
    profile = op_profile.profile(call, compiled.as_text(), int(profile_steps)) if int(profile_steps) else None
    peak = common.measure_matmul_peak("float32")
    return {
        "timing": timing.as_dict(),
        "build_s": build_s,
        "lower_s": lower_s,
        "compile_s": compile_s,
        "step_flops": step_flops,
        "peak_flops": peak,
        "metrics": metrics,
        "op_profile": profile,
        "devices": [str(d) for d in jax.devices()],
        "backend": jax.default_backend(),
        "trainable": {
            "generator": _count(trainer.state.generator),
            "fake_score": _count(trainer.state.fake_score),
            "frozen": _count(trainer.frozen),
        },
    }


def _count(tree) -> int:
    import jax
    import numpy as np

    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# --------------------------------------------------------------------------------------------------- torch


def _torch_lpips(path: str):
    """lpips.LPIPS(net='vgg') (torchvision-free, see torch_reference) loaded with our random LPIPS weights."""
    from safetensors.torch import load_file

    from benchmarks.torch_reference import lpips_torch

    model = lpips_torch()
    tensors = load_file(path)
    state = {}
    for s in range(1, 6):
        for name, _ in getattr(model.net, f"slice{s}").named_parameters():
            state[f"net.slice{s}.{name}"] = tensors.pop(f"features.{name}")
    for k in range(5):
        state[f"lin{k}.model.1.weight"] = tensors.pop(f"lin{k}.model.1.weight")
    if tensors:
        raise common.BenchmarkError(f"{path}: LPIPS tensors not used by the lpips package: {sorted(tensors)[:3]}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    # `lins.k` are the same modules as `lin{k}`; the scaling layer's constants are buffers of the package.
    missing = [m for m in missing if not m.startswith(("scaling_layer.", "lins."))]
    if missing or unexpected:
        raise common.BenchmarkError(f"lpips package: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval().requires_grad_(False)


class _Adapters:
    """PEFT-style LoRA on plain torch layers through forward hooks: y + scale * B(A(x)) for active adapters.

    Linear: A, B Linear without bias. Conv2d: A a conv with the base kernel, stride, padding and dilation, B
    a 1x1 conv. A ~ N(0, (1/r)^2), B = 0, scale = alpha / r, exactly as PEFT's gaussian init.
    """

    def __init__(self, rank: int, alpha: float):
        self.rank, self.scale = rank, alpha / rank
        self.active: frozenset[str] = frozenset()
        self.params: dict[str, list] = {}

    def add(self, module, adapter: str) -> None:
        import torch

        if isinstance(module, torch.nn.Linear):
            a = torch.nn.Linear(module.in_features, self.rank, bias=False)
            b = torch.nn.Linear(self.rank, module.out_features, bias=False)
        elif isinstance(module, torch.nn.Conv2d):
            a = torch.nn.Conv2d(
                module.in_channels,
                self.rank,
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                bias=False,
            )
            b = torch.nn.Conv2d(self.rank, module.out_channels, 1, bias=False)
        else:
            raise common.BenchmarkError(f"LoRA target {type(module).__name__} is neither Linear nor Conv2d")
        torch.nn.init.normal_(a.weight, std=1.0 / self.rank)
        torch.nn.init.zeros_(b.weight)
        if not hasattr(module, "_bench_lora"):
            module._bench_lora = {}
            module.register_forward_hook(self._hook)
        module._bench_lora[adapter] = (a, b)
        self.params.setdefault(adapter, []).extend([a.weight, b.weight])

    def add_targets(self, root, names, adapter: str) -> None:
        modules = dict(root.named_modules())
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise common.BenchmarkError(f"LoRA target {unknown[0]!r} is not a module of {type(root).__name__}")
        for name in names:
            self.add(modules[name], adapter)

    def _hook(self, module, inputs, output):
        for name, (a, b) in module._bench_lora.items():
            if name in self.active:
                output = output + self.scale * b(a(inputs[0]))
        return output

    @contextlib.contextmanager
    def use(self, names):
        previous, self.active = self.active, frozenset(names)
        try:
            yield
        finally:
            self.active = previous


def _gaussian_blur(images, t):
    """Blur_t per sample with torchvision GaussianBlur semantics: k x k kernel, reflect padding (SPEC 3.2)."""
    import torch
    import torch.nn.functional as F

    out = []
    channels = images.shape[1]
    for i in range(images.shape[0]):
        ti = int(t[i])
        k, sigma = 5 + 4 * (ti // 200), 1.0 + ti / 200.0
        x = torch.linspace(-(k - 1) * 0.5, (k - 1) * 0.5, k)
        pdf = torch.exp(-0.5 * (x / sigma) ** 2)
        k1 = pdf / pdf.sum()
        kernel = (k1[:, None] * k1[None, :]).expand(channels, 1, k, k).to(images.dtype)
        padded = F.pad(images[i : i + 1], [k // 2] * 4, mode="reflect")
        out.append(F.conv2d(padded, kernel, groups=channels))
    return torch.cat(out)


class _TorchTADSR:
    """The reference train step on the diffusers/transformers/lpips modules, weights from `folder`."""

    def __init__(self, folder: str, seed: int = 0):
        import numpy as np
        import torch
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        from benchmarks.torch_reference import load_time_vae

        torch.manual_seed(seed)
        with open(os.path.join(folder, META_FILE)) as f:
            meta = json.load(f)
        self.unet = UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")).requires_grad_(False)
        self.vae, time = load_time_vae(os.path.join(folder, "time_vae"))
        # The time layers are trained in full: real parameters next to the stock encoder's modules.
        self.time = {k: torch.nn.Parameter(v) for k, v in time.items()}
        self.vae.requires_grad_(False)
        self.text = CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder")).requires_grad_(False).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
        self.lpips = _torch_lpips(os.path.join(folder, LPIPS_FILE))
        self.unet.eval()
        self.vae.eval()

        # LoRA: generator groups on the UNet (their conv_in LoRA goes to the student's own conv_in copy),
        # VAE encoder targets, fake-score groups on the same UNet; teacher = no adapter.
        self.adapters = _Adapters(LORA_RANK, LORA_ALPHA)
        groups = meta["unet_lora_groups"]
        self.student_conv_in = copy.deepcopy(self.unet.conv_in).requires_grad_(True)
        for group, names in groups.items():
            self.adapters.add_targets(self.unet, [n for n in names if n != "conv_in"], f"gen_{group}")
        self.adapters.add(self.student_conv_in, "gen_encoder")
        self.adapters.add_targets(self.vae, meta["vae_lora_targets"], "gen_vae")
        for group in FAKE_SCORE_GROUPS:
            self.adapters.add_targets(self.unet, groups[group], f"fake_{group}")
        self.student_adapters = [f"gen_{g}" for g in groups] + ["gen_vae"]
        self.fake_adapters = [f"fake_{g}" for g in FAKE_SCORE_GROUPS]
        self.lora_modules = {g: len(n) for g, n in groups.items()} | {"vae": len(meta["vae_lora_targets"])}

        self.gen_params = [p for g in self.student_adapters for p in self.adapters.params[g]]
        self.gen_params += list(self.student_conv_in.parameters()) + list(self.time.values())
        self.fake_params = [p for g in self.fake_adapters for p in self.adapters.params[g]]
        for p in self.gen_params + self.fake_params:
            p.requires_grad_(True)
        adamw = lambda params: torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, eps=ADAM_EPS)
        self.gen_opt, self.fake_opt = adamw(self.gen_params), adamw(self.fake_params)

        betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
        self.alphas = torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32)
        self.t_list = torch.tensor(np.linspace(1, 999, 50).astype(np.int64))
        from configs import tadsr_sd21

        with torch.no_grad():
            self.neg_context = self.text(self._ids([tadsr_sd21.get_config().train.negative_prompt]))[0]
        lq, hq = make_images()
        self.lq = torch.tensor(lq).permute(0, 3, 1, 2).contiguous()
        self.hq = torch.tensor(hq).permute(0, 3, 1, 2).contiguous()
        self.input_ids = self._ids([PROMPT] * BATCH)

    def _ids(self, prompts):
        return self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.text.config.max_position_embeddings,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def _a(self, t):
        return self.alphas[t].view(-1, 1, 1, 1)

    def _encode(self, x, t):
        """docs/method.md 1.1 on diffusers' stock encoder modules -> (mean, logvar)."""
        from benchmarks.torch_reference import time_aware_moments

        return time_aware_moments(self.vae, self.time, x, t)

    def _unet(self, z, t, context, conv_in=None):
        if conv_in is None:
            return self.unet(z, t, encoder_hidden_states=context).sample
        base = self.unet.conv_in
        self.unet.conv_in = conv_in
        try:
            return self.unet(z, t, encoder_hidden_states=context).sample
        finally:
            self.unet.conv_in = base

    def step(self) -> dict[str, float]:
        import torch
        import torch.nn.functional as F

        b = self.lq.shape[0]
        t = self.t_list[torch.randint(0, len(self.t_list), (b,))]
        with torch.no_grad():
            context = self.text(self.input_ids)[0]
        # Generator forward: time-aware encode (sampled), student UNet, x0 rule, frozen decoder.
        with self.adapters.use(self.student_adapters):
            mean, logvar = self._encode(self.lq, t)
            z = (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * SCALING_FACTOR
            residual = self._unet(z, t, context, conv_in=self.student_conv_in)
        x0 = z / self._a(t).sqrt() - residual
        images = self.vae.decode(x0 / SCALING_FACTOR).sample.clamp(-1, 1)
        l2 = F.mse_loss(_gaussian_blur(images, t), _gaussian_blur(self.hq, t))
        lp = self.lpips(images, self.hq).mean()
        vsd = self._ta_vsd(x0, context, t)
        loss = LAMBDA_L2 * l2 + LAMBDA_LPIPS * lp + LAMBDA_VSD * vsd
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.gen_params, MAX_GRAD_NORM)
        self.gen_opt.step()
        self.gen_opt.zero_grad(set_to_none=True)
        # Fake score on the detached generator latent.
        fake = LAMBDA_FAKE * self._fake_loss(x0.detach(), context.detach())
        fake.backward()
        torch.nn.utils.clip_grad_norm_(self.fake_params, MAX_GRAD_NORM)
        self.fake_opt.step()
        self.fake_opt.zero_grad(set_to_none=True)
        return {
            "loss/generator": loss.item(),
            "loss/fake_score": fake.item(),
            "loss/l2": l2.item(),
            "loss/lpips": lp.item(),
            "loss/vsd": vsd.item(),
        }

    def _ta_vsd(self, x0, context, t_g):
        import torch
        import torch.nn.functional as F

        t = torch.floor(0.5 * t_g.float()).long()
        a = self._a(t)
        with torch.no_grad():
            z_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn_like(x0)
            with self.adapters.use(self.fake_adapters):
                eps_fake = self._unet(z_t, t, context)
            x0_fake = (z_t - (1 - a).sqrt() * eps_fake) / a.sqrt()
            with self.adapters.use([]):
                both = self._unet(
                    torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([self.neg_context.expand_as(context), context])
                )
            eps_u, eps_c = both.chunk(2)
            w = (7.5 + t.float() / 200.0).view(-1, 1, 1, 1)
            eps_real = eps_u + w * (eps_c - eps_u)
            x0_real = (z_t - (1 - a).sqrt() * eps_real) / a.sqrt()
            weight = (x0 - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
            grad = (x0_fake - x0_real) / weight
            target = (x0 - grad).detach()
        return F.mse_loss(x0, target)

    def _fake_loss(self, x0, context):
        import torch
        import torch.nn.functional as F

        t = torch.randint(0, 1000, (x0.shape[0],))
        noise = torch.randn_like(x0)
        a = self._a(t)
        z_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with self.adapters.use(self.fake_adapters):
            eps = self._unet(z_t, t, context)
        return F.mse_loss(eps, noise)


def run_torch(folder: str, steps: int, warmup: int, profile_steps: str = "0") -> dict[str, Any]:
    del profile_steps  # a worker option of both sides; the op profile reads XLA's trace, so ours only
    import torch

    torch.set_num_threads(os.cpu_count())
    start = time.perf_counter()
    model = _TorchTADSR(folder)
    build_s = time.perf_counter() - start
    box = {}

    def call():
        box["metrics"] = model.step()

    timing = common.time_calls(call, steps=steps, warmup=warmup, sync=lambda x: x)
    step_flops = None
    try:  # matmul/conv FLOPs (forward and backward) of one more step, as torch counts them
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            model.step()
        step_flops = float(counter.get_total_flops()) or None
    except Exception as e:  # noqa: BLE001 - the count is informative only
        common.progress(f"bench train: torch FLOP count unavailable ({type(e).__name__}: {e})")
    peak = common.measure_torch_matmul_peak("float32")
    count = lambda params: int(sum(p.numel() for p in params))
    return {
        "timing": timing.as_dict(),
        "build_s": build_s,
        "step_flops": step_flops,
        "peak_flops": peak,
        "metrics": box["metrics"],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lora_modules": model.lora_modules,
        "trainable": {"generator": count(model.gen_params), "fake_score": count(model.fake_params)},
    }


# ----------------------------------------------------------------------------------------------- the bench


def run(steps: int = 5, warmup: int = 2, cache_dir: str | None = None, profile_steps: int = 0) -> common.Report:
    """Write (once) the weights, then time ours and torch, each in its own subprocess; return the report.

    `profile_steps` > 0: ours then traces that many more steps and the report adds where they spend their time,
    by op kind (`benchmarks.op_profile`)."""
    folder = ensure_weights(cache_dir)
    args = [f"--folder={folder}", f"--steps={steps}", f"--warmup={warmup}"]
    common.progress(f"bench train: ours (JAX), {warmup} warmup + {steps} timed steps")
    ours = common.run_worker(WORKER, ["--side=ours", *args, f"--profile_steps={profile_steps}"], label="ours (JAX)")
    common.progress(f"bench train: torch eager, {warmup} warmup + {steps} timed steps")
    ref = common.run_worker(WORKER, ["--side=torch", *args], label="torch")

    ours_s, torch_s = ours["timing"]["median_s"], ref["timing"]["median_s"]
    flops, peak = ours["step_flops"], max(ours["peak_flops"], ref["peak_flops"])
    achieved, torch_achieved = flops / ours_s, flops / torch_s
    result = {
        "what": "train",
        "ours_s": ours_s,
        "torch_s": torch_s,
        "speedup": torch_s / ours_s,
        "peak_fraction": achieved / peak,
        "torch_peak_fraction": torch_achieved / peak,
        "compile_s": ours["compile_s"],
        "lower_s": ours["lower_s"],
        "build_s": ours["build_s"],
        "torch_build_s": ref["build_s"],
        "step_flops": flops,
        "torch_counted_step_flops": ref["step_flops"],
        "peak_flops": peak,
        "jax_matmul_peak_flops": ours["peak_flops"],
        "torch_matmul_peak_flops": ref["peak_flops"],
        "ours_flops_per_s": achieved,
        "ours_times_s": ours["timing"]["times_s"],
        "torch_times_s": ref["timing"]["times_s"],
        "steps": steps,
        "warmup": warmup,
        "backend": ours["backend"],
        "devices": len(ours["devices"]),
        "cpu_count": os.cpu_count(),
        "torch_threads": ref["threads"],
        "config": {**summary(), "lora_modules": ref["lora_modules"], "trainable_params": ours["trainable"]},
        "ours_losses": {k: v for k, v in ours["metrics"].items() if k.startswith("loss/")},
        "torch_losses": ref["metrics"],
    }
    rows = [
        ("step time (median)", common.seconds(ours_s), common.seconds(torch_s)),
        ("step time (min)", common.seconds(ours["timing"]["min_s"]), common.seconds(ref["timing"]["min_s"])),
        ("setup (load + build)", common.seconds(ours["build_s"]), common.seconds(ref["build_s"])),
        ("compile (trace + XLA)", common.seconds(ours["compile_s"]), "-"),
        ("FLOP per step (matmul + conv)", common.si(flops, "FLOP"), "-"),
        ("FLOP per step (torch count)", "-", common.si(ref["step_flops"], "FLOP")),
        ("achieved (our FLOP count / time)", common.si(achieved, "FLOP/s"), common.si(torch_achieved, "FLOP/s")),
        ("f32 matmul peak", common.si(ours["peak_flops"], "FLOP/s"), common.si(ref["peak_flops"], "FLOP/s")),
        (
            "fraction of the better peak",
            common.percent(result["peak_fraction"]),
            common.percent(result["torch_peak_fraction"]),
        ),
        (
            "generator loss (last step)",
            f"{ours['metrics']['loss/generator']:.4g}",
            f"{ref['metrics']['loss/generator']:.4g}",
        ),
    ]
    cfg = summary()
    title = (
        f"train step: UNet/VAE {cfg['unet_channels']}, {HR_SIZE}x{HR_SIZE} HR, batch {BATCH}, fp32, "
        f"LoRA r{LORA_RANK}, text {cfg['text_encoder']}, all losses; speedup {result['speedup']:.2f}x"
    )
    if ours["op_profile"]:
        result["op_profile"] = profile = ours["op_profile"]
        rows.append(
            (f"{profile_steps} traced steps, mean (the profiler slows them)", common.seconds(profile["step_s"]), "-")
        )
        rows += [(f"  {kind}", common.seconds(seconds), "-") for kind, seconds in profile["by_kind_s"].items()]
        rows.append(
            (
                f"  convolutions: FLOP/s; time below {common.si(op_profile.SLOW_CONV_FLOPS_PER_S, 'FLOP/s')}",
                f"{common.si(profile['convolution_flop'] / profile['convolution_s'], 'FLOP/s')}; "
                f"{common.seconds(profile['slow_convolution_s'])}",
                "-",
            )
        )
    notes = [f"median of {steps} steps after {warmup} warmup; {os.cpu_count()} CPU cores; weights {folder}"]
    if not ours["metrics"].get("finite", 1.0):
        notes.append("warning: ours reported a non-finite loss (the step then leaves the state unchanged)")
    return common.Report(title=title, header=("", "ours (JAX)", "torch eager"), rows=rows, result=result, notes=notes)


if __name__ == "__main__":
    common.worker_main(sys.argv[1:], WORKER, prepare, {"ours": run_ours, "torch": run_torch}, profile_steps="0")
