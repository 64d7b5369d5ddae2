"""Evaluate folders of SR outputs as the paper does: match files to HR references by name, optional centre crops,
full-reference (PSNR/SSIM on Y, LPIPS-VGG, LPIPS-AlexNet, DISTS), no-reference (pyiqa) and per-folder (FID,
pyiqa) metrics, a JSON report, a markdown table laid out like the paper's Table 1, and the fidelity-realism sweep
plot (metrics against the timestep). docs/metrics.md lists every metric, what it needs and how it relates to
pyiqa.

Files are matched by stem: `<sr_dir>/<stem><suffix>.<ext>` with `<hr_dir>/<stem>.<ext>` (any image extension; a
sweep's outputs carry the suffix `_t<T>`). A file that cannot be read, or whose size differs from its reference,
costs one line and the rest is evaluated. Several columns (methods, timesteps) are compared on the same images
only: those scored in every column (`compare`). Folders, weight files and reports may be URLs (gs://...): see
`tadsr_jax.storage`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import Collection, Mapping, Sequence
from typing import TextIO

import numpy as np
from tqdm import tqdm

from tadsr_jax import metrics, storage
from tadsr_jax.images import ImageError, list_images, read_rgb, write_png_atomic


@dataclasses.dataclass(frozen=True)
class MetricInfo:
    label: str  # as in the paper's tables
    higher_is_better: bool
    digits: int
    full_reference: bool
    per_folder: bool = False  # one value for a set of images (FID), not a mean of per-image values


METRICS: dict[str, MetricInfo] = {
    "psnr": MetricInfo("PSNR", True, 3, True),
    "ssim": MetricInfo("SSIM", True, 4, True),
    "lpips": MetricInfo("LPIPS-VGG", False, 4, True),  # not the paper's LPIPS: that is "lpips_alex"
    "lpips_alex": MetricInfo("LPIPS-Alex (paper's LPIPS)", False, 4, True),
    "dists": MetricInfo("DISTS", False, 4, True),
    "fid": MetricInfo("FID", False, 2, True, per_folder=True),
    "clipiqa": MetricInfo("CLIPIQA", True, 4, False),
    "musiq": MetricInfo("MUSIQ", True, 3, False),
    "maniqa": MetricInfo("MANIQA", True, 4, False),
    "topiq": MetricInfo("TOPIQ", True, 4, False),
    "qalign": MetricInfo("Q-Align", True, 4, False),
    "niqe": MetricInfo("NIQE", False, 4, False),
}


@dataclasses.dataclass(frozen=True)
class Pair:
    name: str  # the stem shared by the SR file and its reference
    sr: str
    hr: str | None


@dataclasses.dataclass
class Matching:
    pairs: list[Pair]
    unmatched_sr: list[str]  # SR files without a reference (only when an HR folder is given)
    unmatched_hr: list[str]  # references without an SR file
    duplicates: list[str]  # files whose stem another file of the same folder already has


def _by_stem(folder: str, suffix: str) -> tuple[dict[str, str], list[str], list[str]]:
    """{stem: path} of the folder's images whose stem ends with `suffix` (removed), the others, and duplicates."""
    stems, others, duplicates = {}, [], []
    for path in list_images(folder):
        stem = os.path.splitext(os.path.basename(path))[0]
        if suffix and not stem.endswith(suffix):
            others.append(path)
            continue
        stem = stem[: len(stem) - len(suffix)] if suffix else stem
        if stem in stems:
            duplicates.append(path)
        else:
            stems[stem] = path
    return stems, others, duplicates


def match_files(sr_dir: str, hr_dir: str | None = None, *, suffix: str = "") -> Matching:
    """Pairs SR outputs with references by stem (see the module docstring); without `hr_dir`, every SR file."""
    sr, _, duplicates = _by_stem(sr_dir, suffix)
    if hr_dir is None:
        return Matching([Pair(stem, path, None) for stem, path in sorted(sr.items())], [], [], duplicates)
    hr, _, hr_duplicates = _by_stem(hr_dir, "")
    pairs = [Pair(stem, sr[stem], hr[stem]) for stem in sorted(sr.keys() & hr.keys())]
    return Matching(
        pairs,
        sorted(sr[s] for s in sr.keys() - hr.keys()),
        sorted(hr[s] for s in hr.keys() - sr.keys()),
        duplicates + hr_duplicates,
    )


