"""Image-quality metrics of the evaluation protocol (docs/method.md section 6: pyiqa 0.1.10 as OSEDiff's
`test_metrics.py` calls it).

Images are batched NHWC RGB floats in [0, 1], (B, H, W, 3); every metric gives one value per image, (B,).
Computation is in float32, or float64 for float64 inputs (with `jax_enable_x64`). To reproduce the paper's
protocol, pass 8-bit images (k / 255): OSEDiff scores saved PNGs read back with cv2.

Full reference, in JAX (jitted; sr = super-resolved, hr = ground truth):
- `psnr_y(sr, hr)`, `ssim_y(sr, hr)`: pyiqa's `psnr` / `ssim` with test_y_channel=True, color_space='ycbcr'.
- `lpips_distance(lpips_model, sr, hr)`: LPIPS of a `tadsr_jax.models.lpips.LPIPS` (it takes [-1, 1]; the
  [0, 1] -> [-1, 1] mapping is done here, as pyiqa's normalize=True does).
- `dists_distance(dists_model, sr, hr)`: DISTS of a `tadsr_jax.models.dists.DISTS`.
- `FullReferenceMetrics(names, lpips=None, lpips_alex=None, dists=None)`, called per batch as `metrics(sr, hr)`,
  returns {name: (B,) float64 numpy array} for names among `FULL_REFERENCE` ("psnr", "ssim", "lpips",
  "lpips_alex", "dists"). "lpips" is LPIPS-VGG (pyiqa's 'lpips-vgg', the training loss's network); "lpips_alex"
  is LPIPS-AlexNet, pyiqa's default 'lpips' and the LPIPS column of the paper (and of OSEDiff).

Through pyiqa itself (PyTorch, downloads its weights); without an importable pyiqa these raise
`PyiqaUnavailable` with one line naming the metrics and the install command:
- `NoReferenceMetrics(names, device="cpu")`, called per batch as `nr(images)`, returns {name: (B,) float64 numpy
  array}, names among `NO_REFERENCE` (clipiqa, musiq, maniqa, niqe, topiq, qalign).
- `FolderMetrics(names, device="cpu")`, called once per column as `fm(sr_dir, hr_dir)`, returns {name: float}:
  metrics of a set of images rather than of one, names among `PER_FOLDER` (fid: the Frechet distance between
  the Inception features of the two folders' images).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tadsr_jax.models.dists import DISTS
from tadsr_jax.models.lpips import LPIPS

# pyiqa's rgb2ycbcr, first column (float32 constants, as pyiqa's torch.tensor(...) makes them).
Y_WEIGHTS = np.array([65.481, 128.553, 24.966], np.float32)
Y_OFFSET = 16.0
PSNR_EPS = 1e-8
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_DATA_RANGE = 255.0  # pyiqa's SSIM works on rounded 8-bit Y levels
FULL_REFERENCE = ("psnr", "ssim", "lpips", "lpips_alex", "dists")
NETWORK_METRICS = ("lpips", "lpips_alex", "dists")  # the full-reference metrics that need a network's weights
# Short names -> the pyiqa metric OSEDiff / TADSR report (docs/method.md section 6, docs/metrics.md).
NO_REFERENCE = {
    "clipiqa": "clipiqa",
    "musiq": "musiq",
    "maniqa": "maniqa-pipal",
    "niqe": "niqe",
    "topiq": "topiq_nr",
    "qalign": "qalign",
}
PER_FOLDER = {"fid": "fid"}
INSTALL_HINT = "pip install pyiqa==0.1.10 torch==2.13.0"


class PyiqaUnavailable(RuntimeError):
    """pyiqa (with PyTorch) is not importable, so the metrics computed through it (NO_REFERENCE, PER_FOLDER)
    cannot be."""


def _float(x) -> jax.Array:
    """x as float32, or float64 when it is float64."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32)


def _check_pair(sr: jax.Array, hr: jax.Array) -> None:
    if sr.shape != hr.shape or sr.ndim != 4 or sr.shape[-1] != 3:
        raise ValueError(f"expected two (B, H, W, 3) RGB batches of one shape, got {sr.shape} and {hr.shape}")


def rgb_to_y(x, data_range: float = 1.0) -> jax.Array:
    """pyiqa's `to_y_channel(x, data_range, 'ycbcr')`: (..., 3) RGB in [0, 1] -> (..., 1) Y.

    Y = (16 + 65.481 R + 128.553 G + 24.966 B) / 255 (BT.601, studio range [16/255, 235/255]), times
    `data_range`; for data_range >= 255 it is rounded to integer levels, as pyiqa does (to match MATLAB).
    Written as a weighted sum, not a matmul, so that no backend lowers its precision.
    """
    x = _float(x)
    w = jnp.asarray(Y_WEIGHTS).astype(x.dtype)
    y = ((x[..., 0:1] * w[0] + x[..., 1:2] * w[1] + x[..., 2:3] * w[2] + Y_OFFSET) / 255.0) * data_range
    return jnp.round(y) if data_range >= 255 else y


