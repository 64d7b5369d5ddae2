"""Real-ESRGAN degradation: each op against an independent re-statement of basicsr's formula (torch float64,
scipy, PIL's JPEG codec) or against statistics, then the whole pipeline."""

import io
import math

import ml_collections
import numpy as np
import pytest
import scipy.optimize
import scipy.special
import scipy.stats
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image

from configs import tadsr_sd21
from tadsr_jax.data import degradation as deg

PAPER = tadsr_sd21.get_config().data
CONFIG, SCALE = PAPER.realesrgan, PAPER.scale  # the reference's Real-ESRGAN parameters, at its x4


def paper_degradation() -> ml_collections.ConfigDict:
    """A copy of the paper's data.realesrgan, to change."""
    return tadsr_sd21.get_config().data.realesrgan


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    """512 x 512 RGB uint8."""
    return np.ascontiguousarray(skimage.data.astronaut())


@pytest.fixture(scope="module")
def image(astronaut) -> np.ndarray:
    """A non-square float32 crop in [0, 1]."""
    return astronaut[40:360, 100:356].astype(np.float32) / 255


def psnr(a: np.ndarray, b: np.ndarray, peak: float) -> float:
    return 10 * math.log10(peak**2 / np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


def to_torch(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].double()


def from_torch(x: torch.Tensor) -> np.ndarray:
    return x[0].permute(1, 2, 0).numpy()


# ---------------------------------------------------------------- kernels


def torch_kernel(kind: str, size: int, sx: float, sy: float | None, theta: float, beta: float) -> np.ndarray:
    """basicsr's bivariate kernels: grid v = (x, y) = (column, row) offsets from the centre, Sigma = U diag(sx^2,
    sy^2) U^T with U = [[cos, -sin], [sin, cos]], q = v^T Sigma^-1 v."""
    if sy is None:
        sy, theta = sx, 0.0
    ax = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    v = torch.stack([xx, yy], dim=-1)
    u = torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]], dtype=torch.float64)
    cov = u @ torch.diag(torch.tensor([sx**2, sy**2], dtype=torch.float64)) @ u.T
    q = ((v @ torch.linalg.inv(cov)) * v).sum(-1)
    k = {
        "gaussian": lambda: torch.exp(-0.5 * q),
        "generalized": lambda: torch.exp(-0.5 * q**beta),
        "plateau": lambda: 1 / (q**beta + 1),
    }[kind]()
    return (k / k.sum()).numpy()


KERNEL_CASES = [
    ("gaussian", 21, 2.0, None, 0.0, 1.0),
    ("gaussian", 21, 2.5, 0.7, 0.6, 1.0),
    ("gaussian", 7, 0.3, 1.9, -2.2, 1.0),
    ("generalized", 21, 1.5, None, 0.0, 0.6),
    ("generalized", 13, 2.7, 0.4, 1.1, 3.5),
    ("plateau", 21, 2.2, None, 0.0, 1.0),
    ("plateau", 15, 0.8, 2.9, -0.4, 1.7),
]


@pytest.mark.parametrize("kind,size,sx,sy,theta,beta", KERNEL_CASES)
def test_kernels_match_a_torch_restatement(kind, size, sx, sy, theta, beta):
    if kind == "gaussian":
        ours = deg.gaussian_kernel(size, sx, sy, theta)
    elif kind == "generalized":
        ours = deg.generalized_gaussian_kernel(size, sx, sy, theta, beta)
    else:
        ours = deg.plateau_kernel(size, sx, sy, theta, beta)
    # float64 on both sides: measured 3.3e-16 apart, sums within 6.7e-16 of 1, so 1e-12 is 1000x above
    np.testing.assert_allclose(ours, torch_kernel(kind, size, sx, sy, theta, beta), rtol=0, atol=1e-12)
    assert ours.shape == (size, size) and abs(ours.sum() - 1) < 1e-12


def test_anisotropic_gaussian_is_wide_along_x_before_rotation():
    k = deg.gaussian_kernel(21, 3.0, 1.0, 0.0)
    assert k[10, 14] > 100 * k[14, 10]  # (row, column): 4 pixels along x vs along y
    rotated = deg.gaussian_kernel(21, 3.0, 1.0, math.pi / 2)
    np.testing.assert_allclose(rotated, k.T, atol=1e-15)


