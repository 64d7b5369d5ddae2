"""The super-resolution network: SD weights plus a trained TADSR generator, LoRA merged, in the serving dtype.

Generator weights come from one of three places: the reference release (`tadsr.pkl`, docs/method.md 2.4), our
safetensors export (`tadsr_jax.method.official.save_generator`), or a training workdir's latest checkpoint.
The timesteps the generator was trained at come with the weights where recorded (a workdir's checkpoints and
our exports; the reference's tadsr.pkl has none), so that a run asked for others can say so. They are loaded onto a
`TADSR` model in float32, its LoRA factors are folded into the kernels (W + scale B A,
docs/method.md 2.2) and the student's conv_in replaces the UNet's, so inference runs plain SD networks with no
adapter overhead; only then is everything cast to the serving dtype, one parameter at a time. The text encoder has
no adapter and is loaded in the serving dtype directly, so a bfloat16 load peaks below a float32 one.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tadsr_jax import runtime, storage
from tadsr_jax.checkpoints import Checkpointer, CheckpointError
from tadsr_jax.diffusion import NoiseSchedule
from tadsr_jax.method.tadsr import GENERATOR, GENERATOR_ADAPTERS, TADSR, VAE_ADAPTER
from tadsr_jax.models.clip_text import CLIPTextModel
from tadsr_jax.models.unet import UNet2DConditionModel
from tadsr_jax.models.vae import AutoencoderKL
from tadsr_jax.nn import lora
from tadsr_jax.weights.convert import WeightsError
from tadsr_jax.weights.loaders import load_networks

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class SRModel:
    """Plain SD networks with the generator merged in; `unet.conv_in` is the student's."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL  # time-aware encoder with its LoRA merged
    text_encoder: CLIPTextModel
    tokenizer: object  # transformers CLIPTokenizer
    schedule: NoiseSchedule
    trained_timesteps: list[int] | None = None  # [lowest, highest] trained student timestep, None: not recorded


@dataclasses.dataclass(frozen=True)
class WeightsSource:
    """Where the generator comes from: at most one of the three fields (none: untrained adapters, whose merge
    leaves the SD weights as they are; benchmarks and tests)."""

    tadsr_ckpt: str = ""  # the reference's tadsr.pkl (needs torch)
    generator: str = ""  # our safetensors export
    workdir: str = ""  # a training workdir: its latest checkpoint

    def __post_init__(self):
        given = [name for name, value in dataclasses.asdict(self).items() if value]
        if len(given) > 1:
            raise ValueError(f"give one source of generator weights, got {', '.join(given)}")

    @property
    def given(self) -> bool:
        return any(dataclasses.asdict(self).values())

    def describe(self) -> str:
        return (
            (self.tadsr_ckpt and f"reference checkpoint {self.tadsr_ckpt}")
            or (self.generator and f"generator export {self.generator}")
            or (self.workdir and f"latest checkpoint of {self.workdir}")
            or "untrained adapters"
        )


def build_tadsr(
    pretrained: str, model_config: ml_collections.ConfigDict, *, fake_score_groups=(), text_encoder_dtype=jnp.float32
) -> tuple:
    """(TADSR in float32 with freshly initialised adapters, tokenizer, schedule) on the SD folder `pretrained`.

    The text encoder alone is in `text_encoder_dtype`: it carries no adapter, so it needs no float32 copy for a
    merge, and serving loads it in its own dtype (a quarter of SD-2.1's weights: a lower bfloat16 peak).
    """
    nets = load_networks(pretrained, dtype=jnp.float32, text_encoder_dtype=text_encoder_dtype)
    model = TADSR(
        nets.unet,
        nets.vae,
        nets.text_encoder,
        None,
        rank=model_config.lora_rank,
        alpha=model_config.lora_alpha,
        fake_score_groups=tuple(fake_score_groups),
        rngs=nnx.Rngs(0),
    )
    return model, nets.tokenizer, nets.schedule


def load_generator_weights(model: TADSR, source: WeightsSource, config: ml_collections.ConfigDict) -> list[int] | None:
    """Fill `model`'s generator (LoRA factors, student conv_in, VAE time layers) from `source`, in place;
    returns the [lowest, highest] timestep it was trained at where the source records it."""
    if source.tadsr_ckpt or source.generator:
        from tadsr_jax.method import official

        path = source.tadsr_ckpt or source.generator
        if not storage.isfile(path):
            raise WeightsError(f"{path}: no such file")
        if source.tadsr_ckpt:
            official.load_reference_checkpoint(model, path)
            return None
        metadata = official.load_generator(model, path).get("metadata")
        return metadata.get("trained_timesteps") if isinstance(metadata, dict) else None
    if source.workdir:
        generator, trained = restore_generator(model, source.workdir, config)
        nnx.update(model, generator)
        return trained
    return None


