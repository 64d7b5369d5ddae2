"""The README's layout map names every file of the package, the configs, launchers, benchmarks and docs, and
names no file that is gone."""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
MAPPED = ("tadsr_jax", "configs", "launch", "benchmarks", "docs")
SUFFIXES = (".py", ".md", ".sh", ".sbatch")


def layout_block(readme: str) -> str:
    return readme.split("## Layout\n\n```\n", 1)[1].split("```", 1)[0]


def files_on_disk() -> set[str]:
    return {
        path.name
        for folder in MAPPED
        for path in (REPO / folder).rglob("*")
        if path.suffix in SUFFIXES and path.name != "__init__.py" and "__pycache__" not in path.parts
    }


def names_in(block: str) -> set[str]:
    return set(re.findall(r"\b[a-z_0-9]+\.(?:py|md|sh|sbatch)\b", block))


def test_layout_map_names_every_file_and_only_existing_ones():
    block = layout_block((REPO / "README.md").read_text())
    on_disk, named = files_on_disk(), names_in(block)
    tests = {path.name for path in (REPO / "tests").glob("*.py")}
    assert sorted(on_disk - named) == []  # files the map does not mention
    assert sorted(named - on_disk - tests) == []  # names in the map that no longer exist


def test_a_file_left_out_of_the_map_is_caught():
    block = layout_block((REPO / "README.md").read_text()).replace("vae_tiling.py", "strip-wise VAE")
    assert files_on_disk() - names_in(block) == {"vae_tiling.py"}
