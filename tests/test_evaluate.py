"""Evaluation: file matching, centre crops, bad files, batched scores == the metric functions, the Table-1 layout,
the sweep plot and the launcher end to end (JSON last line, reports, exit status)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageFilter
from skimage import data

from tadsr_jax import evaluation, metrics
from tadsr_jax.weights.lpips import random_lpips

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


def test_scorer_errors():
    with pytest.raises(ValueError, match="unknown metric"):
        evaluation.Scorer(["psnr", "fid"])
    with pytest.raises(ValueError, match=r"lpips needs its weights: --lpips=FILE"):
        evaluation.Scorer(["lpips"])


def test_markdown_table_has_the_paper_layout():
    table = evaluation.markdown_table("RealSR", {"ours": {"psnr": 25.16612, "ssim": 0.715, "lpips": 0.31684},
                                                 "other": {"psnr": 25.5, "ssim": 0.7, "lpips": 0.3}},
                                      {"ours": 100, "other": 100})
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


def test_launcher_end_to_end(folders, tmp_path):
    sr, hr = folders
    out = tmp_path / "report"
    cmd = [sys.executable, os.path.join(REPO, "launch", "evaluate.py"), f"--sr={sr}", f"--hr={hr}",
           f"--output={out}", "--dataset=Samples"]
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
    bad = subprocess.run(cmd[:-1] + ["--metrics=psnr,lpips"], capture_output=True, text=True, cwd=REPO, timeout=300,
                         check=False)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("evaluate: error: lpips needs")


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
    run = subprocess.run([sys.executable, os.path.join(REPO, "launch", "evaluate.py"), f"--sr={a},{b}", f"--hr={hr}",
                          f"--output={out}", "--metrics=psnr", "--dataset=Samples"],
                         capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert run.returncode == 1, run.stderr[-2000:]  # b's coffee failed
    stderr = run.stderr.splitlines()
    assert "left out: a: 2 image(s) not scored in every column: chelsea, coffee" in stderr
    assert "left out: b: 2 image(s) not scored in every column: coffee, rocket" in stderr
    report = json.loads((out / "metrics.json").read_text())
    astronaut = [np.asarray(Image.open(path).convert("RGB"), np.float32)[None] / 255
                 for path in (a / "astronaut.jpg", hr / "astronaut.png")]
    expected = float(metrics.psnr_y(*astronaut)[0])
    for label, left_out in (("a", ["chelsea", "coffee"]), ("b", ["coffee", "rocket"])):
        assert report[label]["images"] == 1 and report[label]["left_out"] == left_out
        np.testing.assert_allclose(report[label]["mean"]["psnr"], expected, rtol=1e-6)
    assert sorted(report["a"]["per_image"]) == ["astronaut", "coffee"]  # coffee: scored in a, not in its mean
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {
        label: {**report[label]["mean"], "images": 1} for label in ("a", "b")}
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
