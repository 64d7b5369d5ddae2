"""LPIPS (v0.1), VGG and AlexNet trunks, against the lpips package, on real images, with the package's real
linear heads.

torchvision does not import beside this torch, so the lpips package gets a stand-in `torchvision.models`
whose `vgg16()` and `alexnet()` have torchvision's `features` layouts; their convolutions are randomised (no
ImageNet weights can be downloaded), the heads are the ones shipped inside the lpips package. Distances are
compared in float32; the input gradient in float64 (see its test for why).
"""

import copy
import functools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from skimage import data
from torch_utils import randomize_, rel_err

from benchmarks.torch_reference import lpips_torch
from tadsr_jax.models.lpips import MaxPool2d
from tadsr_jax.weights.convert import WeightsError
from tadsr_jax.weights.lpips import convert_lpips_weights, load_lpips, random_lpips

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# torchvision `features` indices that hold convolutions, per trunk.
CONV_INDICES = {"vgg": [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28], "alex": [0, 3, 6, 8, 10]}


def _torch_lpips(net: str) -> torch.nn.Module:
    """lpips.LPIPS(net=net) with the package's real heads and a seeded random trunk."""
    model = lpips_torch(net)
    randomize_(model.net, seed=7)  # weights N(0, 1/fan_in), biases N(0, 0.1^2)
    return model.eval()


def _weight_files(torch_model: torch.nn.Module, net: str, folder) -> dict[str, str]:
    """A torchvision-style trunk .pth, an lpips-style <net>.pth and their conversion."""
    features = {}
    for s in range(1, 6):
        features.update(
            {f"features.{k}": v.clone() for k, v in getattr(torch_model.net, f"slice{s}").state_dict().items()}
        )
    assert sorted({int(k.split(".")[1]) for k in features}) == CONV_INDICES[net]
    features["classifier.1.weight"] = torch.zeros(8, 4)  # torchvision's classifier must be dropped
    heads = {k: v.clone() for k, v in torch_model.state_dict().items() if re.fullmatch(r"lin\d\..*", k)}
    assert sorted(heads) == [f"lin{k}.model.1.weight" for k in range(5)]
    shipped = torch.load(
        os.path.join(
            os.path.dirname(sys.modules[type(torch_model).__module__].__file__), "weights", "v0.1", f"{net}.pth"
        ),
        map_location="cpu",
        weights_only=True,
    )
    for key, value in heads.items():  # the real, human-calibrated heads of the package
        torch.testing.assert_close(value, shipped[key], rtol=0, atol=0)
    paths = {name: str(folder / name) for name in ("trunk.pth", f"{net}.pth", f"lpips_{net}.safetensors")}
    torch.save(features, paths["trunk.pth"])
    torch.save(heads, paths[f"{net}.pth"])
    convert_lpips_weights(paths["trunk.pth"], paths[f"{net}.pth"], paths[f"lpips_{net}.safetensors"], net=net)
    return paths


@pytest.fixture(scope="module")
def torch_lpips():
    return _torch_lpips("vgg")


@pytest.fixture(scope="module")
def weight_files(torch_lpips, tmp_path_factory):
    paths = _weight_files(torch_lpips, "vgg", tmp_path_factory.mktemp("lpips"))
    return {"vgg16.pth": paths["trunk.pth"], **paths}


@pytest.fixture(scope="module")
def model(weight_files):
    return load_lpips(weight_files["lpips_vgg.safetensors"])


@pytest.fixture(scope="module")
def torch_lpips_alex():
    return _torch_lpips("alex")


@pytest.fixture(scope="module")
def alex_weight_files(torch_lpips_alex, tmp_path_factory):
    return _weight_files(torch_lpips_alex, "alex", tmp_path_factory.mktemp("lpips_alex"))


@functools.partial(jax.jit, static_argnums=0)
def _distances(graphdef, state, x, y):
    return nnx.merge(graphdef, state)(x, y)


@functools.partial(jax.jit, static_argnums=0)
def _value_and_input_grad(graphdef, state, x, y):
    model = nnx.merge(graphdef, state)

    def total(x):
        d = model(x, y)
        return d.sum(), d

    (_, d), grad = jax.value_and_grad(total, has_aux=True)(x)
    return d, grad


def distances(model, x, y):
    """Per-pair distances, (B,)."""
    return _distances(*nnx.split(model), x, y)


def value_and_input_grad(model, x, y):
    """Per-pair distances and d(sum of distances)/dx."""
    return _value_and_input_grad(*nnx.split(model), x, y)


