"""Weights, training data, SR and evaluation inputs, the workdir and its lock on an object store (gs://), offline.

The `bucket` fixture serves gs://test-bucket from memory through each of the two backends etils.epath picks for a
URL: tf.io.gfile when TensorFlow is installed (the `train` extra; gs:// rewritten to TensorFlow's ram:// file
system) and fsspec otherwise (gcsfs in production; here fsspec's memory file system). Each test runs in a fresh
current folder that holds only a decoy `gs:/test-bucket/` tree: the os functions read `gs://test-bucket/x` as the local
`gs:/test-bucket/x`, so code that handled a URL as a local path would find the decoy (or nothing) instead of the
bucket; the fixture also checks that nothing was written locally. Orbax's own gs:// writes (TensorStore's GCS
driver) are not served here.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import socket
import uuid

import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from flax import nnx
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

from configs.tiny import get_config

BUCKET = "gs://test-bucket"


class _MemoryBucket(MemoryFileSystem):
    """fsspec's in-memory file system answering gs:// URLs, with a store of its own."""

    cachable = False

    def __init__(self):
        super().__init__()
        self.store, self.pseudo_dirs = {}, [""]

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol("memory://" + str(path).removeprefix("gs://"))


def _ram_backend(root: str):
    """tf.io.gfile's backend with gs://X kept at `root`X in TensorFlow's in-memory file system. Writing a file
    creates its folders, as listing a GCS prefix shows them."""

    class RamBackend(epath_backend._TfBackend):
        def _ram(self, path) -> str:
            path = os.fspath(path)
            assert path.startswith("gs://"), path
            return root + path.removeprefix("gs://")

        def open(self, path, mode):
            if "r" not in mode:  # and TensorFlow's ram:// writes over an old file without truncating it
                self.gfile.makedirs(os.path.dirname(self._ram(path)))
                if self.gfile.exists(self._ram(path)):
                    self.gfile.remove(self._ram(path))
            return super().open(self._ram(path), mode)

        def rename(self, path, dst):
            return super().rename(self._ram(path), self._ram(dst))

        def glob(self, *args, **kwargs):
            raise NotImplementedError("not served by the test bucket")

        walk = replace = copy = glob

    for name in ("exists", "isdir", "listdir", "makedirs", "mkdir", "rmtree", "remove", "stat"):

        def method(self, path, *args, _name=name, **kwargs):
            return getattr(epath_backend._TfBackend, _name)(self, self._ram(path), *args, **kwargs)

        setattr(RamBackend, name, method)
    return RamBackend()


def _files(folder) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(d, f), folder): pathlib.Path(d, f).read_bytes()
        for d, _, names in os.walk(folder)
        for f in names
    }


@pytest.fixture(params=["gfile", "fsspec"])
def bucket(request, tmp_path, monkeypatch):
    """gs://test-bucket in memory through the param's backend; the test runs in a folder with a decoy tree."""
    monkeypatch.setattr(gpath, "_is_zonal_gcs_bucket", lambda name: False)  # would ask GCS about the bucket
    monkeypatch.setattr(gpath, "_is_tf_installed", lambda: request.param == "gfile")  # not EPATH_USE_TF: cached
    root = f"ram://{uuid.uuid4().hex}/"
    if request.param == "gfile":
        pytest.importorskip("tensorflow")
        monkeypatch.setattr(epath_backend, "tf_backend", _ram_backend(root))
    else:
        memory, local = _MemoryBucket(), epath_backend.fsspec_backend.fs("/")
        monkeypatch.setattr(
            epath_backend.fsspec_backend, "fs", lambda path: memory if os.fspath(path).startswith("gs://") else local
        )
    cwd = tmp_path / "cwd"
    decoy = cwd / "gs:" / "test-bucket"
    _write_image(decoy / "data" / "hr" / "decoy.png", np.zeros((16, 16, 3), np.uint8))
    (decoy / "data" / "captions.tsv").write_text("decoy.png\tdecoy\n")
    monkeypatch.chdir(cwd)
    before = _files(cwd)
    yield BUCKET
    if request.param == "gfile" and epath_backend.tf_backend.gfile.exists(root):
        epath_backend.tf_backend.gfile.rmtree(root)  # TensorFlow's ram:// lives as long as the process
    assert _files(cwd) == before, "something was written to a local path named like the URL"


