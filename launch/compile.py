"""python launch/compile.py --config=configs/tadsr_sd21.py --topology=v5p:2x2x1 [--what=train,sr] [--config.K=V ...]

Compiles the train step of a config for a Cloud TPU slice without one attached (needs libtpu: `pip install -e
".[tpu]"`), from abstract weights (no files are read), and the SR program of launch/sr.py on one chip of that slice
for each of --sr_sizes (config.sr.batch_size images per call, networks in config.sr.dtype: pass
--config.sr.dtype=bfloat16 to see accelerator serving), and prints per chip what XLA says of each: HBM needed
against the chip's (arguments, outputs, temporaries), FLOPs (XLA's and our model count), XLA's time estimate beside
the roofline bound, images/s per chip, MFU and the collectives; for the train step also the activations its
backward pass keeps, by source, and for each program what XLA's estimate spends its cycles on (by op kind,
result shape and source line). Every time figure is an estimate, not a measurement. The last line is the report as
JSON. Compiling the SD-2.1 step takes ~20 minutes and ~15 GiB of host memory on a 2-core machine; its SR program ~2
minutes.
"""

import json
import resource
import sys
import time
from collections.abc import Callable
from typing import Any

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "A TPU slice, e.g. v5e:2x2, v5p:2x2x4, v6e:4x4, v5e:16x16.")
_WHAT = flags.DEFINE_list("what", ["train", "sr"], "Programs to compile: train (the train step), sr (launch/sr.py's).")
_SR_SIZES = flags.DEFINE_list("sr_sizes", ["512"], "Working-image sides (pixels) of the SR programs.")
_ACTIVATIONS = flags.DEFINE_integer(
    "activations", 8, "List this many of the train step's largest saved activations per chip (0: none)."
)
_CYCLES = flags.DEFINE_integer(
    "cycles", 10, "List this many of each program's largest items by XLA's estimated cycles (0: none)."
)
flags.mark_flags_as_required(["config", "topology"])

GiB = 2**30


def _host_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _add_cycles(report: dict, program) -> None:
    """The program's largest items by XLA's estimated cycles, into the report and printed (--cycles)."""
    from tadsr_jax.train import aot

    if not _CYCLES.value:
        return
    items = aot.estimated_cycles(program.compiled.as_text())
    if not items:
        return
    report["largest_estimated_cycles"] = items[: _CYCLES.value]
    print("XLA's estimated cycles by op kind, result shape and source line, largest:", file=sys.stderr)
    for item in items[: _CYCLES.value]:
        print(
            f"  {100 * item['share']:5.1f}% {item['kind']:<12} {item['shape']:<28} {item['source']}",
            file=sys.stderr,
        )


def _compile_and_report(label: str, build: Callable[[], Any], chip, what: str) -> dict:
    """The report of `build()`'s compiled program, printed under `label`; for a program XLA refused for the
    chip's HBM, a report that says so."""
    from tadsr_jax.train import aot

    start = time.perf_counter()
    try:
        program = build()
    except aot.DoesNotFit as e:
        print(f"{label}: DOES NOT FIT ({e})", file=sys.stderr)
        return {"fits": False, "xla_error": str(e), "compile_s": time.perf_counter() - start}
    report = aot.report(program, chip)
    report["compile_s"], report["host_peak_rss_gib"] = time.perf_counter() - start, _host_peak_gib()
    print(f"{label}:", file=sys.stderr)
    print(aot.format_report(report, what=what), file=sys.stderr)
    _add_cycles(report, program)
    return report


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from tadsr_jax.train import aot

    config, result = _CONFIG.value, {"topology": _TOPOLOGY.value}
    try:
        unknown = set(_WHAT.value) - {"train", "sr"}
        if unknown:
            raise ValueError(f"--what: unknown program(s) {', '.join(sorted(unknown))} (train, sr)")
        sizes = [int(size) for size in _SR_SIZES.value]
        devices = aot.topology_devices(_TOPOLOGY.value)
        chip = aot.CHIPS.get(devices[0].device_kind)
        if chip is None:
            raise ValueError(
                f"--topology={_TOPOLOGY.value}: no chip figures for {devices[0].device_kind!r} "
                f"(known: {', '.join(aot.CHIPS)})"
            )
        if "train" in _WHAT.value:
            report = _compile_and_report(
                "train step", lambda: aot.compile_train_step(config, devices), chip, what="step"
            )
            if _ACTIVATIONS.value:
                per_chip = max(1, config.train.batch_size // len(devices))
                kept = aot.saved_activations(config, devices[0].platform, per_chip)
                report["saved_activations_gib"] = sum(e["bytes"] for e in kept) / GiB
                report["largest_saved_activations"] = kept[: _ACTIVATIONS.value]
                print(
                    f"activations kept for the backward pass ({per_chip} image(s) per chip): "
                    f"{report['saved_activations_gib']:.2f} GiB, largest:",
                    file=sys.stderr,
                )
                for e in kept[: _ACTIVATIONS.value]:
                    print(
                        f"  {e['bytes'] / GiB:7.3f} GiB {e['dtype']:>4} x{e['count']:<4d} {e['source']}",
                        file=sys.stderr,
                    )
            result["train"] = report
        if "sr" in _WHAT.value:
            result["sr"] = []
            for size in sizes:
                report = _compile_and_report(
                    f"SR at {size}x{size}, {config.sr.dtype}",
                    lambda size=size: aot.compile_sr(config, devices[0], size=size),
                    chip,
                    what="call",
                )
                report["dtype"] = config.sr.dtype
                result["sr"].append(report)
    except ValueError as e:
        print(f"compile: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    app.run(main)
