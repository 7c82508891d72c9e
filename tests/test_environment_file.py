"""The conda environment (``environment.yml``, installed with ``pip install -e . --no-deps``) carries every main
dependency of ``pyproject.toml``: torch and FAISS under their conda names, the rest as pip requirements."""

import re
from pathlib import Path

import pytest
import yaml

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"torch": "pytorch", "faiss-cpu": "faiss-gpu"}  # the GPU builds conda provides


def requirement_name(requirement: str) -> str:
    return re.split(r"[\[<>=! ]", requirement, maxsplit=1)[0].lower()


def test_every_main_dependency_is_in_the_conda_environment() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    environment = yaml.safe_load((REPO / "environment.yml").read_text())["dependencies"]
    conda = {requirement_name(d) for d in environment if isinstance(d, str)}
    pip = {requirement_name(d) for entry in environment if isinstance(entry, dict) for d in entry["pip"]}
    missing = [name for name in map(requirement_name, project["dependencies"])
               if CONDA_NAMES.get(name, name) not in conda | pip]  # fmt: skip
    assert not missing, f"environment.yml lacks {missing}"