def _write_image(path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def put(local: str, url: str) -> None:
    """Copy a local file or folder tree into the bucket."""
    if os.path.isdir(local):
        for name in _files(local):
            put(os.path.join(local, name), f"{url}/{name}")
        return
    with open(local, "rb") as f:
        data = f.read()
    with epath.Path(url).open("wb") as f:
        f.write(data)


def get(url: str) -> bytes:
    with epath.Path(url).open("rb") as f:
        return f.read()


def _leaves(model: nnx.Module) -> dict:
    return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model))}


def _assert_same_networks(ours, reference) -> None:
    for name in ("unet", "vae", "text_encoder"):
        a, b = _leaves(getattr(ours, name)), _leaves(getattr(reference, name))
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name} {key}")
    assert ours.tokenizer("a cat").input_ids == reference.tokenizer("a cat").input_ids
    np.testing.assert_array_equal(ours.schedule.alphas_cumprod, reference.schedule.alphas_cumprod)


# ------------------------------------------------------------------------------------------------------ weights


@pytest.fixture(scope="module")
def stand_in(tiny_sd):
    """The tiny SD stand-in (unet/, time_vae/ and no vae/, text_encoder/, tokenizer/, scheduler/), written locally,
    and its networks."""
    from tadsr_jax.weights.loaders import load_networks

    return tiny_sd, load_networks(tiny_sd)


def test_sd_folder_loads_from_a_bucket(bucket, stand_in):
    """Its only VAE is time_vae/: a local look-up of time_vae/ would fall back to the missing vae/ and fail."""
    from tadsr_jax.weights.loaders import load_networks

    folder, reference = stand_in
    put(folder, f"{bucket}/sd21")
    _assert_same_networks(load_networks(f"{bucket}/sd21"), reference)


def test_bucket_folder_problems_are_the_local_one_line_errors(bucket, stand_in):
    from tadsr_jax.weights.convert import WeightsError
    from tadsr_jax.weights.dists import load_dists
    from tadsr_jax.weights.loaders import load_networks, load_unet

    with pytest.raises(WeightsError, match=f"^{BUCKET}/none: pretrained model folder does not exist$"):
        load_networks(f"{bucket}/none")
    put(os.path.join(stand_in[0], "scheduler"), f"{bucket}/sd/scheduler")
    with pytest.raises(WeightsError, match=f"^{BUCKET}/sd/scheduler: no config.json"):
        load_unet(f"{bucket}/sd/scheduler")
    with pytest.raises(WeightsError, match=f"^{BUCKET}/dists.safetensors: DISTS weights file does not exist"):
        load_dists(f"{bucket}/dists.safetensors")


def test_bin_and_lpips_weight_files_load_from_a_bucket(bucket, tmp_path):
    """.bin checkpoints (torch.load) and single safetensors files (LPIPS)."""
    import torch

    from tadsr_jax.weights.convert import state_to_torch
    from tadsr_jax.weights.files import read_tensors, weight_files, write_safetensors
    from tadsr_jax.weights.lpips import load_lpips, random_lpips

    tensors = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b.bias": np.ones(4, np.float32)}
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, tmp_path / "diffusion_pytorch_model.bin")
    put(str(tmp_path / "diffusion_pytorch_model.bin"), f"{bucket}/bin/diffusion_pytorch_model.bin")
    files = weight_files(f"{bucket}/bin")
    assert files == [f"{BUCKET}/bin/diffusion_pytorch_model.bin"]
    loaded = dict(read_tensors(files))
    assert loaded.keys() == tensors.keys()
    for key, value in tensors.items():
        np.testing.assert_array_equal(loaded[key], value)

    lpips = random_lpips(0)
    write_safetensors(str(tmp_path / "lpips.safetensors"), state_to_torch(lpips))
    put(str(tmp_path / "lpips.safetensors"), f"{bucket}/lpips.safetensors")
    ours = _leaves(load_lpips(f"{bucket}/lpips.safetensors"))
    for key, value in _leaves(lpips).items():
        np.testing.assert_array_equal(ours[key], value, err_msg=str(key))


