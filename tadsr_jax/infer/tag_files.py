"""What launch/tag.py runs: DAPE tags for a training set, as a captions file or a paired list.

The tagger sees each HR image (in [0, 1], resized to its 384x384 as at inference): training prompts describe
the target, as the reference's training tags its ground truth. Output lines:
- captions file (`data.captions`, read by `data.source=hr_folder`): `relative/name<TAB>tags`;
- paired list (`data.source=paired_list`), given an LR folder holding the same relative names: `HR_path LR_path
  tags`, HR first as our reader (and the reference's training) expects, paths relative to the list's folder.
A bad image or a missing LR costs one line; the file is written atomically once every image is tagged.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import TextIO

from tqdm import tqdm

from tadsr_jax import storage
from tadsr_jax.data.sources import list_images
from tadsr_jax.images import ImageError, read_rgb
from tadsr_jax.infer.tagger import Tagger


@dataclasses.dataclass
class TagReport:
    lines: list[str] = dataclasses.field(default_factory=list)
    failed: list[str] = dataclasses.field(default_factory=list)  # one line each: "<path>: <problem>"

    def summary(self) -> dict:
        return {"tagged": len(self.lines), "failed": len(self.failed)}


def _list_path(path: str, list_folder: str) -> str:
    """A path as the paired list holds it: relative to the list's folder (URLs as they are)."""
    return path if storage.is_url(path) else os.path.relpath(storage.absolute(path), list_folder)


def _line(name: str, hr_folder: str, lr_folder: str, list_folder: str, tags: str) -> str:
    if not lr_folder:
        return f"{name}\t{tags}"
    hr, lr = (_list_path(os.path.join(folder, name), list_folder) for folder in (hr_folder, lr_folder))
    return f"{hr} {lr} {tags}"


def _check_pair(name: str, hr_folder: str, lr_folder: str, list_folder: str) -> None:
    """ImageError when the pair cannot be listed: its LR is missing, or a path holds whitespace."""
    if not lr_folder:
        return
    lr = os.path.join(lr_folder, name)
    if not storage.isfile(lr):
        raise ImageError(os.path.join(hr_folder, name), f"no LR image {lr}")
    for path in (os.path.join(hr_folder, name), lr):
        if any(c.isspace() for c in _list_path(path, list_folder)):
            raise ImageError(path, "the path holds whitespace, which a paired list cannot")


def tag_folder(
    tagger: Tagger,
    hr_folder: str,
    output: str,
    *,
    lr_folder: str = "",
    batch_size: int = 1,
    log: TextIO = sys.stderr,
) -> TagReport:
    """Tags every image under `hr_folder` (recursive) and writes `output` (see the module docstring)."""
    if not storage.isdir(hr_folder):
        raise ValueError(f"{hr_folder}: image folder does not exist")
    if lr_folder and not storage.isdir(lr_folder):
        raise ValueError(f"{lr_folder}: LR folder does not exist")
    names = list_images(hr_folder)
    if not names:
        raise ValueError(f"{hr_folder}: no image files")
    list_folder = os.path.dirname(storage.absolute(output))
    storage.makedirs(list_folder)  # before the tagging, so that a folder that cannot be made costs no work
    report = TagReport()
    batch: list[tuple[str, object]] = []

    def flush() -> None:
        if batch:
            tags = tagger([pixels for _, pixels in batch])
            report.lines += [_line(n, hr_folder, lr_folder, list_folder, t) for (n, _), t in zip(batch, tags)]
            bar.update(len(batch))
            batch.clear()

    bar = tqdm(total=len(names), unit="img", desc="tagging", file=log)
    for name in names:
        try:
            _check_pair(name, hr_folder, lr_folder, list_folder)
            batch.append((name, read_rgb(os.path.join(hr_folder, name)).pixels / 255.0))
        except ImageError as e:
            report.failed.append(str(e))
            tqdm.write(f"error: {e}", file=log)
            bar.update(1)
            continue
        if len(batch) == batch_size:
            flush()
    flush()
    bar.close()
    storage.atomic_write_text(output, "".join(line + "\n" for line in report.lines))
    return report
