"""Colour fix against a PyTorch re-statement of StableSR's colorfix formulas (NCHW) on real images."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data, filters, transform
from torch_utils import nchw_to_nhwc, nhwc_to_nchw

from tadsr_jax.infer.colorfix import COLOR_FIX_METHODS, adain_color_fix, color_fix, wavelet_color_fix

# Pixels in [0, 1], where a float32 ulp is <= 1.2e-7: ours vs torch measured up to 3.0e-7 (6 runs over seeds), so
# ATOL is 30x above; a biased variance alone moves pixels by 2e-3, a dropped wavelet level by far more.
ATOL = 1e-5


# --- the reference formulas, in torch -------------------------------------------------------------------------


def torch_adain(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    def mean_std(x):
        flat = x.flatten(2)
        return flat.mean(dim=2)[..., None, None], (flat.var(dim=2, unbiased=True) + 1e-5).sqrt()[..., None, None]

    target_mean, target_std = mean_std(target)
    source_mean, source_std = mean_std(source)
    return ((target - target_mean) / target_std * source_std + source_mean).clamp(0, 1)


def torch_wavelet(target: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    kernel = kernel[None, None].repeat(3, 1, 1, 1)

    def decompose(image):
        high = torch.zeros_like(image)
        for level in range(5):
            radius = 2**level
            low = F.conv2d(F.pad(image, (radius,) * 4, mode="replicate"), kernel, groups=3, dilation=radius)
            high += image - low
            image = low
        return high, low

    return (decompose(target)[0] + decompose(source)[1]).clamp(0, 1)


# Jitted once here: op-by-op, XLA:CPU compiles each of the wavelet's ~100 small ops separately (seconds).
FIXES = {"adain": (jax.jit(adain_color_fix), torch_adain), "wavelet": (jax.jit(wavelet_color_fix), torch_wavelet)}


def reference(fix, target: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Run a torch re-statement on NHWC arrays, adding a batch axis to single images."""
    single = target.ndim == 3
    if single:
        target, source = target[None], source[None]
    out = nchw_to_nhwc(fix(torch.from_numpy(nhwc_to_nchw(target)), torch.from_numpy(nhwc_to_nchw(source))))
    return out[0] if single else out


# --- real images and SR-like perturbed copies ---------------------------------------------------------------


def image(name: str, height: int = 96, width: int = 128) -> np.ndarray:
    return transform.resize(getattr(data, name)(), (height, width), anti_aliasing=True).astype(np.float32)


def perturbed(img: np.ndarray, seed: int) -> np.ndarray:
    """Blurred, colour-shifted and noised, like an SR output whose colours drifted from its input."""
    rng = np.random.default_rng(seed)
    shifted = filters.gaussian(img, sigma=1.0, channel_axis=-1) * [1.15, 0.9, 1.0] + [0.04, -0.03, 0.06]
    return np.clip(shifted + rng.normal(0, 0.03, img.shape), 0, 1).astype(np.float32)


@pytest.fixture(scope="module")
def batch() -> tuple[np.ndarray, np.ndarray]:
    """(target, source): two different real images, so per-image statistics differ."""
    source = np.stack([image("astronaut"), image("coffee")])
    target = np.stack([perturbed(img, seed) for seed, img in enumerate(source)])
    return target, source


# --- parity --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["adain", "wavelet"])
def test_batch_matches_reference(batch, method):
    ours, theirs = FIXES[method]
    target, source = batch
    out = ours(target, source)
    assert out.dtype == jnp.float32 and out.shape == target.shape
    np.testing.assert_allclose(out, reference(theirs, target, source), rtol=0, atol=ATOL)
    for i in range(2):  # each image is fixed with its own statistics, independent of its batch neighbour
        np.testing.assert_allclose(out[i], ours(target[i], source[i]), rtol=0, atol=ATOL)  # another program


@pytest.mark.parametrize("method", ["adain", "wavelet"])
def test_single_image_matches_reference(batch, method):
    ours, theirs = FIXES[method]
    target, source = batch[0][1], batch[1][1]
    out = ours(target, source)
    assert out.shape == target.shape
    np.testing.assert_allclose(out, reference(theirs, target, source), rtol=0, atol=ATOL)