def sinc_restated(cutoff: float, size: int) -> np.ndarray:
    """h(r) = cutoff J1(cutoff r) / (2 pi r), cutoff^2 / (4 pi) at r = 0, pixel by pixel, normalised."""
    c = (size - 1) / 2
    k = np.empty((size, size))
    for i in range(size):
        for j in range(size):
            r = math.hypot(i - c, j - c)
            k[i, j] = cutoff**2 / (4 * math.pi) if r == 0 else cutoff * scipy.special.j1(cutoff * r) / (2 * math.pi * r)
    return k / k.sum()


def frequency_response(kernel: np.ndarray, wx: float, wy: float) -> float:
    ax = np.arange(kernel.shape[0]) - kernel.shape[0] // 2
    return abs(np.sum(kernel * np.exp(-1j * (wx * ax[None, :] + wy * ax[:, None]))))


@pytest.mark.parametrize("cutoff,size", [(math.pi / 3, 21), (0.6 * math.pi, 13), (math.pi / 5, 21), (math.pi, 7)])
def test_sinc_kernel_matches_the_bessel_formula(cutoff, size):
    ours = deg.circular_lowpass_kernel(cutoff, size)
    np.testing.assert_allclose(ours, sinc_restated(cutoff, size), rtol=0, atol=1e-12)  # float64: measured 0
    # The centre value is the r -> 0 limit of the formula.
    r = 1e-5
    limit = cutoff * scipy.special.j1(cutoff * r) / (2 * math.pi * r)
    assert abs(limit / (cutoff**2 / (4 * math.pi)) - 1) < 1e-8
    padded = deg.circular_lowpass_kernel(cutoff, size, pad_to=21)
    pad = (21 - size) // 2
    assert padded.shape == (21, 21)
    np.testing.assert_array_equal(padded[pad : pad + size, pad : pad + size], ours)
    assert np.count_nonzero(padded) == np.count_nonzero(ours)


@pytest.mark.parametrize("cutoff,size", [(math.pi / 3, 21), (0.6 * math.pi, 13)])
def test_sinc_kernel_is_a_circular_low_pass(cutoff, size):
    k = deg.circular_lowpass_kernel(cutoff, size)
    assert frequency_response(k, 0, 0) == pytest.approx(1, abs=1e-12)
    for angle in (0, math.pi / 4, math.pi / 2):
        for radius, low, high in ((0.3, 0.85, 1.3), (0.6, 0.85, 1.3), (1.5, 0, 0.05), (2.0, 0, 0.05)):
            w = radius * cutoff
            assert low <= frequency_response(k, w * math.cos(angle), w * math.sin(angle)) <= high, (angle, radius)


def test_pulse_kernel_is_the_identity(image):
    np.testing.assert_array_equal(deg.filter2d(image, deg.pulse_kernel(21)), image)
    np.testing.assert_array_equal(deg.filter2d(image, deg.pulse_kernel(1)), image)


def test_mixed_kernel_types_follow_kernel_prob():
    rng = np.random.default_rng(0)
    names = list(CONFIG.kernel_list)
    counts = dict.fromkeys(names, 0)
    asymmetric = {name: 0 for name in names if name.endswith("aniso")}
    n = 4000
    for _ in range(n):
        name, k = deg.random_mixed_kernel(
            rng, CONFIG.kernel_list, CONFIG.kernel_prob, 21, CONFIG.blur_sigma, CONFIG.betag_range, CONFIG.betap_range
        )
        counts[name] += 1
        assert k.shape == (21, 21) and abs(k.sum() - 1) < 1e-12 and k.min() >= 0
        if name.endswith("aniso"):
            asymmetric[name] += np.abs(k - k.T).max() > 1e-6  # rotated, unequal sigmas: almost always
        else:
            np.testing.assert_allclose(k, k.T, atol=1e-15)  # isotropic: symmetric under transposition
    assert all(asymmetric[name] > 0.9 * counts[name] for name in asymmetric), (asymmetric, counts)
    observed = np.array([counts[name] for name in names])
    assert scipy.stats.chisquare(observed, n * np.asarray(CONFIG.kernel_prob)).pvalue > 1e-3, counts


