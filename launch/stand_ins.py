"""python launch/stand_ins.py --config=configs/tiny.py --out=out/tiny

Writes offline stand-ins for a config: <out>/sd, a tiny SD folder of the config's architectures (random UNet and
text encoder, a constructed near-lossless VAE; tadsr_jax/weights/tiny_sd.py), and <out>/images, scikit-image
training samples. Prints the flags that point launch/train.py at them (the last line). Nothing is rewritten that
is already complete. For runs without the real SD-2.1 weights and data: tests, CI, trying the code offline.
"""

from absl import flags

from tadsr_jax import cli

_CONFIG = cli.define_config()
_OUT = flags.DEFINE_string("out", None, "Folder for the stand-ins (sd/ and images/).", required=True)
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    from tadsr_jax.stand_ins import write_stand_ins
    from tadsr_jax.weights.convert import WeightsError

    try:
        stand_ins = write_stand_ins(_OUT.value, _CONFIG.value)
    except WeightsError as e:
        cli.usage_error(str(e))
    print(" ".join(stand_ins.flags()))
    return 0


if __name__ == "__main__":
    cli.run(main)
