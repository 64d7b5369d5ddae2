"""The training input pipeline: record contents recomputed with PIL, determinism, sharding, resume, bad files."""

import logging
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from configs import tadsr_sd21
from tadsr_jax.data import make_train_iterator
from tadsr_jax.data.degradation import RealESRGANDegradation
from tadsr_jax.data.pipeline import make_transform
from tadsr_jax.data.samples import SAMPLE_NAMES, sample_image, write_paired_list, write_sample_images
from tadsr_jax.data.sources import HRFolderSource, PairedListSource, Record
from tadsr_jax.data.transforms import read_rgb

CROP = 32
SIZE = 64


@pytest.fixture(scope="module")
def paired_list(tmp_path_factory) -> str:
    return write_paired_list(str(tmp_path_factory.mktemp("paired")), SAMPLE_NAMES, size=SIZE)


@pytest.fixture(scope="module")
def hr_folder(tmp_path_factory) -> tuple[str, str]:
    """An HR tree (nested folders, L/P/RGBA modes, one image smaller than the crop, a non-image file) and a
    captions file naming each image by its relative path."""
    root = str(tmp_path_factory.mktemp("hr"))
    write_sample_images(os.path.join(root, "a"), SAMPLE_NAMES[:4], SIZE)
    write_sample_images(os.path.join(root, "b", "c"), SAMPLE_NAMES[4:6], SIZE)
    sample_image("camera", SIZE).convert("L").save(os.path.join(root, "gray.png"))
    sample_image("coffee", SIZE).convert("P").save(os.path.join(root, "palette.bmp"))
    sample_image("chelsea", SIZE).convert("RGBA").save(os.path.join(root, "rgba.png"))
    sample_image("rocket", 40).crop((0, 8, 40, 32)).save(os.path.join(root, "small.tif"))  # 40 x 24
    with open(os.path.join(root, "notes.txt"), "w") as f:
        f.write("not an image")
    names = sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs if not f.endswith(".txt")
    )
    captions = os.path.join(str(tmp_path_factory.mktemp("captions")), "captions.tsv")
    with open(captions, "w") as f:
        f.writelines(f"{name}\t{name}\n" for name in names)
    return root, captions


def _config(source: str, path: str, **overrides):
    """The paper's data config, in this process, with bicubic synthetic LRs unless overridden: tests below recompute
    them exactly."""
    config = tadsr_sd21.get_config().data
    config.update(source=source, path=path, crop_size=CROP, degradation="bicubic", num_workers=0)
    config.update(overrides)
    return config


def _take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def _examples(batches: list[dict]) -> list[dict]:
    return [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(next(iter(b.values()))))]


def _to_uint8(x: np.ndarray) -> np.ndarray:
    assert x.dtype == np.float32 and x.shape == (CROP, CROP, 3)
    assert x.min() >= -1.0 and x.max() <= 1.0
    return np.rint((x + 1.0) * 127.5).astype(np.uint8)


def _find_window(patch: np.ndarray, image: np.ndarray) -> tuple[int, int, bool]:
    """(top, left, flipped) of the unique CROP window of `image` equal to `patch` (possibly mirrored)."""
    windows = sliding_window_view(image, (CROP, CROP, 3))[:, :, 0]
    hits = [
        (int(top), int(left), flipped)
        for flipped in (False, True)
        for top, left in np.argwhere((windows == (patch[:, ::-1] if flipped else patch)).all(axis=(2, 3, 4)))
    ]
    assert len(hits) == 1, f"expected one matching crop window, found {hits}"
    return hits[0]


def _covering(image: Image.Image) -> Image.Image:
    w, h = image.size
    if min(w, h) >= CROP:
        return image
    return image.resize((round(w * CROP / min(w, h)), round(h * CROP / min(w, h))), Image.BICUBIC)