def test_shape_parameters_are_drawn_below_or_above_one_half_the_time():
    rng = np.random.default_rng(9)
    betas = np.array([deg.draw_beta(rng, CONFIG.betag_range) for _ in range(4000)])
    below, above = betas[betas < 1], betas[betas >= 1]
    assert abs(below.size / betas.size - 0.5) < 0.03
    assert 0.5 <= below.min() and above.max() <= 4.0
    assert below.mean() == pytest.approx(0.75, abs=0.01) and above.mean() == pytest.approx(2.5, abs=0.05)


def test_blur_kernels_have_odd_sizes_7_to_21_and_the_sinc_rate():
    rng = np.random.default_rng(1)
    n = 3000
    sizes, sincs = [], 0
    for _ in range(n):
        name, k = deg.random_blur_kernel(
            rng,
            CONFIG.blur_kernel_size,
            CONFIG.sinc_prob,
            CONFIG.kernel_list,
            CONFIG.kernel_prob,
            CONFIG.blur_sigma,
            CONFIG.betag_range,
            CONFIG.betap_range,
        )
        assert k.shape[0] == k.shape[1] and abs(k.sum() - 1) < 1e-12
        sizes.append(k.shape[0])
        sincs += name == "sinc"
    values, counts = np.unique(sizes, return_counts=True)
    assert values.tolist() == [7, 9, 11, 13, 15, 17, 19, 21]
    assert scipy.stats.chisquare(counts).pvalue > 1e-3
    assert abs(sincs / n - CONFIG.sinc_prob) < 4 * math.sqrt(0.09 / n)
    finals = [deg.random_final_sinc(rng, 21, CONFIG.final_sinc_prob) for _ in range(1000)]
    pulses = sum(k.shape == (1, 1) for k in finals)
    assert abs(pulses / 1000 - (1 - CONFIG.final_sinc_prob)) < 0.05
    assert {k.shape[0] for k in finals if k.shape != (1, 1)} == set(range(7, 22, 2))


def sinc_cutoff(kernel: np.ndarray) -> float:
    """The cutoff of a `circular_lowpass_kernel`: next-to-centre over centre is 2 J1(w) / w, decreasing on (0, pi]."""
    c = kernel.shape[0] // 2
    ratio = kernel[c, c + 1] / kernel[c, c]
    return scipy.optimize.brentq(lambda w: 2 * scipy.special.j1(w) / w - ratio, 1e-6, math.pi + 1e-6)


def test_sinc_cutoffs_follow_the_kernel_size_rule():
    """U(pi/3, pi) below size 13, U(pi/5, pi) from 13; the final sinc always U(pi/3, pi)."""
    rng = np.random.default_rng(8)
    assert sinc_cutoff(deg.circular_lowpass_kernel(1.234, 15)) == pytest.approx(1.234, abs=1e-9)
    small, large = [], []
    for _ in range(600):
        name, k = deg.random_blur_kernel(
            rng,
            21,
            1.0,
            CONFIG.kernel_list,
            CONFIG.kernel_prob,
            CONFIG.blur_sigma,
            CONFIG.betag_range,
            CONFIG.betap_range,
        )
        assert name == "sinc"
        (small if k.shape[0] < 13 else large).append(sinc_cutoff(k))
    small, large = np.array(small), np.array(large)
    assert math.pi / 3 - 1e-9 <= small.min() and small.max() <= math.pi + 1e-9
    assert math.pi / 5 - 1e-9 <= large.min() and large.max() <= math.pi + 1e-9
    assert abs(np.mean(large < math.pi / 3) - 1 / 6) < 0.06  # (pi/3 - pi/5) / (pi - pi/5)
    finals = [deg.random_final_sinc(rng, 21, 1.0) for _ in range(200)]
    cutoffs = np.array([sinc_cutoff(k) for k in finals])
    assert math.pi / 3 - 1e-9 <= cutoffs.min() and cutoffs.max() <= math.pi + 1e-9
    assert any(k.shape[0] >= 13 for k in finals)


# ---------------------------------------------------------------- filtering and resizing


