"""The SR tool's output plan: every input gets its own output, no input is overwritten, the output folder is usable,
and all of it is known before the model loads."""

import errno
import os
import subprocess
import sys

import pytest

from configs import tiny
from tadsr_jax.infer import outputs, session
from tadsr_jax.infer.model import WeightsSource
from tadsr_jax.infer.outputs import OutputError, plan_outputs, sweep_suffixes


def _inputs(folder, *names) -> list[str]:
    folder.mkdir(exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"an image")
    return [str(folder / name) for name in names]


def _problems(*args) -> list[str]:
    with pytest.raises(OutputError) as error:
        plan_outputs(*args)
    assert str(error.value).splitlines() == error.value.problems
    return error.value.problems


def test_plan_gives_each_input_its_outputs_and_creates_the_folder(tmp_path):
    inputs = _inputs(tmp_path / "in", "a.png", "b.jpg")
    out = tmp_path / "new" / "out"
    assert plan_outputs(str(tmp_path / "in"), inputs, str(out)) == {
        inputs[0]: [f"{out}/a.png"],
        inputs[1]: [f"{out}/b.png"],
    }
    assert plan_outputs(str(tmp_path / "in"), inputs[:1], str(out), sweep_suffixes([100, 700])) == {
        inputs[0]: [f"{out}/a_t100.png", f"{out}/a_t700.png", f"{out}/a_sweep.png"]
    }
    assert os.listdir(out) == []  # the write probe is gone


@pytest.mark.parametrize(
    "suffixes, more", [(("",), ""), (sweep_suffixes([100, 300, 500]), " (and 3 more outputs)")], ids=["single", "sweep"]
)
def test_inputs_with_one_stem_are_refused_one_line_per_clash(tmp_path, suffixes, more):
    inputs = _inputs(tmp_path / "in", "a.jpg", "a.png", "b.png", "c.png", "c.tif", "c.webp")
    out = tmp_path / "out"
    problems = _problems(str(tmp_path / "in"), inputs, str(out), suffixes)
    first = f"{suffixes[0]}.png"
    assert problems == [
        f"{inputs[0]} and {inputs[1]} would be written to one file, {out}/a{first}{more}: rename one, or run them "
        f"separately",
        f"{inputs[3]}, {inputs[4]} and {inputs[5]} would be written to one file, {out}/c{first}{more}: rename one, "
        f"or run them separately",
    ]
    assert not out.exists()


@pytest.mark.parametrize("link", [False, True], ids=["same_path", "symlink"])
def test_the_input_folder_as_output_is_refused(tmp_path, link):
    inputs = _inputs(tmp_path / "photos", "photo.png", "other.jpg")
    out = tmp_path / "photos"
    if link:
        out = tmp_path / "link"
        out.symlink_to(tmp_path / "photos")
    problems = _problems(str(tmp_path / "photos"), inputs, str(out))
    assert len(problems) == 1 and problems[0].startswith(f"--output {out}: is the input folder")


def test_an_output_that_is_an_input_file_is_refused(tmp_path):
    (photo,) = _inputs(tmp_path / "out", "photo.png")
    assert _problems(photo, [photo], str(tmp_path / "out")) == [
        f"--output {tmp_path / 'out'}: {photo} would overwrite the input {photo}"
    ]
    assert plan_outputs(photo, [photo], str(tmp_path / "out"), sweep_suffixes([100]))  # other names: fine


def test_an_output_that_is_a_file_is_refused(tmp_path):
    inputs = _inputs(tmp_path / "in", "a.png")
    (tmp_path / "results").write_text("a file")
    assert _problems(str(tmp_path / "in"), inputs, str(tmp_path / "results")) == [
        f"--output {tmp_path / 'results'}: exists and is not a folder (give a folder to write into)"
    ]
    assert _problems(str(tmp_path / "in"), inputs, str(tmp_path / "results" / "sr")) == [
        f"--output {tmp_path / 'results' / 'sr'}: cannot create the folder: Not a directory"
    ]