def _bicubic_lq(hq: np.ndarray, scale: int = 4) -> np.ndarray:
    small = Image.fromarray(hq).resize((CROP // scale, CROP // scale), Image.BICUBIC)
    return np.asarray(small.resize((CROP, CROP), Image.BICUBIC))


def test_folder_records_are_crops_with_bicubic_lq(hr_folder):
    root, captions = hr_folder
    iterator = make_train_iterator(
        _config("hr_folder", root, captions=captions), global_batch_size=5, seed=1, process_index=0, process_count=1
    )
    examples = _examples(_take(iterator, 4))  # two epochs of the 10 images
    seen, flips = set(), set()
    for ex in examples:
        hq, lq = _to_uint8(ex["hq"]), _to_uint8(ex["lq"])
        name = str(ex["prompt"])
        with Image.open(os.path.join(root, name)) as image:
            source = np.asarray(_covering(image.convert("RGB")))
        flips.add(_find_window(hq, source)[2])
        np.testing.assert_array_equal(lq, _bicubic_lq(hq), err_msg=name)
        seen.add(name)
    assert len(seen) == 10 and "small.tif" in seen and "b/c/immunohistochemistry.png" in seen
    assert flips == {False, True}


def test_paired_records_use_the_lanczos_resized_lr(paired_list):
    iterator = make_train_iterator(
        _config("paired_list", paired_list, synthetic_prob=0.0),
        global_batch_size=4,
        seed=0,
        process_index=0,
        process_count=1,
    )
    examples = _examples(_take(iterator, 4))
    folder = os.path.dirname(paired_list)
    for ex in examples:
        name = str(ex["prompt"]).replace(" ", "_")
        hr = np.asarray(Image.open(os.path.join(folder, "hr", f"{name}.png")).convert("RGB"))
        lr = Image.open(os.path.join(folder, "lr", f"{name}.png")).convert("RGB").resize((SIZE, SIZE), Image.LANCZOS)
        top, left, flipped = _find_window(_to_uint8(ex["hq"]), hr)
        expected = np.asarray(lr)[top : top + CROP, left : left + CROP]
        np.testing.assert_array_equal(_to_uint8(ex["lq"]), expected[:, ::-1] if flipped else expected, err_msg=name)
    assert {str(ex["prompt"]) for ex in examples} == {n.replace("_", " ") for n in SAMPLE_NAMES}


def test_synthetic_prob_mixes_bicubic_and_listed_lr(paired_list):
    iterator = make_train_iterator(
        _config("paired_list", paired_list, synthetic_prob=0.5, flip=False),
        global_batch_size=8,
        seed=0,
        process_index=0,
        process_count=1,
    )
    folder = os.path.dirname(paired_list)
    kinds = []
    for ex in _examples(_take(iterator, 3)):
        hq, lq = _to_uint8(ex["hq"]), _to_uint8(ex["lq"])
        if np.array_equal(lq, _bicubic_lq(hq)):
            kinds.append("synthetic")
            continue
        name = str(ex["prompt"]).replace(" ", "_")
        hr = np.asarray(Image.open(os.path.join(folder, "hr", f"{name}.png")).convert("RGB"))
        lr = Image.open(os.path.join(folder, "lr", f"{name}.png")).convert("RGB").resize((SIZE, SIZE), Image.LANCZOS)
        top, left, _ = _find_window(hq, hr)
        np.testing.assert_array_equal(lq, np.asarray(lr)[top : top + CROP, left : left + CROP], err_msg=name)
        kinds.append("listed")
    assert 3 <= kinds.count("synthetic") <= 21, kinds


def _arrays(batches: list[dict]) -> list[np.ndarray]:
    return [b[k] for b in batches for k in ("hq", "lq")]


def test_same_seed_same_batches_other_seed_differs(paired_list):
    config = _config("paired_list", paired_list)

    def run(seed):
        return _take(make_train_iterator(config, global_batch_size=4, seed=seed, process_index=0, process_count=1), 5)

    first, again, other = run(3), run(3), run(4)
    for a, b in zip(_arrays(first), _arrays(again)):
        np.testing.assert_array_equal(a, b)
    assert [list(b["prompt"]) for b in first] == [list(b["prompt"]) for b in again]
    assert any(not np.array_equal(a, b) for a, b in zip(_arrays(first), _arrays(other)))


@pytest.mark.parametrize("processes, global_batch", [(2, 4), (4, 8)])
def test_processes_read_disjoint_rows_of_the_same_global_batches(paired_list, processes, global_batch):
    config = _config("paired_list", paired_list)
    batches = len(SAMPLE_NAMES) // global_batch  # one epoch: every example once
    shards = [
        _take(
            make_train_iterator(
                config, global_batch_size=global_batch, seed=5, process_index=p, process_count=processes
            ),
            batches,
        )
        for p in range(processes)
    ]
    prompts = [{str(p) for b in shard for p in b["prompt"]} for shard in shards]
    assert sum(map(len, prompts)) == len(set().union(*prompts)) == len(SAMPLE_NAMES)
    # Global batch k is the same examples, crops and flips in the same order whatever the process count: process
    # p holds the rows where parallel.global_batch puts them (the train step's per-row draws follow the rows).
    single = _take(
        make_train_iterator(config, global_batch_size=global_batch, seed=5, process_index=0, process_count=1), batches
    )
    rows = global_batch // processes
    for k in range(batches):
        for p in range(processes):
            for key in ("hq", "lq", "prompt"):
                np.testing.assert_array_equal(shards[p][k][key], single[k][key][p * rows : (p + 1) * rows])


def test_resume_from_state_gives_the_same_batches(hr_folder):
    config = _config("hr_folder", hr_folder[0], captions=hr_folder[1])
    kwargs = {"global_batch_size": 4, "seed": 2, "process_index": 0, "process_count": 1}
    iterator = make_train_iterator(config, **kwargs)
    _take(iterator, 2)
    state = iterator.get_state()
    expected = _take(iterator, 4)  # crosses into the next (reshuffled) epoch
    resumed = make_train_iterator(config, **kwargs)
    resumed.set_state(state)
    got = _take(resumed, 4)
    for a, b in zip(_arrays(expected), _arrays(got)):
        np.testing.assert_array_equal(a, b)
    assert [list(b["prompt"]) for b in expected] == [list(b["prompt"]) for b in got]


def test_a_worker_process_gives_the_in_process_batches_and_resumes(paired_list):
    # One worker keeps the in-process order (n workers interleave batches of slices i::n); more only cost test time.
    kwargs = {"global_batch_size": 4, "seed": 0, "process_index": 0, "process_count": 1}
    in_process = _take(make_train_iterator(_config("paired_list", paired_list), **kwargs), 4)
    iterator = make_train_iterator(_config("paired_list", paired_list, num_workers=1), **kwargs)
    try:
        first = _take(iterator, 2)
        state = iterator.get_state()
        expected = _take(iterator, 2)
        iterator.set_state(state)
        again = _take(iterator, 2)
    finally:
        iterator.close()
    for a, b in zip(_arrays(in_process), _arrays(first + expected)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_arrays(expected), _arrays(again)):
        np.testing.assert_array_equal(a, b)


def test_list_prompts_relative_paths_and_malformed_lines(tmp_path, caplog):
    folder = tmp_path / "data"
    write_sample_images(str(folder / "img"), ["astronaut", "coffee"], SIZE)
    (folder / "list.txt").write_text(
        'img/astronaut.png   img/coffee.png  a  "red"   cat \n\nimg/coffee.png img/astronaut.png\nimg/coffee.png\n'
    )
    with caplog.at_level(logging.WARNING):
        source = PairedListSource(str(folder / "list.txt"))
    assert [r.prompt for r in source.records] == ['a "red" cat', ""]
    assert source.records[0].hr == os.path.join(str(folder), "img/astronaut.png")
    assert source.records[0].lr == os.path.join(str(folder), "img/coffee.png")
    assert [r.getMessage() for r in caplog.records] == [
        f"{folder / 'list.txt'}:4: skipping line with fewer than 2 fields (HR_path LR_path prompt...)"
    ]


def test_captions_file_gives_folder_prompts(tmp_path, caplog):
    write_sample_images(str(tmp_path / "hr" / "sub"), ["astronaut", "coffee"], SIZE)
    captions = tmp_path / "captions.tsv"
    captions.write_text("sub/astronaut.png\ta photo of an astronaut \nmissing tab line\n")
    with caplog.at_level(logging.WARNING):
        source = HRFolderSource(str(tmp_path / "hr"), str(captions))
    assert [(os.path.basename(r.hr), r.lr, r.prompt) for r in source.records] == [
        ("astronaut.png", None, "a photo of an astronaut"),
        ("coffee.png", None, ""),
    ]
    assert [r.getMessage() for r in caplog.records] == [f"{captions}:2: skipping caption line without a TAB"]


def _write_corrupt_files(folder) -> dict[str, str]:
    os.makedirs(folder, exist_ok=True)
    sample_image("rocket", SIZE).save(os.path.join(folder, "full.png"))
    full = os.path.join(folder, "full.png")
    with open(full, "rb") as f:
        data = f.read()
    os.remove(full)
    bad = {"truncated.png": data[: len(data) // 2], "empty.png": b"", "text.jpg": b"just some text\n"}
    for name, content in bad.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(content)
    return {
        os.path.join(folder, name): reason
        for name, reason in [
            ("truncated.png", "image file is truncated"),
            ("empty.png", "empty file"),
            ("text.jpg", "not a recognised image format"),
        ]
    }


def test_corrupt_files_are_skipped_with_one_log_line_each(tmp_path, caplog):
    write_sample_images(str(tmp_path), ["astronaut", "coffee", "chelsea"], SIZE)
    bad = _write_corrupt_files(str(tmp_path))
    captions = tmp_path / "captions.tsv"
    captions.write_text("".join(f"{n}\t{n}\n" for n in os.listdir(tmp_path) if n.endswith(("png", "jpg"))))
    with caplog.at_level(logging.WARNING):
        iterator = make_train_iterator(
            _config("hr_folder", str(tmp_path), captions=str(captions)),
            global_batch_size=3,
            seed=0,
            process_index=0,
            process_count=1,
        )
        prompts = [str(p) for b in _take(iterator, 4) for p in b["prompt"]]  # four epochs of the readable three
    assert sorted(prompts) == sorted(["astronaut.png", "coffee.png", "chelsea.png"] * 4)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("tadsr_jax")]
    assert len(messages) == len(bad), messages
    for path, reason in bad.items():
        assert sum(m.startswith(f"skipping unreadable image {path}: ") and reason in m for m in messages) == 1, path


def test_sources_without_readable_images_raise(tmp_path):
    bad = _write_corrupt_files(str(tmp_path / "hr"))
    os.remove(next(p for p in bad if p.endswith("truncated.png")))
    with pytest.raises(ValueError, match=f"no readable image in folder {tmp_path / 'hr'}$"):
        HRFolderSource(str(tmp_path / "hr"), "")
    listing = tmp_path / "list.txt"
    listing.write_text("hr/empty.png hr/text.jpg prompt\nmissing.png hr/text.jpg\n")
    with pytest.raises(ValueError, match=f"no readable HR/LR image pair in list {listing}$"):
        PairedListSource(str(listing))


def test_tokenize_replaces_prompts_by_input_ids(paired_list):
    config = _config("paired_list", paired_list)
    kwargs = {"global_batch_size": 4, "seed": 0, "process_index": 0, "process_count": 1}

    def tokenize(prompts: list[str]) -> np.ndarray:
        return np.array([[len(p), ord(p[0]), 7] for p in prompts], np.int64)

    plain = _take(make_train_iterator(config, **kwargs), 2)
    tokenized = _take(make_train_iterator(config, tokenize=tokenize, **kwargs), 2)
    for a, b in zip(plain, tokenized):
        assert set(b) == {"hq", "lq", "input_ids"} and b["input_ids"].dtype == np.int32
        np.testing.assert_array_equal(b["input_ids"], tokenize(list(a["prompt"])))
        np.testing.assert_array_equal(b["hq"], a["hq"])
    broken = make_train_iterator(config, tokenize=lambda p: np.zeros((len(p),), np.int32), **kwargs)
    with pytest.raises(ValueError, match=r"tokenize must return \(4, T\) token ids, got shape \(4,\)"):
        next(broken)


@pytest.mark.parametrize(
    "overrides, kwargs, message",
    [
        ({}, {"global_batch_size": 6, "process_count": 4}, "global batch size 6 is not a positive multiple"),
        ({}, {"process_index": 2, "process_count": 2}, r"process_index 2 is not in \[0, 2\)"),
        ({"source": "nope"}, {}, "data.source must be one of"),
        ({"source": "mixture"}, {}, "data.source is 'mixture' but data.mixture is empty"),
        ({"degradation": "jpeg"}, {}, r"data.degradation must be one of \('realesrgan', 'bicubic'\)"),
        ({"crop_size": 30}, {}, r"data.crop_size \(30\) must be a positive multiple of data.scale \(4\)"),
        ({"synthetic_prob": 1.5}, {}, r"data.synthetic_prob must be in \[0, 1\]"),
        ({"path": ""}, {}, "data.path is empty"),
    ],
)
def test_bad_settings_are_one_line_errors(paired_list, overrides, kwargs, message):
    config = _config("paired_list", paired_list)
    config.update(overrides)
    with pytest.raises(ValueError, match=message):
        make_train_iterator(
            config, **{"global_batch_size": 4, "seed": 0, "process_index": 0, "process_count": 1, **kwargs}
        )


def test_read_rgb_converts_modes(tmp_path):
    rgb = sample_image("chelsea", 16)
    rgb.convert("RGBA").save(tmp_path / "rgba.png")
    rgb.convert("L").save(tmp_path / "gray.png")
    Image.fromarray(np.full((4, 4), 0xAB12, np.uint16)).save(tmp_path / "deep.png")
    np.testing.assert_array_equal(np.asarray(read_rgb(str(tmp_path / "rgba.png"))), np.asarray(rgb))
    gray = np.asarray(read_rgb(str(tmp_path / "gray.png")))
    assert gray.shape == (16, 16, 3)
    np.testing.assert_array_equal(gray[..., 0], np.asarray(rgb.convert("L")))
    np.testing.assert_array_equal(np.asarray(read_rgb(str(tmp_path / "deep.png"))), np.full((4, 4, 3), 0xAB))


def test_sample_writers(tmp_path):
    paths = write_sample_images(str(tmp_path / "s"), ["camera", "astronaut"], 40)
    for path in paths:
        with Image.open(path) as image:
            assert (image.mode, image.size) == ("RGB", (40, 40))
    listing = write_paired_list(str(tmp_path / "p"), ["coins"], 40, prompts=["some coins"])
    with open(listing) as f:
        assert f.read() == "hr/coins.png lr/coins.png some coins\n"
    assert Image.open(tmp_path / "p" / "lr" / "coins.png").size == (10, 10)
    with pytest.raises(ValueError, match="skimage.data has no sample image 'nope'"):
        write_sample_images(str(tmp_path / "x"), ["nope"], 40)


def test_a_set_that_mostly_fails_to_decode_raises_instead_of_spinning(tmp_path):
    bad = _write_corrupt_files(str(tmp_path))
    for path in bad:
        if not path.endswith("truncated.png"):
            os.remove(path)
    iterator = make_train_iterator(
        _config("hr_folder", str(tmp_path)), global_batch_size=2, seed=0, process_index=0, process_count=1
    )
    with pytest.raises(ValueError, match=r"skipped 100.00 % of the last seen 1000 elements"):
        next(iterator)


# ---- tfds sources, mixtures, Real-ESRGAN LRs, device prefetch ----


def _find_in_any(patch: np.ndarray, images: list[np.ndarray]) -> int:
    """Index of the one image (covered to the crop size) that holds `patch` as a window."""
    hits = []
    for i, image in enumerate(images):
        windows = sliding_window_view(np.asarray(_covering(Image.fromarray(image))), (CROP, CROP, 3))[:, :, 0]
        if any((windows == p).all(axis=(2, 3, 4)).any() for p in (patch, patch[:, ::-1])):
            hits.append(i)
    assert len(hits) == 1, f"expected one source image, found {hits}"
    return hits[0]


def test_tfds_source_by_name_with_prompts_and_synthetic_lr():
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        source = tfds.data_source("oxford_flowers102", split="train")
        images = [source[i]["image"] for i in range(len(source))]
        names = [source[i]["file_name"] for i in range(len(source))]
        config = _config("tfds", "oxford_flowers102", split="train", prompt_key="file_name")
        examples = _examples(
            _take(make_train_iterator(config, global_batch_size=3, seed=0, process_index=0, process_count=1), 4)
        )
    found = set()
    for ex in examples:
        hq = _to_uint8(ex["hq"])
        index = _find_in_any(hq, images)
        assert str(ex["prompt"]) == names[index]
        np.testing.assert_array_equal(_to_uint8(ex["lq"]), _bicubic_lq(hq))
        found.add(index)
    assert found == set(range(6))  # two epochs of six


def test_tfds_paired_features_use_the_lanczos_resized_lr():
    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        source = tfds.data_source("div2k/bicubic_x4", split="validation")
        pairs = [(source[i]["hr"], source[i]["lr"]) for i in range(len(source))]
        config = _config(
            "tfds", "div2k/bicubic_x4", split="validation", image_key="hr", lr_key="lr", synthetic_prob=0.0
        )
        examples = _examples(
            _take(make_train_iterator(config, global_batch_size=2, seed=3, process_index=0, process_count=1), 2)
        )
    for ex in examples:
        hq = _to_uint8(ex["hq"])
        hr, lr = pairs[_find_in_any(hq, [p[0] for p in pairs])]
        covered_hr = np.asarray(_covering(Image.fromarray(hr)))
        top, left, flipped = _find_window(hq, covered_hr)
        covered_lr = _covering(Image.fromarray(lr).resize(Image.fromarray(hr).size, Image.LANCZOS))
        expected = np.asarray(covered_lr)[top : top + CROP, left : left + CROP]
        np.testing.assert_array_equal(_to_uint8(ex["lq"]), expected[:, ::-1] if flipped else expected)
        assert str(ex["prompt"]) == ""


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"image_key": "picture"},
            r"tfds dataset oxford_flowers102:train has no feature 'picture' \(image_key\); "
            r"it has \['file_name', 'image', 'label'\]",
        ),
        ({"path": "no_such_dataset_xyz"}, "tfds dataset no_such_dataset_xyz:train cannot be read"),
    ],
)
def test_tfds_errors_are_one_line(overrides, message):
    with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
        config = _config("tfds", "oxford_flowers102")
        config.update(overrides)
        with pytest.raises(ValueError, match=message) as info:
            make_train_iterator(config, global_batch_size=2, seed=0, process_index=0, process_count=1)
    assert "\n" not in str(info.value)


