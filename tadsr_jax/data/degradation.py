"""Real-ESRGAN's second-order degradation on the host (numpy + OpenCV), with the reference's parameters.

The reference (SeeSR-style `dataloaders/realesrgan.py`, from Real-ESRGAN's dataset and `feed_data`) runs basicsr's
kernels, noise and DiffJPEG in PyTorch. Here every op works on one HWC float32 RGB image in [0, 1]:

  kernels: kernel1, kernel2 (sinc with sinc_prob, else a mixed Gaussian-family kernel; size uniform in odd 7..21)
           and the final sinc (with final_sinc_prob, else a pulse), all drawn first
  stage 1: blur(kernel1) -> resize by s (up/down/keep) -> Gaussian (gaussian_noise_prob) or Poisson noise -> JPEG
  stage 2: blur(kernel2) with second_blur_prob -> resize to (H/scale * s, W/scale * s) -> noise ->
           50/50 [resize to (H/scale, W/scale) -> final sinc -> JPEG] or [JPEG -> resize -> final sinc]
  end:     clamp to [0, 1], round to 1/255 (uint8); `__call__` then resizes bicubically back to (H, W)

All randomness comes from the `np.random.Generator` passed in, so an output depends only on (image, rng state).
Deviations from the PyTorch reference:
- JPEG is a real codec (OpenCV's libjpeg, 4:2:0, integer quality = the reference's uniform float draw rounded)
  instead of DiffJPEG (float quality, float input, zero padding to multiples of 16).
- Resizes are `cv2.resize` (see `resize` and `rescale` for how they differ from `F.interpolate`).
- Kernels are not zero-padded to 21 x 21 and the pulse is 1 x 1: zero taps change nothing in a reflect-padded
  correlation.
- The reference's horizontal flip is left to the caller (the training pipeline flips HR and LR together);
  `gray_prob` and `color_jitter_prob` are 0 in the reference's config and are not implemented.
"""

import functools
import math
from collections.abc import Sequence
from typing import NoReturn

import cv2
import ml_collections
import numpy as np
from scipy import special

# The input pipeline runs examples in parallel (threads, worker processes); OpenCV's own thread pool would only
# oversubscribe the cores. Set at import so that grain's worker processes get it too.
cv2.setNumThreads(1)

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}
MIN_KERNEL_SIZE = 7
ROTATION_RANGE = (-math.pi, math.pi)
# torchvision's rgb_to_grayscale, used by basicsr's gray Poisson noise.
GRAY_WEIGHTS = np.array([0.2989, 0.587, 0.114], np.float32)


def _fail(key: str, value, why: str) -> NoReturn:
    raise ValueError(f"degradation config: {key} = {value!r} {why}")


def _check_prob(c: ml_collections.ConfigDict, key: str):
    if not 0.0 <= c[key] <= 1.0:
        _fail(key, c[key], "must be a probability in [0, 1]")


def _check_distribution(c: ml_collections.ConfigDict, key: str, n: int):
    p = tuple(c[key])
    if len(p) != n or min(p) < 0 or abs(sum(p) - 1.0) > 1e-6:
        _fail(key, p, f"must be {n} non-negative probabilities summing to 1")


def _check_range(c: ml_collections.ConfigDict, key: str, low: float, high: float, around_one: bool = False):
    r = tuple(c[key])
    if len(r) != 2 or not low <= r[0] <= r[1] <= high:
        _fail(key, r, f"must be (min, max) with {low} <= min <= max <= {high}")
    if around_one and not r[0] <= 1.0 <= r[1]:
        _fail(key, r, "must contain 1 (values are drawn from U(min, 1) or U(1, max))")


