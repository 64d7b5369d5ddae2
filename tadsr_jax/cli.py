"""What every launcher (launch/*.py) shares: `run(main)` in place of `absl.app.run`, and `define_config`.

- A usage error (an unknown flag or `--config.KEY`, a missing required flag, a stray argument) is one line on
  stderr, `<launcher>: error: ...`, and exit status 2; an unknown config key names the closest existing one.
- `--help`, `--helpshort` and `--helpfull` print the usage and exit 0 (absl exits 1).
- Quiet by default: our own log lines (tadsr_jax's) and progress bars, and other libraries' (JAX, Orbax, ...)
  warnings and errors; their INFO lines only with `--verbose` or absl's `-v`. Log lines go through tqdm, so they
  are not glued to a progress bar.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags
from tqdm import tqdm

CONFIG = "config"  # the config flag's name: --config=FILE --config.KEY=VALUE
USAGE_ERROR = 2  # exit status of a command line that cannot be run
HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "?")
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))

_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Also show other libraries' INFO logs (JAX, Orbax, ...), as absl's -v does."
)


def _program() -> str:
    return os.path.splitext(os.path.basename(sys.argv[0]))[0]


def usage_error(message: str) -> NoReturn:
    """`<launcher>: error: <message>` on one line of stderr, exit status 2."""
    print(f"{_program()}: error: {' '.join(message.split())}", file=sys.stderr)
    sys.exit(USAGE_ERROR)


# ------------------------------------------------------------------------------------------ config keys


def sweep_timesteps(values: Sequence[str] | None) -> list[int] | None:
    """--sweep's comma-separated timesteps as integers (None when the flag is not given); ValueError otherwise."""
    if values is None:
        return None
    try:
        return [int(t) for t in values]
    except ValueError:
        raise ValueError(f"--sweep takes integers 1..999 separated by commas, got {','.join(values)}") from None


