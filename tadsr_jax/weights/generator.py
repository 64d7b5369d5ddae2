"""Where a trained generator comes from, and loading it onto a `TADSR` model: shared by inference (`launch/sr.py`,
`launch/convert.py`) and by training that starts from a trained generator (`config.model.init_generator`).

Three sources: the reference release (`tadsr.pkl`, docs/method.md 2.4), our safetensors export
(`official.save_generator`), or a training workdir's newest intact checkpoint. A workdir is read in training's
checkpoint format, which this layer does not import: the caller passes the function that restores it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from flax import nnx

from tadsr_jax import storage
from tadsr_jax.method.tadsr import TADSR
from tadsr_jax.weights import official
from tadsr_jax.weights.convert import WeightsError

# (model, workdir) -> (the generator state of the workdir's newest intact checkpoint, its trained timesteps or None)
WorkdirRestore = Callable[[TADSR, str], tuple[nnx.State, list[int] | None]]


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
        return (self.tadsr_ckpt and f"reference checkpoint {self.tadsr_ckpt}") or (
            self.generator and f"generator export {self.generator}") or (
            self.workdir and f"latest checkpoint of {self.workdir}") or "untrained adapters"


def load_generator_weights(model: TADSR, source: WeightsSource, restore_workdir: WorkdirRestore) -> list[int] | None:
    """Fill `model`'s generator (LoRA factors, student conv_in, VAE time layers) from `source`, in place;
    returns the [lowest, highest] timestep it was trained at where the source records it."""
    if source.workdir:
        generator, trained = restore_workdir(model, source.workdir)
        nnx.update(model, generator)
        return trained
    if not source.given:
        return None
    path = source.tadsr_ckpt or source.generator
    if not storage.isfile(path):
        raise WeightsError(f"{path}: no such file")
    if source.tadsr_ckpt:
        official.load_reference_checkpoint(model, path)
        return None
    metadata = official.load_generator(model, path).get("metadata")
    return metadata.get("trained_timesteps") if isinstance(metadata, dict) else None
