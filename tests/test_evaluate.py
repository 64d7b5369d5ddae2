"""Evaluation: file matching, centre crops, bad files, batched scores == the metric functions, the Table-1 layout,
the sweep plot and the launcher end to end (JSON last line, reports, exit status)."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from flax import nnx
from hidden_modules import subprocess_env
from PIL import Image, ImageFilter
from skimage import data

from tadsr_jax import evaluation, metrics
from tadsr_jax.models.lpips import LPIPS
from tadsr_jax.weights.convert import state_to_torch
from tadsr_jax.weights.files import write_safetensors
from tadsr_jax.weights.lpips import load_lpips, random_lpips

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _photo(name: str, size: int) -> Image.Image:
    image = getattr(data, name)()
    image = image if image.ndim == 3 else np.stack([image] * 3, -1)
    return Image.fromarray(image[..., :3]).resize((size, size), Image.BICUBIC)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """HR photos and 'SR' versions (blurred, JPEG'd), with one unmatched file on each side, a duplicate stem,
    a corrupt SR file and an SR file of the wrong size."""
    root = tmp_path_factory.mktemp("eval")
    hr, sr = root / "hr", root / "sr"
    hr.mkdir()
    sr.mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        photo = _photo(name, 48)
        photo.save(hr / f"{name}.png")
        photo.filter(ImageFilter.GaussianBlur(1.2)).save(sr / f"{name}.jpg", quality=60)
    _photo("camera", 48).save(hr / "camera.png")  # no SR output
    _photo("coins", 48).save(sr / "coins.png")  # no reference
    _photo("astronaut", 48).save(sr / "astronaut.png")  # same stem as astronaut.jpg
    (sr / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _photo("immunohistochemistry", 48).save(hr / "broken.png")
    _photo("hubble_deep_field", 40).save(sr / "small.png")
    _photo("hubble_deep_field", 48).save(hr / "small.png")
    return sr, hr


def test_match_files_reports_unmatched_and_duplicates(folders):
    sr, hr = folders
    matching = evaluation.match_files(str(sr), str(hr))
    assert [p.name for p in matching.pairs] == ["astronaut", "broken", "chelsea", "coffee", "rocket", "small"]
    assert matching.pairs[0].sr == str(sr / "astronaut.jpg") and matching.pairs[0].hr == str(hr / "astronaut.png")
    assert matching.unmatched_sr == [str(sr / "coins.png")]
    assert matching.unmatched_hr == [str(hr / "camera.png")]
    assert matching.duplicates == [str(sr / "astronaut.png")]
    alone = evaluation.match_files(str(sr))
    assert len(alone.pairs) == 7 and all(p.hr is None for p in alone.pairs)


def test_scores_equal_the_metric_functions_and_bad_files_cost_one_line(folders):
    sr, hr = folders
    lpips = random_lpips(0)
    scorer = evaluation.Scorer(["psnr", "ssim", "lpips"], lpips=lpips)
    result = evaluation.evaluate(evaluation.match_files(str(sr), str(hr)), scorer, batch_size=3)
    assert sorted(result.per_image) == ["astronaut", "chelsea", "coffee", "rocket"]
    assert len(result.failed) == 2 and all("\n" not in line for line in result.failed)
    assert any(line.startswith(str(sr / "broken.png")) for line in result.failed)
    assert any(line.startswith(str(sr / "small.png")) and "40x40 differs" in line for line in result.failed)
    for name, scores in result.per_image.items():
        a = np.asarray(Image.open(sr / f"{name}.jpg").convert("RGB"), np.float32)[None] / 255
        b = np.asarray(Image.open(hr / f"{name}.png").convert("RGB"), np.float32)[None] / 255
        # a padded batch of 3 vs one image: float32 sums in another order, measured up to 1.7e-7 (ssim), so 60x
        np.testing.assert_allclose(scores["psnr"], float(metrics.psnr_y(a, b)[0]), rtol=1e-5)
        np.testing.assert_allclose(scores["ssim"], float(metrics.ssim_y(a, b)[0]), rtol=1e-5)
        np.testing.assert_allclose(scores["lpips"], float(metrics.lpips_distance(lpips, a, b)[0]), rtol=1e-5)
    means = result.means()
    assert list(means) == ["psnr", "ssim", "lpips"]
    np.testing.assert_allclose(means["psnr"], np.mean([s["psnr"] for s in result.per_image.values()]))


def test_centre_crop_scores_the_middle(folders):
    sr, hr = folders
    matching = evaluation.match_files(str(sr), str(hr))
    matching.pairs[:] = [p for p in matching.pairs if p.name == "coffee"]
    cropped = evaluation.evaluate(matching, evaluation.Scorer(["psnr"]), crop=32)
    a = np.asarray(Image.open(sr / "coffee.jpg").convert("RGB"), np.float32)[8:40, 8:40][None] / 255
    b = np.asarray(Image.open(hr / "coffee.png").convert("RGB"), np.float32)[8:40, 8:40][None] / 255
    np.testing.assert_allclose(cropped.per_image["coffee"]["psnr"], float(metrics.psnr_y(a, b)[0]), rtol=1e-6)
    too_big = evaluation.evaluate(matching, evaluation.Scorer(["psnr"]), crop=64)
    assert too_big.failed == [f"{sr / 'coffee.jpg'}: 48x48 is smaller than the 64x64 centre crop"]


KNOWN = "psnr, ssim, lpips, lpips_alex, dists, fid, clipiqa, musiq, maniqa, topiq, qalign, niqe"


def test_scorer_errors():
    with pytest.raises(ValueError) as error:
        evaluation.Scorer(["psnr", "foo", "lpipz"])
    assert str(error.value) == f"unknown metric(s) foo, lpipz; known: {KNOWN}"
    with pytest.raises(ValueError, match=r"lpips needs its weights: --lpips=FILE"):
        evaluation.Scorer(["lpips"])
    with pytest.raises(
        ValueError,
        match=r"lpips_alex needs its weights: --lpips_alex=FILE \(made by "
        r"launch/convert.py --what=lpips_alex\)",
    ):
        evaluation.Scorer(["lpips_alex"])


def _evaluate_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", "evaluate.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
        env=env,
    )


@pytest.mark.slow  # runs launch/evaluate.py
def test_launcher_unknown_metric_and_fid_without_pyiqa_are_one_line(folders, tmp_path):
    """Both refused before anything is scored, exit 2, one line; pyiqa is made absent in the launcher's process
    (installed or not here)."""
    sr, hr = folders
    env = subprocess_env(str(tmp_path), "pyiqa")
    unknown = _evaluate_cli(f"--sr={sr}", f"--hr={hr}", "--metrics=psnr,foo", env=env)
    assert unknown.returncode == 2 and unknown.stderr.splitlines() == [
        f"evaluate: error: unknown metric(s) foo; known: {KNOWN}"
    ], unknown.stderr[-2000:]
    fid = _evaluate_cli(f"--sr={sr}", f"--hr={hr}", "--metrics=psnr,fid", env=env)
    assert fid.returncode == 2 and fid.stderr.splitlines() == [
        "evaluate: error: fid needs pyiqa and its weights (ModuleNotFoundError: No module named 'pyiqa'): "
        "pip install pyiqa==0.1.10 torch==2.13.0"
    ], fid.stderr[-2000:]


def test_fid_and_qalign_plumbing_with_a_stand_in_pyiqa(folders, tmp_path, monkeypatch):
    """PLUMBING ONLY, not a test of FID or Q-Align: a stand-in pyiqa records what it is given. FID is called once
    per column with two local folders holding exactly the images the columns are compared on, centre-cropped as
    for the per-image metrics and pixel-exact; Q-Align is scored per image. Both reach the means, the JSON and the
    table."""
    sr, hr = folders
    b = tmp_path / "b"
    b.mkdir()
    for name in ("astronaut", "coffee", "rocket"):
        (b / f"{name}.jpg").write_bytes((sr / f"{name}.jpg").read_bytes())
    seen = []

    def fid(sr_dir, hr_dir):
        folders_read = []
        for folder in (sr_dir, hr_dir):
            files = sorted(os.listdir(folder))
            folders_read.append({f: np.asarray(Image.open(os.path.join(folder, f))) for f in files})
        seen.append((sr_dir, hr_dir, folders_read))
        return 10.0 * len(seen)

    def create_metric(name, device=None):
        return fid if name == "fid" else (lambda x: x.mean(dim=(1, 2, 3), keepdim=True) * torch.tensor(4.0) + 1)

    monkeypatch.setitem(sys.modules, "pyiqa", types.SimpleNamespace(create_metric=create_metric))
    scorer = evaluation.Scorer(["psnr", "fid", "qalign"])
    assert scorer.per_image_names == ("psnr", "qalign") and scorer.folder_names == ("fid",)
    matchings = {"a": evaluation.match_files(str(sr), str(hr)), "b": evaluation.match_files(str(b), str(hr))}
    comparison = evaluation.compare(matchings, scorer, crop=32)
    assert comparison.images == ["astronaut", "coffee", "rocket"]
    assert len(seen) == 2 and all(os.path.isabs(s) and os.path.isabs(h) and s != h for s, h, _ in seen)
    for column, (_, _, (sr_read, hr_read)) in zip((sr, b), seen):
        assert sorted(sr_read) == sorted(hr_read) == ["astronaut.png", "coffee.png", "rocket.png"]
        for name in ("astronaut", "coffee", "rocket"):
            want_sr = np.asarray(Image.open(column / f"{name}.jpg").convert("RGB"))[8:40, 8:40]
            want_hr = np.asarray(Image.open(hr / f"{name}.png").convert("RGB"))[8:40, 8:40]
            np.testing.assert_array_equal(sr_read[f"{name}.png"], want_sr)
            np.testing.assert_array_equal(hr_read[f"{name}.png"], want_hr)
    means = comparison.means()
    assert means["a"]["fid"] == 10.0 and means["b"]["fid"] == 20.0 and list(means["a"]) == ["psnr", "fid", "qalign"]
    astronaut = np.asarray(Image.open(sr / "astronaut.jpg").convert("RGB"))[8:40, 8:40].astype(np.float32) / 255
    np.testing.assert_allclose(
        comparison.columns["a"].per_image["astronaut"]["qalign"], astronaut.mean() * 4 + 1, rtol=1e-6
    )
    assert comparison.to_json()["b"]["mean"]["fid"] == 20.0
    table = evaluation.markdown_table("Samples", means, {"a": 3, "b": 3}).splitlines()
    assert "|  | FID↓ | **10.00** | 20.00 |" in table and any(row.startswith("|  | Q-Align↑ |") for row in table)


def test_markdown_table_has_the_paper_layout():
    table = evaluation.markdown_table(
        "RealSR",
        {
            "ours": {"psnr": 25.16612, "ssim": 0.715, "lpips": 0.31684},
            "other": {"psnr": 25.5, "ssim": 0.7, "lpips": 0.3},
        },
        {"ours": 100, "other": 100},
    )
    assert table.splitlines() == [
        "| Dataset | Metric | ours | other |",
        "|---|---|---|---|",
        "| RealSR | PSNR↑ | 25.166 | **25.500** |",
        "|  | SSIM↑ | **0.7150** | 0.7000 |",
        "|  | LPIPS-VGG↓ | 0.3168 | **0.3000** |",
        "|  | Images | 100 | 100 |",
    ]


def test_sweep_plot_writes_a_png(tmp_path):
    path = str(tmp_path / "sweep.png")
    evaluation.sweep_plot({100: {"psnr": 25.0, "lpips": 0.2}, 500: {"psnr": 24.0, "lpips": 0.25}}, path, "x")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > image.height > 100


@pytest.mark.slow  # runs launch/evaluate.py
def test_launcher_end_to_end(folders, tmp_path):
    sr, hr = folders
    out = tmp_path / "report"
    cmd = [
        sys.executable,
        os.path.join(REPO, "launch", "evaluate.py"),
        f"--sr={sr}",
        f"--hr={hr}",
        f"--output={out}",
        "--dataset=Samples",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert run.returncode == 1, run.stderr[-2000:]  # two files failed
    stderr = run.stderr.splitlines()
    assert f"unmatched: {sr / 'coins.png'}: no file of that name in {hr}" in stderr
    assert f"unmatched: {hr / 'camera.png'}: no SR output of that name in {sr}" in stderr
    assert any(line.startswith("note: lpips skipped") for line in stderr)
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    report = json.loads((out / "metrics.json").read_text())
    assert summary == {**report["sr"]["mean"], "images": 4, "failed": 2}
    assert set(summary) == {"psnr", "ssim", "images", "failed"}
    assert (out / "metrics.md").read_text().startswith("| Dataset | Metric | sr |\n|---|---|---|\n| Samples | PSNR↑ |")
    bad = subprocess.run(
        cmd[:-1] + ["--metrics=psnr,lpips"], capture_output=True, text=True, cwd=REPO, timeout=300, check=False
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("evaluate: error: lpips needs")


@pytest.mark.slow  # runs launch/evaluate.py
def test_launcher_lpips_alex_is_the_papers_lpips_row(folders, tmp_path):
    """--lpips_alex=FILE: by default beside PSNR/SSIM (notes for the LPIPS-VGG and DISTS left out), its means equal
    the AlexNet LPIPS of the files, labelled as the paper's LPIPS in the table."""
    sr, hr = folders
    weights = str(tmp_path / "lpips_alex.safetensors")
    write_safetensors(weights, state_to_torch(LPIPS(net="alex", rngs=nnx.Rngs(1))))
    out = tmp_path / "report"
    run = _evaluate_cli(f"--sr={sr}", f"--hr={hr}", f"--output={out}", f"--lpips_alex={weights}", "--dataset=S")
    assert run.returncode == 1, run.stderr[-2000:]  # broken and small fail, as in the end-to-end test
    stderr = run.stderr.splitlines()
    assert "note: lpips skipped: pass --lpips=FILE (made by launch/convert.py --what=lpips)" in stderr
    assert "note: dists skipped: pass --dists=FILE (made by launch/convert.py --what=dists)" in stderr
    assert not any("lpips_alex skipped" in line for line in stderr)
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(summary) == {"psnr", "ssim", "lpips_alex", "images", "failed"}
    model = load_lpips(weights, net="alex")
    pairs = [
        [
            np.asarray(Image.open(path).convert("RGB"), np.float32)[None] / 255
            for path in (sr / f"{n}.jpg", hr / f"{n}.png")
        ]
        for n in ("astronaut", "chelsea", "coffee", "rocket")
    ]
    expected = np.mean([float(metrics.lpips_distance(model, a, b)[0]) for a, b in pairs])
    np.testing.assert_allclose(summary["lpips_alex"], expected, rtol=1e-5)  # batched vs one by one, float32
    table = (out / "metrics.md").read_text().splitlines()
    assert any(row.startswith("|  | LPIPS-Alex (paper's LPIPS)↓ |") for row in table), table


@pytest.mark.slow  # runs launch/evaluate.py
def test_columns_of_different_coverage_are_compared_on_the_images_scored_in_all(folders, tmp_path):
    """Column a lacks rocket, b lacks chelsea and b's coffee is unreadable: both are scored on astronaut alone (the
    only image scored in both), each lists what it left out, and the count is in the table and the JSON."""
    sr, hr = folders
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, names in ((a, ("astronaut", "coffee", "chelsea")), (b, ("astronaut", "rocket"))):
        folder.mkdir()
        for name in names:
            (folder / f"{name}.jpg").write_bytes((sr / f"{name}.jpg").read_bytes())
    (b / "coffee.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    out = tmp_path / "report"
    run = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "launch", "evaluate.py"),
            f"--sr={a},{b}",
            f"--hr={hr}",
            f"--output={out}",
            "--metrics=psnr",
            "--dataset=Samples",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    assert run.returncode == 1, run.stderr[-2000:]  # b's coffee failed
    stderr = run.stderr.splitlines()
    assert "left out: a: 2 image(s) not scored in every column: chelsea, coffee" in stderr
    assert "left out: b: 2 image(s) not scored in every column: coffee, rocket" in stderr
    report = json.loads((out / "metrics.json").read_text())
    astronaut = [
        np.asarray(Image.open(path).convert("RGB"), np.float32)[None] / 255
        for path in (a / "astronaut.jpg", hr / "astronaut.png")
    ]
    expected = float(metrics.psnr_y(*astronaut)[0])
    for label, left_out in (("a", ["chelsea", "coffee"]), ("b", ["coffee", "rocket"])):
        assert report[label]["images"] == 1 and report[label]["left_out"] == left_out
        np.testing.assert_allclose(report[label]["mean"]["psnr"], expected, rtol=1e-6)
    assert sorted(report["a"]["per_image"]) == ["astronaut", "coffee"]  # coffee: scored in a, not in its mean
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {
        label: {**report[label]["mean"], "images": 1} for label in ("a", "b")
    }
    assert (out / "metrics.md").read_text().splitlines()[-1] == "|  | Images | 1 | 1 |"


def test_columns_without_a_common_image_are_refused(folders, tmp_path):
    sr, _ = folders
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, name in ((a, "astronaut"), (b, "rocket")):
        folder.mkdir()
        (folder / f"{name}.jpg").write_bytes((sr / f"{name}.jpg").read_bytes())
    matchings = {"a": evaluation.match_files(str(a)), "b": evaluation.match_files(str(b))}
    with pytest.raises(ValueError, match=r"no image name is in every column \(a, b\): nothing to compare"):
        evaluation.compare(matchings, evaluation.Scorer(["psnr"]))
