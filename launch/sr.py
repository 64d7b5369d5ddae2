"""python launch/sr.py --config=CONFIG --input=FILE_OR_DIR --output=DIR [--workdir=DIR | --tadsr_ckpt=FILE |
    --generator=FILE] [--sweep=100,300,500,700,900] [--captions=FILE] [--config.sr.KEY=VALUE ...]

Settings are the config's `sr` section, e.g. --config.sr.timestep=300 --config.sr.prompt=TEXT --config.sr.scale=4
--config.sr.seed=42 --config.sr.dtype=bfloat16 --config.sr.color_fix=wavelet --config.sr.batch_size=4
(configs/tadsr_sd21.py lists them all, with what each does).

xS super-resolution (S = config.sr.scale) of one image or every image of a directory (png, jpg, jpeg, webp,
bmp, tif, tiff). The SD folder is --config.model.pretrained (for configs/tiny.py: the stand-in written into
--workdir by training).
Generator weights: the reference's tadsr.pkl (--tadsr_ckpt, needs torch), our export (--generator), or the
latest checkpoint of a training workdir (--workdir). A bad input gets one line and the rest is processed; the
exit status is 1 if any input failed. The last line printed is a JSON summary.
"""

import json
import sys

from absl import flags

from tadsr_jax import cli, runtime, storage

_CONFIG = cli.define_config()
_INPUT = flags.DEFINE_string("input", None, "An image file or a directory of images.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Output directory (created if missing).", required=True)
_WORKDIR = flags.DEFINE_string("workdir", "", "A training workdir: generator weights from its latest checkpoint.")
_TADSR_CKPT = flags.DEFINE_string("tadsr_ckpt", "", "The reference's released tadsr.pkl (needs torch).")
_GENERATOR = flags.DEFINE_string("generator", "", "Generator weights exported by launch/convert.py (safetensors).")
_SWEEP = flags.DEFINE_list(
    "sweep",
    None,
    "Timesteps to run each image at (config.sr.batch_size per call), plus a contact sheet (e.g. 100,300,500,700,900).",
)
_CAPTIONS = flags.DEFINE_string(
    "captions", "", "File of `<file name><TAB><prompt>` lines; other images get config.sr.prompt."
)
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    runtime.set_xla_cpu_flags()
    runtime.enable_compilation_cache()
    from tadsr_jax.images import ImageError
    from tadsr_jax.infer import session
    from tadsr_jax.infer.model import WeightsSource
    from tadsr_jax.weights.convert import WeightsError

    try:
        report = session.run(
            _CONFIG.value,
            _INPUT.value,
            _OUTPUT.value,
            WeightsSource(tadsr_ckpt=_TADSR_CKPT.value, generator=_GENERATOR.value, workdir=_WORKDIR.value),
            captions=_CAPTIONS.value,
            sweep=cli.sweep_timesteps(_SWEEP.value),
        )
    except (ImageError, WeightsError, ValueError, OSError) as e:
        for line in str(e).splitlines():  # an OutputError has one line per problem
            print(f"sr: error: {line}", file=sys.stderr)
        return 2
    print(json.dumps({**report.summary(), "output": storage.absolute(_OUTPUT.value)}))
    return 1 if report.failed else 0


if __name__ == "__main__":
    cli.run(main)
