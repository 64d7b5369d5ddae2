"""What every launcher shares (tadsr_jax/cli.py): one-line usage errors, --help exiting 0 with the defaults, quiet
logging unless --verbose, log lines written through tqdm. Launchers run as subprocesses on inputs that fail or
finish before any compilation (a few seconds each)."""

import logging
import os
import re
import subprocess
import sys

import pytest
from absl import logging as absl_logging
from tqdm import tqdm

from tadsr_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHERS = ("bench", "convert", "demo", "evaluate", "sr", "tag", "train")


def _launch(name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", f"{name}.py"), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        check=False,
        env=env,
    )


@pytest.mark.slow  # runs the launcher
@pytest.mark.parametrize(
    "name, args, line",
    [
        (
            "sr",
            ["--config=configs/tiny.py", "--config.sr.timestepp=3", "--input=x", "--output=y"],
            "sr: error: unknown config key 'sr.timestepp' (did you mean 'sr.timestep'?)",
        ),
        (
            "train",
            ["--config", "configs/tiny.py", "--config.train.step=2", "--workdir=w"],
            "train: error: unknown config key 'train.step' (did you mean 'train.steps'?)",
        ),
        # demo.py's --config has a default file, whose overrides ml_collections applies at import
        ("demo", ["--config.xxx=3"], "demo: error: unknown config key 'xxx'"),
    ],
)
def test_unknown_config_key_is_one_line_naming_the_closest_key(name, args, line):
    run = _launch(name, *args)
    assert (run.returncode, run.stderr, run.stdout) == (2, line + "\n", "")


@pytest.mark.slow  # runs the launcher
def test_usage_errors_are_one_line():
    missing = _launch("sr", "--config=configs/tiny.py", "--input=x")
    assert missing.returncode == 2 and missing.stderr.splitlines() == [
        "sr: error: flag --output=None: Flag --output must have a value other than None."
    ]
    no_file = _launch("train", "--config=configs/nope.py", "--workdir=w")
    assert no_file.returncode == 2 and no_file.stderr.splitlines() == [
        "train: error: --config=configs/nope.py: no such file"
    ]
    stray = _launch("evaluate", "--sr=a", "b")
    assert stray.returncode == 2 and stray.stderr.splitlines() == [
        "evaluate: error: unexpected arguments b (flags are --name=value)"
    ]


def test_unknown_config_key_message():
    config = cli.load_config(os.path.join(REPO, "configs/tiny.py"))
    assert cli.unknown_config_key(config, ["sr.timestep", "model.lora_rnak"]) == (
        "unknown config key 'model.lora_rnak' (did you mean 'model.lora_rank'?)"
    )
    assert cli.unknown_config_key(config, ["sr.timestep", "train", "data"]) is None
    assert cli.unknown_config_key(config, ["zzzzzz"]) == "unknown config key 'zzzzzz'"


@pytest.mark.slow  # runs the launcher
@pytest.mark.parametrize("name", LAUNCHERS)
def test_help_exits_0(name):
    run = _launch(name, "--help")
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"launch/{name}.py" in run.stdout and "--[no]verbose" in run.stdout


def _flag_names(help_text: str) -> set[str]:
    """The names of the flags an absl `--helpfull` lists (`--name`, `--[no]name`, `-x,--name`)."""
    return set(re.findall(r"^\s+(?:-\S+,)?--(?:\[no\])?([\w.]+):", help_text, re.M))


# evaluate.py's --batch_size is the scoring batch (images scored per call), not config.sr.batch_size.
@pytest.mark.slow  # runs the launcher
@pytest.mark.parametrize("name, not_sr_settings", [("sr", set()), ("evaluate", {"batch_size"})])
def test_sr_settings_are_config_keys_not_flags(name, not_sr_settings):
    """The SR settings have one source, config.sr: the launchers that super-resolve have no flag named after one
    (users write --config.sr.timestep=300), and their --helpfull exits 0."""
    run = _launch(name, "--helpfull")
    assert run.returncode == 0, run.stderr[-2000:]
    flags = _flag_names(run.stdout)
    assert {"config", "verbose", "workdir", "sweep"} <= flags  # the parse sees the listed flags
    sr_keys = set(cli.load_config(os.path.join(REPO, "configs/tiny.py")).sr.keys())
    assert flags & sr_keys == not_sr_settings


@pytest.mark.slow  # runs the launcher
def test_convert_usage_keeps_its_continuation_lines():
    run = _launch("convert", "--help")
    assert run.returncode == 0
    commands = [line for line in run.stdout.splitlines() if line.startswith("python launch/convert.py")]
    assert [c.split()[2] for c in commands] == [
        "--what=lpips",
        "--what=lpips_alex",
        "--what=dists",
        "--what=dape",
        "--what=generator",
    ]
    assert all(c.endswith(" \\") and not c.endswith("\\\\") for c in commands)