def validate(c: ml_collections.ConfigDict):
    """Raises a one-line ValueError naming the first bad key of a `config.data.realesrgan`."""
    for suffix in ("", "2"):
        for key in ("gaussian_noise_prob", "gray_noise_prob", "sinc_prob"):
            _check_prob(c, key + suffix)
        _check_distribution(c, "resize_prob" + suffix, 3)
        _check_range(c, "resize_range" + suffix, 1e-3, 1e3, around_one=True)
        _check_range(c, "noise_range" + suffix, 0.0, 255.0)
        _check_range(c, "poisson_scale_range" + suffix, 0.0, 1e3)
        _check_range(c, "jpeg_range" + suffix, 1, 100)
        size = c["blur_kernel_size" + suffix]
        if not (isinstance(size, int) and size >= MIN_KERNEL_SIZE and size % 2):
            _fail("blur_kernel_size" + suffix, size, f"must be an odd integer >= {MIN_KERNEL_SIZE}")
        names = tuple(c["kernel_list" + suffix])
        if not names or any(name not in KERNEL_TYPES for name in names):
            _fail("kernel_list" + suffix, names, f"must be a non-empty subset of {KERNEL_TYPES}")
        _check_distribution(c, "kernel_prob" + suffix, len(c["kernel_list" + suffix]))
        _check_range(c, "blur_sigma" + suffix, 1e-3, 1e3)
        _check_range(c, "betag_range" + suffix, 1e-3, 1e3, around_one=True)
        _check_range(c, "betap_range" + suffix, 1e-3, 1e3, around_one=True)
    _check_prob(c, "second_blur_prob")
    _check_prob(c, "final_sinc_prob")


# ---------------------------------------------------------------- kernels


@functools.cache
def mesh_grid(size: int) -> np.ndarray:
    """(size, size, 2) float64 offsets (x, y) = (column, row) from the centre of an odd-sized kernel (read-only)."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"kernel size must be odd and positive, got {size}")
    ax = np.arange(size, dtype=np.float64) - size // 2
    grid = np.stack(np.meshgrid(ax, ax), axis=-1)
    grid.flags.writeable = False
    return grid


def sigma_matrix(sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """Covariance U diag(sigma_x^2, sigma_y^2) U^T, U the rotation by theta (radians)."""
    c, s = math.cos(theta), math.sin(theta)
    u = np.array([[c, -s], [s, c]])
    return u @ np.diag([sigma_x**2, sigma_y**2]) @ u.T


def _quadratic_form(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """q(v) = v^T Sigma^-1 v over the kernel grid."""
    grid = mesh_grid(size)
    return np.einsum("...i,ij,...j->...", grid, np.linalg.inv(sigma_matrix(sigma_x, sigma_y, theta)), grid)


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0) -> np.ndarray:
    """exp(-q/2), normalised to sum 1; isotropic (sigma_y = sigma_x, theta = 0) when sigma_y is None."""
    if sigma_y is None:
        sigma_y, theta = sigma_x, 0.0
    k = np.exp(-0.5 * _quadratic_form(size, sigma_x, sigma_y, theta))
    return k / k.sum()


def generalized_gaussian_kernel(
    size: int, sigma_x: float, sigma_y: float | None, theta: float, beta: float
) -> np.ndarray:
    """exp(-q^beta / 2), normalised (Pascal et al. 2013; beta = 1 is the Gaussian)."""
    if sigma_y is None:
        sigma_y, theta = sigma_x, 0.0
    k = np.exp(-0.5 * np.power(_quadratic_form(size, sigma_x, sigma_y, theta), beta))
    return k / k.sum()


def plateau_kernel(size: int, sigma_x: float, sigma_y: float | None, theta: float, beta: float) -> np.ndarray:
    """1 / (1 + q^beta), normalised: flat top, heavy tails."""
    if sigma_y is None:
        sigma_y, theta = sigma_x, 0.0
    k = np.reciprocal(np.power(_quadratic_form(size, sigma_x, sigma_y, theta), beta) + 1.0)
    return k / k.sum()


def circular_lowpass_kernel(cutoff: float, size: int, pad_to: int = 0) -> np.ndarray:
    """The 2-D sinc: the ideal circular low-pass of cutoff `cutoff` (radians, pi is Nyquist), truncated to
    size x size, h(r) = cutoff J1(cutoff r) / (2 pi r) with its limit cutoff^2 / (4 pi) at r = 0, normalised to
    sum 1, then zero-padded to pad_to x pad_to if pad_to > size."""
    grid = mesh_grid(size)
    r = np.hypot(grid[..., 0], grid[..., 1])
    r[size // 2, size // 2] = 1.0  # any non-zero value; the centre is overwritten below
    k = cutoff * special.j1(cutoff * r) / (2 * np.pi * r)
    k[size // 2, size // 2] = cutoff**2 / (4 * np.pi)
    k /= k.sum()
    if pad_to > size:
        pad = (pad_to - size) // 2
        k = np.pad(k, pad)
    return k


def pulse_kernel(size: int) -> np.ndarray:
    """The identity filter: 1 at the centre."""
    k = np.zeros((size, size))
    k[size // 2, size // 2] = 1.0
    return k


def draw_beta(rng: np.random.Generator, beta_range: Sequence[float]) -> float:
    """basicsr's shape draw: U(min, 1) or U(1, max), 50/50."""
    return rng.uniform(beta_range[0], 1.0) if rng.random() < 0.5 else rng.uniform(1.0, beta_range[1])


