"""Where the SR tool writes: every output path of a run, planned and checked before the model loads.

A run that would overwrite one of its inputs, write two inputs to one file, or write into a folder it cannot
use is refused up front, with one line per problem, instead of after minutes of model loading and compute.
The output folder may be a URL (gs://...): see `tadsr_jax.storage`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

from tadsr_jax import storage
from tadsr_jax.images import output_path


class OutputError(ValueError):
    """The run's outputs cannot be written as asked. Its message has one line per problem."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def sweep_suffixes(timesteps: Sequence[int]) -> list[str]:
    """The output name suffixes of a timestep sweep: `_t<T>` per timestep, then the contact sheet's `_sweep`."""
    return [f"_t{t}" for t in timesteps] + ["_sweep"]


def plan_outputs(
    input_path: str, inputs: Sequence[str], output_dir: str, suffixes: Sequence[str] = ("",)
) -> dict[str, list[str]]:
    """input -> its output paths (`<output_dir>/<stem><suffix>.png`, one per suffix), or OutputError.

    Refused: `output_dir` that exists as something other than a folder, or cannot be created or written in;
    the input folder itself as `output_dir` (a rerun would read the outputs as inputs); an output path that is an
    input file (compared as real paths); two inputs with one output path (`a.png` and `a.jpg`). The folder is
    created (if missing) and probed with a temporary file, which is removed.
    """
    if (
        storage.isfile(output_dir)
        if storage.is_url(output_dir)
        else os.path.lexists(output_dir) and not os.path.isdir(output_dir)
    ):
        raise OutputError([f"--output {output_dir}: exists and is not a folder (give a folder to write into)"])
    plan = {path: [output_path(path, output_dir, suffix) for suffix in suffixes] for path in inputs}
    problems = _overwritten_inputs(input_path, inputs, output_dir, plan) + _clashes(plan)
    if problems:
        raise OutputError(problems)
    _check_writable(output_dir)
    return plan


def _real(path: str) -> str:
    """The path compared: `os.path.realpath` of a local one, a URL as it is (less any trailing slash)."""
    return path.rstrip("/") if storage.is_url(path) else os.path.realpath(path)


def _overwritten_inputs(
    input_path: str, inputs: Sequence[str], output_dir: str, plan: dict[str, list[str]]
) -> list[str]:
    if storage.isdir(input_path) and _real(output_dir) == _real(input_path):
        return [
            f"--output {output_dir}: is the input folder; its outputs would replace or join the inputs "
            f"(give another folder)"
        ]
    real_inputs = {_real(path): path for path in inputs}
    return [
        f"--output {output_dir}: {target} would overwrite the input {real_inputs[_real(target)]}"
        for targets in plan.values()
        for target in targets
        if _real(target) in real_inputs
    ]


def _clashes(plan: dict[str, list[str]]) -> list[str]:
    """One line per group of inputs that share output paths."""
    writers: dict[str, list[str]] = {}
    for path, targets in plan.items():
        for target in targets:
            writers.setdefault(_real(target), []).append(path)
    groups: dict[tuple[str, ...], list[str]] = {}
    for targets in plan.values():
        for target in targets:
            group = tuple(writers[_real(target)])
            if len(group) > 1 and target not in groups.get(group, []):
                groups.setdefault(group, []).append(target)
    lines = []
    for group, targets in groups.items():
        names = f"{', '.join(group[:-1])} and {group[-1]}"
        more = f" (and {len(targets) - 1} more outputs)" if len(targets) > 1 else ""
        lines.append(f"{names} would be written to one file, {targets[0]}{more}: rename one, or run them separately")
    return lines


def _check_writable(output_dir: str) -> None:
    if storage.is_url(output_dir):
        _check_writable_url(output_dir)
        return
    try:
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise OutputError([f"--output {output_dir}: cannot create the folder: {e.strerror or e}"]) from e
    try:
        with tempfile.TemporaryFile(dir=output_dir, prefix=".write_probe"):
            pass
    except OSError as e:
        raise OutputError([f"--output {output_dir}: cannot write in the folder: {e.strerror or e}"]) from e


def _check_writable_url(output_dir: str) -> None:
    """Write and remove a probe object (an object store has no folder to create)."""
    probe = os.path.join(output_dir, f".write_probe.{os.getpid()}")
    try:
        storage.atomic_write(probe, lambda tmp: open(tmp, "wb").close())
        storage.remove(probe)
    except Exception as e:  # noqa: BLE001 - TensorFlow's and fsspec's store errors are not all OSErrors
        lines = str(e).strip().splitlines()
        raise OutputError(
            [f"--output {output_dir}: cannot write in the folder: {type(e).__name__}: {lines[0] if lines else ''}"]
        ) from e
