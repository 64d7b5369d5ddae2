"""python launch/train.py --config=configs/tiny.py --workdir=DIR [--config.train.steps=N ...]

Rerunning the same command resumes from the latest checkpoint in DIR that passes its integrity check. One run
per DIR: a second is refused, naming the first. Exit status: 0 when training reached train.steps, 75
(EX_TEMPFAIL) when SIGTERM stopped it earlier (a checkpoint is saved: requeue/rerun to resume), 1 on an
error, 2 on a bad setting (one line naming the key). Multi-host: pass --coordinator_address, --num_processes
and --process_id (GPU clusters), or nothing on TPU pods and under SLURM (auto-detected).
"""

import sys

from absl import flags

from tadsr_jax import cli, parallel, runtime
from tadsr_jax.weights.convert import WeightsError

_CONFIG = cli.define_config()
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
    from tadsr_jax.checkpoints import CheckpointError
    from tadsr_jax.train.lock import WorkdirLocked
    from tadsr_jax.train.loop import Interrupted, TrainingError, train

    try:
        train(_CONFIG.value, _WORKDIR.value)
    except Interrupted as e:
        print(f"{e}", file=sys.stderr)
        sys.exit(Interrupted.exit_status)
    except (TrainingError, WeightsError, CheckpointError, WorkdirLocked) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except ValueError as e:  # a setting that cannot work (step.check_config, the mesh, validation, missing inputs)
        cli.usage_error(str(e))


if __name__ == "__main__":
    cli.run(main)