@pytest.fixture
def root_logging(monkeypatch):
    """absl at INFO as a launcher has it; restores the root logger's handlers and level, absl's verbosity, and
    transformers' environment variable."""
    root = logging.getLogger()
    handlers, level, verbosity = list(root.handlers), root.level, absl_logging.get_verbosity()
    monkeypatch.delenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", raising=False)
    absl_logging.set_verbosity(absl_logging.INFO)
    yield root
    absl_logging.set_verbosity(verbosity)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def _log_from(logger: str, level: int, message: str, path: str) -> None:
    """A record as if `logging.getLogger(logger).log(level, message)` were called in the file `path`."""
    logging.getLogger(logger).handle(logging.LogRecord(logger, level, path, 1, message, (), None))


def _ours(message: str) -> None:
    _log_from("absl", logging.INFO, message, os.path.join(cli.PACKAGE_DIR, "train", "loop.py"))


def test_log_lines_are_not_glued_to_a_progress_bar(root_logging, capsys):
    cli.configure_logging(verbose=False)
    with tqdm(total=4, desc="train", file=sys.stderr) as bar:
        bar.update(1)
        _ours("step 1: {}")
        bar.update(1)
    err = capsys.readouterr().err
    assert re.search(r"(^|[\r\n])I\d{4} [^\n]* loop.py:1\] step 1: \{\}\n", err), err
    assert not re.search(r"it/s\]I\d{4}", err), err


def test_other_libraries_info_is_dropped_unless_verbose(root_logging, capsys):
    orbax = os.path.join(os.path.dirname(os.path.dirname(cli.PACKAGE_DIR)), "orbax", "checkpoint", "x.py")
    for verbose in (False, True):
        cli.configure_logging(verbose=verbose)
        _ours("ours")
        _log_from("absl", logging.INFO, "orbax info", orbax)  # Orbax logs through absl too
        logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu'")
        _log_from("absl", logging.WARNING, "a library warning", orbax)
        lines = [line.split("] ", 1)[1] for line in capsys.readouterr().err.splitlines()]
        libraries_info = ["orbax info", "Unable to initialize backend 'tpu'"] if verbose else []
        assert lines == ["ours", *libraries_info, "a library warning"]


@pytest.mark.slow  # a fresh Python process
@pytest.mark.parametrize("verbose", [False, True])
def test_transformers_torch_advice_only_with_verbose(verbose):
    """transformers says "PyTorch was not found" on import when torch is missing (here: made unimportable)."""
    code = (
        "import sys; sys.modules['torch'] = None; from tadsr_jax import cli; "
        f"cli.configure_logging(verbose={verbose}); import transformers"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=300, check=True
    )
    assert ("PyTorch was not found" in run.stderr) == verbose, run.stderr


@pytest.mark.slow
def test_launcher_is_quiet_unless_verbose(tmp_path):
    """train.py stops at a missing SD folder after JAX has started: without JAX_PLATFORMS (as users run it), JAX
    probes for a TPU and logs the failure at INFO."""
    missing = tmp_path / "missing"
    args = [
        "--config=configs/tiny.py",
        f"--workdir={tmp_path / 'work'}",
        f"--config.model.pretrained={missing}",
        f"--config.data.path={tmp_path / 'images'}",
    ]
    # As on a host without libtpu: the test environment installs it (tests/test_aot.py), and libtpu on a host with
    # no TPU writes its own C++ lines to stderr when JAX probes for one, below any Python logging. (JAX in this test
    # process has set TPU_LIBRARY_PATH, which would load it directly.)
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TPU_LIBRARY_PATH")}
    hide = tmp_path / "hide_libtpu"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['libtpu'] = None\n")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hide), env.get("PYTHONPATH")]))
    quiet = _launch("train", *args, env=env)
    assert quiet.returncode == 1 and quiet.stderr.splitlines() == [
        f"error: {missing}: pretrained model folder does not exist"
    ]
    loud = _launch("train", *args, "--verbose", env=env)
    assert loud.returncode == 1
    assert re.search(r"^I\d{4} [^\n]* xla_bridge.py:\d+\] ", loud.stderr, re.M), loud.stderr


@pytest.mark.slow
def test_demo_says_what_it_does_before_the_slow_part(tmp_path):
    """The demo announces training (compilation) before it starts; here the SD folder is missing, so it stops
    right after, with one error line."""
    missing = tmp_path / "missing"
    run = _launch(
        "demo",
        f"--workdir={tmp_path / 'demo'}",
        f"--config.model.pretrained={missing}",
        f"--config.data.path={tmp_path / 'images'}",
        "--config.train.steps=3",
    )
    assert run.returncode == 1
    assert run.stderr.splitlines() == [
        f"demo: training to step 3 in {tmp_path / 'demo'}; the bar starts moving once the train step is compiled",
        f"demo: error: {missing}: pretrained model folder does not exist",
    ]