@pytest.mark.parametrize("bucket", ["gfile"], indirect=True)
def test_stand_ins_are_written_into_a_bucket(bucket, stand_in):
    from tadsr_jax import storage
    from tadsr_jax.data.samples import TRAIN_SAMPLES
    from tadsr_jax.stand_ins import write_stand_ins
    from tadsr_jax.weights.loaders import load_networks

    written = write_stand_ins(f"{bucket}/stand_ins", get_config())
    assert (written.pretrained, written.images) == (f"{BUCKET}/stand_ins/sd", f"{BUCKET}/stand_ins/images")
    _assert_same_networks(load_networks(written.pretrained), stand_in[1])
    assert sorted(storage.listdir(written.images)) == sorted(f"{name}.png" for name in TRAIN_SAMPLES)


# ------------------------------------------------------------------------------------------------------ data


@pytest.fixture(scope="module")
def local_data(tmp_path_factory) -> str:
    """paired/ (a paired list with relative paths), hr/ (a tree) and captions.tsv naming hr/'s images."""
    from tadsr_jax.data.samples import write_paired_list, write_sample_images

    root = str(tmp_path_factory.mktemp("data"))
    write_paired_list(os.path.join(root, "paired"), ("chelsea", "rocket"), size=32)
    write_sample_images(os.path.join(root, "hr"), ("coins",), size=32)
    write_sample_images(os.path.join(root, "hr", "sub"), ("moon",), size=32)
    open(os.path.join(root, "hr", "empty.png"), "wb").close()
    with open(os.path.join(root, "captions.tsv"), "w") as f:
        f.write("coins.png\ta coin\nsub/moon.png\tthe moon\n")
    return root


def test_data_sources_read_a_bucket(bucket, local_data, caplog):
    from tadsr_jax.data.sources import HRFolderSource, PairedListSource
    from tadsr_jax.data.transforms import read_rgb

    put(local_data, f"{bucket}/data")
    with caplog.at_level(logging.WARNING):
        folder = HRFolderSource(f"{bucket}/data/hr", f"{bucket}/data/captions.tsv")
    assert [(r.hr, r.lr, r.prompt) for r in folder.records] == [
        (f"{BUCKET}/data/hr/coins.png", None, "a coin"),
        (f"{BUCKET}/data/hr/sub/moon.png", None, "the moon"),
    ]
    assert [r.getMessage() for r in caplog.records if r.name.startswith("tadsr_jax")] == [
        f"skipping unreadable image {BUCKET}/data/hr/empty.png: empty file"
    ]

    paired = PairedListSource(f"{bucket}/data/paired/train.txt")
    assert [(r.hr, r.lr, r.prompt) for r in paired.records] == [
        (f"{BUCKET}/data/paired/hr/{n}.png", f"{BUCKET}/data/paired/lr/{n}.png", n) for n in ("chelsea", "rocket")
    ]
    for record in [*folder.records, *paired.records]:
        for url in (record.hr, record.lr):
            if url is not None:
                local = os.path.join(local_data, url.removeprefix(f"{BUCKET}/data/"))
                np.testing.assert_array_equal(np.asarray(read_rgb(url)), np.asarray(read_rgb(local)))


def test_missing_bucket_data_is_the_local_error(bucket):
    """Locally, the URL would name the decoy folder."""
    from tadsr_jax.data.sources import HRFolderSource, PairedListSource

    assert os.path.isdir(f"{bucket}/data/hr")
    with pytest.raises(FileNotFoundError, match=f"^HR image folder not found: {BUCKET}/data/hr$"):
        HRFolderSource(f"{bucket}/data/hr", "")
    with pytest.raises(FileNotFoundError, match=f"^paired list file not found: {BUCKET}/list.txt$"):
        PairedListSource(f"{bucket}/list.txt")


# ------------------------------------------------------------------------------------------ SR and evaluation


