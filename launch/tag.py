"""python launch/tag.py --config=configs/tadsr_sd21.py --config.sr.tagger=dape.safetensors --input=HR_FOLDER \
    --output=captions.tsv [--lr=LR_FOLDER]

DAPE tags for a training set. Without --lr: a captions file (`relative/name<TAB>tags` lines) for
--config.data.captions with data.source=hr_folder. With --lr (a folder holding the same relative names): a
paired list (`HR_path LR_path tags` lines, HR first) for data.source=paired_list. The HR images are tagged.
The tagger runs in config.sr.dtype, config.sr.batch_size images per call. A bad image gets one line and the
rest is processed; the exit status is 1 if any failed. The last line printed is a JSON summary.
"""

import json
import sys

from absl import flags

from tadsr_jax import cli, runtime, storage

_CONFIG = cli.define_config(help_text="The experiment config: sr.tagger (the DAPE file), sr.dtype, sr.batch_size.")
_INPUT = flags.DEFINE_string("input", None, "Folder of HR images (searched recursively).", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "The captions file or paired list to write.", required=True)
_LR = flags.DEFINE_string("lr", "", "Folder of the LR images (same relative names): write a paired list.")
flags.mark_flags_as_required(["config"])


def main(argv):
    del argv
    runtime.enable_compilation_cache()
    from tadsr_jax.infer.model import serving_dtype
    from tadsr_jax.infer.tag_files import tag_folder
    from tadsr_jax.infer.tagger import load_tagger
    from tadsr_jax.weights.convert import WeightsError

    config = _CONFIG.value
    try:
        if not config.sr.tagger:
            raise ValueError("no tagger: set --config.sr.tagger=FILE (written by launch/convert.py --what=dape)")
        tagger = load_tagger(config.sr.tagger, dtype=serving_dtype(config))
        report = tag_folder(tagger, _INPUT.value, _OUTPUT.value, lr_folder=_LR.value, batch_size=config.sr.batch_size)
    except (WeightsError, ValueError, OSError) as e:
        print(f"tag: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({**report.summary(), "output": storage.absolute(_OUTPUT.value)}))
    return 1 if report.failed else 0


if __name__ == "__main__":
    cli.run(main)
