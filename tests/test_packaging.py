"""environment.yml lists the same dependencies as pyproject.toml (core + prepare + notebooks + test extras)."""

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"])
    for extra in ("prepare", "notebooks", "test"):
        wanted |= set(project["optional-dependencies"][extra])
    lines = (ROOT / "environment.yml").read_text().splitlines()
    pip_block = lines[lines.index("  - pip:") + 1:]
    listed = {re.sub(r"^\s*-\s*", "", line).strip() for line in pip_block if line.strip().startswith("-")}
    assert listed == wanted
