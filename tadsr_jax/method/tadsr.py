"""The TADSR model for training: one frozen SD UNet in three roles, the time-aware VAE, and the losses.

Roles share one copy of the frozen weights (docs/method.md 2.3):
- student: UNet + generator LoRA (3 groups) + its own conv_in, trained in full; time-aware VAE encoder with
  LoRA and trainable time layers; frozen decoder.
- teacher: the UNet with no adapter (the pristine SD UNet, its own conv_in).
- fake score: the UNet with its own LoRA (by default the mid-block group only, as the reference effectively
  trains; `fake_score_groups` can enable all three).
Each trainable set is its own variable type, so `nnx.split(model, GENERATOR, FAKE_SCORE, FROZEN)` yields
exactly what each optimizer sees, and the frozen weights are never duplicated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tadsr_jax import prng
from tadsr_jax.diffusion import NoiseSchedule
from tadsr_jax.method import losses
from tadsr_jax.method.generator import generate
from tadsr_jax.method.lora_targets import UNET_GROUPS, unet_lora_groups, vae_encoder_lora_targets
from tadsr_jax.models.clip_text import CLIPTextModel
from tadsr_jax.models.lpips import LPIPS
from tadsr_jax.models.unet import UNet2DConditionModel
from tadsr_jax.models.vae import AutoencoderKL
from tadsr_jax.nn import Conv2d, Linear, ResnetBlock2D, TimestepEmbedding, lora


class GeneratorLoRA(lora.LoRAParam):
    """LoRA factors of the generator (UNet groups and VAE encoder)."""


class GeneratorParam(nnx.Param):
    """Base tensors the generator trains in full: the student's conv_in and the VAE encoder's time layers."""


class FakeScoreLoRA(lora.LoRAParam):
    """LoRA factors of the fake-score network."""


GENERATOR = nnx.Any(GeneratorLoRA, GeneratorParam)
FAKE_SCORE = FakeScoreLoRA
FROZEN = nnx.All(nnx.Param, nnx.Not(nnx.Any(GeneratorLoRA, GeneratorParam, FakeScoreLoRA)))

# Adapter names as in the reference checkpoint (`<module>.lora_A.<adapter>.weight`).
GENERATOR_ADAPTERS = tuple(f"default_{g}" for g in UNET_GROUPS)
VAE_ADAPTER = "default_encoder"


def fake_adapter(group: str) -> str:
    return f"fake_{group}"


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss weights and TA-VSD settings (docs/method.md 3.1-3.2), built from `config.loss` (the paper's values:
    configs/tadsr_sd21.py)."""

    l2: float
    lpips: float
    vsd: float
    fake: float
    teacher_scale: float  # lambda: t_teacher = floor(lambda t + gamma)
    teacher_shift: float  # gamma
    cfg_base: float
    cfg_per_step: float


def _retype(layer: Linear | Conv2d, variable_type: type[nnx.Param]) -> None:
    layer.kernel = variable_type(layer.kernel[...])
    if layer.bias is not None:
        layer.bias = variable_type(layer.bias[...])


