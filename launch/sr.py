"""python launch/sr.py --config=CONFIG --input=FILE_OR_DIR --output=DIR [--workdir=DIR | --tadsr_ckpt=FILE |
    --generator=FILE] [--timestep=500 | --sweep=100,300,500,700,900] [--prompt=TEXT] [--captions=FILE]
    [--scale=4] [--seed=42] [--dtype=float32|bfloat16] [--color_fix=adain|wavelet|none]
    [--latent_tile=96 --latent_overlap=32] [--vae_strip_above=1048576] [--batch_size=1]

xS super-resolution (S = --scale, default 4) of one image or every image of a directory (png, jpg, jpeg, webp,
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
_TIMESTEP = flags.DEFINE_integer(
    "timestep", None, "The fidelity (low) / realism (high) knob, 1..999 " + cli.config_default("sr.timestep")
)
_SCALE = flags.DEFINE_integer(
    "scale",
    None,
    "Output size / input size, 1..8: the bicubic upscale in front of the "
    "model (the reference's --upscale) " + cli.config_default("sr.scale"),
)
_SWEEP = flags.DEFINE_list(
    "sweep",
    None,
    "Timesteps to run each image at (--batch_size per call), plus a contact sheet (e.g. 100,300,500,700,900).",
)
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt for every image " + cli.config_default("sr.prompt"))
_CAPTIONS = flags.DEFINE_string("captions", "", "File of `<file name><TAB><prompt>` lines; others use --prompt.")
_SEED = flags.DEFINE_integer(
    "seed", None, "Posterior-noise seed: the same seed gives the same output " + cli.config_default("sr.seed")
)
_DTYPE = flags.DEFINE_enum(
    "dtype", None, ["float32", "bfloat16"], "Weights and activations " + cli.config_default("sr.dtype")
)
_COLOR_FIX = flags.DEFINE_enum(
    "color_fix", None, ["adain", "wavelet", "none"], "Colour correction " + cli.config_default("sr.color_fix")
)
_LATENT_TILE = flags.DEFINE_integer(
    "latent_tile", None, "UNet tile side in latent pixels " + cli.config_default("sr.latent_tile")
)
_LATENT_OVERLAP = flags.DEFINE_integer(
    "latent_overlap", None, "UNet tile overlap in latent pixels " + cli.config_default("sr.latent_overlap")
)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Same-shape images per call " + cli.config_default("sr.batch_size")
)
_VAE_STRIP_ABOVE = flags.DEFINE_integer(
    "vae_strip_above",
    None,
    "Working images (scale x the input) with more pixels "
    "run the VAE strip-wise, with bounded memory " + cli.config_default("sr.vae_strip_above"),
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
        overrides = dict(
            timestep=_TIMESTEP.value,
            scale=_SCALE.value,
            prompt=_PROMPT.value,
            seed=_SEED.value,
            dtype=_DTYPE.value,
            color_fix=_COLOR_FIX.value,
            latent_tile=_LATENT_TILE.value,
            latent_overlap=_LATENT_OVERLAP.value,
            batch_size=_BATCH_SIZE.value,
            vae_strip_above=_VAE_STRIP_ABOVE.value,
        )
        report = session.run(
            _CONFIG.value,
            _INPUT.value,
            _OUTPUT.value,
            WeightsSource(tadsr_ckpt=_TADSR_CKPT.value, generator=_GENERATOR.value, workdir=_WORKDIR.value),
            captions=_CAPTIONS.value,
            sweep=cli.sweep_timesteps(_SWEEP.value),
            **overrides,
        )
    except (ImageError, WeightsError, ValueError, OSError) as e:
        for line in str(e).splitlines():  # an OutputError has one line per problem
            print(f"sr: error: {line}", file=sys.stderr)
        return 2
    print(json.dumps({**report.summary(), "output": storage.absolute(_OUTPUT.value)}))
    return 1 if report.failed else 0


if __name__ == "__main__":
    cli.run(main)