def test_an_output_folder_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
    """Tests run as root, for whom permission bits do not stop writes: the probe is made to fail as a read-only
    file system would make it."""

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(outputs.tempfile, "TemporaryFile", read_only)
    inputs = _inputs(tmp_path / "in", "a.png")
    assert _problems(str(tmp_path / "in"), inputs, str(tmp_path / "out")) == [
        f"--output {tmp_path / 'out'}: cannot write in the folder: Read-only file system"
    ]


@pytest.mark.parametrize("case", ["same_stem", "input_folder", "output_is_file", "repeated_timestep"])
def test_session_refuses_before_loading_the_model(tmp_path, monkeypatch, case):
    def load_sr_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(session, "load_sr_model", load_sr_model)
    config = tiny.get_config()
    config.model.pretrained = str(tmp_path)
    folder = tmp_path / "in"
    _inputs(folder, "a.png", *(["a.jpg"] if case == "same_stem" else []))
    output = {"input_folder": folder, "output_is_file": folder / "a.png"}.get(case, tmp_path / "out")
    sweep = [100, 300, 100] if case == "repeated_timestep" else None
    with pytest.raises(ValueError) as error:
        session.run(config, str(folder), str(output), WeightsSource(), sweep=sweep)
    assert len(str(error.value).splitlines()) == 1, str(error.value)


@pytest.mark.parametrize("scale", [0, 9])
def test_an_out_of_range_scale_is_refused_before_the_model_loads(tmp_path, monkeypatch, scale):
    def load_sr_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(session, "load_sr_model", load_sr_model)
    config = tiny.get_config()
    config.sr.scale = scale
    _inputs(tmp_path / "in", "a.png")
    with pytest.raises(ValueError) as error:
        session.run(config, str(tmp_path / "in"), str(tmp_path / "out"), WeightsSource())
    assert str(error.value) == f"sr.scale must be an integer in 1..8, got {scale}"


def _launch_sr(tmp_path, folder, output, *flags) -> subprocess.CompletedProcess:
    """launch/sr.py on the tiny config with a generator file that does not exist (so any model load would fail)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run(
        [
            sys.executable,
            os.path.join(repo, "launch", "sr.py"),
            f"--config={os.path.join(repo, 'configs/tiny.py')}",
            f"--generator={tmp_path / 'none'}",
            f"--input={folder}",
            f"--output={output}",
            *flags,
        ],
        capture_output=True,
        text=True,
        cwd=repo,
        timeout=300,
        check=False,
    )


@pytest.mark.slow  # runs launch/sr.py
def test_launcher_refuses_a_bad_scale_in_one_line(tmp_path):
    folder, output = tmp_path / "in", tmp_path / "out"
    _inputs(folder, "a.png")
    run = _launch_sr(tmp_path, folder, output, "--config.sr.scale=9")
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.splitlines() == ["sr: error: sr.scale must be an integer in 1..8, got 9"]
    assert not output.exists()


@pytest.mark.slow  # runs launch/sr.py
def test_launcher_refuses_with_one_line_per_problem_before_loading_weights(tmp_path):
    """The weights file does not exist: had the model been loaded first, that would be the error."""
    folder = tmp_path / "in"
    _inputs(folder, "a.png", "a.jpg", "b.png", "b.webp")
    output = tmp_path / "out"
    run = _launch_sr(tmp_path, folder, output, "--sweep=100,700")
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.splitlines() == [
        f"sr: error: {folder / 'a.jpg'} and {folder / 'a.png'} would be written to one file, {output}/a_t100.png "
        f"(and 2 more outputs): rename one, or run them separately",
        f"sr: error: {folder / 'b.png'} and {folder / 'b.webp'} would be written to one file, {output}/b_t100.png "
        f"(and 2 more outputs): rename one, or run them separately",
    ]
    assert not output.exists()
