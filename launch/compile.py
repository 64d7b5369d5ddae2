"""python launch/compile.py --config=configs/tadsr_sd21.py --topology=v5p:2x2x1 [--config.KEY=VALUE ...]

Compiles the train step of a config for a Cloud TPU slice without one attached (needs libtpu:
`pip install -e ".[tpu]"`), from abstract weights (no files are read), and prints per chip what XLA says of it:
HBM needed against the chip's (arguments, outputs, temporaries), FLOPs (XLA's and our model count), XLA's step-time
estimate beside the roofline bound, images/s per chip, MFU and the collectives. Every time figure is XLA's
estimate, not a measurement. The last line is the report as JSON. Compiling the SD-2.1 step takes ~20 minutes and
~15 GiB of host memory on a 2-core machine.
"""

import json
import resource
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "A TPU slice, e.g. v5e:2x2, v5p:2x2x4, v6e:4x4, v5e:16x16.")
flags.mark_flags_as_required(["config", "topology"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    from tadsr_jax.train import aot

    try:
        devices = aot.topology_devices(_TOPOLOGY.value)
        chip = aot.CHIPS.get(devices[0].device_kind)
        if chip is None:
            raise ValueError(f"--topology={_TOPOLOGY.value}: no chip figures for {devices[0].device_kind!r} "
                             f"(known: {', '.join(aot.CHIPS)})")
        start = time.perf_counter()
        step = aot.compile_train_step(_CONFIG.value, devices)
        report = aot.step_report(step, chip)
    except ValueError as e:
        print(f"compile: error: {e}", file=sys.stderr)
        return 2
    report["topology"] = _TOPOLOGY.value
    report["compile_s"] = time.perf_counter() - start
    report["host_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(aot.format_report(report), file=sys.stderr)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    app.run(main)