def config_keys(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[str]:
    """Every dotted key of `config`, nested ConfigDicts and their fields alike."""
    for key, value in config.items():
        yield prefix + key
        if isinstance(value, ml_collections.ConfigDict):
            yield from config_keys(value, f"{prefix}{key}.")


def _overrides(argv: Sequence[str], name: str) -> list[str]:
    """The keys of `--<name>.KEY=...` overrides in `argv`, as ml_collections finds them."""
    found = (re.match(rf"-{{1,2}}(?:no)?{re.escape(name)}\.([^=]+)", arg) for arg in argv)
    return [m.group(1) for m in found if m]


def unknown_config_key(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> str | None:
    """`unknown config key 'sr.timestepp' (did you mean 'sr.timestep'?)` for the first override `config` lacks."""
    keys = list(config_keys(config))
    for key in overrides:
        if key not in keys:
            closest = difflib.get_close_matches(key, keys, n=1)
            return f"unknown config key {key!r}" + (f" (did you mean {closest[0]!r}?)" if closest else "")
    return None


def load_config(path: str) -> ml_collections.ConfigDict:
    """`get_config()` of a config file, as `--config=FILE[:ARG]` loads it."""
    file, *args = path.split(":", 1)
    spec = importlib.util.spec_from_file_location("tadsr_cli_config", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def _config_path(argv: Sequence[str], name: str) -> str | None:
    """The value of the last `--<name>=PATH` or `--<name> PATH` in argv."""
    path = None
    for i, arg in enumerate(argv):
        match = re.fullmatch(rf"-{{1,2}}{re.escape(name)}(=(.*))?", arg)
        if match:
            path = match.group(2) if match.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
    return path


def _unknown_config_key_in(argv: Sequence[str]) -> str | None:
    """The unknown-key message for argv's `--config.KEY` overrides (the config loaded again, unlocked)."""
    if CONFIG not in flags.FLAGS:
        return None
    path = _config_path(argv, CONFIG)
    config = load_config(path) if path else flags.FLAGS[CONFIG].value
    if not isinstance(config, ml_collections.ConfigDict):
        return None
    return unknown_config_key(config, _overrides(argv, CONFIG))


def define_config(default: str | None = None, help_text: str = "Experiment config file.") -> flags.FlagHolder:
    """`--config` (ml_collections, locked), with `--config.KEY=VALUE` overrides. With a default file, the overrides
    are applied here, at import: an unknown key is a usage error here too."""
    try:
        holder = config_flags.DEFINE_config_file(CONFIG, default, help_text, lock_config=True)
    except (AttributeError, KeyError) as e:  # how ml_collections reports an override of a missing key
        config = load_config(default)
        usage_error(unknown_config_key(config, _overrides(sys.argv, CONFIG)) or f"--{CONFIG}: {e}")
    _show_in_help(CONFIG)
    return holder


def _show_in_help(name: str) -> None:
    """List a flag defined here in the launcher's --help (absl lists the main module's flags: sys.argv[0])."""
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])


# ---------------------------------------------------------------------------------------------- parsing


def _asks_for_help(argv: Sequence[str]) -> bool:
    arguments = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
    return any(arg.startswith("-") and arg.split("=")[0].lstrip("-") in HELP_FLAGS for arg in arguments)


def _parse(argv: list[str]) -> list[str]:
    """absl's flag parsing with one-line usage errors and `--help` exiting 0; sets up logging once parsed."""
    try:
        remaining = flags.FLAGS(argv)
    except SystemExit as e:
        if e.code == 1 and _asks_for_help(argv):
            sys.exit(0)
        raise
    except flags.Error as e:
        usage_error(str(e))
    except (AttributeError, KeyError) as e:  # ml_collections: an override of a key the config lacks
        usage_error(_unknown_config_key_in(argv) or str(e))
    if len(remaining) > 1:
        usage_error(f"unexpected arguments {' '.join(remaining[1:])} (flags are --name=value)")
    config_path = _config_path(argv, CONFIG) if CONFIG in flags.FLAGS else None
    if config_path and not os.path.isfile(config_path.split(":", 1)[0]):  # ml_collections defers this error
        usage_error(f"--{CONFIG}={config_path}: no such file")
    configure_logging(verbose=verbose())
    return remaining


def run(main: Callable[[list[str]], int | None]) -> NoReturn:
    """`absl.app.run(main)` with this module's parsing and logging (see the module docstring)."""
    _show_in_help("verbose")
    app.run(main, flags_parser=_parse)


# ---------------------------------------------------------------------------------------------- logging


def verbose() -> bool:
    """--verbose, or absl's -v/--verbosity given."""
    return bool(_VERBOSE.value or flags.FLAGS["verbosity"].present)


class _TqdmHandler(logging.Handler):
    """Writes records through `tqdm.write`, which moves progress bars out of the way."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must not raise
            self.handleError(record)


def ours_or_warning(record: logging.LogRecord) -> bool:
    """Keep tadsr_jax's records and every library's warnings and errors."""
    return record.levelno >= logging.WARNING or os.path.abspath(record.pathname).startswith(PACKAGE_DIR + os.sep)


def configure_logging(*, verbose: bool) -> None:
    """Replace absl's stderr handler by one that writes through tqdm; unless `verbose`, drop other libraries' INFO
    and DEBUG records, and transformers' advisory warnings (such as "PyTorch was not found")."""
    root = logging.getLogger()
    root.removeHandler(absl_logging.get_absl_handler())
    for handler in [h for h in root.handlers if isinstance(h, _TqdmHandler)]:
        root.removeHandler(handler)
    handler = _TqdmHandler()
    handler.setFormatter(absl_logging.PythonFormatter())
    if verbose:  # absl sets the root level only while its own handler is installed
        root.setLevel(min(root.getEffectiveLevel(), logging.INFO))
    else:
        handler.addFilter(ours_or_warning)
        os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # read when transformers logs, after import
    root.addHandler(handler)