def center_crop(pixels: np.ndarray, size: int, path: str) -> np.ndarray:
    """The central `size` x `size` window; ImageError when the image is smaller."""
    h, w = pixels.shape[:2]
    if h < size or w < size:
        raise ImageError(path, f"{w}x{h} is smaller than the {size}x{size} centre crop")
    top, left = (h - size) // 2, (w - size) // 2
    return pixels[top : top + size, left : left + size]


NO_REFERENCE_DEFAULT = ("clipiqa", "musiq", "maniqa", "topiq")


def default_metrics(*, reference: bool, weights: Collection[str], log: TextIO = sys.stderr) -> list[str]:
    """PSNR and SSIM, plus each of LPIPS-VGG/LPIPS-Alex/DISTS whose weights are given (`weights`: their metric
    names; a note says how otherwise); without references, the paper's no-reference metrics."""
    if not reference:
        return list(NO_REFERENCE_DEFAULT)
    names = ["psnr", "ssim"]
    for name in metrics.NETWORK_METRICS:
        if name in weights:
            names.append(name)
        else:
            print(f"note: {name} skipped: pass --{name}=FILE (made by launch/convert.py --what={name})", file=log)
    return names


def load_metric_net(kind: str, path: str):
    """The network of metric `kind` (one of metrics.NETWORK_METRICS) from a converted weights file, or None when
    `path` is empty."""
    if not path:
        return None
    if kind in ("lpips", "lpips_alex"):
        from tadsr_jax.weights.lpips import load_lpips

        return load_lpips(path, net="alex" if kind == "lpips_alex" else "vgg")
    from tadsr_jax.weights.dists import load_dists

    return load_dists(path)