def random_mixed_kernel(
    rng: np.random.Generator,
    kernel_list: Sequence[str],
    kernel_prob: Sequence[float],
    size: int,
    sigma_range: Sequence[float],
    betag_range: Sequence[float],
    betap_range: Sequence[float],
    rotation_range: Sequence[float] = ROTATION_RANGE,
) -> tuple[str, np.ndarray]:
    """(type, kernel): a type drawn from kernel_list with kernel_prob, sigma_x (and for *aniso sigma_y, rotation)
    uniform in their ranges, beta by `draw_beta` (basicsr's `random_mixed_kernels` without kernel noise)."""
    name = kernel_list[rng.choice(len(kernel_list), p=kernel_prob)]
    sigma_x = rng.uniform(*sigma_range)
    sigma_y, theta = None, 0.0
    if name.endswith("aniso"):
        sigma_y, theta = rng.uniform(*sigma_range), rng.uniform(*rotation_range)
    if name.startswith("generalized"):
        return name, generalized_gaussian_kernel(size, sigma_x, sigma_y, theta, draw_beta(rng, betag_range))
    if name.startswith("plateau"):
        return name, plateau_kernel(size, sigma_x, sigma_y, theta, draw_beta(rng, betap_range))
    return name, gaussian_kernel(size, sigma_x, sigma_y, theta)


def kernel_sizes(max_size: int) -> tuple[int, ...]:
    """The odd sizes 7..max_size, drawn uniformly."""
    return tuple(range(MIN_KERNEL_SIZE, max_size + 1, 2))


def random_blur_kernel(
    rng: np.random.Generator,
    max_size: int,
    sinc_prob: float,
    kernel_list: Sequence[str],
    kernel_prob: Sequence[float],
    sigma_range: Sequence[float],
    betag_range: Sequence[float],
    betap_range: Sequence[float],
) -> tuple[str, np.ndarray]:
    """(type, kernel) of one blur stage: size uniform in `kernel_sizes(max_size)`; with sinc_prob a "sinc" of
    cutoff U(pi/3, pi) (size < 13) or U(pi/5, pi), else `random_mixed_kernel`."""
    sizes = kernel_sizes(max_size)
    size = sizes[rng.integers(len(sizes))]
    if rng.random() < sinc_prob:
        cutoff = rng.uniform(np.pi / 3 if size < 13 else np.pi / 5, np.pi)
        return "sinc", circular_lowpass_kernel(cutoff, size)
    return random_mixed_kernel(rng, kernel_list, kernel_prob, size, sigma_range, betag_range, betap_range)


def random_final_sinc(rng: np.random.Generator, max_size: int, prob: float) -> np.ndarray:
    """With prob a sinc of size uniform in `kernel_sizes(max_size)` and cutoff U(pi/3, pi), else the 1 x 1 pulse."""
    if rng.random() >= prob:
        return pulse_kernel(1)
    sizes = kernel_sizes(max_size)
    size = sizes[rng.integers(len(sizes))]
    return circular_lowpass_kernel(rng.uniform(np.pi / 3, np.pi), size)


