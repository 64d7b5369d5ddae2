"""DISTS against a PyTorch re-statement of DISTS_pytorch's DISTS_pt.py, on real images, after conversion.

The re-statement (`L2pooling`, `TorchDISTS`) follows DISTS_pt.py: torchvision's vgg16 `features` cut into
five stages at 4 / 9 / 16 / 23 with `L2pooling` (normalised 3x3 Hann window, depthwise conv, stride 2,
padding 1, sqrt(. + 1e-12)) in place of the max-pools, ImageNet mean/std, the input image as the first
representation, alpha / beta normalised by their joint sum, c1 = c2 = 1e-6, 1 - sum. torchvision does not
import beside this torch, so its VGG16 `features` come from the stand-in of `torch_reference`, seeded
random; alpha / beta are random and positive.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from safetensors.numpy import load_file, save_file
from skimage import data
from torch_utils import randomize_

from benchmarks.torch_reference import vgg16_stand_in
from tadsr_jax.models.dists import CHANNELS, L2Pool2d
from tadsr_jax.weights.convert import WeightsError
from tadsr_jax.weights.dists import convert_dists_weights, load_dists, random_dists


class L2pooling(torch.nn.Module):
    def __init__(self, channels: int, filter_size: int = 5, stride: int = 2):
        super().__init__()
        self.padding, self.stride = (filter_size - 2) // 2, stride
        a = np.hanning(filter_size)[1:-1]
        g = torch.Tensor(a[:, None] * a[None, :])
        self.register_buffer("filter", (g / torch.sum(g))[None, None].repeat((channels, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x**2, self.filter, stride=self.stride, padding=self.padding, groups=x.shape[1])
        return (out + 1e-12).sqrt()


class TorchDISTS(torch.nn.Module):
    def __init__(self, features: torch.nn.Sequential, alpha: torch.Tensor, beta: torch.Tensor):
        super().__init__()
        bounds, pool_channels = (0, 4, 9, 16, 23, 30), (None, 64, 128, 256, 512)
        self.stages = torch.nn.ModuleList()
        for k in range(5):
            stage = torch.nn.Sequential()
            if pool_channels[k]:
                stage.add_module(str(bounds[k]), L2pooling(pool_channels[k]))
            for i in range(bounds[k] + (k > 0), bounds[k + 1]):
                stage.add_module(str(i), features[i])
            self.stages.append(stage)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, -1, 1, 1))
        self.alpha, self.beta = torch.nn.Parameter(alpha), torch.nn.Parameter(beta)

    def forward_once(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, feats = (x - self.mean) / self.std, [x]
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        return feats

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        feats0, feats1 = self.forward_once(x), self.forward_once(y)
        dist1 = dist2 = 0
        c1 = c2 = 1e-6
        w_sum = self.alpha.sum() + self.beta.sum()
        alpha = torch.split(self.alpha / w_sum, list(CHANNELS), dim=1)
        beta = torch.split(self.beta / w_sum, list(CHANNELS), dim=1)
        for k in range(len(CHANNELS)):
            x_mean, y_mean = feats0[k].mean([2, 3], keepdim=True), feats1[k].mean([2, 3], keepdim=True)
            s1 = (2 * x_mean * y_mean + c1) / (x_mean**2 + y_mean**2 + c1)
            dist1 = dist1 + (alpha[k] * s1).sum(1, keepdim=True)
            x_var = ((feats0[k] - x_mean) ** 2).mean([2, 3], keepdim=True)
            y_var = ((feats1[k] - y_mean) ** 2).mean([2, 3], keepdim=True)
            xy_cov = (feats0[k] * feats1[k]).mean([2, 3], keepdim=True) - x_mean * y_mean
            s2 = (2 * xy_cov + c2) / (x_var + y_var + c2)
            dist2 = dist2 + (beta[k] * s2).sum(1, keepdim=True)
        return 1 - (dist1 + dist2).reshape(-1)


@pytest.fixture(scope="module")
def torch_dists():
    features = randomize_(vgg16_stand_in().features, seed=11)
    gen = torch.Generator().manual_seed(3)
    alpha, beta = (0.05 + torch.rand(1, sum(CHANNELS), 1, 1, generator=gen) for _ in range(2))
    return TorchDISTS(features, alpha, beta).eval()


@pytest.fixture(scope="module")
def weight_files(torch_dists, tmp_path_factory):
    """A torchvision-style vgg16.pth, a DISTS_pytorch-style weights.pt and their conversion."""
    folder = tmp_path_factory.mktemp("dists")
    features = {
        f"features.{k}": v.clone()
        for stage in torch_dists.stages
        for k, v in stage.state_dict().items()
        if not k.endswith("filter")
    }
    assert sorted({int(k.split(".")[1]) for k in features}) == [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    features["classifier.0.weight"] = torch.zeros(8, 4)  # torchvision's classifier must be dropped
    paths = {name: str(folder / name) for name in ("vgg16.pth", "weights.pt", "dists.safetensors")}
    torch.save(features, paths["vgg16.pth"])
    torch.save(
        {"alpha": torch_dists.alpha.detach().clone(), "beta": torch_dists.beta.detach().clone()}, paths["weights.pt"]
    )
    convert_dists_weights(paths["vgg16.pth"], paths["weights.pt"], paths["dists.safetensors"])
    return paths


@pytest.fixture(scope="module")
def model(weight_files):
    return load_dists(weight_files["dists.safetensors"])


@functools.partial(jax.jit, static_argnums=0)
def _distances(graphdef, state, x, y):
    return nnx.merge(graphdef, state)(x, y)


def distances(model, x, y) -> np.ndarray:
    return np.asarray(_distances(*nnx.split(model), jnp.asarray(x), jnp.asarray(y)))


def _image_pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    """NHWC float32 pairs in [0, 1] from real photographs: a 64x64 batch of 3 and a 50x70 batch of 2 (odd sizes
    after pooling: 25x35, 13x18, 7x9, 4x5)."""
    rng = np.random.default_rng(0)

    def crop(image, top, left, h, w):
        return image[top : top + h, left : left + w].astype(np.float32) / 255

    astronaut, coffee, chelsea = data.astronaut(), data.coffee(), data.chelsea()
    a, c, k = crop(astronaut, 100, 180, 64, 64), crop(coffee, 150, 250, 64, 64), crop(chelsea, 100, 150, 64, 64)
    noisy = np.clip(a + 0.08 * rng.standard_normal(a.shape, dtype=np.float32), 0, 1)
    square = (np.stack([noisy, k, np.roll(c, 3, axis=1)]), np.stack([a, c, c]))
    w1, w2 = crop(astronaut, 20, 200, 50, 70), crop(coffee, 200, 300, 50, 70)
    wide = (np.stack([crop(astronaut, 23, 203, 50, 70), np.clip(w2 * 0.8 + 0.1, 0, 1)]), np.stack([w1, w2]))
    return [square, wide]


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("pair", [0, 1], ids=["64x64", "50x70"])
def test_distances_match_dists_pt(torch_dists, model, pair):
    x, y = _image_pairs()[pair]
    with torch.no_grad():
        theirs = torch_dists(_nchw(x), _nchw(y)).numpy()
    ours = distances(model, x, y)
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    err = float(np.max(np.abs(ours - theirs) / np.abs(theirs)))
    print(f"DISTS fp32 {x.shape}: distances {ours}, max per-pair rel err {err:.2e}")
    assert theirs.min() > 1e-3
    assert err <= 3e-4, (ours, theirs)  # measured 1.1e-5 (float32 VGG, two summation orders): 25x


def test_identical_images_give_zero(model):
    x, _ = _image_pairs()[0]
    np.testing.assert_allclose(distances(model, x, x), 0.0, atol=1e-6)


def test_l2pool_matches_torch_on_odd_sizes():
    x = np.random.default_rng(1).standard_normal((2, 7, 10, 4)).astype(np.float32)
    with torch.no_grad():
        theirs = L2pooling(4)(_nchw(x)).numpy().transpose(0, 2, 3, 1)
    ours = np.asarray(L2Pool2d()(jnp.asarray(x)))
    assert ours.shape == theirs.shape == (2, 4, 5, 4)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)  # measured 1.2e-7 (an ulp): 80x; a wrong window errs by 1e-1


def test_random_dists_is_deterministic_with_positive_weights():
    a, b, other = random_dists(0), random_dists(0), random_dists(1)
    leaves_a, leaves_b = jax.tree.leaves(nnx.state(a, nnx.Param)), jax.tree.leaves(nnx.state(b, nnx.Param))
    assert len(leaves_a) == 28  # 13 convolutions (weight, bias), alpha, beta
    for u, v in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    for weights in (a.alpha[...], a.beta[...]):
        assert weights.shape == (sum(CHANNELS),) and float(weights.min()) > 0
    assert not np.array_equal(np.asarray(other.features[0].kernel[...]), np.asarray(a.features[0].kernel[...]))
    assert not np.array_equal(np.asarray(other.alpha[...]), np.asarray(a.alpha[...]))


def _one_line_error(call, *fragments: str) -> None:
    with pytest.raises(WeightsError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and all(f in message for f in fragments), message


def test_conversion_errors_are_one_line(weight_files, tmp_path):
    vgg, weights = weight_files["vgg16.pth"], weight_files["weights.pt"]
    out = str(tmp_path / "out.safetensors")
    _one_line_error(lambda: convert_dists_weights(str(tmp_path / "nope.pth"), weights, out), "nope.pth")
    _one_line_error(lambda: convert_dists_weights(vgg, str(tmp_path / "nope.pt"), out), "nope.pt")
    alpha = torch.load(weights, weights_only=True)["alpha"]
    cases = {
        "no_beta.pt": ({"alpha": alpha}, ("'beta'",)),
        "flat.pt": ({"alpha": alpha.reshape(-1), "beta": alpha}, ("'alpha'", "(1475,)")),
        "extra.pt": ({"alpha": alpha, "beta": alpha, "gamma": alpha}, ("'gamma'",)),
    }
    for name, (state, fragments) in cases.items():
        torch.save(state, tmp_path / name)
        _one_line_error(lambda name=name: convert_dists_weights(vgg, str(tmp_path / name), out), name, *fragments)
    truncated = {k: v for k, v in torch.load(vgg, weights_only=True).items() if k != "features.28.bias"}
    torch.save(truncated, tmp_path / "vgg_truncated.pth")
    _one_line_error(
        lambda: convert_dists_weights(str(tmp_path / "vgg_truncated.pth"), weights, out), "'features.28.bias'"
    )
    assert not (tmp_path / "out.safetensors").exists()


def test_load_errors_are_one_line(weight_files, tmp_path):
    _one_line_error(lambda: load_dists(str(tmp_path / "missing.safetensors")), "missing.safetensors")
    tensors = load_file(weight_files["dists.safetensors"])
    assert sorted(k for k in tensors if not k.startswith("features.")) == ["alpha", "beta"]
    del tensors["beta"]
    save_file(tensors, str(tmp_path / "no_beta.safetensors"))
    _one_line_error(lambda: load_dists(str(tmp_path / "no_beta.safetensors")), "'beta'")
    tensors = load_file(weight_files["dists.safetensors"])
    tensors["features.0.weight"] = tensors["features.0.weight"][:, :2]
    save_file(tensors, str(tmp_path / "bad_shape.safetensors"))
    _one_line_error(lambda: load_dists(str(tmp_path / "bad_shape.safetensors")), "'features.0.weight'")