def _image_pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    """NCHW float32 pairs in [-1, 1] from real photographs: a 64x64 batch of 3 and a 48x80 batch of 2."""
    rng = np.random.default_rng(0)

    def crop(image, top, left, h, w):
        return image[top : top + h, left : left + w].astype(np.float32).transpose(2, 0, 1) / 127.5 - 1

    astronaut, coffee, chelsea = data.astronaut(), data.coffee(), data.chelsea()
    a = crop(astronaut, 100, 180, 64, 64)
    c = crop(coffee, 150, 250, 64, 64)
    k = crop(chelsea, 100, 150, 64, 64)
    noisy = np.clip(a + 0.2 * rng.standard_normal(a.shape, dtype=np.float32), -1, 1)
    square = (np.stack([a, c, k]), np.stack([noisy, k, np.roll(c, 3, axis=2)]))
    w1 = crop(astronaut, 20, 200, 48, 80)
    w2 = crop(coffee, 200, 300, 48, 80)
    wide = (
        np.stack([w1, w2]),
        np.stack(
            [
                crop(astronaut, 24, 204, 48, 80),
                np.clip(w2 + 0.1 * rng.standard_normal(w2.shape, dtype=np.float32), -1, 1),
            ]
        ),
    )
    return [square, wide]


@pytest.fixture(scope="module")
def torch_lpips64(torch_lpips):
    return copy.deepcopy(torch_lpips).double()


def _nhwc(x: np.ndarray, dtype=jnp.float32) -> jax.Array:
    return jnp.asarray(x.transpose(0, 2, 3, 1), dtype)


# Bounds over the float32 noise (the same net in two summation orders): VGG measured 2.9e-7 (300x), AlexNet 5.4e-7
# (64x64) and 6.6e-7 (48x80) (15x).
@pytest.mark.parametrize("pair", [0, 1], ids=["64x64", "48x80"])
@pytest.mark.parametrize("net, bound", [("vgg", 1e-4), ("alex", 1e-5)])
def test_distances_match_lpips_package(request, net, bound, pair):
    """LPIPS-VGG and LPIPS-AlexNet (the package's default net, the paper's LPIPS) on identical random trunk weights."""
    if net == "vgg":
        torch_net, model = request.getfixturevalue("torch_lpips"), request.getfixturevalue("model")
    else:
        torch_net = request.getfixturevalue("torch_lpips_alex")
        model = load_lpips(request.getfixturevalue("alex_weight_files")["lpips_alex.safetensors"], net="alex")
    x, y = _image_pairs()[pair]
    with torch.no_grad():
        theirs = torch_net(torch.tensor(x), torch.tensor(y)).reshape(-1).numpy()
    ours = np.asarray(distances(model, _nhwc(x), _nhwc(y)))
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    err = float(np.max(np.abs(ours - theirs) / np.abs(theirs)))
    print(f"LPIPS-{net} fp32 {x.shape}: distances {ours}, max per-pair rel err {err:.2e}")
    assert err <= bound, (ours, theirs)


def test_alexnet_and_vgg_files_are_not_interchangeable(weight_files, alex_weight_files):
    with pytest.raises(WeightsError, match=r"features\.0\.weight"):
        load_lpips(weight_files["lpips_vgg.safetensors"], net="alex")
    with pytest.raises(WeightsError, match=r"lin1\.model\.1\.weight.*expects \(1, 1, 192, 1\)"):  # lin0: 64 in both
        convert_lpips_weights(
            alex_weight_files["trunk.pth"],
            weight_files["vgg.pth"],
            alex_weight_files["lpips_alex.safetensors"] + ".x",
            net="alex",
        )


def test_input_gradient_matches_lpips_package(torch_lpips64, weight_files):
    """d(sum of distances)/dx, in float64 on both sides.

    In float32 the two gradients are not comparable elementwise: where a ReLU pre-activation or a max-pool
    tie lies within rounding of its switch point, torch and XLA may route the gradient differently (both
    correct subgradients), which moves whole receptive-field patches; float64 makes that vanishingly rare.
    """
    # Four of the pairs, cropped to 24x40 (pools down to 1x2: odd sizes floor) to keep float64 VGG quick.
    (x0, y0), (x1, y1) = _image_pairs()
    x, y = (np.concatenate([a[:2, :, :24, :40], b[:, :, :24, :40]]) for a, b in ((x0, x1), (y0, y1)))
    tx = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    theirs = torch_lpips64(tx, torch.tensor(y, dtype=torch.float64)).reshape(-1)
    theirs.sum().backward()
    with jax.enable_x64(True):
        model64 = load_lpips(weight_files["lpips_vgg.safetensors"], dtype=jnp.float64)
        ours, grad = value_and_input_grad(model64, _nhwc(x, jnp.float64), _nhwc(y, jnp.float64))
        ours, grad = np.asarray(ours), np.asarray(grad).transpose(0, 3, 1, 2)
    assert ours.dtype == np.float64 and grad.dtype == np.float64
    value_err = float(np.max(np.abs(ours - theirs.detach().numpy()) / np.abs(theirs.detach().numpy())))
    grad_err = rel_err(grad, tx.grad.numpy())
    print(f"LPIPS fp64 {x.shape}: distance rel err {value_err:.2e}, input-gradient rel err {grad_err:.2e}")
    assert value_err <= 1e-4  # float64: measured 6e-16
    assert grad_err <= 1e-4  # float64: measured 1.8e-14


