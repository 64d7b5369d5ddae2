"""Process-wide JAX settings the launchers apply."""

import os

import jax


def enable_compilation_cache(directory: str | None = None) -> str:
    """Persist compiled programs, so a second run of a CLI skips compilation: in `directory`, else
    $JAX_COMPILATION_CACHE_DIR, else ~/.cache/tadsr_jax/xla."""
    directory = (directory or os.environ.get("JAX_COMPILATION_CACHE_DIR")
                 or os.path.join(os.path.expanduser("~"), ".cache", "tadsr_jax", "xla"))
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return directory