def test_mixture_draws_by_weight_and_is_deterministic(paired_list, hr_folder):
    from tadsr_jax.data.pipeline import source_config

    config = _config("mixture", "")
    config.mixture.pairs = source_config(source="paired_list", path=paired_list, weight=3.0)
    config.mixture.folder = source_config(source="hr_folder", path=hr_folder[0], captions=hr_folder[1], weight=1.0)
    kwargs = {"global_batch_size": 8, "seed": 0, "process_index": 0, "process_count": 1}
    batches = _take(make_train_iterator(config, **kwargs), 8)
    prompts = [str(p) for b in batches for p in b["prompt"]]
    from_folder = sum("." in p for p in prompts)  # folder captions are file names; list prompts have no dot
    assert from_folder == 16, prompts  # grain mixes exactly by weight: 1 in 4 of 64
    assert {p for p in prompts if "." not in p} == {n.replace("_", " ") for n in SAMPLE_NAMES}
    again = _take(make_train_iterator(config, **kwargs), 8)
    for a, b in zip(_arrays(batches), _arrays(again)):
        np.testing.assert_array_equal(a, b)
    config.mixture.folder.weight = 0.0
    with pytest.raises(ValueError, match="data.mixture.folder.weight must be positive, got 0.0"):
        make_train_iterator(config, **kwargs)


