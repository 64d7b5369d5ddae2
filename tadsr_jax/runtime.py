"""Process-wide JAX settings the launchers apply."""

import os

import jax

# XLA:CPU options the launchers and benchmark workers add to $XLA_FLAGS. jaxlib 0.10 hands convolutions and
# matmuls to YNNPACK; on the AVX2 CPU we develop on, its 3x3 convolutions at the VAE's sizes reach 80-105
# GFLOP/s where XLA's own (Eigen) kernels reach 145-165, while its matmuls are the faster ones (SD's
# 4096-token attention: 259 ms against 336 ms). So: YNNPACK for matmuls only.
XLA_CPU_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def set_xla_cpu_flags() -> None:
    """Add `XLA_CPU_FLAGS` to $XLA_FLAGS, keeping any the user gave. Call before JAX's first computation: XLA
    reads the variable once. GPUs and TPUs ignore CPU options."""
    flags = os.environ.get("XLA_FLAGS", "")
    missing = [f"--{name}={value}" for name, value in XLA_CPU_FLAGS.items() if f"--{name}=" not in flags]
    os.environ["XLA_FLAGS"] = " ".join([flags, *missing]).strip()


def enable_compilation_cache(directory: str | None = None) -> str:
    """Persist compiled programs, so a second run of a CLI skips compilation: in `directory`, else
    $JAX_COMPILATION_CACHE_DIR, else ~/.cache/tadsr_jax/xla."""
    directory = (directory or os.environ.get("JAX_COMPILATION_CACHE_DIR")
                 or os.path.join(os.path.expanduser("~"), ".cache", "tadsr_jax", "xla"))
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return directory
