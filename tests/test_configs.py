"""Each config value is written once: configs/tadsr_sd21.py writes every key of the paper setting itself, and
configs/tiny.py is the paper config plus the overrides it writes (read from the files' source, no JAX)."""

import ast
import os

import ml_collections

from tadsr_jax import cli
from tadsr_jax.data.pipeline import source_config

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
PAPER, TINY = os.path.join(CONFIGS, "tadsr_sd21.py"), os.path.join(CONFIGS, "tiny.py")
# Sections whose keys are an experiment's own: network architectures (empty: the pretrained folder's) and the
# entries of a data mixture.
OPEN_SECTIONS = ("model.unet", "model.vae", "model.text_encoder", "data.mixture")


def _path(node: ast.expr, aliases: dict[str, str]) -> str | None:
    """'model.lora_rank' for `config.model.lora_rank` (or `r.lora_rank` where r = config.model); else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or not (node.id == "config" or node.id in aliases):
        return None
    root = [] if node.id == "config" else [aliases[node.id]]
    return ".".join(root + parts[::-1]) or None


def _written(key: str, value: ast.expr) -> set[str]:
    """The keys an assignment of `value` to `key` writes: the keyword names of a `dict(...)` or `source_config(...)`
    (all of a source's keys), else `key` itself."""
    if isinstance(value, ast.Call) and isinstance(value.func, ast.Name):
        if value.func.id == "source_config":
            return {f"{key}.{name}" for name in source_config("", "")}
        if value.func.id == "dict":
            return {f"{key}.{k.arg}" for k in value.keywords}
    return {key}


def written_keys(path: str) -> set[str]:
    """Every config key a config file assigns (`config.a.b = ...`, through aliases and tuple assignments)."""
    aliases, keys = {}, set()
    assignments = [node for node in ast.walk(ast.parse(open(path).read(), path)) if isinstance(node, ast.Assign)]
    for node in sorted(assignments, key=lambda node: (node.lineno, node.col_offset)):
        for target in node.targets:
            pairs = (
                zip(target.elts, node.value.elts)
                if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple)
                else [(target, node.value)]
            )
            for name, value in pairs:
                key = _path(name, aliases)
                if key:
                    keys |= _written(key, value)
        sections = [key for key in (_path(t, aliases) for t in node.targets) if key]
        for target in node.targets:
            if isinstance(target, ast.Name) and sections:  # r = config.data.realesrgan = ConfigDict()
                aliases[target.id] = sections[0]
    return keys


def leaf_keys(config: ml_collections.ConfigDict) -> dict[str, object]:
    """key -> value of every value that is not a section (an empty section counts as a value)."""
    return {
        key: value
        for key, value in ((k, _get(config, k)) for k in cli.config_keys(config))
        if not isinstance(value, ml_collections.ConfigDict) or not value
    }


def _get(config: ml_collections.ConfigDict, key: str):
    for part in key.split("."):
        config = config[part]
    return config


def _outside_open_sections(keys) -> set[str]:
    return {k for k in keys if not any(k == s or k.startswith(s + ".") for s in OPEN_SECTIONS)}


def test_the_paper_config_writes_every_key_itself():
    missing = set(leaf_keys(cli.load_config(PAPER))) - written_keys(PAPER)
    assert not missing, f"configs/tadsr_sd21.py does not write these keys itself: {sorted(missing)}"


def test_tiny_is_the_paper_config_plus_the_overrides_it_writes():
    paper, tiny = leaf_keys(cli.load_config(PAPER)), leaf_keys(cli.load_config(TINY))
    assert _outside_open_sections(tiny) == _outside_open_sections(paper)
    differ = {key for key, value in tiny.items() if key not in paper or paper[key] != value}
    assert differ <= written_keys(TINY), (
        f"configs/tiny.py differs without saying so: {sorted(differ - written_keys(TINY))}"
    )


def test_written_keys_reads_assignments_aliases_dicts_and_sources(tmp_path):
    """The reader the tests above rely on: what it must find, and what it must not."""
    path = tmp_path / "config.py"
    path.write_text(
        "def get_config():\n"
        "    config.a.b = 1\n"
        "    config.c = dict(d=1, e=2)\n"
        "    config.f = r = ConfigDict()\n"
        "    r.g = 3\n"
        "    config.h, config.i = 4, 5\n"
        "    config.s = source_config(source='tfds', path='x')\n"
        "    other.j = 6\n"
    )
    expected = {"a.b", "c.d", "c.e", "f", "f.g", "h", "i"} | {f"s.{k}" for k in source_config("", "")}
    assert written_keys(str(path)) == expected
