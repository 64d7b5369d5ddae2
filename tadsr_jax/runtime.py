"""Process-wide JAX settings the launchers apply, and the process's memory."""

import ctypes
import os
import sys

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
    directory = (
        directory
        or os.environ.get("JAX_COMPILATION_CACHE_DIR")
        or os.path.join(os.path.expanduser("~"), ".cache", "tadsr_jax", "xla")
    )
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return directory


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's malloc_trim; elsewhere nothing).

    glibc keeps freed memory in its arenas, so the transient copies of a model load (file reads, layout
    transposes, the float32 merge before a bfloat16 cast) would stay in the process's resident set for its whole
    life, with compilation and activations allocated on top."""
    if sys.platform.startswith("linux"):
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # absent from other C libraries, e.g. musl
        if trim is not None:
            trim(0)