# ---------------------------------------------------------------- image ops (HWC float32 RGB in [0, 1])


# cv2.filter2D takes a DFT path for float32 kernels of more than this many taps; at these sizes it is slower than
# the direct path, so larger kernels are applied in bands of rows.
_DIRECT_TAPS = 129
# Budget (L1, summed |taps|) of the kernel simplifications below, half for dropping border taps and half for a
# low-rank approximation: the output moves by less than float32 resolution for pixels in [0, 1].
_KERNEL_TOL = 1e-7


def _trim(kernel: np.ndarray) -> np.ndarray:
    """The centred square of `kernel` without the outer rings whose taps sum to at most _KERNEL_TOL / 2 (the far
    tails of narrow Gaussians: most of a 21 x 21 grid for sigma below ~1.5)."""
    mass = np.abs(kernel)
    total, c = mass.sum(), kernel.shape[0] // 2
    for r in range(c):
        if total - mass[c - r : c + r + 1, c - r : c + r + 1].sum() <= _KERNEL_TOL / 2:
            return kernel[c - r : c + r + 1, c - r : c + r + 1]
    return kernel


def _separable_terms(kernel: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(column, row)] whose outer products sum to `kernel` within _KERNEL_TOL / 2 (L1); [] when a row + column
    pass per term would cost more than the direct correlation (about 3 size + 12 against size^2 taps each)."""
    size = kernel.shape[0]
    u, s, vt = np.linalg.svd(kernel)
    approx = np.zeros_like(kernel)
    for rank in range(1, size + 1):
        if rank * (3 * size + 12) >= size * size:
            return []
        approx += s[rank - 1] * np.outer(u[:, rank - 1], vt[rank - 1])
        if np.abs(kernel - approx).sum() <= _KERNEL_TOL / 2:
            return [((u[:, i] * s[i]).astype(np.float32), vt[i].astype(np.float32)) for i in range(rank)]
    return []


def _correlate_direct(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """cv2.filter2D kept on its direct path: kernels of more than _DIRECT_TAPS taps go in bands of rows."""
    size = kernel.shape[0]
    if size * size <= _DIRECT_TAPS:
        return cv2.filter2D(img, -1, kernel, borderType=cv2.BORDER_REFLECT_101)
    # out[y, x] = sum_ij K[i, j] P[y + i, x + j] on the padded P, summed over bands of rows a..a+n-1 of K; each
    # band reads only inside P, so the border mode of these calls never matters.
    h, w = img.shape[:2]
    half = size // 2
    padded = cv2.copyMakeBorder(img, half, half, half, half, cv2.BORDER_REFLECT_101)
    step = _DIRECT_TAPS // size
    out = None
    for a in range(0, size, step):
        band = kernel[a : a + step]
        part = cv2.filter2D(padded[a : a + h + band.shape[0] - 1], -1, band, anchor=(0, 0))[:h, :w]
        out = part.copy() if out is None else cv2.add(out, part, dst=out)
    return out


def filter2d(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Per-channel correlation with `kernel` (odd square), borders reflected without repeating the edge
    (cv2.BORDER_REFLECT_101 = the torch "reflect" padding of basicsr's `filter2D`); output of the input's size.

    Negligible border taps are dropped; kernels of low numerical rank (isotropic Gaussians are rank 1) then run
    as row + column passes, one pair per rank-1 term, the others directly. Equal to one 2-D correlation with the
    whole kernel up to float32 rounding.
    """
    kernel = _trim(kernel)
    if kernel.shape == (1, 1):
        return img * np.float32(kernel[0, 0])
    terms = _separable_terms(kernel)
    if not terms:
        return _correlate_direct(img, kernel.astype(np.float32))
    out = None
    for col, row in terms:
        part = cv2.filter2D(img, -1, row[None], borderType=cv2.BORDER_REFLECT_101)
        part = cv2.filter2D(part, -1, col[:, None], borderType=cv2.BORDER_REFLECT_101)
        out = part if out is None else cv2.add(out, part, dst=out)
    return out