def test_wavelet_replicates_edges_beyond_small_images():
    """At 12x20 the radius-8 and -16 taps reach past the borders, so every level reads replicated edges."""
    source = image("coffee", 12, 20)
    target = perturbed(source, seed=3)
    ours, theirs = FIXES["wavelet"]
    np.testing.assert_allclose(ours(target, source), reference(theirs, target, source), rtol=0, atol=ATOL)


def test_adain_on_flat_tiny_target():
    """A 4x6 target whose variance is near eps: where the eps inside the root and the unbiased variance show."""
    source = image("coffee", 4, 6)
    target = 0.5 + 0.01 * (perturbed(source, seed=4) - 0.5)
    ours, theirs = FIXES["adain"]
    # Dividing by a std near sqrt(eps) amplifies rounding: measured up to 2.8e-6 (3 seeds), 36x below this bound;
    # a biased variance errs by 2e-3, eps outside the root by 0.2.
    np.testing.assert_allclose(ours(target, source), reference(theirs, target, source), rtol=0, atol=1e-4)


@pytest.mark.parametrize("method", ["adain", "wavelet"])
def test_color_fix_dispatches(batch, method):
    target, source = batch
    fix = jax.jit(color_fix, static_argnames="method")
    np.testing.assert_allclose(fix(target, source, method=method), FIXES[method][0](target, source), rtol=0, atol=1e-6)


def test_statistics_in_float32_for_low_precision_inputs(batch):
    target, source = (jnp.asarray(x, jnp.bfloat16) for x in batch)
    out = adain_color_fix(target, source)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(
        out, adain_color_fix(target.astype(jnp.float32), source.astype(jnp.float32)), rtol=0, atol=1e-6
    )


# --- properties ----------------------------------------------------------------------------------------------


def test_none_is_identity(batch):
    target, source = batch
    out = color_fix(target, source, "none")
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, target)


def test_wavelet_of_source_against_itself_is_source(batch):
    """high + low telescopes back to the image, so fixing an image against itself changes nothing."""
    source = batch[1]
    # measured 1.2e-7 (one ulp: the five levels telescope in float32), 17x below; a dropped level errs by 1e-2
    np.testing.assert_allclose(FIXES["wavelet"][0](source, source), source, rtol=0, atol=2e-6)


def test_adain_takes_source_channel_means(batch):
    target, source = batch
    target, source = 0.3 + 0.4 * target, 0.3 + 0.4 * source  # mid-range contrast, so nothing is clamped
    out = np.asarray(adain_color_fix(target, source))
    assert 0 < out.min() and out.max() < 1

    def channel_means(x):  # in float64: numpy's float32 sum over two axes is itself off by ~1e-5
        return x.astype(np.float64).mean(axis=(1, 2))

    np.testing.assert_allclose(channel_means(out), channel_means(source), rtol=0, atol=1e-6)  # measured 7e-8: 14x
    assert np.abs(channel_means(target) - channel_means(source)).max() > 0.01  # the fix had work to do


# --- errors --------------------------------------------------------------------------------------------------


def test_unknown_method_is_rejected(batch):
    with pytest.raises(ValueError, match="'sepia'") as error:
        color_fix(*batch, method="sepia")
    assert all(method in str(error.value) for method in COLOR_FIX_METHODS)


@pytest.mark.parametrize("method", COLOR_FIX_METHODS)
def test_mismatched_shapes_are_rejected(batch, method):
    target, source = batch
    with pytest.raises(ValueError, match=r"\(2, 96, 128, 3\).*\(2, 96, 120, 3\)"):
        color_fix(target, source[:, :, :120], method)


def test_images_without_a_channel_axis_are_rejected(batch):
    grey = batch[0][0, ..., 0]
    with pytest.raises(ValueError, match=r"\(H, W, C\) or \(B, H, W, C\).*\(96, 128\)"):
        adain_color_fix(grey, grey)