@jax.jit
def psnr_y(sr, hr) -> jax.Array:
    """pyiqa `psnr(test_y_channel=True, color_space='ycbcr')`: 10 log10(1 / (MSE + 1e-8)) of Y in [0, 1]
    (not rounded: pyiqa's PSNR keeps data_range=1, below its rounding threshold). (B,) in dB."""
    sr, hr = _float(sr), _float(hr)
    _check_pair(sr, hr)
    mse = jnp.mean(jnp.square(rgb_to_y(sr) - rgb_to_y(hr)), axis=(1, 2, 3))
    return 10 * jnp.log10(1.0 / (mse + PSNR_EPS))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """MATLAB's fspecial('gaussian', size, sigma) as pyiqa builds it: 2-D in float64, tiny taps zeroed,
    normalised, then stored as float32 (so float64 SSIM uses the float32-rounded taps, as pyiqa does)."""
    r = (size - 1) / 2
    yy, xx = np.ogrid[-r : r + 1, -r : r + 1]
    h = np.exp(-(xx * xx + yy * yy) / (2.0 * sigma * sigma))
    h[h < np.finfo(h.dtype).eps * h.max()] = 0
    return (h / h.sum()).astype(np.float32)


def _filter_valid(x: jax.Array, window: jax.Array) -> jax.Array:
    """Each channel of (B, H, W, C) filtered by the 2-D window, 'valid' (no padding), at full precision."""
    b, h, w, c = x.shape
    x = jnp.moveaxis(x, -1, 1).reshape(b * c, h, w, 1)
    out = jax.lax.conv_general_dilated(
        x,
        window[:, :, None, None],
        (1, 1),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )
    return jnp.moveaxis(out.reshape(b, c, *out.shape[1:3]), 1, -1)


