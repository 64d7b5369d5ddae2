"""Per-example work: decode, random crop, flip, make or (re)size the LR, scale to [-1, 1]. Resampling is PIL's
except inside the Real-ESRGAN degradation (OpenCV)."""

import logging
import threading
from collections.abc import Callable

import grain
import numpy as np
from PIL import Image

from tadsr_jax import storage
from tadsr_jax.data.sources import READ_ERRORS, Record, failure_reason

logger = logging.getLogger(__name__)

# Files whose pixels failed to decode, logged once per process however many epochs hit them again.
_reported: set[str] = set()
_reported_lock = threading.Lock()


def read_rgb(path: str) -> Image.Image:
    """Decodes an image as 8-bit RGB (grayscale, palette and RGBA are converted; alpha is dropped)."""
    with storage.open_seekable(path) as f, Image.open(f) as image:
        if image.mode.startswith("I;16"):  # PIL's convert("RGB") would clip 16-bit grey to white; keep the top byte
            image = Image.fromarray((np.asarray(image, np.uint16) >> 8).astype(np.uint8))
        return image.convert("RGB")


def _read_or_report(path: str) -> Image.Image | None:
    try:
        return read_rgb(path)
    except READ_ERRORS as err:
        with _reported_lock:
            first = path not in _reported
            _reported.add(path)
        if first:
            logger.warning("skipping unreadable image %s: %s", path, failure_reason(path, err))
        return None


def _load(image: str | np.ndarray) -> Image.Image | None:
    """A file path (decoded, None if unreadable) or decoded pixels (HW, HW1, HW3 or HW4 uint8) -> RGB image."""
    if isinstance(image, str):
        return _read_or_report(image)
    pixels = np.asarray(image)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    return Image.fromarray(pixels).convert("RGB")


def bicubic_degrade(image: Image.Image, scale: int) -> Image.Image:
    """PIL bicubic down by `scale`, then bicubic back up to the original size (the reference's synthetic LR)."""
    w, h = image.size
    small = image.resize((w // scale, h // scale), Image.BICUBIC)
    return small.resize((w, h), Image.BICUBIC)


def cover_size(size: tuple[int, int], crop_size: int) -> tuple[int, int]:
    """(w, h) scaled up so the short side is `crop_size`; unchanged if both sides already reach it."""
    w, h = size
    if min(w, h) >= crop_size:
        return w, h
    factor = crop_size / min(w, h)
    return max(crop_size, round(w * factor)), max(crop_size, round(h * factor))


# (HR crop as HWC uint8, rng) -> LR as HWC uint8 at the HR size.
Degradation = Callable[[np.ndarray, np.random.Generator], np.ndarray]


class BicubicDegradation:
    """`bicubic_degrade` as a `Degradation` (it draws nothing from the rng)."""

    def __init__(self, scale: int):
        self.scale = scale

    def __call__(self, hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.asarray(bicubic_degrade(Image.fromarray(hr), self.scale))


def to_float(image: Image.Image | np.ndarray) -> np.ndarray:
    """HWC uint8 RGB -> float32 in [-1, 1] (one float32 buffer, scaled in place)."""
    x = np.array(image, np.float32)
    x *= np.float32(1 / 127.5)
    x -= np.float32(1.0)
    return x


class MakeTrainPair(grain.transforms.RandomMap):
    """Record -> {"hq", "lq", "prompt"} (or None if a file fails to decode; grain drops Nones).

    Paired records: the LR is resized to the HR size with LANCZOS, or, with probability `synthetic_prob`, replaced
    by `bicubic_degrade` of the HR crop (the reference's 1 %). Records without an LR get `degrade` of the HR crop.
    Both images are cropped with the same random window and flipped together; a synthetic LR is made from the final
    (cropped, flipped) HR, as the reference's online Real-ESRGAN dataset does. With `centre` the window is the
    central one (validation sets: the rng then only drives the degradation).
    """

    def __init__(
        self, crop_size: int, scale: int, flip: bool, synthetic_prob: float, degrade: Degradation, centre: bool = False
    ):
        self.crop_size = crop_size
        self.scale = scale
        self.flip = flip
        self.synthetic_prob = synthetic_prob
        self.degrade = degrade
        self.centre = centre

    def random_map(self, record: Record, rng: np.random.Generator) -> dict | None:
        hr = _load(record.hr)
        if hr is None:
            return None
        unpaired = record.lr is None
        synthetic = unpaired or rng.random() < self.synthetic_prob
        images = [hr]
        if not synthetic:
            lr = _load(record.lr)
            if lr is None:
                return None
            images.append(lr.resize(hr.size, Image.LANCZOS))
        size = cover_size(hr.size, self.crop_size)
        if size != hr.size:
            images = [image.resize(size, Image.BICUBIC) for image in images]
        if self.centre:
            left, top = (size[0] - self.crop_size) // 2, (size[1] - self.crop_size) // 2
        else:
            left = int(rng.integers(0, size[0] - self.crop_size + 1))
            top = int(rng.integers(0, size[1] - self.crop_size + 1))
        images = [image.crop((left, top, left + self.crop_size, top + self.crop_size)) for image in images]
        if self.flip and rng.random() < 0.5:
            images = [image.transpose(Image.FLIP_LEFT_RIGHT) for image in images]
        hr = images[0]
        if unpaired:
            lr = self.degrade(np.asarray(hr), rng)
        else:
            lr = bicubic_degrade(hr, self.scale) if synthetic else images[1]
        return {"hq": to_float(hr), "lq": to_float(lr), "prompt": record.prompt}
