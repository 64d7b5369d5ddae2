"""python launch/bench.py --what=train|sr|data [--steps=5] [--warmup=2] [--cache_dir=DIR] [--profile_steps=N]

Measures our speed against the PyTorch reference on the same weights, ours and the reference one after the
other, each in its own subprocess; `data` measures the input pipeline's degraded examples/s per core. Prints a
small table and, as the last line, one JSON object (`ours_s`, `torch_s`, `speedup`, `peak_fraction`, ...). Each
`--what` is one handler in HANDLERS (flags -> library call -> report). Compilation is measured, so the
persistent compilation cache is deliberately not enabled.
"""

import os
import sys
from collections.abc import Callable

from absl import flags

from tadsr_jax import cli

# The benchmarks and their PyTorch references live beside the package (benchmarks/), not in it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_WHAT = flags.DEFINE_string("what", "train", "What to measure: one of data, sr, train.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed calls (the median is reported).", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls before timing.", lower_bound=0)
_SR_DTYPES = flags.DEFINE_list(
    "sr_dtypes",
    ["float32"],
    "sr: dtypes to compare (float32, bfloat16); torch's bf16 on a CPU without bf16 matrix units is very slow.",
)
_SR_SIZES = flags.DEFINE_list("sr_sizes", ["256", "512"], "sr: output sides to measure.")
_PROFILE_STEPS = flags.DEFINE_integer(
    "profile_steps", 0, "train: trace this many more steps of ours and add their time by op kind.", lower_bound=0
)
_CACHE_DIR = flags.DEFINE_string(
    "cache_dir", None, "Where benchmark weights are written once (default ~/.cache/tadsr_jax/bench)."
)


def _train():
    from benchmarks import train

    return train.run(
        steps=_STEPS.value, warmup=_WARMUP.value, cache_dir=_CACHE_DIR.value, profile_steps=_PROFILE_STEPS.value
    )


def _sr():
    from benchmarks import sr

    return sr.run(
        steps=_STEPS.value,
        warmup=_WARMUP.value,
        cache_dir=_CACHE_DIR.value,
        dtypes=tuple(_SR_DTYPES.value),
        sizes=tuple(int(s) for s in _SR_SIZES.value),
    )


def _data():
    from benchmarks import data

    return data.run(steps=_STEPS.value, warmup=_WARMUP.value, cache_dir=_CACHE_DIR.value)


HANDLERS: dict[str, Callable] = {"data": _data, "sr": _sr, "train": _train}


def main(argv: list[str]) -> int:
    del argv
    handler = HANDLERS.get(_WHAT.value)
    if handler is None:
        cli.usage_error(f"--what must be one of {', '.join(sorted(HANDLERS))} (got {_WHAT.value!r})")
    from benchmarks.common import BenchmarkError, print_report

    try:
        print_report(handler())
    except BenchmarkError as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli.run(main)
