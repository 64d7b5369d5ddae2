import os

import pytest

# Keep the test process single-host CPU and quiet; tests that need simulated devices set XLA_FLAGS themselves
# in a subprocess.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


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
