"""Timing, peak-FLOP and reporting helpers shared by the benchmarks.

Conventions: a timed call is synchronised (`jax.block_until_ready` on its outputs) before the clock stops;
a measurement is `warmup` untimed calls followed by `steps` timed ones, summarised by the median. FLOP/s
peaks are the best of several large square matmuls. Ours and the reference run in separate subprocesses
(`run_worker`), each reporting one JSON dict back through a file.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class BenchmarkError(RuntimeError):
    """A benchmark could not run (a worker failed, a result is missing); the message says which and why."""


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of each timed call."""

    times: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def best(self) -> float:
        return min(self.times)

    def as_dict(self) -> dict[str, Any]:
        return {"median_s": self.median, "min_s": self.best, "times_s": list(self.times)}


def block(tree: Any) -> Any:
    """Wait for every array in `tree` (a no-op for non-JAX values)."""
    import jax

    return jax.block_until_ready(tree)


def time_calls(fn: Callable[[], Any], *, steps: int, warmup: int, sync: Callable[[Any], Any] = block) -> Timing:
    """`warmup` untimed then `steps` timed calls of `fn()`; each call's result goes through `sync` inside the clock.

    Stateful loops (e.g. a train step whose state is donated) keep their state in `fn`'s closure.
    """
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return Timing(tuple(times))


def _best_flops(
    run: Callable[[int], Callable[[], Any]], sizes: Sequence[int], repeats: int, sync: Callable[[Any], Any]
) -> float:
    best = 0.0
    for n in sizes:
        call = run(n)
        sync(call())  # compile / allocate
        timing = time_calls(call, steps=repeats, warmup=1, sync=sync)
        best = max(best, 2.0 * n**3 / timing.best)
    return best


def measure_matmul_peak(dtype: str = "float32", *, sizes: Sequence[int] = (1024, 2048), repeats: int = 5) -> float:
    """Best FLOP/s of `n x n @ n x n` matmuls in JAX on the default device (2 n^3 FLOP each)."""
    import jax
    import jax.numpy as jnp

    matmul = jax.jit(jnp.matmul)

    def run(n: int):
        ka, kb = jax.random.split(jax.random.key(n))
        a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
        b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
        return lambda: matmul(a, b)

    return _best_flops(run, sizes, repeats, block)


def measure_torch_matmul_peak(
    dtype: str = "float32", *, sizes: Sequence[int] = (1024, 2048), repeats: int = 5
) -> float:
    """Best FLOP/s of `n x n @ n x n` matmuls in PyTorch (CPU, current thread setting)."""
    import torch

    torch_dtype = getattr(torch, dtype)

    def run(n: int):
        gen = torch.Generator().manual_seed(n)
        a = torch.randn(n, n, generator=gen).to(torch_dtype)
        b = torch.randn(n, n, generator=gen).to(torch_dtype)
        return lambda: torch.mm(a, b)

    return _best_flops(run, sizes, repeats, lambda x: x)


def worker_env() -> dict[str, str]:
    """The environment of a benchmark subprocess: this repository importable, Hugging Face offline."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + path if path else "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def run_worker(module: str, args: Sequence[str], *, label: str, timeout: float | None = None) -> dict[str, Any]:
    """`python -m module *args --out=FILE` in a fresh process; returns the JSON dict it wrote to FILE.

    The worker's own output is kept out of the report: it is shown (its tail) only if the worker fails.
    """
    with tempfile.TemporaryDirectory(prefix="tadsr_bench_") as tmp:
        out = os.path.join(tmp, "result.json")
        command = [sys.executable, "-m", module, *args, f"--out={out}"]
        start = time.perf_counter()
        try:
            proc = subprocess.run(
                command, env=worker_env(), cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise BenchmarkError(f"{label}: worker did not finish within {timeout:.0f} s") from None
        if proc.returncode != 0 or not os.path.isfile(out):
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
            raise BenchmarkError(f"{label}: worker failed (exit status {proc.returncode}):\n{tail}")
        with open(out) as f:
            result = json.load(f)
        result["process_wall_s"] = time.perf_counter() - start
        return result


def default_cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "tadsr_jax", "bench")


def weights_folder(kind: str, key: dict[str, Any], cache_dir: str | None = None) -> str:
    """`<cache>/<kind>-<hash of key>`: a new folder whenever what the weights depend on changes."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(cache_dir or default_cache_dir(), f"{kind}-{digest}")


def ensure_weights(folder: str, worker: str, marker: str, message: str) -> str:
    """Run `worker --side=prepare --folder=folder` once, unless `folder/marker` (written last) exists."""
    if not os.path.isfile(os.path.join(folder, marker)):
        progress(message)
        run_worker(worker, ["--side=prepare", f"--folder={folder}"], label="weights", timeout=3600)
    return folder


def write_folder(folder: str, fill: Callable[[str], None]) -> None:
    """`fill(staging)` then rename staging to `folder`: a half-written weights folder never has the final name."""
    staging = folder + ".partial"
    shutil.rmtree(staging, ignore_errors=True)
    fill(staging)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(staging, folder)


def worker_main(
    argv: Sequence[str],
    module: str,
    prepare: Callable[[str], None],
    sides: dict[str, Callable[..., dict[str, Any]]],
    **options: Any,
) -> None:
    """A benchmark worker's entry point: `--side=prepare|<side> --folder=F --steps --warmup --out [--option]`.

    `options` are extra string flags with their defaults, passed to the side's function as keywords.
    """
    parser = argparse.ArgumentParser(prog=f"python -m {module}")
    parser.add_argument("--side", choices=("prepare", *sides), required=True)
    parser.add_argument("--folder", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", required=True)
    for name, default in options.items():
        parser.add_argument(f"--{name}", default=default)
    args = parser.parse_args(argv)
    from tadsr_jax import runtime

    runtime.set_xla_cpu_flags()  # as the launchers do, before any JAX computation
    if args.side == "prepare":
        prepare(args.folder)
        result = {"folder": args.folder}
    else:
        result = sides[args.side](
            args.folder, steps=args.steps, warmup=args.warmup, **{name: getattr(args, name) for name in options}
        )
    write_result(args.out, result)


def write_result(path: str, result: dict[str, Any]) -> None:
    """A worker's JSON result, written atomically."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, path)


def progress(message: str) -> None:
    """One progress line on stderr (stdout is the report)."""
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- formatting


def si(value: float | None, unit: str = "") -> str:
    """1.23e12 -> '1.23 T' + unit; None -> 'n/a'."""
    if value is None:
        return "n/a"
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} s"


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table; the first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


@dataclasses.dataclass
class Report:
    """What a benchmark prints: a title, a table and the result dict (the final JSON line)."""

    title: str
    header: Sequence[str]
    rows: Sequence[Sequence[Any]]
    result: dict[str, Any]
    notes: Sequence[str] = ()


def print_report(report: Report, file: TextIO | None = None) -> None:
    """The title, the table, any notes, and as the very last line the result as one JSON object."""
    file = file or sys.stdout
    print(report.title, file=file)
    print(format_table(report.header, report.rows), file=file)
    for note in report.notes:
        print(note, file=file)
    print(json.dumps(report.result), file=file, flush=True)