@pytest.mark.parametrize("kernel,stride", [(2, 2), (3, 2)], ids=["vgg", "alexnet"])
def test_max_pool_ties_route_the_gradient_like_torch(kernel, stride):
    """Of tied maxima (ReLU zeros, flat image regions) the first in the window takes the gradient; partial windows
    at the end are dropped (odd sizes floor); overlapping 3x3 windows share inputs."""
    x = np.random.default_rng(0).integers(0, 3, (2, 7, 9, 4)).astype(np.float32)
    out_h, out_w = (7 - kernel) // stride + 1, (9 - kernel) // stride + 1
    weights = np.arange(1, 1 + 2 * out_h * out_w * 4, dtype=np.float32).reshape(2, out_h, out_w, 4)
    ours, grad = jax.value_and_grad(lambda x: (MaxPool2d(kernel, stride)(x) * weights).sum())(jnp.asarray(x))
    tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    theirs = (torch.nn.functional.max_pool2d(tx, kernel, stride) * torch.tensor(weights.transpose(0, 3, 1, 2))).sum()
    theirs.backward()
    assert float(ours) == theirs.detach().item()  # integer inputs and weights: every sum is exact in float32
    np.testing.assert_array_equal(np.asarray(grad).transpose(0, 3, 1, 2), tx.grad.numpy())


def test_identical_images_give_zero(model):
    x, _ = _image_pairs()[0]
    np.testing.assert_allclose(np.asarray(distances(model, _nhwc(x), _nhwc(x))), 0.0, atol=1e-7)


def test_random_lpips_is_deterministic_with_nonnegative_heads():
    a, b = random_lpips(0), random_lpips(0)
    leaves_a, leaves_b = jax.tree.leaves(nnx.state(a, nnx.Param)), jax.tree.leaves(nnx.state(b, nnx.Param))
    assert len(leaves_a) == 31
    for u, v in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    for head in a.heads:
        kernel = np.asarray(head.model[1].kernel[...])
        assert kernel.shape[-1] == 1 and kernel.min() >= 0 and kernel.max() > 0
    other = random_lpips(1)
    assert not np.array_equal(np.asarray(other.lin0.model[1].kernel[...]), np.asarray(a.lin0.model[1].kernel[...]))


def test_missing_head_is_named(weight_files, tmp_path):
    tensors = load_file(weight_files["lpips_vgg.safetensors"])
    assert "classifier.0.weight" not in tensors
    del tensors["lin3.model.1.weight"]
    broken = str(tmp_path / "broken.safetensors")
    save_file(tensors, broken)
    with pytest.raises(WeightsError, match=r"lin3\.model\.1\.weight"):
        load_lpips(broken)


@pytest.mark.slow  # runs launch/convert.py
def test_convert_cli_missing_input_is_one_line(weight_files, tmp_path):
    out = tmp_path / "out.safetensors"
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "launch", "convert.py"),
            "--what=lpips",
            f"--vgg16={tmp_path / 'nope.pth'}",
            f"--lpips_linear={weight_files['vgg.pth']}",
            f"--out={out}",
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope.pth" in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not out.exists()


@pytest.mark.slow  # runs launch/convert.py
def test_convert_cli_writes_the_alexnet_file(alex_weight_files, tmp_path):
    out = tmp_path / "lpips_alex.safetensors"
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "launch", "convert.py"),
            "--what=lpips_alex",
            f"--alexnet={alex_weight_files['trunk.pth']}",
            f"--lpips_linear={alex_weight_files['alex.pth']}",
            f"--out={out}",
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == f"wrote {out} (LPIPS AlexNet v0.1)"
    written, fixture = load_file(str(out)), load_file(alex_weight_files["lpips_alex.safetensors"])
    assert sorted(written) == sorted(fixture) and all(np.array_equal(written[k], fixture[k]) for k in fixture)
