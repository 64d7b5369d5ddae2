"""python launch/convert.py --what=lpips --vgg16=vgg16-397923af.pth \\
    --lpips_linear=<site-packages>/lpips/weights/v0.1/vgg.pth --out=lpips_vgg.safetensors

Converts PyTorch weight files into the safetensors files our loaders read. Each `--what` is one handler in
HANDLERS (flags -> library call -> one line of output); errors are one line on stderr and exit status 1.
"""

import sys
from collections.abc import Callable

from absl import app, flags, logging

_WHAT = flags.DEFINE_string("what", None, "What to convert: one of lpips.")
_VGG16 = flags.DEFINE_string("vgg16", None, "lpips: torchvision's VGG16 ImageNet weights (vgg16-*.pth).")
_LPIPS_LINEAR = flags.DEFINE_string("lpips_linear", None, "lpips: the lpips package's weights/v0.1/vgg.pth.")
_OUT = flags.DEFINE_string("out", None, "Output file.")


def _require(**values: str | None) -> None:
    missing = [f"--{name}" for name, value in values.items() if not value]
    if missing:
        raise ValueError(f"--what={_WHAT.value} needs {', '.join(missing)}")


def _convert_lpips() -> str:
    from tadsr_jax.weights.lpips import convert_lpips_weights

    _require(vgg16=_VGG16.value, lpips_linear=_LPIPS_LINEAR.value, out=_OUT.value)
    convert_lpips_weights(_VGG16.value, _LPIPS_LINEAR.value, _OUT.value)
    return f"wrote {_OUT.value} (LPIPS VGG16 v0.1)"


HANDLERS: dict[str, Callable[[], str]] = {"lpips": _convert_lpips}


def main(argv: list[str]) -> int:
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # keep output to one line (JAX logs its backend probe at INFO)
    if len(argv) > 1:
        print(f"convert: unexpected arguments {argv[1:]}", file=sys.stderr)
        return 1
    handler = HANDLERS.get(_WHAT.value)
    if handler is None:
        print(f"convert: --what must be one of {', '.join(sorted(HANDLERS))} (got {_WHAT.value!r})",
              file=sys.stderr)
        return 1
    from tadsr_jax.weights.convert import WeightsError

    try:
        print(handler())
    except (WeightsError, OSError, ValueError) as e:
        print(f"convert: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    app.run(main)