def torch_filter2d(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """basicsr's filter2D: reflect padding by k // 2, then a per-channel conv2d (a correlation)."""
    p = kernel.shape[0] // 2
    x = F.pad(to_torch(img), (p, p, p, p), mode="reflect")
    w = torch.from_numpy(kernel).double()[None, None].repeat(3, 1, 1, 1)
    return from_torch(F.conv2d(x, w, groups=3))


def filter_cases() -> list[np.ndarray]:
    rng = np.random.default_rng(2)
    asym = [rng.random((size, size)) for size in (5, 11, 21)]  # 11: one direct pass; 21: bands of rows
    low_rank = sum(np.outer(rng.random(15), rng.random(15)) for _ in range(2))  # two separable terms
    narrow = deg.gaussian_kernel(21, 0.9, 0.3, 0.5)  # mostly negligible taps
    return [k / k.sum() for k in asym] + [
        low_rank / low_rank.sum(),
        deg.gaussian_kernel(21, 2.5),
        narrow,
        deg.gaussian_kernel(17, 2.5, 0.8, 0.7),
        deg.circular_lowpass_kernel(math.pi / 4, 19),
    ]


@pytest.mark.parametrize("kernel", filter_cases(), ids=lambda k: f"{k.shape[0]}")
def test_filter2d_matches_torch_conv_with_reflect_padding(image, kernel):
    ours = deg.filter2d(image, kernel)
    assert ours.shape == image.shape and ours.dtype == np.float32
    # ours in float32 vs torch in float64 on [0, 1] pixels: measured up to 6.1e-7, so 16x
    np.testing.assert_allclose(ours, torch_filter2d(image, kernel), rtol=0, atol=1e-5)


@pytest.mark.parametrize("separable", [True, False])
def test_filter2d_on_an_image_smaller_than_the_kernel(separable):
    """Reflection repeats past the far edge (torch's reflect padding refuses; numpy's pads in steps)."""
    rng = np.random.default_rng(3)
    img = rng.random((6, 9, 3)).astype(np.float32)
    kernel = deg.gaussian_kernel(21, 2.5) if separable else rng.random((21, 21)) / 220
    padded = np.pad(img.astype(np.float64), ((10, 10), (10, 10), (0, 0)), mode="reflect")
    theirs = sum(kernel[i, j] * padded[i : i + 6, j : j + 9] for i in range(21) for j in range(21))
    np.testing.assert_allclose(deg.filter2d(img, kernel), theirs, rtol=0, atol=1e-5)  # measured 1.4e-7: 70x


@pytest.mark.parametrize(
    "size,mode",
    [
        ((80, 64), "area"),
        ((160, 128), "area"),
        ((123, 201), "bilinear"),
        ((500, 300), "bilinear"),
        ((123, 201), "bicubic"),
        ((500, 300), "bicubic"),
    ],
)
def test_resize_matches_torch_interpolate(image, size, mode):
    kwargs = {} if mode == "area" else {"align_corners": False}
    theirs = from_torch(F.interpolate(to_torch(image), size=size, mode=mode, **kwargs))
    ours = deg.resize(image, size, mode)
    assert ours.shape == (*size, 3)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)  # measured 2.1e-7 (both float32): 50x


@pytest.mark.parametrize("factor", [0.15, 0.73, 1.0, 1.37])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_rescale_matches_torch_scale_factor(image, factor, mode):
    theirs = from_torch(F.interpolate(to_torch(image), scale_factor=factor, mode=mode, align_corners=False))
    ours = deg.rescale(image, factor, mode)
    assert ours.shape == theirs.shape
    # cv2 holds the factor in lower precision; measured 2.3e-7 here, 400x below
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


@pytest.mark.parametrize("size", [(233, 187), (450, 400)])
def test_area_at_non_integer_factors_differs_from_torch_only_slightly(image, size):
    """Documented in `resize`: coverage-weighted (cv2) vs equal-weight (torch adaptive pooling) boxes."""
    theirs = from_torch(F.interpolate(to_torch(image), size=size, mode="area"))
    assert np.abs(deg.resize(image, size, "area") - theirs).mean() < 0.02


# ---------------------------------------------------------------- noise


def test_gaussian_noise_statistics():
    rng = np.random.default_rng(4)
    shape, sigma = (512, 384, 3), 12.0
    noise = deg.gaussian_noise(rng, shape, sigma, gray=False)
    assert noise.shape == shape and noise.dtype == np.float32
    std = sigma / 255
    assert abs(noise.mean()) < 4 * std / math.sqrt(noise.size)
    assert abs(noise.std() / std - 1) < 0.01
    assert abs(np.corrcoef(noise[..., 0].ravel(), noise[..., 1].ravel())[0, 1]) < 0.01
    gray = deg.gaussian_noise(rng, shape, sigma, gray=True)
    assert gray.shape == (512, 384, 1) and abs(gray.std() / std - 1) < 0.01
    flat = np.full(shape, 0.5, np.float32)
    out = deg.random_add_noise(rng, flat, 1.0, (sigma, sigma), (1.0, 1.0), gray_prob=1.0)
    assert out.shape == shape and np.array_equal(out[..., 0], out[..., 2]) and out.std() > 0.5 * std