def resize(img: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """`F.interpolate(img, size=size, mode=mode)` (align_corners=False) with cv2.resize; size = (height, width),
    mode "area", "bilinear" or "bicubic"; no clamping.

    Bilinear and bicubic (both a = -0.75, no antialiasing) agree with torch to float32 rounding, and so does area
    for integer downscale factors. Area differs elsewhere: at non-integer downscale factors cv2 weighs partially
    covered pixels by their coverage where torch's adaptive average pooling averages every touched pixel equally,
    and when upscaling cv2 interpolates linearly where torch repeats pixels.
    """
    if size == img.shape[:2]:
        return img
    if min(size) < 1:
        raise ValueError(f"cannot resize a {img.shape} image to {size}")
    return cv2.resize(img, (size[1], size[0]), interpolation=RESIZE_MODES[mode])


def rescale(img: np.ndarray, factor: float, mode: str) -> np.ndarray:
    """`F.interpolate(img, scale_factor=factor, mode=mode)`: floor(h * factor) x floor(w * factor), source
    coordinates mapped with 1 / factor (not the size ratio, as `resize` does). cv2 maps the same way given fx, fy
    but rounds the size up or down, so its output is cropped; it agrees with torch to ~2e-5 (cv2 keeps the
    factor in lower precision), area as in `resize`. A factor within 1/h of 1 that keeps the size returns the
    image as is, where torch would shift it by up to half a pixel; sizes below 1 (torch fails) become 1."""
    h, w = img.shape[:2]
    size = (max(1, int(h * factor)), max(1, int(w * factor)))
    if size == (h, w):
        return img
    if min(h, w) * factor < 1:
        return resize(img, size, mode)
    out = cv2.resize(img, None, fx=factor, fy=factor, interpolation=RESIZE_MODES[mode])
    return out if out.shape[:2] == size else np.ascontiguousarray(out[: size[0], : size[1]])


def _draw_scale(rng: np.random.Generator, resize_prob: Sequence[float], resize_range: Sequence[float]) -> float:
    """The reference's up/down/keep draw: U(1, max), U(min, 1) or 1."""
    updown = rng.choice(3, p=resize_prob)
    if updown == 0:
        return rng.uniform(1.0, resize_range[1])
    if updown == 1:
        return rng.uniform(resize_range[0], 1.0)
    return 1.0


def _draw_mode(rng: np.random.Generator) -> str:
    return tuple(RESIZE_MODES)[rng.integers(len(RESIZE_MODES))]


def gaussian_noise(rng: np.random.Generator, shape: tuple[int, int, int], sigma: float, gray: bool) -> np.ndarray:
    """N(0, (sigma / 255)^2) noise (sigma in 0-255 units) for an image of `shape`; gray: one (H, W, 1) plane that
    broadcasts over the channels."""
    h, w, c = shape
    return rng.standard_normal((h, w, 1 if gray else c), dtype=np.float32) * np.float32(sigma / 255)


_GUIDE_BINS = 4096


@functools.cache
def _poisson_tables(vals: float) -> tuple[np.ndarray, np.ndarray]:
    """Inversion tables of Poisson(level * vals / 255), level 0..255 (read-only, flat):

    cdf: (256 * n,) the CDFs over the counts 0..n-1, the last set to 1 (the tail beyond is below 1e-20);
    guide: (256 * _GUIDE_BINS,) int16, for u in bin g = floor(u * _GUIDE_BINS) the count min{x : CDF(x) > u} when
      it is the same for the whole bin, else -1 - (that count at the bin's lower edge), where a search starts.
    """
    lam = np.arange(256)[:, None] * (vals / 255)
    counts = np.arange(int(vals + 10 * math.sqrt(vals) + 30))[None]
    cdf = np.minimum(np.cumsum(np.exp(special.xlogy(counts, lam) - lam - special.gammaln(counts + 1)), 1), 1.0)
    cdf[:, -1] = 1.0
    edges = np.arange(_GUIDE_BINS + 1) / _GUIDE_BINS
    first = np.stack([np.searchsorted(row, edges, side="right") for row in cdf])
    guide = np.where(first[:, 1:] == first[:, :-1], first[:, :-1], -1 - first[:, :-1]).astype(np.int16)
    cdf, guide = cdf.ravel(), guide.ravel()
    cdf.flags.writeable = guide.flags.writeable = False
    return cdf, guide


def poisson_counts(rng: np.random.Generator, levels: np.ndarray, vals: float) -> np.ndarray:
    """Poisson(levels * vals / 255) for uint8 `levels` (int16 counts), by inversion: X = min{x : CDF(x) > u},
    u ~ U[0, 1), read from a guide table or, for the ~1 % of u whose table bin straddles a CDF step, searched.
    Exact like `rng.poisson` (other draws), several times faster."""
    cdf, guide = _poisson_tables(vals)
    flat = levels.ravel()
    u = rng.random(flat.size)
    index = flat.astype(np.int32)  # < 256 * _GUIDE_BINS: int32 halves the memory traffic of intp
    index *= _GUIDE_BINS
    index += (u * _GUIDE_BINS).astype(np.int32)
    x = guide[index]
    slow = np.flatnonzero(x < 0)
    start = flat[slow].astype(np.intp) * (cdf.size // 256)
    found = -1 - x[slow].astype(np.intp)
    todo = np.arange(slow.size)
    while todo.size:
        todo = todo[cdf[start[todo] + found[todo]] <= u[slow[todo]]]
        found[todo] += 1
    x[slow] = found
    return x.reshape(levels.shape)


def poisson_noise(rng: np.random.Generator, img: np.ndarray, scale: float, gray: bool) -> np.ndarray:
    """basicsr's shot noise: with x the image (gray: its luma, (H, W, 1)) rounded to 1/255 and vals =
    2^ceil(log2(number of distinct values of x)), noise = scale * (Poisson(x * vals) / vals - x)."""
    src = (img @ GRAY_WEIGHTS)[..., None] if gray else img
    levels = np.rint(np.clip(src, 0.0, 1.0) * 255).astype(np.uint8)
    distinct = np.count_nonzero(np.bincount(levels.ravel(), minlength=256))
    vals = 2.0 ** math.ceil(math.log2(distinct))
    x = levels.astype(np.float32) / np.float32(255)
    return (poisson_counts(rng, levels, vals).astype(np.float32) / np.float32(vals) - x) * np.float32(scale)


def random_add_noise(
    rng: np.random.Generator,
    img: np.ndarray,
    gaussian_prob: float,
    noise_range: Sequence[float],
    poisson_scale_range: Sequence[float],
    gray_prob: float,
) -> np.ndarray:
    """Gaussian noise (sigma ~ U(noise_range)) with gaussian_prob, else Poisson noise (scale ~
    U(poisson_scale_range)); gray with gray_prob; the sum clamped to [0, 1]."""
    if rng.random() < gaussian_prob:
        sigma = rng.uniform(*noise_range)
        noise = gaussian_noise(rng, img.shape, sigma, gray=rng.random() < gray_prob)
    else:
        scale = rng.uniform(*poisson_scale_range)
        noise = poisson_noise(rng, img, scale, gray=rng.random() < gray_prob)
    return np.clip(img + noise, 0.0, 1.0)


def to_uint8(img: np.ndarray) -> np.ndarray:
    """Clamp to [0, 1] and round to the nearest 1/255 (ties to even, as torch.round)."""
    return np.rint(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)


def encode_jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """The JPEG bytes (uint8 array) of a float image (clamped, rounded) at integer quality 1..100."""
    bgr = cv2.cvtColor(to_uint8(img), cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"JPEG encoding of a {img.shape} image failed")
    return data


def jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    """The image after a JPEG round trip at `quality` (input clamped to [0, 1] as basicsr does)."""
    bgr = cv2.imdecode(encode_jpeg(img, quality), cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).astype(np.float32) / np.float32(255)


def random_jpeg(rng: np.random.Generator, img: np.ndarray, quality_range: Sequence[float]) -> np.ndarray:
    """`jpeg` at quality U(quality_range) rounded to an integer (OpenCV takes integer qualities only)."""
    return jpeg(img, int(np.rint(rng.uniform(*quality_range))))


# ---------------------------------------------------------------- the pipeline


class RealESRGANDegradation:
    """HR crop (H, W, 3) uint8 RGB -> its Real-ESRGAN LQ, see the module docstring; the LQ is (H / scale,
    W / scale) before it is resized back to (H, W). Thread-safe (no state)."""

    def __init__(self, config: ml_collections.ConfigDict, scale: int):
        if not (isinstance(scale, int) and scale >= 1):
            raise ValueError(f"degradation scale must be a positive integer, got {scale!r}")
        validate(config)
        self.config = config
        self.scale = scale

    def _kernels(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c = self.config
        _, kernel1 = random_blur_kernel(
            rng,
            c.blur_kernel_size,
            c.sinc_prob,
            c.kernel_list,
            c.kernel_prob,
            c.blur_sigma,
            c.betag_range,
            c.betap_range,
        )
        _, kernel2 = random_blur_kernel(
            rng,
            c.blur_kernel_size2,
            c.sinc_prob2,
            c.kernel_list2,
            c.kernel_prob2,
            c.blur_sigma2,
            c.betag_range2,
            c.betap_range2,
        )
        return kernel1, kernel2, random_final_sinc(rng, c.blur_kernel_size, c.final_sinc_prob)

    def degrade(self, hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The LQ at (H / scale, W / scale, 3) uint8."""
        c = self.config
        if hr.dtype != np.uint8 or hr.ndim != 3 or hr.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {hr.dtype} {hr.shape}")
        h, w = hr.shape[:2]
        if h % self.scale or w % self.scale:
            raise ValueError(f"image size {h}x{w} is not a multiple of the scale {self.scale}")
        kernel1, kernel2, sinc = self._kernels(rng)

        out = filter2d(hr.astype(np.float32) / np.float32(255), kernel1)
        out = rescale(out, _draw_scale(rng, c.resize_prob, c.resize_range), _draw_mode(rng))
        out = random_add_noise(rng, out, c.gaussian_noise_prob, c.noise_range, c.poisson_scale_range, c.gray_noise_prob)
        out = random_jpeg(rng, out, c.jpeg_range)

        if rng.random() < c.second_blur_prob:
            out = filter2d(out, kernel2)
        s = _draw_scale(rng, c.resize_prob2, c.resize_range2)
        out = resize(out, (max(1, int(h / self.scale * s)), max(1, int(w / self.scale * s))), _draw_mode(rng))
        out = random_add_noise(
            rng, out, c.gaussian_noise_prob2, c.noise_range2, c.poisson_scale_range2, c.gray_noise_prob2
        )
        lr_size = (h // self.scale, w // self.scale)
        if rng.random() < 0.5:
            out = filter2d(resize(out, lr_size, _draw_mode(rng)), sinc)
            out = random_jpeg(rng, out, c.jpeg_range2)
        else:
            out = random_jpeg(rng, out, c.jpeg_range2)
            out = filter2d(resize(out, lr_size, _draw_mode(rng)), sinc)
        return to_uint8(out)

    def __call__(self, hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The LQ resized bicubically (cv2, a = -0.75) back to the HR size: (H, W, 3) uint8 RGB. (The reference's
        trainer reads stored LRs and resizes them with PIL's LANCZOS.)"""
        lq = self.degrade(hr, rng)
        return cv2.resize(lq, (hr.shape[1], hr.shape[0]), interpolation=cv2.INTER_CUBIC)
