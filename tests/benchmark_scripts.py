"""Load a script of ``benchmarks/`` (a folder of scripts, not a package) as a module for a test."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(script: str) -> ModuleType:
    """``benchmarks/<script>.py`` as the module ``benchmark_<script>``, registered in ``sys.modules`` (dataclasses
    look their module up there), with ``benchmarks/`` on the path while it loads, for its sibling imports
    (``timing``) as when it runs from there."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{script}", BENCHMARKS / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module
