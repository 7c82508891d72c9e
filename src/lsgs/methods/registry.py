"""The method registry: which methods a run evaluates, where their outputs are, and how to load one.

A method is one class (an ``AnomalyMapModule`` subclass) plus one config entry in the experiment YAML::

    baselines:
      <name>:
        model: {class_path: package.module.Class, init_args: {...}}
        trainer: {...}

The built-in methods (``lsgs.methods.BUILTIN_METHODS``: intensity, pixel_gaussian, ae, vae) are declared by
every experiment parser; any other name is discovered from the config files and the command line
(:func:`discover_method_names`), so a new method needs no edit in ``lsgs``. LSGS itself is the method ``lsgs``:
its evaluation is the ``scoring`` stage. Everything that lists or loads methods (the runner, ``lsgs detect``,
``lsgs report``, ``lsgs ablate``, ``lsgs study``) goes through this module.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lsgs.errors import ConfigError
from lsgs.layout import METHOD_STAGE_PREFIX, RunLayout, StageLayout, method_stage_key
from lsgs.methods import BUILTIN_METHODS

LSGS_METHOD = "lsgs"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ARGUMENT = re.compile(rf"^--{METHOD_STAGE_PREFIX}\.([A-Za-z_][A-Za-z0-9_]*)\.")


def builtin_method_names() -> tuple[str, ...]:
    """Names of the methods every experiment parser declares, in run order."""
    return tuple(BUILTIN_METHODS)


def check_method_name(name: str, where: str) -> str:
    if not _NAME.match(name) or name == LSGS_METHOD:
        raise ConfigError(
            f"{where}: method name {name!r} must be a Python identifier other than {LSGS_METHOD!r}"
        )
    return name


def discover_method_names(argv: Sequence[str]) -> list[str]:
    """Method names an experiment command line configures: the built-ins, then any other
    ``baselines.<name>`` key found in its ``--config``/``-c`` files or its ``--baselines.<name>.*`` arguments
    (sorted). Read before the experiment parser is built, so the parser can declare their sections."""
    found: set[str] = set()
    for i, argument in enumerate(argv):
        if argument in ("-c", "--config") and i + 1 < len(argv):
            found |= _names_in_config(argv[i + 1])
        elif argument.startswith(("--config=", "-c=")):
            found |= _names_in_config(argument.split("=", 1)[1])
        match = _ARGUMENT.match(argument)
        if match:
            found.add(match.group(1))
    builtin = builtin_method_names()
    extra = sorted(check_method_name(n, f"{METHOD_STAGE_PREFIX}.{n}") for n in found - set(builtin))
    return [*builtin, *extra]


def _names_in_config(source: str) -> set[str]:
    """``baselines.<name>`` keys of one experiment YAML (a path, or YAML text as jsonargparse also accepts)."""
    import yaml

    path = Path(source)
    try:
        text = path.read_text() if path.is_file() else source
        content = yaml.safe_load(text)
    except (OSError, yaml.YAMLError):
        return set()  # the experiment parser reports the bad --config with its own message
    if not isinstance(content, dict):
        return set()
    section = content.get(METHOD_STAGE_PREFIX)
    names = {str(n) for n in section} if isinstance(section, dict) else set()
    # Dotted keys (``baselines.<name>.model: ...``) are valid jsonargparse YAML too.
    dotted = (str(key).split(".") for key in content if str(key).startswith(f"{METHOD_STAGE_PREFIX}."))
    return names | {parts[1] for parts in dotted if len(parts) > 2}


def configured_methods(config: Any, names: Iterable[str]) -> list[str]:
    """The names among ``names`` whose ``baselines.<name>.model`` is set in a parsed experiment config."""
    return [n for n in names if config.get(f"{METHOD_STAGE_PREFIX}.{n}.model") is not None]


@dataclass(frozen=True)
class EvaluatedMethod:
    """A finished evaluation in a run folder: its row label in the summary, and its stage folder."""

    name: str  # method name (``lsgs``, ``ae``, ...) or ``<table>-<variant>`` for an ablation variant
    label: str  # row name in the summary: ``baseline: ae``, ``ablation: attention-wo``, ``LSGS``
    stage: StageLayout


def evaluated_methods(run_dir: str | Path) -> list[EvaluatedMethod]:
    """Every finished evaluation of a run (it has ``results.json``): other methods (sorted), ablation variants,
    then LSGS."""
    layout = RunLayout.of(run_dir)
    found: list[EvaluatedMethod] = []
    if layout.methods_dir.is_dir():
        for folder in sorted(p for p in layout.methods_dir.iterdir() if p.is_dir()):
            stage = layout.method(folder.name)
            if stage.results_json.is_file():
                found.append(EvaluatedMethod(folder.name, f"baseline: {folder.name}", stage))
    for variant, run in layout.ablation_runs():
        if run.scoring.results_json.is_file():
            found.append(EvaluatedMethod(variant, f"ablation: {variant}", run.scoring))
    if layout.scoring.results_json.is_file():
        found.append(EvaluatedMethod(LSGS_METHOD, "LSGS", layout.scoring))
    return found


def method_stage(run_dir: str | Path, name: str) -> StageLayout:
    """The stage folder of method ``name`` in a run (``lsgs`` -> ``scoring/``, else ``baselines/<name>/``)."""
    if name != LSGS_METHOD:
        check_method_name(name, "--method")
    return RunLayout.of(run_dir).stage(method_stage_key(name))


def load_method(run_dir: str | Path, name: str) -> Any:
    """Method ``name`` of a finished run, rebuilt by the evaluation harness, ready for ``Trainer.predict``
    (calibrated; see ``lsgs.evaluation.load_method``). One ``ConfigError`` line when it did not finish."""
    stage = method_stage(run_dir, name)
    if not stage.done.is_file() or not stage.config.is_file():
        finished = [m.name for m in evaluated_methods(run_dir) if not m.label.startswith("ablation")]
        raise ConfigError(
            f"--method {name}: '{stage.folder}' holds no finished evaluation ({stage.done.name} and "
            f"{stage.config.name} are needed); finished in this run: {finished or 'none'}"
        )
    from lsgs.evaluation import load_method as harness_load_method

    return harness_load_method(stage.folder)