def test_realesrgan_lr_is_degraded_and_deterministic(hr_folder):
    config = _config("hr_folder", hr_folder[0], degradation="realesrgan", crop_size=64)
    kwargs = {"global_batch_size": 4, "seed": 0, "process_index": 0, "process_count": 1}
    first = _take(make_train_iterator(config, **kwargs), 3)
    again = _take(make_train_iterator(config, **kwargs), 3)
    for a, b in zip(_arrays(first), _arrays(again)):
        np.testing.assert_array_equal(a, b)
    psnrs = []
    for ex in _examples(first):
        hq = (ex["hq"] + 1) * 127.5
        lq = (ex["lq"] + 1) * 127.5
        assert lq.shape == hq.shape == (64, 64, 3)
        bicubic = np.asarray(
            Image.fromarray(np.rint(hq).astype(np.uint8))
            .resize((16, 16), Image.BICUBIC)
            .resize((64, 64), Image.BICUBIC),
            np.float32,
        )
        assert not np.array_equal(np.rint(lq), bicubic)
        psnrs.append(10 * np.log10(255.0**2 / np.mean((lq - hq) ** 2)))
    assert 10 < np.median(psnrs) < 35, psnrs


@pytest.mark.parametrize("source", ["hr_folder", "paired_list"])
def test_data_scale_2_makes_bicubic_lrs_at_half_size(hr_folder, paired_list, source):
    """data.scale end to end: the LQ is the HR crop bicubic-downscaled by 2 and upscaled back to the HR size (what
    SR at sr.scale=2 feeds the model), not by 4. Paired lists take their bicubic LR from the HR too here."""
    path = hr_folder[0] if source == "hr_folder" else paired_list
    config = _config(source, path, scale=2, synthetic_prob=1.0)
    batches = _take(make_train_iterator(config, global_batch_size=4, seed=0, process_index=0, process_count=1), 2)
    for ex in _examples(batches):
        hq, lq = _to_uint8(ex["hq"]), _to_uint8(ex["lq"])
        np.testing.assert_array_equal(lq, _bicubic_lq(hq, 2))
        assert not np.array_equal(lq, _bicubic_lq(hq, 4))


