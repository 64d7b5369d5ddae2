"""Image files in and out: list them, read each as 8-bit RGB, write PNGs atomically; caption files.

A bad input raises `ImageError`, whose message is the single line "<path>: <problem>", so that the caller can
report it and go on with the other files. Whatever can be converted to 8-bit RGB is, and each conversion comes
back as a one-line note. 16-bit grayscale arrives from Pillow as 16-bit samples and is rounded to 8 bits here;
16-bit colour (RGB, RGBA, gray + alpha) PNGs and TIFFs are reduced by Pillow itself while decoding, to the high
byte of each sample (at most one level below rounding).

Inputs and outputs may be local or URLs (gs://...): see `tadsr_jax.storage`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import tempfile
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from tadsr_jax import storage

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

_SIXTEEN_BIT_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# A raw mode ending in ";16" and a byte order has 16 bits per sample (BMP's "BGR;16" is 16 bits per pixel).
_SIXTEEN_BIT_RAW_MODE = re.compile(r";16[BLN]$")
_RGB_MODES = ("RGB", "RGBA", "RGBa", "RGBX")
_CONVERSION_NOTES = {
    "1": "black and white (1-bit) converted to RGB",
    "L": "grayscale converted to RGB",
    "LA": "grayscale converted to RGB",
    "P": "palette converted to RGB",
    "PA": "palette converted to RGB",
    "CMYK": "CMYK converted to RGB",
}
# Exceptions Pillow raises while decoding truncated or corrupt pixel data.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError)


class ImageError(ValueError):
    """A bad input image. Its message is the single line "<path>: <problem>"."""

    def __init__(self, path: str, problem: str):
        self.path = path
        self.problem = " ".join(problem.split())
        super().__init__(f"{path}: {self.problem}")


@dataclasses.dataclass(frozen=True)
class LoadedImage:
    path: str
    pixels: np.ndarray  # (H, W, 3) uint8 RGB, C-contiguous
    notes: tuple[str, ...]  # one line per conversion made, e.g. "alpha channel dropped"


def list_images(path: str) -> list[str]:
    """`[path]` for a file (whatever its extension), else the sorted non-hidden image files directly in `path`."""
    if not storage.isdir(path):
        if not storage.exists(path):
            raise ImageError(path, "no such file or directory")
        return [path]
    try:
        names = storage.listdir(path)
    except OSError as e:
        raise ImageError(path, e.strerror or str(e)) from e
    images = sorted(
        name
        for name in names
        if not name.startswith(".")
        and name.lower().endswith(IMAGE_EXTENSIONS)
        and storage.isfile(os.path.join(path, name))
    )
    if not images:
        raise ImageError(path, f"no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return [os.path.join(path, name) for name in images]


def read_rgb(path: str, *, min_side: int = 8, max_pixels: int = 64_000_000) -> LoadedImage:
    """Decodes `path` completely to 8-bit RGB, or raises ImageError saying what is wrong with it.

    The size limits are checked from the header, before any pixel is decoded. Pillow's own decompression-bomb
    limits apply too, whatever `max_pixels` is: its error above 2 * Image.MAX_IMAGE_PIXELS, and its warning above
    Image.MAX_IMAGE_PIXELS where warnings are errors.
    """
    with contextlib.ExitStack() as opened:
        try:
            if storage.size(path) == 0:
                raise ImageError(path, "empty file (0 bytes)")
            image = opened.enter_context(Image.open(opened.enter_context(storage.open_seekable(path))))
        except UnidentifiedImageError as e:
            raise ImageError(path, "not an image Pillow can read") from e
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(path, f"too large: {e}") from e
        except OSError as e:
            raise ImageError(path, e.strerror or str(e)) from e
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(path, f"too large: {width}x{height} pixels (limit {max_pixels})")
        if min(width, height) < min_side:
            raise ImageError(path, f"too small: {width}x{height} pixels (need at least {min_side}x{min_side})")
        notes = []
        try:
            frames = getattr(image, "n_frames", 1)
            if frames > 1:
                notes.append(f"first of {frames} frames")
            if image.mode in _SIXTEEN_BIT_GRAY_MODES or _has_16_bit_raw_mode(image):
                notes.append("16-bit samples reduced to 8 bits")
            image.load()  # Image.open read only the header: truncated or corrupt pixel data shows here
        except _DECODE_ERRORS as e:
            raise ImageError(path, f"corrupt or truncated data: {e}") from e
        pixels, conversion_notes = _to_rgb(image, path)
    return LoadedImage(path, pixels, tuple(notes + conversion_notes))


def _has_16_bit_raw_mode(image: Image.Image) -> bool:
    """Whether Pillow will decode 16-bit samples into this 8-bit image; only the raw mode of its tiles tells."""
    for tile in image.tile:
        raw_mode = tile.args[0] if isinstance(tile.args, tuple) and tile.args else tile.args  # PNG's is a str
        if isinstance(raw_mode, str) and _SIXTEEN_BIT_RAW_MODE.search(raw_mode):
            return True
    return False


def _to_rgb(image: Image.Image, path: str) -> tuple[np.ndarray, list[str]]:
    notes = []
    if image.getexif().get(ExifTags.Base.Orientation) in range(2, 9):  # 1 is upright
        image = ImageOps.exif_transpose(image)
        notes.append("EXIF orientation applied")
    if image.mode == "F":
        raise ImageError(path, "unsupported mode F (32-bit float)")
    if image.mode in _SIXTEEN_BIT_GRAY_MODES:
        notes.append("grayscale converted to RGB")
        gray = _round_16_to_8_bits(np.asarray(image, dtype=np.int32), path)
        return np.repeat(gray[:, :, np.newaxis], 3, axis=2), notes
    if image.has_transparency_data:
        notes.append("alpha channel dropped")
    if image.mode not in _RGB_MODES:
        notes.append(_CONVERSION_NOTES.get(image.mode, f"{image.mode} converted to RGB"))
    try:
        rgb = image.convert("RGB")
    except ValueError as e:
        raise ImageError(path, f"unsupported mode {image.mode}") from e
    return np.array(rgb), notes


def _round_16_to_8_bits(samples: np.ndarray, path: str) -> np.ndarray:
    if samples.min() < 0 or samples.max() > 0xFFFF:  # only mode I (32-bit) can hold these
        raise ImageError(path, f"unsupported mode I: 32-bit samples outside 0..{0xFFFF}")
    return ((samples + 128) // 257).astype(np.uint8)  # round(x * 255 / 65535), as 65535 = 255 * 257


def write_png_atomic(path: str, pixels: np.ndarray) -> None:
    """Writes `pixels`, uint8 (H, W, 3), as a PNG at `path`, which never holds a partial file.

    The PNG is written to a hidden temporary file in the same directory, synced, and renamed onto `path`; if
    anything fails the temporary file is removed and whatever was at `path` before is left as it was. A URL's
    PNG is uploaded as one object (`storage.atomic_write`).
    """
    if not (
        isinstance(pixels, np.ndarray)
        and pixels.dtype == np.uint8
        and pixels.ndim == 3
        and pixels.shape[2] == 3
        and pixels.size > 0
    ):
        raise ValueError(
            f"pixels must be a non-empty uint8 (H, W, 3) array, got "
            f"{getattr(pixels, 'dtype', type(pixels).__name__)} of shape {np.shape(pixels)}"
        )
    if storage.is_url(path):
        storage.atomic_write(path, lambda tmp: Image.fromarray(pixels).save(tmp, format="PNG"))
        return
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        dir=directory, prefix="." + os.path.basename(path), suffix=".tmp", delete=False
    ) as temporary:
        try:
            Image.fromarray(pixels).save(temporary, format="PNG")
            temporary.flush()
            os.fchmod(temporary.fileno(), _new_file_mode())
            os.fsync(temporary.fileno())
            os.replace(temporary.name, path)
        except BaseException:
            os.unlink(temporary.name)
            raise


def _new_file_mode() -> int:
    """The mode open() gives a new file (0o666 less the umask); NamedTemporaryFile's own is 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def output_path(input_path: str, output_dir: str, suffix: str = "") -> str:
    """`<output_dir>/<input stem><suffix>.png`, e.g. photo.jpg -> out/photo.png."""
    return os.path.join(output_dir, f"{Path(input_path).stem}{suffix}.png")


def read_captions(captions_path: str) -> dict[str, str]:
    """Reads `relative/file/name<TAB>caption` lines; malformed lines are skipped with a warning."""
    captions = {}
    with storage.open_file(captions_path) as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            name, tab, caption = line.partition("\t")
            if not tab:
                logger.warning("%s:%d: skipping caption line without a TAB", captions_path, number)
                continue
            captions[os.path.normpath(name)] = caption.strip()
    return captions