def test_noise_is_clamped_to_the_unit_range():
    rng = np.random.default_rng(5)
    img = np.tile(np.linspace(0, 1, 64, dtype=np.float32), (64, 1))[..., None].repeat(3, axis=2)
    for gaussian_prob in (0.0, 1.0):
        out = deg.random_add_noise(rng, img, gaussian_prob, (30, 30), (3.0, 3.0), gray_prob=0.0)
        assert out.min() == 0 and out.max() == 1 and out.dtype == np.float32


@pytest.mark.parametrize("level,vals", [(1, 256.0), (37, 256.0), (200, 256.0), (255, 1.0), (3, 4.0)])
def test_poisson_counts_follow_the_poisson_law(level, vals):
    lam = level * vals / 255
    counts = deg.poisson_counts(np.random.default_rng(level), np.full(200_000, level, np.uint8), vals)
    xs = np.arange(int(lam + 8 * math.sqrt(lam) + 10))
    expected = scipy.stats.poisson.pmf(xs, lam) * counts.size
    observed = np.bincount(counts, minlength=xs.size)[: xs.size]
    keep = expected >= 5
    # Pool the tails so that observed and expected have the same total.
    observed = np.append(observed[keep], counts.size - observed[keep].sum())
    expected = np.append(expected[keep], counts.size - expected[keep].sum())
    assert scipy.stats.chisquare(observed, expected).pvalue > 1e-3
    assert counts.max() < lam + 12 * math.sqrt(lam) + 12


def test_poisson_noise_variance_follows_basicsr():
    """noise = scale (Poisson(x vals) / vals - x): variance scale^2 x / vals, x rounded to 1/255, vals the power
    of two at or above the number of distinct values."""
    rng = np.random.default_rng(6)
    scale = 2.0
    flat = np.full((400, 400, 3), 0.4, np.float32)  # one distinct value: vals = 1
    x = round(0.4 * 255) / 255
    noise = deg.poisson_noise(rng, flat, scale, gray=False)
    assert abs(noise.mean()) < 4 * scale * math.sqrt(x / noise.size)
    assert noise.var() == pytest.approx(scale**2 * x, rel=0.02)

    img = np.full((400, 400, 3), 128 / 255, np.float32)
    img[:10, :20, 0] = np.arange(200).reshape(10, 20) / 255  # 200 distinct values (128 among them): vals = 256
    noise = deg.poisson_noise(rng, img, scale, gray=False)[10:]
    assert noise.var() == pytest.approx(scale**2 * (128 / 255) / 256, rel=0.02)

    img = np.zeros((64, 64, 3), np.float32)
    img[:, :20], img[:, 20:40] = 0.2, 0.6  # 3 distinct values: vals = 4, so counts = noise / scale * 4 + 4 x
    counts = (deg.poisson_noise(rng, img, scale, gray=False) / scale + np.rint(img * 255) / 255) * 4
    np.testing.assert_allclose(counts, np.rint(counts), atol=1e-4)


def test_gray_poisson_noise_uses_the_luma_and_is_shared_by_the_channels():
    rng = np.random.default_rng(7)
    img = np.empty((400, 400, 3), np.float32)
    img[:] = (0.2, 0.5, 0.8)
    noise = deg.poisson_noise(rng, img, 1.0, gray=True)
    assert noise.shape == (400, 400, 1)
    luma = round((0.2989 * 0.2 + 0.587 * 0.5 + 0.114 * 0.8) * 255) / 255  # torchvision's rgb_to_grayscale
    assert noise.var() == pytest.approx(luma, rel=0.02)
    img[:] = (0.2, 0.3, 0.4)
    out = deg.random_add_noise(rng, img, 0.0, (0.05, 0.05), (0.05, 0.05), gray_prob=1.0)
    assert out.std() > 0.01
    np.testing.assert_allclose(out - img, (out - img)[..., :1].repeat(3, axis=2), atol=1e-6)


# ---------------------------------------------------------------- JPEG


