"""python launch/demo.py [--config=configs/tiny.py] [--workdir=out/demo]: x4 SR of a scikit-image sample."""

import json

from absl import app, flags
from ml_collections import config_flags

from tadsr_jax import demo

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", "out/demo", "Where the model folder and the outputs go.")


def main(argv):
    del argv
    print(json.dumps(demo.run(_CONFIG.value, _WORKDIR.value)))


if __name__ == "__main__":
    app.run(main)