class TADSR(nnx.Module):
    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        lpips: LPIPS | None,
        *,
        rank: int = 4,
        alpha: float = 8.0,
        fake_score_groups: Sequence[str] = ("others",),
        rngs: nnx.Rngs,
    ):
        if not vae.encoder.time_aware:
            raise ValueError("TADSR needs the time-aware VAE (load_vae(..., time_aware=True))")
        unknown = set(fake_score_groups) - set(UNET_GROUPS)
        if unknown:
            raise ValueError(f"fake_score_groups: unknown group {sorted(unknown)[0]!r} (groups: {UNET_GROUPS})")
        self.unet, self.vae, self.text_encoder, self.lpips = unet, vae, text_encoder, lpips
        self.fake_adapters = tuple(fake_adapter(g) for g in fake_score_groups)

        # The student's own conv_in starts as a copy of the base one and is trained in full; it carries
        # the encoder group's conv_in LoRA, the base conv_in keeps serving teacher and fake score.
        self.student_conv_in = nnx.clone(unet.conv_in)
        _retype(self.student_conv_in, GeneratorParam)
        groups = unet_lora_groups(unet)
        for group, targets in groups.items():
            student_targets = [t for t in targets if t != "conv_in"]
            lora.add_adapter(
                unet, f"default_{group}", GeneratorLoRA, student_targets, rank=rank, alpha=alpha, rngs=rngs
            )
        lora.add_adapter(
            self.student_conv_in, "default_encoder", GeneratorLoRA, [""], rank=rank, alpha=alpha, rngs=rngs
        )
        for group in fake_score_groups:
            lora.add_adapter(unet, fake_adapter(group), FakeScoreLoRA, groups[group], rank=rank, alpha=alpha, rngs=rngs)

        lora.add_adapter(
            vae, VAE_ADAPTER, GeneratorLoRA, vae_encoder_lora_targets(vae), rank=rank, alpha=alpha, rngs=rngs
        )
        for _, module in nnx.iter_modules(vae.encoder):
            if isinstance(module, TimestepEmbedding):
                _retype(module.linear_1, GeneratorParam)
                _retype(module.linear_2, GeneratorParam)
            elif isinstance(module, ResnetBlock2D) and module.time_emb_proj is not None:
                _retype(module.time_emb_proj, GeneratorParam)
        # The VAE and the student conv_in only ever run as the generator.
        lora.set_active_adapters(vae, [VAE_ADAPTER])
        lora.set_active_adapters(self.student_conv_in, ["default_encoder"])
        lora.set_active_adapters(unet, [])

    def student(
        self,
        schedule: NoiseSchedule,
        lq: jax.Array,
        t: jax.Array,
        context: jax.Array,
        key: jax.Array,
        *,
        sample_posterior: bool = True,
    ) -> tuple[jax.Array, jax.Array]:
        with lora.active_adapters(self.unet, GENERATOR_ADAPTERS):
            return generate(
                self.vae,
                self.unet,
                schedule,
                lq,
                t,
                context,
                key,
                conv_in=self.student_conv_in,
                sample_posterior=sample_posterior,
            )

    def fake_score(self, z_t: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
        with lora.active_adapters(self.unet, self.fake_adapters):
            return self.unet(z_t, t, context)

    def teacher(self, z_t: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
        with lora.active_adapters(self.unet, []):
            return self.unet(z_t, t, context)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GeneratorOutputs:
    x0: jax.Array  # generator latent (B, h, w, 4)
    images: jax.Array  # SR images in [-1, 1]
    context: jax.Array  # positive prompt embeddings
    losses: dict[str, jax.Array]


def generator_loss(
    model: TADSR,
    schedule: NoiseSchedule,
    batch: dict[str, jax.Array],
    neg_context: jax.Array,
    student_t: jax.Array,
    key: jax.Array,
    cfg: LossConfig,
) -> tuple[jax.Array, GeneratorOutputs]:
    """L2 (timestep-blurred) + LPIPS + TA-VSD for one batch; `student_t` (B,) are the generator timesteps.

    `batch` holds `lq`, `hq` (B,H,W,3) in [-1, 1] and `input_ids` (B, T); `neg_context` is the negative
    prompt's embedding (1, T, D), used only by the teacher's classifier-free guidance. `key` is one key, or one per
    row (B,): then each row's noise comes from its own key (`tadsr_jax.prng`).

    The frozen text encoder runs here, inside the jitted step, on token ids from the input pipeline: prompts
    differ per example, CLIP costs a few percent of the step, and the step stays a pure function of the batch
    (no host round trip, no embedding cache to keep consistent across hosts). The constant negative prompt is
    embedded once, outside.
    """
    k_post, k_noise = prng.split(key)
    context = jax.lax.stop_gradient(model.text_encoder(batch["input_ids"]))
    x0, images = model.student(schedule, batch["lq"], student_t, context, k_post)
    terms = {"l2": losses.blurred_mse(images, batch["hq"], student_t)}
    if cfg.lpips:
        if model.lpips is None:
            raise ValueError("the LPIPS loss weight is non-zero but no LPIPS network was given")
        terms["lpips"] = jnp.mean(model.lpips(images, batch["hq"]))
    if cfg.vsd:
        terms["vsd"] = _ta_vsd(model, schedule, x0, context, neg_context, student_t, k_noise, cfg)
    weights = {"l2": cfg.l2, "lpips": cfg.lpips, "vsd": cfg.vsd}
    total = sum(weights[name] * value for name, value in terms.items())
    return total, GeneratorOutputs(x0, images, context, terms)


def _ta_vsd(
    model: TADSR,
    schedule: NoiseSchedule,
    x0: jax.Array,
    context: jax.Array,
    neg_context: jax.Array,
    student_t: jax.Array,
    key: jax.Array,
    cfg: LossConfig,
) -> jax.Array:
    t = losses.teacher_timestep(student_t, cfg.teacher_scale, cfg.teacher_shift)
    noise = prng.normal(key, x0.shape, jnp.float32)
    z_t = jax.lax.stop_gradient(schedule.add_noise(x0, noise, t))
    eps_fake = model.fake_score(z_t, t, context).astype(jnp.float32)
    b = x0.shape[0]
    both = model.teacher(
        jnp.concatenate([z_t, z_t]),
        jnp.concatenate([t, t]),
        jnp.concatenate([jnp.broadcast_to(neg_context, context.shape), context]),
    )
    eps_uncond, eps_cond = jnp.split(both.astype(jnp.float32), [b])
    eps_real = losses.classifier_free_guidance(
        eps_uncond, eps_cond, losses.guidance_scale(t, cfg.cfg_base, cfg.cfg_per_step)
    )
    return losses.distribution_matching_loss(
        x0, schedule.eps_to_x0(z_t, eps_fake, t), schedule.eps_to_x0(z_t, eps_real, t)
    )


def fake_score_loss(
    model: TADSR, schedule: NoiseSchedule, x0: jax.Array, context: jax.Array, key: jax.Array
) -> jax.Array:
    """eps-prediction loss of the fake score on the detached generator latent, its own t ~ U{0..999}; `key` as in
    `generator_loss`."""
    k_t, k_noise = prng.split(key)
    x0, context = jax.lax.stop_gradient(x0), jax.lax.stop_gradient(context)
    t = prng.randint(k_t, (x0.shape[0],), 0, schedule.num_timesteps)
    noise = prng.normal(k_noise, x0.shape, jnp.float32)
    eps = model.fake_score(schedule.add_noise(x0, noise, t), t, context).astype(jnp.float32)
    return jnp.mean(jnp.square(eps - noise))
