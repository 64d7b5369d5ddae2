"""Imports point one way: each module of the package imports only from its own layer or the layers below it."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "tadsr_jax"

# Lowest first. A module may import its own layer and any layer listed before it, never one after it.
LAYERS = (
    ("storage", "runtime", "prng", "flops", "images", "checkpoints", "diffusion", "parallel"),
    ("nn",),
    ("models",),
    ("weights",),
    ("method", "metrics"),
    ("data", "evaluation"),
    ("infer",),
    ("train",),
    ("cli", "stand_ins"),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _unit(module: str) -> str:
    """tadsr_jax.infer.model -> infer; tadsr_jax.storage -> storage."""
    return module.split(".")[1]


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) of every tadsr_jax module this file imports, at any depth (lazy imports count too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("tadsr_jax.")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "tadsr_jax":
                found += [(node.lineno, f"tadsr_jax.{a.name}") for a in node.names]
            elif node.module.startswith("tadsr_jax."):
                found.append((node.lineno, node.module))
    return found


def upward_imports(package: pathlib.Path = PACKAGE) -> list[str]:
    problems = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package.parent)
        parts = relative.with_suffix("").parts
        if len(parts) == 2 and parts[1] == "__init__":
            continue
        unit = parts[1]
        if unit not in RANK:
            problems.append(f"{relative}: not in LAYERS")
            continue
        for line, module in _imports(path):
            target = _unit(module)
            if target not in RANK:
                problems.append(f"{relative}:{line}: imports {module}, not in LAYERS")
            elif RANK[target] > RANK[unit]:
                problems.append(f"{relative}:{line}: {unit} imports {module} from a higher layer")
    return problems


def test_no_module_imports_from_a_higher_layer():
    assert upward_imports() == []


def test_an_upward_import_is_caught(tmp_path):
    (tmp_path / "tadsr_jax" / "models").mkdir(parents=True)
    (tmp_path / "tadsr_jax" / "models" / "unet.py").write_text(
        "import jax\n\ndef f():\n    from tadsr_jax.train.step import make_model\n"
    )
    (tmp_path / "tadsr_jax" / "nn").mkdir()
    (tmp_path / "tadsr_jax" / "nn" / "layers.py").write_text("from tadsr_jax import storage\n")
    assert upward_imports(tmp_path / "tadsr_jax") == [
        "tadsr_jax/models/unet.py:4: models imports tadsr_jax.train.step from a higher layer"
    ]


@pytest.mark.parametrize("unit", sorted(RANK))
def test_every_layer_exists(unit):
    assert (PACKAGE / unit).is_dir() or (PACKAGE / f"{unit}.py").is_file()