def test_data_scale_reaches_the_realesrgan_degradation(hr_folder):
    """The Real-ESRGAN LQ of a folder record at data.scale = 2 is RealESRGANDegradation(scale=2) of the HR crop,
    with the rng in the state the transform leaves it (crop offsets drawn first; no flip), and not the scale-4 one."""
    path = os.path.join(hr_folder[0], "a", f"{SAMPLE_NAMES[0]}.png")
    config = _config("hr_folder", hr_folder[0], degradation="realesrgan", scale=2, flip=False)
    example = make_transform(config).random_map(Record(hr=path, lr=None, prompt=""), np.random.default_rng(5))
    lq = _to_uint8(example["lq"])

    def expected(scale: int) -> np.ndarray:
        rng = np.random.default_rng(5)
        left, top = (int(rng.integers(0, SIZE - CROP + 1)) for _ in range(2))
        hr = np.asarray(read_rgb(path))[top : top + CROP, left : left + CROP]
        np.testing.assert_array_equal(hr, _to_uint8(example["hq"]))
        return RealESRGANDegradation(config.realesrgan, scale)(hr, rng)

    np.testing.assert_array_equal(lq, expected(2))
    assert not np.array_equal(lq, expected(4))


def test_device_prefetch_checkpoints_the_consumed_position(paired_list):
    from tadsr_jax.data.prefetch import DevicePrefetch

    config = _config("paired_list", paired_list)
    kwargs = {"global_batch_size": 2, "seed": 0, "process_index": 0, "process_count": 1}
    copies = []

    def to_device(batch):
        copies.append(1)
        return {k: v for k, v in batch.items() if k != "prompt"}

    reference = _take(make_train_iterator(config, **kwargs), 6)
    prefetch = DevicePrefetch(make_train_iterator(config, **kwargs), to_device, size=3)
    got = [next(prefetch)]
    prefetch.fill()
    assert len(copies) == 4  # one handed out, three waiting
    got.append(next(prefetch))
    state = prefetch.get_state()  # two consumed, whatever is buffered
    got += [next(prefetch) for _ in range(4)]
    for a, b in zip(_arrays(reference), _arrays(got)):
        np.testing.assert_array_equal(a, b)
    resumed = DevicePrefetch(make_train_iterator(config, **kwargs), to_device, size=2)
    resumed.set_state(state)
    for a, b in zip(_arrays(reference[2:]), _arrays([next(resumed) for _ in range(4)])):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="device prefetch size must be at least 1, got 0"):
        DevicePrefetch(iter([]), to_device, size=0)