def test_jpeg_quality_orders_size_and_fidelity(image):
    qualities = (30, 50, 70, 95)
    sizes = [deg.encode_jpeg(image, q).size for q in qualities]
    psnrs = [psnr(deg.jpeg(image, q), image, 1.0) for q in qualities]
    assert sizes == sorted(sizes) and len(set(sizes)) == 4, sizes
    assert psnrs == sorted(psnrs) and psnrs[-1] - psnrs[0] > 4, psnrs
    assert 26 < psnrs[0] < 36 and 34 < psnrs[-1] < 46, psnrs


def test_jpeg_is_the_rgb_codec_of_pil(image):
    """PIL encodes RGB with libjpeg's tables and 4:2:0 chroma as well; swapped channels would miss by ~2/255."""
    u8 = np.rint(image * 255).astype(np.uint8)
    for q in (35, 90):
        buf = io.BytesIO()
        Image.fromarray(u8).save(buf, "JPEG", quality=q)
        pil = np.asarray(Image.open(buf), np.float32) / 255
        ours = deg.jpeg(image, q)
        assert ours.shape == image.shape and ours.dtype == np.float32
        assert np.abs(ours - pil).max() <= 2 / 255 and np.abs(ours - pil).mean() < 0.1 / 255


def test_jpeg_clamps_its_input(image):
    np.testing.assert_array_equal(deg.jpeg(image * 1.6 - 0.3, 80), deg.jpeg(np.clip(image * 1.6 - 0.3, 0, 1), 80))


# ---------------------------------------------------------------- the pipeline


def test_pipeline_shapes_types_and_determinism(astronaut):
    degrade = deg.RealESRGANDegradation(CONFIG, SCALE)
    hr = astronaut[:96, :128]
    state = np.random.get_state()
    outs = [degrade(hr, np.random.default_rng(seed)) for seed in (11, 11, 12)]
    assert np.random.get_state()[1].tolist() == state[1].tolist()  # the global numpy RNG is not touched
    assert all(out.shape == hr.shape and out.dtype == np.uint8 for out in outs)
    assert outs[0].tobytes() == outs[1].tobytes() and outs[0].tobytes() != outs[2].tobytes()
    lq = degrade.degrade(hr, np.random.default_rng(11))
    assert lq.shape == (24, 32, 3) and lq.dtype == np.uint8
    for seed in range(40):  # tiny crops: intermediate sizes are clamped to 1 pixel where torch would fail
        assert degrade(astronaut[:4, :8], np.random.default_rng(seed)).shape == (4, 8, 3)


def test_pipeline_degrades_substantially(astronaut):
    degrade = deg.RealESRGANDegradation(CONFIG, SCALE)
    scores = [psnr(degrade(astronaut, np.random.default_rng(seed)), astronaut, 255.0) for seed in range(6)]
    lr = np.asarray(Image.fromarray(astronaut).resize((128, 128), Image.BICUBIC))
    bicubic = psnr(np.asarray(Image.fromarray(lr).resize((512, 512), Image.BICUBIC)), astronaut, 255.0)
    assert all(12 < s < 30 for s in scores), scores
    assert np.mean(scores) < bicubic - 2, (scores, bicubic)
    assert np.std(scores) > 0.3, scores  # the degradation varies with the draw


def neutral_config():
    """Every degradation off (zero noise, pulse blurs, no random resize, JPEG at 100): only the x4 downscale."""
    c = paper_degradation()
    for suffix in ("", "2"):
        c["noise_range" + suffix] = (0.0, 0.0)
        c["gaussian_noise_prob" + suffix] = 1.0
        c["sinc_prob" + suffix] = 0.0
        c["kernel_list" + suffix], c["kernel_prob" + suffix] = ("iso",), (1.0,)
        c["blur_sigma" + suffix] = (1e-3, 1e-3)
        c["resize_prob" + suffix] = (0.0, 0.0, 1.0)
        c["jpeg_range" + suffix] = (100, 100)
    c.final_sinc_prob = 0.0
    return c


def downscale_residual_stds(lq: np.ndarray, hr: np.ndarray) -> list[float]:
    """std (0-255 units) of the LQ minus the plain downscale of the HR, for each resize mode."""
    img, lq = hr.astype(np.float32) / 255, lq.astype(np.float32) / 255
    return [float(np.std(lq - deg.resize(img, lq.shape[:2], mode)) * 255) for mode in deg.RESIZE_MODES]


