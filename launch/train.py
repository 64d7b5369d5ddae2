"""python launch/train.py --config=configs/tiny.py --workdir=DIR [--config.train.steps=N ...]

Rerunning the same command resumes from the latest checkpoint in DIR. Multi-host: pass --coordinator_address,
--num_processes and --process_id (GPU clusters), or nothing on TPU pods and under SLURM (auto-detected).
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from tadsr_jax import parallel, runtime
from tadsr_jax.weights.convert import WeightsError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and samples go here.", required=True)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes (multi-host).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    runtime.set_xla_cpu_flags()
    parallel.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    runtime.enable_compilation_cache()
    from tadsr_jax.train.loop import TrainingError, train

    try:
        train(_CONFIG.value, _WORKDIR.value)
    except (TrainingError, WeightsError, parallel.SharedFileError) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
