r"""python launch/convert.py --what=lpips --vgg16=vgg16-397923af.pth \
    --lpips_linear=<site-packages>/lpips/weights/v0.1/vgg.pth --out=lpips_vgg.safetensors
python launch/convert.py --what=lpips_alex --alexnet=alexnet-owt-7be5be79.pth \
    --lpips_linear=<site-packages>/lpips/weights/v0.1/alex.pth --out=lpips_alex.safetensors
python launch/convert.py --what=dists --vgg16=vgg16-397923af.pth --dists_weights=<DISTS_pytorch>/weights.pt \
    --out=dists.safetensors
python launch/convert.py --what=dape --ram=ram_swin_large_14m.pth \
    --dape=DAPE.pth --out=dape.safetensors
python launch/convert.py --what=generator --config=configs/tadsr_sd21.py --config.model.pretrained=SD_FOLDER \
    (--tadsr_ckpt=tadsr.pkl | --generator=FILE.safetensors | --workdir=TRAIN_WORKDIR) --out=FILE.safetensors|FILE.pkl

Converts weight files: LPIPS (VGG, or AlexNet: the paper's), DISTS and the DAPE tagger (RAM's checkpoint with
SeeSR's LoRA merged) (PyTorch -> our safetensors) and TADSR
generators between the reference's tadsr.pkl (reading or writing it needs torch), our safetensors export and a
training workdir's checkpoint.
Each `--what` is one handler in HANDLERS (flags -> library call -> one line of output); errors are one line on
stderr and exit status 1 (2 for a usage error).
"""

import sys
from collections.abc import Callable

from absl import flags

from tadsr_jax import cli

_WHAT = flags.DEFINE_string("what", None, "What to convert: one of dape, dists, generator, lpips, lpips_alex.")
_VGG16 = flags.DEFINE_string("vgg16", None, "lpips, dists: torchvision's VGG16 ImageNet weights (vgg16-*.pth).")
_ALEXNET = flags.DEFINE_string(
    "alexnet", None, "lpips_alex: torchvision's AlexNet ImageNet weights (alexnet-owt-*.pth)."
)
_LPIPS_LINEAR = flags.DEFINE_string(
    "lpips_linear", None, "lpips, lpips_alex: the lpips package's weights/v0.1/vgg.pth or alex.pth."
)
_DISTS_WEIGHTS = flags.DEFINE_string("dists_weights", None, "dists: DISTS_pytorch's weights.pt (alpha, beta).")
_RAM = flags.DEFINE_string("ram", None, "dape: RAM's checkpoint (ram_swin_large_14m.pth).")
_DAPE = flags.DEFINE_string("dape", None, "dape: SeeSR's DAPE.pth (LoRA over RAM).")
_OUT = flags.DEFINE_string("out", None, "Output file.")
_CONFIG = cli.define_config(help_text="generator: the experiment config (SD folder, LoRA rank).")
_TADSR_CKPT = flags.DEFINE_string("tadsr_ckpt", "", "generator: the reference's tadsr.pkl.")
_GENERATOR = flags.DEFINE_string("generator", "", "generator: our safetensors export.")
_WORKDIR = flags.DEFINE_string("workdir", "", "generator: a training workdir (its latest checkpoint).")


def _require(**values: str | None) -> None:
    missing = [f"--{name}" for name, value in values.items() if not value]
    if missing:
        raise ValueError(f"--what={_WHAT.value} needs {', '.join(missing)}")


def _convert_lpips() -> str:
    from tadsr_jax.weights.lpips import convert_lpips_weights

    _require(vgg16=_VGG16.value, lpips_linear=_LPIPS_LINEAR.value, out=_OUT.value)
    convert_lpips_weights(_VGG16.value, _LPIPS_LINEAR.value, _OUT.value)
    return f"wrote {_OUT.value} (LPIPS VGG16 v0.1)"


def _convert_lpips_alex() -> str:
    from tadsr_jax.weights.lpips import convert_lpips_weights

    _require(alexnet=_ALEXNET.value, lpips_linear=_LPIPS_LINEAR.value, out=_OUT.value)
    convert_lpips_weights(_ALEXNET.value, _LPIPS_LINEAR.value, _OUT.value, net="alex")
    return f"wrote {_OUT.value} (LPIPS AlexNet v0.1)"


def _convert_dists() -> str:
    from tadsr_jax.weights.dists import convert_dists_weights

    _require(vgg16=_VGG16.value, dists_weights=_DISTS_WEIGHTS.value, out=_OUT.value)
    convert_dists_weights(_VGG16.value, _DISTS_WEIGHTS.value, _OUT.value)
    return f"wrote {_OUT.value} (DISTS)"


def _convert_dape() -> str:
    from tadsr_jax.weights.dape import convert_dape_weights

    _require(ram=_RAM.value, dape=_DAPE.value, out=_OUT.value)
    convert_dape_weights(_RAM.value, _DAPE.value, _OUT.value)
    return f"wrote {_OUT.value} (DAPE: RAM Swin-L tagging path with SeeSR's LoRA merged)"


def _convert_generator() -> str:
    from tadsr_jax.infer.model import WeightsSource, export_generator
    from tadsr_jax.infer.session import pretrained_folder

    config = _CONFIG.value
    _require(config="" if config is None else "given", out=_OUT.value)
    source = WeightsSource(tadsr_ckpt=_TADSR_CKPT.value, generator=_GENERATOR.value, workdir=_WORKDIR.value)
    if not source.given:
        raise ValueError("--what=generator needs one of --tadsr_ckpt, --generator, --workdir")
    return export_generator(config, pretrained_folder(config), source, _OUT.value)


HANDLERS: dict[str, Callable[[], str]] = {
    "dape": _convert_dape,
    "dists": _convert_dists,
    "generator": _convert_generator,
    "lpips": _convert_lpips,
    "lpips_alex": _convert_lpips_alex,
}


def main(argv: list[str]) -> int:
    del argv
    handler = HANDLERS.get(_WHAT.value)
    if handler is None:
        cli.usage_error(f"--what must be one of {', '.join(sorted(HANDLERS))} (got {_WHAT.value!r})")
    from tadsr_jax.weights.convert import WeightsError

    try:
        print(handler())
    except (WeightsError, OSError, ValueError) as e:
        print(f"convert: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    cli.run(main)
