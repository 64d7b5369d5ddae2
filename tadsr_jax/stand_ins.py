"""Offline stand-ins for what a run reads: a tiny SD folder of the config's architectures and training images.

Nothing can be downloaded in CI or on an offline machine, so the tests, the demo and `launch/stand_ins.py` write
these and pass their paths like real ones (`config.model.pretrained`, `config.data.path`). Training never writes
them itself: an empty path is an error there, so that a forgotten flag cannot train on random weights or sample
images.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections

from tadsr_jax import storage
from tadsr_jax.data.samples import TRAIN_SAMPLES, write_sample_images
from tadsr_jax.weights.tiny_sd import write_tiny_sd


@dataclasses.dataclass(frozen=True)
class StandIns:
    """Where the stand-ins are: an SD folder and an image folder (data.source "hr_folder")."""

    pretrained: str
    images: str

    def flags(self) -> list[str]:
        """The launcher flags that point a run at them."""
        return [
            f"--config.model.pretrained={self.pretrained}",
            "--config.data.source=hr_folder",
            f"--config.data.path={self.images}",
        ]

    def apply(self, config: ml_collections.ConfigDict) -> None:
        """Point `config` at them, as `flags()` would."""
        config.model.pretrained = self.pretrained
        config.data.source, config.data.path = "hr_folder", self.images


def write_stand_ins(folder: str, config: ml_collections.ConfigDict) -> StandIns:
    """Write `<folder>/sd` (weights/tiny_sd.py: the config's tiny architectures) and `<folder>/images` (scikit-image
    samples of side `config.data.sample_size`), each only if it is not complete there yet. The SD folder is written
    atomically and each image file too, so an interrupted call leaves nothing that a later one would take as done."""
    stand_ins = StandIns(pretrained=os.path.join(folder, "sd"), images=os.path.join(folder, "images"))
    if not storage.isdir(stand_ins.pretrained):
        write_tiny_sd(stand_ins.pretrained, config.model)
    missing = [name for name in TRAIN_SAMPLES if not storage.isfile(os.path.join(stand_ins.images, f"{name}.png"))]
    if missing:
        write_sample_images(stand_ins.images, missing, size=config.data.sample_size)
    return stand_ins
