"""Make installed modules look absent, as on a machine without them: importing one raises the real
`ModuleNotFoundError: No module named '<name>'`."""

import importlib.abc
import os
import sys


class HiddenModules(importlib.abc.MetaPathFinder):
    """Put first in `sys.meta_path`: the named top-level modules (and their submodules) cannot be found."""

    def __init__(self, *names: str):
        self.names = set(names)

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def subprocess_env(folder: str, *names: str) -> dict[str, str]:
    """os.environ for a child Python in which `names` look absent (a sitecustomize.py written into `folder`)."""
    with open(os.path.join(folder, "sitecustomize.py"), "w") as f:
        f.write(
            f"import sys\nsys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
            f"from hidden_modules import HiddenModules\nsys.meta_path.insert(0, HiddenModules(*{names!r}))\n"
        )
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [folder, os.environ.get("PYTHONPATH")]))}


def hide(monkeypatch, *names: str) -> None:
    """In this process, for one test."""
    for name in [m for m in sys.modules if m.split(".")[0] in names]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [HiddenModules(*names), *sys.meta_path])
