"""python launch/demo.py [--config=configs/tiny.py] [--workdir=out/demo]

Trains the config (tiny: a few hundred CPU steps), then super-resolves held-out scikit-image samples x4, saying
what it is doing at each stage. The last line printed is a JSON object with psnr_bicubic and psnr_sr.
"""

import json
import sys

from absl import flags

from tadsr_jax import cli, runtime

_CONFIG = cli.define_config("configs/tiny.py")
_WORKDIR = flags.DEFINE_string("workdir", "out/demo", "Where the model, checkpoints and outputs go.")


def main(argv):
    del argv
    runtime.set_xla_cpu_flags()
    runtime.enable_compilation_cache()
    from tadsr_jax import demo
    from tadsr_jax.train.loop import TrainingError
    from tadsr_jax.weights.convert import WeightsError

    try:
        print(json.dumps(demo.run(_CONFIG.value, _WORKDIR.value)))
    except (TrainingError, WeightsError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli.run(main)
