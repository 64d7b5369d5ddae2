import os
import shutil
import tempfile

import pytest

# Keep the test process single-host CPU and quiet; tests that need simulated devices add a device count to
# XLA_FLAGS in a subprocess.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Compile fast: LLVM's expensive passes off and its backend optimisation at level 1. On the tiny models a test's
# time is compiling plus running; level 1 balances them best for the programs that run a lot (launch/sr.py on two
# images: 24 s of CPU at XLA's default, 34 s at level 0, 20 s at level 1), while a train step, which compiles much
# more than it runs, is cheapest at level 0 (tests/test_training.py's runs: 40 s at level 0 vs 51 s at level 1 for
# 3 steps). Numerics move by float32 rounding only (e.g. 2.5e-7 in SSIM), far inside every tolerance. Subprocesses
# inherit it.
FAST_COMPILE = "--xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), FAST_COMPILE]))
# One persistent compilation cache for the whole run: many modules compile the same tiny SD programs (a UNet or VAE
# pass, an SR batch), and pytest-xdist's workers and the launchers' subprocesses inherit the directory, so each
# program is compiled once per run. The main process makes it (xdist workers are started after this import, with
# its environment) and removes it at the end; programs that compile in under JAX's default 1 s are not written.
if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _SESSION_CACHE = tempfile.mkdtemp(prefix="tadsr-jax-test-compile-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
else:
    _SESSION_CACHE = None


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SESSION_CACHE is not None:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> str:
    """configs/tiny.py's offline SD stand-in (tadsr_jax/weights/tiny_sd.py: random UNet and text encoder, a nearly
    lossless VAE), written once for the whole session. Tests only read it."""
    from configs.tiny import get_config
    from tadsr_jax.weights.tiny_sd import write_tiny_sd

    return write_tiny_sd(str(tmp_path_factory.mktemp("session") / "tiny_sd"), get_config().model)


@pytest.fixture(scope="session")
def tiny_generator(tiny_sd, tmp_path_factory) -> str:
    """A generator export (launch/convert.py's format) of `tiny_models.trained_tadsr(tiny_sd)`, for the whole
    session; no trained timesteps recorded."""
    from tiny_models import trained_tadsr

    from tadsr_jax.method.official import save_generator

    path = str(tmp_path_factory.mktemp("session") / "generator.safetensors")
    save_generator(trained_tadsr(tiny_sd)[0], path)
    return path


# The longest modules first: under pytest-xdist they then run beside the many short ones instead of after them,
# so the suite takes about as long as its longest module rather than that plus a tail.
LONGEST_FIRST = ("test_training.py", "test_aot.py", "test_sr.py", "test_train_options.py", "test_unet.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a module's own order is kept