def test_with_every_degradation_off_the_lq_is_a_plain_downscale(astronaut):
    degrade = deg.RealESRGANDegradation(neutral_config(), SCALE)
    for seed in range(3):
        residuals = downscale_residual_stds(degrade.degrade(astronaut, np.random.default_rng(seed)), astronaut)
        assert min(residuals) < 8, residuals  # what JPEG at quality 100 (4:2:0 chroma) leaves


def test_second_stage_noise_is_added_at_the_lr_size(astronaut):
    """Noise of sigma 20 added after the second resize (to H/4) stays ~20; added at H it would be averaged down."""
    c = neutral_config()
    c.noise_range2, c.gray_noise_prob2 = (20.0, 20.0), 0.0
    degrade = deg.RealESRGANDegradation(c, SCALE)
    for seed in range(3):
        residuals = downscale_residual_stds(degrade.degrade(astronaut, np.random.default_rng(seed)), astronaut)
        assert 12 < min(residuals) and max(residuals) < 22, residuals


def test_second_blur_prob_switches_the_second_blur(astronaut):
    """The kernels are drawn either way, so the same seed gives the same draws with a pulse or a wide kernel2."""
    hr = astronaut[:128, :128]
    for prob, kernel_matters in ((0.0, False), (1.0, True)):
        outs = []
        for sigma in (1e-3, 3.0):
            c = neutral_config()
            c.blur_sigma2, c.second_blur_prob = (sigma, sigma), prob
            outs.append(deg.RealESRGANDegradation(c, SCALE).degrade(hr, np.random.default_rng(0)))
        assert np.array_equal(*outs) != kernel_matters


def blockiness(img: np.ndarray) -> float:
    """Mean luma step across the 8 x 8 JPEG block boundaries over the mean step elsewhere (rows and columns)."""
    y = img.astype(np.float64) @ [0.299, 0.587, 0.114]
    ratios = []
    for axis in (0, 1):
        steps = np.abs(np.diff(y, axis=axis)).mean(1 - axis)
        at_boundary = np.arange(steps.size) % 8 == 7
        ratios.append(steps[at_boundary].mean() / steps[~at_boundary].mean())
    return float(np.mean(ratios))


def test_last_jpeg_comes_after_or_before_the_last_resize_half_the_time(astronaut):
    """JPEG last leaves 8 x 8 blocks on the LR grid; JPEG before the last resize (from up to 1.2 x the LR size,
    here the second-stage resize always goes up) leaves them off it."""
    c = neutral_config()
    c.resize_prob2, c.jpeg_range2 = (1.0, 0.0, 0.0), (30, 30)
    degrade = deg.RealESRGANDegradation(c, SCALE)
    ratios = [blockiness(degrade.degrade(astronaut, np.random.default_rng(seed))) for seed in range(24)]
    assert 4 <= sum(r > 1.18 for r in ratios) <= 20, np.round(ratios, 2)


@pytest.mark.parametrize(
    "key,value",
    [
        ("resize_prob", (0.5, 0.5, 0.5)),
        ("resize_range2", (1.2, 0.3)),
        ("noise_range", (30.0, 1.0)),
        ("gray_noise_prob2", 1.4),
        ("jpeg_range", (0, 101)),
        ("kernel_list", ("iso", "box", "aniso", "generalized_iso", "plateau_iso", "plateau_aniso")),
        ("kernel_prob2", (0.5, 0.5)),
        ("blur_kernel_size", 20),
        ("betag_range", (1.5, 4.0)),
        ("blur_sigma2", (-1.0, 1.5)),
        ("final_sinc_prob", -0.1),
    ],
)
def test_bad_configs_are_one_line_errors_naming_the_key(key, value):
    c = paper_degradation()
    c[key] = value
    with pytest.raises(ValueError, match=f"^degradation config: {key} = ") as info:
        deg.RealESRGANDegradation(c, SCALE)
    assert "\n" not in str(info.value)


def test_bad_scale_is_a_one_line_error():
    with pytest.raises(ValueError, match="^degradation scale must be a positive integer, got 0$"):
        deg.RealESRGANDegradation(CONFIG, scale=0)


def test_bad_images_are_refused(astronaut):
    degrade = deg.RealESRGANDegradation(CONFIG, SCALE)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="not a multiple of the scale 4"):
        degrade(astronaut[:66, :64], rng)
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) uint8 RGB image"):
        degrade(astronaut[:64, :64].astype(np.float32), rng)