class Scorer:
    """The run's metrics. Per image, on batches of same-shape images (float32 NHWC in [0, 1]): `scorer(sr, hr)` ->
    {metric: (B,) float64} for `per_image_names`: full-reference metrics in JAX (LPIPS-VGG, LPIPS-Alex and DISTS
    need their networks), no-reference ones through pyiqa. Per set of images (`folder_names`: FID, through pyiqa):
    `scorer.score_folders(pairs, crop)` -> {metric: float}; `compare` calls it on the images it compares. pyiqa
    must be installed with its weights for the metrics that go through it: asking for one without it is one
    error line, here, before anything is scored."""

    def __init__(self, names: Sequence[str], *, lpips=None, lpips_alex=None, dists=None):
        unknown = [n for n in names if n not in METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
        for name, model in (("lpips", lpips), ("lpips_alex", lpips_alex), ("dists", dists)):
            if name in names and model is None:
                raise ValueError(f"{name} needs its weights: --{name}=FILE (made by launch/convert.py --what={name})")
        self.names = tuple(names)
        self.folder_names = tuple(n for n in self.names if METRICS[n].per_folder)
        self.per_image_names = tuple(n for n in self.names if not METRICS[n].per_folder)
        full = [n for n in self.per_image_names if METRICS[n].full_reference]
        no_reference = [n for n in self.per_image_names if not METRICS[n].full_reference]
        self._full = (
            metrics.FullReferenceMetrics(full, lpips=lpips, lpips_alex=lpips_alex, dists=dists) if full else None
        )
        self._no_reference = metrics.NoReferenceMetrics(no_reference) if no_reference else None
        self._folder = metrics.FolderMetrics(self.folder_names) if self.folder_names else None

    @property
    def reference_metrics(self) -> list[str]:
        """The metrics that need references (`--hr`)."""
        return [n for n in self.names if METRICS[n].full_reference]

    def __call__(self, sr: np.ndarray, hr: np.ndarray | None) -> dict[str, np.ndarray]:
        scores = self._full(sr, hr) if self._full is not None else {}
        if self._no_reference is not None:
            scores.update(self._no_reference(sr))
        return {name: scores[name] for name in self.per_image_names}

    def score_folders(self, pairs: Sequence[Pair], crop: int = 0) -> dict[str, float]:
        """The per-folder metrics of these pairs' SR images against their references, as read for per-image
        scoring (centre-cropped with `crop`): written as PNGs to two temporary local folders (lossless: the
        pixels are 8-bit), which pyiqa then reads. {} when no per-folder metric was asked for."""
        if self._folder is None:
            return {}
        with tempfile.TemporaryDirectory(prefix="tadsr_fid_") as tmp:
            sr_dir, hr_dir = os.path.join(tmp, "sr"), os.path.join(tmp, "hr")
            for pair in pairs:
                sr, hr = _read(pair, crop)
                write_png_atomic(os.path.join(sr_dir, f"{pair.name}.png"), sr)
                write_png_atomic(os.path.join(hr_dir, f"{pair.name}.png"), hr)
            return self._folder(sr_dir, hr_dir)


@dataclasses.dataclass
class Evaluation:
    per_image: dict[str, dict[str, float]]
    failed: list[str]  # one line each: "<path>: <problem>"
    matching: Matching
    per_folder: dict[str, float] = dataclasses.field(default_factory=dict)  # FID, over the images `compare` chose

    def means(self, images: Collection[str] | None = None) -> dict[str, float]:
        """Each per-image metric's mean over `images` (default: every scored image), and the per-folder values."""
        scores = [self.per_image[name] for name in (self.per_image if images is None else images)]
        values = {n: float(np.mean([s[n] for s in scores])) for n in {n for s in scores for n in s}}
        values.update(self.per_folder)
        return {n: values[n] for n in METRICS if n in values}

    def to_json(self, images: Collection[str] | None = None) -> dict:
        """The report of one column; `images`: those its mean is over (default: every scored image)."""
        images = sorted(self.per_image if images is None else images)
        return {
            "mean": self.means(images),
            "images": len(images),
            "per_image": self.per_image,
            "failed": self.failed,
            "unmatched_sr": self.matching.unmatched_sr,
            "unmatched_hr": self.matching.unmatched_hr,
            "duplicates": self.matching.duplicates,
        }


def _read(pair: Pair, crop: int) -> tuple[np.ndarray, np.ndarray | None]:
    images = []
    for path in (pair.sr, pair.hr):
        if path is None:
            images.append(None)
            continue
        pixels = read_rgb(path).pixels
        images.append(center_crop(pixels, crop, path) if crop else pixels)
    sr, hr = images
    if hr is not None and sr.shape != hr.shape:
        raise ImageError(
            pair.sr,
            f"{sr.shape[1]}x{sr.shape[0]} differs from its reference {pair.hr} "
            f"({hr.shape[1]}x{hr.shape[0]}); use --crop to compare centre crops",
        )
    return sr, hr


def evaluate(
    matching: Matching,
    scorer: Scorer,
    *,
    crop: int = 0,
    batch_size: int = 8,
    log: TextIO = sys.stderr,
    desc: str = "evaluating",
) -> Evaluation:
    """Scores every pair; same-shape images are batched (one compiled metric program per shape and batch size)."""
    needs_reference = scorer.reference_metrics
    if needs_reference and any(p.hr is None for p in matching.pairs):
        raise ValueError(
            f"{', '.join(needs_reference)} need{'s' if len(needs_reference) == 1 else ''} references: pass --hr"
        )
    evaluation = Evaluation({}, [], matching)
    pending: dict[tuple[int, ...], list[tuple[str, np.ndarray, np.ndarray | None]]] = {}
    bar = tqdm(total=len(matching.pairs), unit="img", desc=desc, file=log, disable=not matching.pairs)

    def flush(shape):
        batch = pending.pop(shape, [])
        if not batch:
            return
        sr = np.stack([b[1] for b in batch]).astype(np.float32) / 255.0
        hr = None if batch[0][2] is None else np.stack([b[2] for b in batch]).astype(np.float32) / 255.0
        scores = scorer(sr, hr)
        for i, (name, _, _) in enumerate(batch):
            evaluation.per_image[name] = {metric: float(values[i]) for metric, values in scores.items()}
        bar.update(len(batch))

    for pair in matching.pairs:
        try:
            sr, hr = _read(pair, crop)
        except ImageError as e:
            evaluation.failed.append(str(e))
            tqdm.write(f"error: {e}", file=log)
            bar.update(1)
            continue
        pending.setdefault(sr.shape, []).append((pair.name, sr, hr))
        if len(pending[sr.shape]) == batch_size:
            flush(sr.shape)
    for shape in list(pending):
        flush(shape)
    bar.close()
    return evaluation


@dataclasses.dataclass
class Comparison:
    """Columns scored on the same images. `images`: those scored in every column, which every mean is over;
    `left_out[label]`: the images of that column's matching outside `images` (another column lacks them, or
    scoring one of them failed somewhere)."""

    columns: dict[str, Evaluation]
    images: list[str]
    left_out: dict[str, list[str]]

    def means(self) -> dict[str, dict[str, float]]:
        return {label: column.means(self.images) for label, column in self.columns.items()}

    def to_json(self) -> dict[str, dict]:
        return {
            label: {**column.to_json(self.images), "left_out": self.left_out[label]}
            for label, column in self.columns.items()
        }


def compare(
    matchings: Mapping[str, Matching], scorer: Scorer, *, crop: int = 0, batch_size: int = 8, log: TextIO = sys.stderr
) -> Comparison:
    """Scores each column (label -> its SR outputs matched to references) on the images all columns have, then
    averages over those scored in all of them: a table compares methods on the same images only. Per-folder
    metrics (FID) are computed on those same images. With several columns, one line per column lists what it
    left out; ValueError when no image is common to all."""
    common = set.intersection(*({p.name for p in m.pairs} for m in matchings.values()))
    if not common:
        raise ValueError(f"no image name is in every column ({', '.join(matchings)}): nothing to compare")
    columns = {}
    for label, matching in matchings.items():
        shared = dataclasses.replace(matching, pairs=[p for p in matching.pairs if p.name in common])
        columns[label] = evaluate(shared, scorer, crop=crop, batch_size=batch_size, log=log, desc=label)
    images = sorted(set.intersection(*(set(column.per_image) for column in columns.values())))
    for column in columns.values():
        column.per_folder = scorer.score_folders([p for p in column.matching.pairs if p.name in set(images)], crop)
    left_out = {label: sorted({p.name for p in m.pairs} - set(images)) for label, m in matchings.items()}
    if len(matchings) > 1:
        for label, names in left_out.items():
            if names:
                print(
                    f"left out: {label}: {len(names)} image(s) not scored in every column: {', '.join(names)}", file=log
                )
    return Comparison(columns, images, left_out)


def _format(name: str, value: float | None) -> str:
    return "-" if value is None else f"{value:.{METRICS[name].digits}f}"


def markdown_table(dataset: str, columns: Mapping[str, Mapping[str, float]], images: Mapping[str, int]) -> str:
    """The paper's Table 1 layout: | Dataset | Metric | method ... |, one row per metric (arrow: better), the best
    value of each row in bold when there are several methods; a last row gives each column's image count."""
    names = [n for n in METRICS if any(n in means for means in columns.values())]
    lines = ["| Dataset | Metric | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for row, name in enumerate(names):
        info = METRICS[name]
        values = [means.get(name) for means in columns.values()]
        present = [v for v in values if v is not None]
        best = (max if info.higher_is_better else min)(present) if len(present) > 1 else None
        cells = [f"**{_format(name, v)}**" if v is not None and v == best else _format(name, v) for v in values]
        arrow = "↑" if info.higher_is_better else "↓"
        lines.append(f"| {dataset if row == 0 else ''} | {info.label}{arrow} | " + " | ".join(cells) + " |")
    lines.append(f"| {dataset if not names else ''} | Images | " + " | ".join(str(images[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_report(path_stem: str, report: dict, table: str) -> None:
    """`<path_stem>.json` and `<path_stem>.md`, each written to a temporary name and renamed."""
    for ext, text in ((".json", json.dumps(report, indent=2) + "\n"), (".md", table)):
        storage.atomic_write_text(path_stem + ext, text)


def sweep_plot(means_by_timestep: Mapping[int, Mapping[str, float]], path: str, title: str = "") -> None:
    """The paper's Fig. 6 view: each metric against the student timestep t (one panel per metric), as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("the sweep plot needs matplotlib: pip install 'tadsr-jax[eval]'") from None
    timesteps = sorted(means_by_timestep)
    names = [n for n in METRICS if all(n in means_by_timestep[t] for t in timesteps)]
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        info = METRICS[name]
        ax.plot(timesteps, [means_by_timestep[t][name] for t in timesteps], marker="o")
        ax.set_xlabel("timestep t")
        ax.set_title(f"{info.label} {'↑' if info.higher_is_better else '↓'}")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    storage.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