def restore_generator(model: TADSR, workdir: str, config: ml_collections.ConfigDict) -> tuple[nnx.State, list | None]:
    """The generator state of `workdir`'s newest intact training checkpoint (one device, float32, as training
    keeps it) and the timesteps it was trained at (None for checkpoints saved before they were recorded). Only the
    generator is read: no optimizer is built and the fake score and optimizer states stay on disk."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = {
        "generator": jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=device), nnx.state(model, GENERATOR)
        )
    }
    checkpointer = Checkpointer(workdir, keep=config.train.keep_checkpoints, async_save=False)
    try:
        restored = checkpointer.restore_latest(abstract, partial=True)
        if restored is None:
            raise WeightsError(f"{workdir}: no training checkpoint (run launch/train.py with this workdir first)")
        step, state = restored
        return state["generator"], checkpointer.metadata(step).get("trained_timesteps")
    except CheckpointError as e:
        raise WeightsError(str(e)) from None
    finally:
        checkpointer.close()


def merge_generator(model: TADSR) -> None:
    """Fold every generator adapter into its base kernel and make the student's conv_in the UNet's own; the fake
    score's adapters (a workdir checkpoint's), which inference never runs, are dropped."""
    lora.merge_adapters(model.unet, GENERATOR_ADAPTERS)
    lora.merge_adapters(model.student_conv_in, ["default_encoder"])
    lora.merge_adapters(model.vae, [VAE_ADAPTER])
    lora.remove_adapters(model.unet, model.fake_adapters)
    model.unet.conv_in = model.student_conv_in


def cast(module: nnx.Module, dtype) -> None:
    """Every parameter of `module` to `dtype`, in place (the models compute in their kernels' dtype).

    One parameter at a time: each float32 array is released as soon as its copy exists, so casting holds the
    network once plus one parameter, not twice (a whole-state cast peaked at float32 + bfloat16 copies).
    """
    for _, variable in nnx.iter_graph(module):
        if isinstance(variable, nnx.Param) and variable[...].dtype != dtype:
            variable.set_value(variable[...].astype(dtype))


def serving_dtype(config: ml_collections.ConfigDict):
    """The jnp dtype of `config.sr.dtype`; ValueError if it is not one of DTYPES."""
    if config.sr.dtype not in DTYPES:
        raise ValueError(f"sr.dtype must be one of {', '.join(DTYPES)}, got {config.sr.dtype!r}")
    return DTYPES[config.sr.dtype]


def load_sr_model(config: ml_collections.ConfigDict, pretrained: str, source: WeightsSource) -> SRModel:
    """SD folder `pretrained` + the generator from `source`, merged, cast to `config.sr.dtype`."""
    dtype = serving_dtype(config)
    # A workdir checkpoint holds the fake score too: build the model it was trained with.
    groups = config.model.fake_score_groups if source.workdir else ()
    model, tokenizer, schedule = build_tadsr(
        pretrained, config.model, fake_score_groups=groups, text_encoder_dtype=dtype
    )
    trained = load_generator_weights(model, source, config)
    merge_generator(model)
    for network in (model.unet, model.vae, model.text_encoder):
        cast(network, dtype)
    runtime.release_free_memory()
    return SRModel(
        unet=model.unet,
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=tokenizer,
        schedule=schedule,
        trained_timesteps=trained,
    )


def export_generator(config: ml_collections.ConfigDict, pretrained: str, source: WeightsSource, out: str) -> str:
    """Write the generator of `source` to `out`: the reference format for `.pkl`, our export for `.safetensors`."""
    from tadsr_jax.method import official

    if not out.endswith((".pkl", ".safetensors")):
        raise ValueError(f"{out}: the output must end in .pkl (reference format) or .safetensors (ours)")
    groups = config.model.fake_score_groups if source.workdir else ()
    model, _, _ = build_tadsr(pretrained, config.model, fake_score_groups=groups)
    trained = load_generator_weights(model, source, config)
    if out.endswith(".pkl"):
        official.save_reference_checkpoint(model, out)
        return f"wrote {out} (reference tadsr.pkl format) from {source.describe()}"
    metadata = {"source": source.describe(), **({"trained_timesteps": trained} if trained else {})}
    official.save_generator(model, out, metadata=metadata)
    return f"wrote {out} and {out}.json (tadsr-jax generator) from {source.describe()}"
