"""PSNR / SSIM (pyiqa's Y-channel settings) against scikit-image and a PyTorch re-statement of pyiqa 0.1.10's
formulas, on real photographs with realistic distortions; LPIPS (VGG and AlexNet) / DISTS through the metrics API;
the error line without pyiqa, and the call arguments with a stand-in pyiqa (plumbing only: no metric of pyiqa's is
computed here).

The pyiqa re-statement (`_torch_*` below) follows pyiqa 0.1.10: `to_y_channel(x, data_range, 'ycbcr')`
(rgb2ycbcr by matmul, Y times data_range, rounded when data_range >= 255), `psnr` with data_range=1 and
eps=1e-8, `SSIM` on the rounded 8-bit Y cast to float64, fspecial(11, 1.5) stored as float32, 'valid' conv2d,
ReLU on the contrast-structure map.
"""

import io
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from hidden_modules import hide
from PIL import Image
from scipy import ndimage
from skimage import data
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from tadsr_jax.metrics import (
    FolderMetrics,
    FullReferenceMetrics,
    NoReferenceMetrics,
    PyiqaUnavailable,
    dists_distance,
    lpips_distance,
    psnr_y,
    ssim_y,
)
from tadsr_jax.models.lpips import LPIPS
from tadsr_jax.weights.dists import random_dists
from tadsr_jax.weights.lpips import random_lpips


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def _pairs(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(sr, hr) float32 (3, h, w, 3) batches of 8-bit levels, as read from PNGs: crops of astronaut, coffee
    and chelsea, distorted by Gaussian blur (sigma 1.2), Gaussian noise (sigma 10 levels) and JPEG (quality 15)."""
    rng = np.random.default_rng(0)
    crops = [
        data.astronaut()[60 : 60 + h, 150 : 150 + w],
        data.coffee()[120 : 120 + h, 220 : 220 + w],
        data.chelsea()[80 : 80 + h, 140 : 140 + w],
    ]
    blurred = ndimage.gaussian_filter(crops[0].astype(np.float64), sigma=(1.2, 1.2, 0))
    noisy = crops[1] + rng.normal(0, 10, crops[1].shape)
    distorted = [
        np.clip(np.round(blurred), 0, 255).astype(np.uint8),
        np.clip(np.round(noisy), 0, 255).astype(np.uint8),
        _jpeg(crops[2], 15),
    ]
    return (np.stack(distorted).astype(np.float32) / 255, np.stack(crops).astype(np.float32) / 255)


SQUARE, WIDE = _pairs(96, 96), _pairs(75, 101)


def _nchw(x: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(x.transpose(0, 3, 1, 2), dtype=dtype)


def _torch_y(x: torch.Tensor, data_range: float) -> torch.Tensor:
    weights = torch.tensor([[65.481, -37.797, 112.0], [128.553, -74.203, -93.786], [24.966, 112.0, -18.214]]).to(x)
    bias = torch.tensor([16, 128, 128]).view(1, 3, 1, 1).to(x)
    ycbcr = (torch.matmul(x.permute(0, 2, 3, 1), weights).permute(0, 3, 1, 2) + bias) / 255.0
    y = ycbcr[:, [0]] * data_range
    return y - y.detach() + y.round() if data_range >= 255 else y


def _torch_psnr(sr: torch.Tensor, hr: torch.Tensor) -> np.ndarray:
    mse = torch.mean((_torch_y(sr, 1.0) - _torch_y(hr, 1.0)) ** 2, dim=[1, 2, 3])
    return (10 * torch.log10(1.0 / (mse + 1e-8))).numpy()


def _torch_ssim(sr: torch.Tensor, hr: torch.Tensor) -> np.ndarray:
    x, y = _torch_y(sr, 255).to(torch.float64), _torch_y(hr, 255).to(torch.float64)
    grid = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-(grid[:, None] ** 2 + grid[None, :] ** 2) / (2 * 1.5**2))
    win = (g / g.sum()).float().to(x)[None, None]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu1, mu2 = F.conv2d(x, win), F.conv2d(y, win)
    s1, s2, s12 = (F.conv2d(x * x, win) - mu1**2, F.conv2d(y * y, win) - mu2**2, F.conv2d(x * y, win) - mu1 * mu2)
    cs = F.relu((2 * s12 + c2) / (s1 + s2 + c2))
    return (((2 * mu1 * mu2 + c1) / (mu1**2 + mu2**2 + c1)) * cs).mean([1, 2, 3]).numpy()


@pytest.mark.parametrize("pair", [SQUARE, WIDE], ids=["96x96", "75x101"])
def test_float32_matches_pyiqa_restatement(pair):
    sr, hr = pair
    psnr, ssim = np.asarray(psnr_y(sr, hr)), np.asarray(ssim_y(sr, hr))
    assert psnr.dtype == np.float32 and ssim.dtype == np.float32 and psnr.shape == ssim.shape == (3,)
    ref_psnr, ref_ssim = _torch_psnr(_nchw(sr), _nchw(hr)), _torch_ssim(_nchw(sr), _nchw(hr))
    print(f"PSNR {psnr} vs {ref_psnr}; SSIM {ssim} vs {ref_ssim}")
    assert 20 < ref_psnr.min() and ref_psnr.max() < 40 and 0.3 < ref_ssim.min() and ref_ssim.max() < 0.98
    np.testing.assert_allclose(psnr, ref_psnr, rtol=0, atol=2e-4)  # measured 3.8e-6 (float32 MSE, log10): 50x
    np.testing.assert_allclose(ssim, ref_ssim, rtol=0, atol=2e-5)  # measured 8.9e-7: 22x


def test_float64_matches_pyiqa_restatement_tightly():
    sr, hr = WIDE
    with jax.enable_x64(True):
        psnr = np.asarray(psnr_y(jnp.asarray(sr, jnp.float64), jnp.asarray(hr, jnp.float64)))
        ssim = np.asarray(ssim_y(jnp.asarray(sr, jnp.float64), jnp.asarray(hr, jnp.float64)))
    assert psnr.dtype == np.float64 and ssim.dtype == np.float64
    x, y = _nchw(sr, torch.float64), _nchw(hr, torch.float64)
    np.testing.assert_allclose(psnr, _torch_psnr(x, y), rtol=1e-12)  # measured 1.1e-16 (float64): 9000x
    np.testing.assert_allclose(ssim, _torch_ssim(x, y), rtol=1e-12)  # measured 1.3e-16


@pytest.mark.parametrize("pair", [SQUARE, WIDE], ids=["96x96", "75x101"])
def test_matches_scikit_image_on_y(pair):
    """skimage's Y (rgb2ycbcr, same BT.601 coefficients) and metrics, in float64.

    Documented differences, accounted for: pyiqa adds eps=1e-8 to the MSE, so skimage's PSNR is mapped back to
    its MSE and the eps added; skimage's SSIM filters with reflect padding but averages only the map's interior
    (it crops (11 - 1) / 2 pixels per side), i.e. exactly the 'valid' region, and it does not clamp the
    contrast-structure term at 0 as pyiqa does, which can only make pyiqa's value larger (asserted, by little).
    """
    sr, hr = pair
    psnr, ssim = np.asarray(psnr_y(sr, hr)), np.asarray(ssim_y(sr, hr))
    for i in range(len(sr)):
        y_sr, y_hr = rgb2ycbcr(sr[i].astype(np.float64))[..., 0], rgb2ycbcr(hr[i].astype(np.float64))[..., 0]
        ref_psnr = peak_signal_noise_ratio(y_hr / 255, y_sr / 255, data_range=1.0)
        ref_psnr = 10 * np.log10(1 / (10 ** (-ref_psnr / 10) + 1e-8))
        ref_ssim = structural_similarity(
            np.round(y_hr),
            np.round(y_sr),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=255,
        )
        print(f"image {i}: PSNR {psnr[i]:.5f} vs skimage {ref_psnr:.5f}, SSIM {ssim[i]:.6f} vs {ref_ssim:.6f}")
        assert abs(psnr[i] - ref_psnr) <= 2e-4  # measured 3.7e-6 (our float32 vs skimage's float64): 55x
        # measured -3.0e-6 to +9.5e-7 (float32 rounding; the clamp can only add): the lower bound is 17x that
        assert -5e-5 <= ssim[i] - ref_ssim <= 1e-3


def test_batched_equals_per_image():
    sr, hr = SQUARE
    psnr, ssim = np.asarray(psnr_y(sr, hr)), np.asarray(ssim_y(sr, hr))
    for i in range(len(sr)):  # measured equal; rtol=1e-6 is >= 13 ulps of either value, should another shape reorder
        np.testing.assert_allclose(psnr[i], np.asarray(psnr_y(sr[i : i + 1], hr[i : i + 1]))[0], rtol=1e-6)
        np.testing.assert_allclose(ssim[i], np.asarray(ssim_y(sr[i : i + 1], hr[i : i + 1]))[0], rtol=1e-6)


def test_full_reference_metrics_and_lpips_through_the_api():
    """FullReferenceMetrics gives each metric's own values; LPIPS maps [0, 1] to the model's [-1, 1]."""
    sr, hr = (x[:, :32, :48] for x in WIDE)
    lpips_model, dists_model = random_lpips(0), random_dists(0)
    scores = FullReferenceMetrics(["psnr", "ssim", "lpips", "dists"], lpips=lpips_model, dists=dists_model)(sr, hr)
    assert list(scores) == ["psnr", "ssim", "lpips", "dists"]
    assert all(v.dtype == np.float64 and v.shape == (3,) for v in scores.values())
    direct_lpips = np.asarray(lpips_model(jnp.asarray(2 * sr - 1), jnp.asarray(2 * hr - 1)))
    np.testing.assert_allclose(scores["lpips"], direct_lpips, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(lpips_distance(lpips_model, sr, hr)), direct_lpips, rtol=1e-5)
    np.testing.assert_allclose(scores["dists"], np.asarray(dists_distance(dists_model, sr, hr)), rtol=1e-6)
    np.testing.assert_allclose(scores["psnr"], np.asarray(psnr_y(sr, hr)), rtol=1e-6)
    np.testing.assert_allclose(scores["ssim"], np.asarray(ssim_y(sr, hr)), rtol=1e-6)
    assert np.all(scores["lpips"] > 0) and np.all(scores["dists"] > 0)


def test_lpips_alex_through_the_api_is_the_alexnet_model():
    """ "lpips_alex" computes the AlexNet-trunk LPIPS it is given, beside "lpips" (VGG); a VGG model passed as
    lpips_alex is refused."""
    sr, hr = (x[:, :32, :48] for x in WIDE)
    vgg, alex = random_lpips(0), LPIPS(net="alex", rngs=nnx.Rngs(3))
    scores = FullReferenceMetrics(["lpips", "lpips_alex"], lpips=vgg, lpips_alex=alex)(sr, hr)
    np.testing.assert_allclose(scores["lpips_alex"], np.asarray(lpips_distance(alex, sr, hr)), rtol=1e-6)
    np.testing.assert_allclose(scores["lpips"], np.asarray(lpips_distance(vgg, sr, hr)), rtol=1e-6)
    assert not np.allclose(scores["lpips"], scores["lpips_alex"])
    with pytest.raises(ValueError, match="metric 'lpips_alex' needs an LPIPS with the 'alex' trunk, got 'vgg'"):
        FullReferenceMetrics(["lpips_alex"], lpips_alex=vgg)


def test_api_errors_are_clear():
    with pytest.raises(ValueError, match="unknown full-reference metric 'fid'"):
        FullReferenceMetrics(["psnr", "fid"])
    with pytest.raises(ValueError, match="'lpips' needs its model"):
        FullReferenceMetrics(["lpips"])
    with pytest.raises(ValueError, match="unknown per-folder metric 'psnr'; known: fid"):
        FolderMetrics(["psnr"])
    sr, hr = SQUARE
    with pytest.raises(ValueError, match="one shape"):
        psnr_y(sr, hr[:, :, :90])


def test_no_reference_metrics_without_pyiqa(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # makes `import pyiqa` raise ImportError
    with pytest.raises(PyiqaUnavailable) as info:
        NoReferenceMetrics(["musiq", "qalign"])
    message = str(info.value)
    assert "\n" not in message and message.startswith("musiq, qalign need pyiqa") and "pip install" in message


def test_fid_without_pyiqa_is_one_line_for_real(monkeypatch):
    """Without pyiqa (made absent here, installed or not) the real import fails and the line says what to do."""
    hide(monkeypatch, "pyiqa")
    with pytest.raises(PyiqaUnavailable) as info:
        FolderMetrics(["fid"])
    assert str(info.value) == (
        "fid needs pyiqa and its weights (ModuleNotFoundError: No module named 'pyiqa'): "
        "pip install pyiqa==0.1.10 torch==2.13.0"
    )


def test_fid_plumbing_with_a_stand_in_pyiqa(monkeypatch, tmp_path):
    """PLUMBING ONLY, not a test of FID: a stand-in pyiqa module records how FolderMetrics calls it (pyiqa's
    metric name, the device, then the two folders as positional arguments) and returns a float."""
    calls = []

    def create_metric(name, device=None):
        calls.append(("create", name, device))
        return lambda first, second: calls.append(("call", first, second)) or torch.tensor(12.5, dtype=torch.float64)

    monkeypatch.setitem(sys.modules, "pyiqa", types.SimpleNamespace(create_metric=create_metric))
    scores = FolderMetrics(["fid"])(str(tmp_path / "sr"), str(tmp_path / "hr"))
    assert calls == [("create", "fid", "cpu"), ("call", str(tmp_path / "sr"), str(tmp_path / "hr"))]
    assert scores == {"fid": 12.5} and type(scores["fid"]) is float


def test_no_reference_metrics_call_pyiqa_per_image(monkeypatch):
    """With a stand-in pyiqa: OSEDiff's metric names, one (1, 3, H, W) [0, 1] tensor per call, (B,) results."""
    created, shapes = [], []

    def create_metric(name, device=None):
        created.append((name, device))

        def metric(x):
            shapes.append(tuple(x.shape))
            return x.mean(dim=(1, 2, 3), keepdim=True) + len(name)

        return metric

    monkeypatch.setitem(sys.modules, "pyiqa", types.SimpleNamespace(create_metric=create_metric))
    images = SQUARE[0]
    scores = NoReferenceMetrics(["maniqa", "topiq", "clipiqa", "qalign"])(images)
    assert created == [("maniqa-pipal", "cpu"), ("topiq_nr", "cpu"), ("clipiqa", "cpu"), ("qalign", "cpu")]
    assert shapes == [(1, 3, 96, 96)] * 12
    assert list(scores) == ["maniqa", "topiq", "clipiqa", "qalign"]
    np.testing.assert_allclose(scores["clipiqa"], images.mean(axis=(1, 2, 3)) + len("clipiqa"), rtol=1e-5)