@jax.jit
def ssim_y(sr, hr) -> jax.Array:
    """pyiqa `ssim(test_y_channel=True, color_space='ycbcr')` (downsample=False): SSIM of the rounded 8-bit
    Y levels with an 11x11 sigma-1.5 Gaussian window, 'valid' filtering, C1 = (0.01 * 255)^2,
    C2 = (0.03 * 255)^2, the contrast-structure term clamped at 0 as pyiqa does, averaged over the map. (B,)

    pyiqa always evaluates this part in float64; here it is float64 only for float64 inputs.
    """
    sr, hr = _float(sr), _float(hr)
    _check_pair(sr, hr)
    if min(sr.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {sr.shape[1:3]}")
    x, y = rgb_to_y(sr, SSIM_DATA_RANGE), rgb_to_y(hr, SSIM_DATA_RANGE)
    window = jnp.asarray(gaussian_window()).astype(x.dtype)
    stats = _filter_valid(jnp.concatenate([x, y, x * x, y * y, x * y], axis=-1), window)
    mu_x, mu_y, xx, yy, xy = (stats[..., i] for i in range(5))
    c1, c2 = (0.01 * SSIM_DATA_RANGE) ** 2, (0.03 * SSIM_DATA_RANGE) ** 2
    var_x, var_y, cov = xx - jnp.square(mu_x), yy - jnp.square(mu_y), xy - mu_x * mu_y
    cs = jax.nn.relu((2 * cov + c2) / (var_x + var_y + c2))
    luminance = (2 * mu_x * mu_y + c1) / (jnp.square(mu_x) + jnp.square(mu_y) + c1)
    return jnp.mean(luminance * cs, axis=(1, 2))


@functools.partial(jax.jit, static_argnums=0)
def _lpips(graphdef, state, sr, hr) -> jax.Array:
    return nnx.merge(graphdef, state)(2 * sr - 1, 2 * hr - 1)


@functools.partial(jax.jit, static_argnums=0)
def _dists(graphdef, state, sr, hr) -> jax.Array:
    return nnx.merge(graphdef, state)(sr, hr)


_NETWORK_FUNCTIONS = {"lpips": _lpips, "lpips_alex": _lpips, "dists": _dists}
_LPIPS_TRUNKS = {"lpips": "vgg", "lpips_alex": "alex"}


def lpips_distance(model: LPIPS, sr, hr) -> jax.Array:
    """LPIPS of images in [0, 1] (mapped to the model's [-1, 1]). (B,)"""
    sr, hr = _float(sr), _float(hr)
    _check_pair(sr, hr)
    return _lpips(*nnx.split(model), sr, hr)


def dists_distance(model: DISTS, sr, hr) -> jax.Array:
    """DISTS of images in [0, 1]. (B,)"""
    sr, hr = _float(sr), _float(hr)
    _check_pair(sr, hr)
    return _dists(*nnx.split(model), sr, hr)


class FullReferenceMetrics:
    """The full-reference metrics of a run, per batch: `FullReferenceMetrics(["psnr", "ssim", "lpips"],
    lpips=load_lpips(path))(sr, hr)` -> {"psnr": (B,), "ssim": (B,), "lpips": (B,)} float64 numpy arrays.

    Each of NETWORK_METRICS needs its model under its own name: `lpips=` an LPIPS-VGG, `lpips_alex=` an
    LPIPS-AlexNet, `dists=` a DISTS model; the models are split once.
    """

    def __init__(
        self,
        names: Sequence[str],
        *,
        lpips: LPIPS | None = None,
        lpips_alex: LPIPS | None = None,
        dists: DISTS | None = None,
    ):
        self.names = tuple(names)
        unknown = [n for n in self.names if n not in FULL_REFERENCE]
        if unknown:
            raise ValueError(f"unknown full-reference metric {unknown[0]!r}; known: {', '.join(FULL_REFERENCE)}")
        models = {"lpips": lpips, "lpips_alex": lpips_alex, "dists": dists}
        self._networks = {}
        for name in NETWORK_METRICS:
            if name not in self.names:
                continue
            model = models[name]
            if model is None:
                raise ValueError(f"metric {name!r} needs its model: FullReferenceMetrics(..., {name}=<model>)")
            if name in _LPIPS_TRUNKS and model.net != _LPIPS_TRUNKS[name]:
                raise ValueError(
                    f"metric {name!r} needs an LPIPS with the {_LPIPS_TRUNKS[name]!r} trunk, got {model.net!r}"
                )
            self._networks[name] = nnx.split(model)

    def __call__(self, sr, hr) -> dict[str, np.ndarray]:
        sr, hr = _float(sr), _float(hr)
        _check_pair(sr, hr)
        compute = {
            "psnr": lambda: psnr_y(sr, hr),
            "ssim": lambda: ssim_y(sr, hr),
            **{
                name: functools.partial(_NETWORK_FUNCTIONS[name], *split, sr, hr)
                for name, split in self._networks.items()
            },
        }
        return {name: np.asarray(compute[name](), np.float64) for name in self.names}


def _import_pyiqa(names: Sequence[str]):
    """pyiqa, or PyiqaUnavailable: one line naming `names` (the metrics that need it) and how to install it."""
    try:
        import pyiqa
    except Exception as e:  # ImportError, or torch/torchvision failing inside pyiqa's imports
        cause = (str(e).splitlines() or [""])[0]
        raise PyiqaUnavailable(
            f"{', '.join(names)} need{'s' if len(names) == 1 else ''} pyiqa and its weights "
            f"({type(e).__name__}: {cause}): {INSTALL_HINT}"
        ) from None
    return pyiqa


class NoReferenceMetrics:
    """pyiqa no-reference metrics, created once: `NoReferenceMetrics(["clipiqa", "maniqa"])(images)` ->
    {name: (B,) float64} for (B, H, W, 3) RGB images in [0, 1], scored one image at a time as OSEDiff does.

    Short names map through `NO_REFERENCE` (e.g. "maniqa" -> "maniqa-pipal"); other names go to pyiqa unchanged.
    Raises PyiqaUnavailable when pyiqa does not import.
    """

    def __init__(self, names: Sequence[str], device: str = "cpu"):
        pyiqa = _import_pyiqa(names)
        self.names, self.device = tuple(names), device
        self._metrics = {name: pyiqa.create_metric(NO_REFERENCE.get(name, name), device=device) for name in names}

    def __call__(self, images) -> dict[str, np.ndarray]:
        import torch

        batch = torch.from_numpy(np.ascontiguousarray(np.asarray(images, np.float32).transpose(0, 3, 1, 2)))
        with torch.no_grad():
            return {
                name: np.array([float(metric(image[None].to(self.device)).reshape(-1)[0]) for image in batch])
                for name, metric in self._metrics.items()
            }


class FolderMetrics:
    """pyiqa metrics of a set of images against a reference set, created once: `FolderMetrics(["fid"])(sr_dir,
    hr_dir)` -> {"fid": float}. pyiqa reads every image file directly in each folder, so the folders must be
    local and hold exactly the images to compare (`evaluation.compare` writes them). Raises PyiqaUnavailable
    when pyiqa does not import.
    """

    def __init__(self, names: Sequence[str], device: str = "cpu"):
        unknown = [n for n in names if n not in PER_FOLDER]
        if unknown:
            raise ValueError(f"unknown per-folder metric {unknown[0]!r}; known: {', '.join(PER_FOLDER)}")
        pyiqa = _import_pyiqa(names)
        self.names = tuple(names)
        self._metrics = {name: pyiqa.create_metric(PER_FOLDER[name], device=device) for name in names}

    def __call__(self, sr_dir: str, hr_dir: str) -> dict[str, float]:
        return {name: float(metric(sr_dir, hr_dir)) for name, metric in self._metrics.items()}
