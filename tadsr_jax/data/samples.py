"""A small offline training set from scikit-image's bundled sample images (tests, CI, the demo).

scikit-image is an optional dependency (extras `demo`/`test`), imported only when these are called. Folders may
be URLs (gs://...): see `tadsr_jax.storage`.
"""

import os
from collections.abc import Sequence

from PIL import Image

from tadsr_jax import storage

SAMPLE_NAMES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "camera",
    "coins",
)
# The demo evaluates on these; offline tiny training never sees them.
HELD_OUT_SAMPLES = ("astronaut", "coffee", "camera")
# Every other single image scikit-image ships (no download): photos, textures, text, microscopy.
TRAIN_SAMPLES = (
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "coins",
    "brick",
    "clock",
    "colorwheel",
    "grass",
    "gravel",
    "moon",
    "page",
    "retina",
    "text",
    "cell",
)


def sample_image(name: str, size: int) -> Image.Image:
    """`skimage.data.<name>()` as RGB, centre-cropped to a square and resized (LANCZOS) to `size` x `size`."""
    import skimage.data
    import skimage.util

    loader = getattr(skimage.data, name, None)
    if not callable(loader):
        raise ValueError(f"skimage.data has no sample image {name!r}")
    image = Image.fromarray(skimage.util.img_as_ubyte(loader())).convert("RGB")
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)


def write_sample_images(folder: str, names: Sequence[str] = SAMPLE_NAMES, size: int = 96) -> list[str]:
    """Saves each named sample image as `<folder>/<name>.png` (RGB, size x size); returns the paths."""
    storage.makedirs(folder)
    paths = []
    for name in names:
        path = os.path.join(folder, f"{name}.png")
        _save_png(sample_image(name, size), path)
        paths.append(path)
    return paths


def _save_png(image: Image.Image, path: str) -> None:
    storage.atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def write_paired_list(
    folder: str,
    names: Sequence[str] = SAMPLE_NAMES,
    size: int = 96,
    scale: int = 4,
    prompts: Sequence[str] | None = None,
) -> str:
    """Writes `hr/<name>.png`, its PIL-bicubic x`scale` downscale `lr/<name>.png`, and `train.txt` with lines
    `hr/<name>.png lr/<name>.png <prompt>` (paths relative to the list; prompt defaults to the name with
    underscores as spaces). Returns the list file's path.
    """
    if size % scale:
        raise ValueError(f"size {size} must be a multiple of scale {scale}")
    if prompts is not None and len(prompts) != len(names):
        raise ValueError(f"got {len(prompts)} prompts for {len(names)} images")
    prompts = prompts if prompts is not None else [name.replace("_", " ") for name in names]
    storage.makedirs(os.path.join(folder, "hr"))
    storage.makedirs(os.path.join(folder, "lr"))
    lines = []
    for name, prompt in zip(names, prompts):
        hr = sample_image(name, size)
        _save_png(hr, os.path.join(folder, "hr", f"{name}.png"))
        _save_png(hr.resize((size // scale, size // scale), Image.BICUBIC), os.path.join(folder, "lr", f"{name}.png"))
        lines.append(f"hr/{name}.png lr/{name}.png {prompt}".rstrip())
    list_path = os.path.join(folder, "train.txt")
    storage.atomic_write_text(list_path, "\n".join(lines) + "\n")
    return list_path