def test_sr_inputs_outputs_and_evaluation_folders_on_a_bucket(bucket, tmp_path):
    from tadsr_jax import evaluation
    from tadsr_jax.images import ImageError, list_images, read_rgb, write_png_atomic
    from tadsr_jax.infer.outputs import plan_outputs

    rng = np.random.default_rng(0)
    pixels = {name: rng.integers(0, 256, (16, 24, 3), np.uint8) for name in ("a", "b")}
    for name, value in pixels.items():
        _write_image(tmp_path / "lq" / f"{name}.png", value)
        _write_image(tmp_path / "hr" / f"{name}.png", value)
    put(str(tmp_path / "lq"), f"{bucket}/lq")
    put(str(tmp_path / "hr"), f"{bucket}/hr")

    inputs = list_images(f"{bucket}/lq")
    assert inputs == [f"{BUCKET}/lq/a.png", f"{BUCKET}/lq/b.png"]
    for url in inputs:
        np.testing.assert_array_equal(read_rgb(url).pixels, pixels[os.path.basename(url)[0]])
    with pytest.raises(ImageError, match=f"^{BUCKET}/lq/c.png: No such file or directory$"):
        read_rgb(f"{bucket}/lq/c.png")

    plan = plan_outputs(f"{bucket}/lq", inputs, f"{bucket}/sr")
    assert plan == {url: [url.replace("/lq/", "/sr/")] for url in inputs}
    for url, (target,) in plan.items():
        write_png_atomic(target, read_rgb(url).pixels)
    assert sorted(child.name for child in epath.Path(f"{bucket}/sr").iterdir()) == ["a.png", "b.png"]  # no probe

    matching = evaluation.match_files(f"{bucket}/sr", f"{bucket}/hr")
    assert [(p.name, p.sr, p.hr) for p in matching.pairs] == [
        (n, f"{BUCKET}/sr/{n}.png", f"{BUCKET}/hr/{n}.png") for n in ("a", "b")
    ]
    evaluation.write_report(f"{bucket}/sr/metrics", {"dataset": "x"}, "| table |\n")
    assert json.loads(get(f"{bucket}/sr/metrics.json")) == {"dataset": "x"}


# ------------------------------------------------------------------------------------------------ the workdir


def test_workdir_lock_on_a_bucket(bucket, monkeypatch):
    from tadsr_jax.train import lock

    monkeypatch.setattr(lock, "CONFIRM_S", 0.01, raising=False)  # (raising: the module had none before)
    workdir = f"{bucket}/workdir"
    first = lock.WorkdirLock(workdir)
    assert first.acquire() is None
    with pytest.raises(lock.WorkdirLocked, match=f"host {socket.gethostname()}, pid {os.getpid()}"):
        lock.WorkdirLock(workdir).acquire()
    first.release()
    assert not epath.Path(f"{workdir}/{lock.LOCK_FILE}").exists()

    other = {"host": "other-node", "pid": 1, "started": "2026-01-01T00:00:00+00:00"}
    with epath.Path(f"{workdir}/{lock.LOCK_FILE}").open("w") as f:
        f.write(json.dumps({**other, "renewed": 1e9}))  # 2001
    taker = lock.WorkdirLock(workdir, lease_s=60)
    assert "lease expired" in taker.acquire()
    taker.release()


def test_checkpoint_digests_on_a_bucket(bucket):
    from tadsr_jax.checkpoints import verify, write_digests

    step = f"{bucket}/workdir/checkpoints/7"
    for name, data in (("state/a", b"123"), ("data/b", b"4567")):
        with epath.Path(f"{step}/{name}").open("wb") as f:
            f.write(data)
    write_digests(step)
    assert verify(step) is None
    with epath.Path(f"{step}/state/a").open("wb") as f:
        f.write(b"124")
    assert verify(step) == "state/a differs from its SHA-256 when saved"


def _config_with_inputs():
    """configs/tiny.py with weights and data paths set (to folders that are never read)."""
    config = get_config()
    config.model.pretrained, config.data.path = f"{BUCKET}/no_sd_here", f"{BUCKET}/no_images_here"
    return config


@pytest.mark.parametrize("bucket", ["fsspec"], indirect=True)
def test_gs_workdir_that_tensorboard_cannot_write_is_refused_before_loading(bucket, monkeypatch):
    from tensorboardX import record_writer

    from tadsr_jax.train import loop

    monkeypatch.setattr(record_writer, "GCS_ENABLED", False)
    with pytest.raises(
        loop.TrainingError,
        match="^--workdir gs://test-bucket/w: TensorBoard logging to gs:// needs "
        r"google-cloud-storage \(pip install google-cloud-storage\)$",
    ):
        loop.train(_config_with_inputs(), f"{bucket}/w")
    assert not epath.Path(f"{bucket}/w").exists()
