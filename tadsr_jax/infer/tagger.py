"""DAPE tags as prompts, as the reference makes them.

The tagger sees the SR working image (the xS bicubic input, in [0, 1]) resized to the model's 384x384 with
bilinear interpolation and no antialiasing (torchvision 0.15's tensor `Resize`), ImageNet-normalised. A tag is on
where sigmoid(logit) > its per-class threshold (RAM's `ram_tag_list_threshold.txt`, float32 as in RAM); the tags
are joined by ", " in the tag list's order, and the prompt is f"{tags}, {user_prompt}," (SeeSR/OSEDiff/TADSR's
`get_validation_prompt`). The tagging pass is jitted, one compilation per batch shape.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tadsr_jax.models.ram import RAMTagger
from tadsr_jax.weights.dape import load_dape

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def ram_tag_data() -> tuple[list[str], np.ndarray]:
    """RAM's 4,585 tag names and their float32 thresholds, from the package data."""
    folder = importlib.resources.files("tadsr_jax") / "data_files" / "ram"
    names = (folder / "ram_tag_list.txt").read_text(encoding="utf-8").splitlines()
    thresholds = np.array((folder / "ram_tag_list_threshold.txt").read_text().split(), np.float32)
    return names, thresholds


def preprocess(images: jax.Array, size: int) -> jax.Array:
    """(B, H, W, 3) in [0, 1] -> (B, size, size, 3): bilinear without antialiasing, ImageNet-normalised."""
    x = jax.image.resize(images, (images.shape[0], size, size, 3), "bilinear", antialias=False)
    return (x - jnp.asarray(IMAGENET_MEAN, x.dtype)) / jnp.asarray(IMAGENET_STD, x.dtype)


def build_prompt(tags: str, user_prompt: str) -> str:
    """The reference's prompt: f"{tags}, {user_prompt},"."""
    return f"{tags}, {user_prompt},"


class Tagger:
    """Working images in [0, 1] -> their tags, ", "-joined strings.

    Images of one SR batch may differ in size (they share a padded shape, not a size), so each is resized on its
    own (a small program per size), and the network runs once on the stacked batch (a program per batch size).
    """

    def __init__(self, model: RAMTagger, names: Sequence[str], thresholds: np.ndarray):
        if not len(names) == len(thresholds) == model.config.num_tags:
            raise ValueError(
                f"tagger: {len(names)} tag names and {len(thresholds)} thresholds for a model of "
                f"{model.config.num_tags} tags"
            )
        self.names, self.thresholds = np.asarray(names, dtype=object), jnp.asarray(thresholds, jnp.float32)
        dtype = model.visual_encoder.norm.scale.dtype
        graphdef, self.state = nnx.split(model)
        size = model.config.swin.image_size

        def on(state, images):
            return jax.nn.sigmoid(nnx.merge(graphdef, state)(images.astype(dtype))) > self.thresholds

        self._preprocess = jax.jit(lambda image: preprocess(image[None].astype(jnp.float32), size)[0])
        self._on = jax.jit(on)

    def _batch(self, images: Sequence[np.ndarray]) -> jax.Array:
        return jnp.stack([self._preprocess(image) for image in images])

    def on(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(H_i, W_i, 3) images in [0, 1] -> (B, num_tags) bool."""
        return np.asarray(self._on(self.state, self._batch(images)))

    def trace(self, images: Sequence[np.ndarray]) -> jax.stages.Traced:
        """The jitted network pass traced for these images (benchmarks count its FLOPs)."""
        return self._on.trace(self.state, self._batch(images))

    def __call__(self, images: Sequence[np.ndarray]) -> list[str]:
        return [", ".join(self.names[row]) for row in self.on(images)]


def load_tagger(path: str, *, dtype=jnp.float32) -> Tagger:
    """A Tagger from a file written by `launch/convert.py --what=dape`, with RAM's tag list and thresholds."""
    return Tagger(load_dape(path, dtype=dtype), *ram_tag_data())
