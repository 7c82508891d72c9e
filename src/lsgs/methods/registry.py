"""The method registry: which methods a run evaluates, where their outputs are, and how to load one.

A method is one class (an ``AnomalyMapModule`` subclass) plus one config entry in the experiment YAML::

    methods:
      <name>:
        model: {class_path: package.module.Class, init_args: {...}}
        trainer: {...}

(or ``methods: methods/<set>.yaml``, a file of such entries next to the experiment file). The built-in methods
(``lsgs.methods.BUILTIN_METHODS``) are declared by every experiment parser; any other name is discovered from the
config files and the command line (:func:`discover_method_names`), so a new method needs no edit in ``lsgs``. LSGS
itself is the method ``lsgs``: its evaluation is the ``scoring`` stage. Everything that lists or loads methods (the
runner, ``lsgs detect``, ``lsgs report``, ``lsgs ablate``, ``lsgs study``) goes through this module.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lsgs.errors import ConfigError
from lsgs.io import read_json_or_none
from lsgs.layout import LSGS_METHOD, METHOD_STAGE_PREFIX, StageLayout, method_stage_key
from lsgs.methods import BUILTIN_METHODS
from lsgs.run_record import check_run_folder

CONFIG_OPTIONS = ("-c", "--config")  # the config-file options of the experiment and stage parsers
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


def refuse_old_methods_key(argv: Sequence[str], config_texts: Iterable[tuple[str, Any]]) -> None:
    """One ``ConfigError`` line for an experiment in the form before methods were called methods: the config key,
    the ``--run_*`` switch and the ``--stages`` entry of every evaluated method other than LSGS are ``methods``."""
    old = "baselines"
    for where, content in config_texts:
        keys = [str(key) for key in content] if isinstance(content, dict) else []
        if any(key == old or key.startswith(f"{old}.") for key in keys):
            raise ConfigError(f"{where}: the key '{old}' is now '{METHOD_STAGE_PREFIX}' (rename it)")
    for argument in argv:
        if argument.startswith((f"--{old}.", f"--run_{old}")) or (argument.startswith("--stages") and old in argument):
            new = argument.replace(old, METHOD_STAGE_PREFIX).split("=")[0]
            raise ConfigError(f"{argument.split('=')[0]}: '{old}' is now '{METHOD_STAGE_PREFIX}' ({new})")


def discover_method_names(argv: Sequence[str]) -> list[str]:
    """Method names an experiment command line configures: the built-ins, then any other ``methods.<name>`` key
    found in its ``--config``/``-c`` files (and the method-set file their ``methods`` key names) or its
    ``--methods.<name>.*`` arguments (sorted). Read before the experiment parser is built, so the parser can declare
    their sections."""
    sources = []
    for i, argument in enumerate(argv):
        if argument in CONFIG_OPTIONS and i + 1 < len(argv):
            sources.append(argv[i + 1])
        elif argument.startswith(("--config=", "-c=")):
            sources.append(argument.split("=", 1)[1])
    configs = [(source, content) for source in sources for content in [_read_config(source)]]
    refuse_old_methods_key(argv, configs)
    found: set[str] = set()
    for source, content in configs:
        found |= _names_in_config(source, content)
    for argument in argv:
        match = _ARGUMENT.match(argument)
        if match:
            found.add(match.group(1))
    builtin = builtin_method_names()
    extra = sorted(check_method_name(n, f"{METHOD_STAGE_PREFIX}.{n}") for n in found - set(builtin))
    return [*builtin, *extra]


def _read_config(source: str | Path) -> Any:
    """One YAML config (a path, or YAML text as jsonargparse also accepts); None when unreadable (the experiment
    parser reports a bad ``--config`` with its own message)."""
    import yaml

    path = Path(source)
    try:
        return yaml.safe_load(path.read_text() if path.is_file() else str(source))
    except (OSError, yaml.YAMLError):
        return None


def method_set_path(experiment_file: str | Path, value: str) -> Path:
    """The method-set file a ``methods: <file>`` line of ``experiment_file`` names: relative to that file's folder,
    as jsonargparse resolves it."""
    path = Path(value)
    return path if path.is_absolute() else Path(experiment_file).parent / path


def _names_in_config(source: str, content: Any) -> set[str]:
    """``methods.<name>`` keys of one experiment YAML, including those of the method-set file it names."""
    if not isinstance(content, dict):
        return set()
    section = content.get(METHOD_STAGE_PREFIX)
    if isinstance(section, str) and Path(source).is_file():
        section = _read_config(method_set_path(source, section))
    names = {str(n) for n in section} if isinstance(section, dict) else set()
    # Dotted keys (``methods.<name>.model: ...``) are valid jsonargparse YAML too.
    dotted = (str(key).split(".") for key in content if str(key).startswith(f"{METHOD_STAGE_PREFIX}."))
    return names | {parts[1] for parts in dotted if len(parts) > 2}


def configured_methods(config: Any, names: Iterable[str]) -> list[str]:
    """The names among ``names`` whose ``methods.<name>.model`` is set in a parsed experiment config."""
    return [n for n in names if config.get(f"{METHOD_STAGE_PREFIX}.{n}.model") is not None]


ABLATION_KIND = "ablation"


@dataclass(frozen=True)
class EvaluatedMethod:
    """A finished evaluation in a run folder: its name and kind in the summary, and its stage folder."""

    name: str  # method name (``lsgs``, ``ae``, ...) or ``<table>-<variant>`` for an ablation variant
    kind: str  # ``method`` or ``baseline`` (the class's ``kind``, as its results record it), or ``ablation``
    stage: StageLayout

    @property
    def label(self) -> str:
        """The row name in the summary: ``LSGS`` for LSGS, else the method or variant name."""
        return "LSGS" if self.name == LSGS_METHOD else self.name


def evaluated_methods(run_dir: str | Path) -> list[EvaluatedMethod]:
    """Every finished evaluation of a run (it has ``results.json``): LSGS, the other methods of kind ``method``,
    those of kind ``baseline``, then the ablation variants (by name within each kind)."""
    layout = check_run_folder(run_dir)
    found: list[EvaluatedMethod] = []
    if layout.scoring.results_json.is_file():
        found.append(EvaluatedMethod(LSGS_METHOD, _recorded_kind(layout.scoring), layout.scoring))
    if layout.methods_dir.is_dir():
        for folder in sorted(p for p in layout.methods_dir.iterdir() if p.is_dir()):
            stage = layout.method(folder.name)
            if stage.results_json.is_file():
                found.append(EvaluatedMethod(folder.name, _recorded_kind(stage), stage))
    for variant, run in layout.ablation_runs():
        if run.scoring.results_json.is_file():
            found.append(EvaluatedMethod(variant, ABLATION_KIND, run.scoring))
    order = {"method": 0, "baseline": 1, ABLATION_KIND: 2}
    return sorted(found, key=lambda m: (order.get(m.kind, 0), m.name != LSGS_METHOD, m.name))


def _recorded_kind(stage: StageLayout) -> str:
    """The kind a stage's ``results.json`` records (``method`` when it does not say)."""
    results = read_json_or_none(stage.results_json)
    kind = results.get("kind") if isinstance(results, dict) else None
    return str(kind) if kind else "method"


def method_stage(run_dir: str | Path, name: str) -> StageLayout:
    """The stage folder of method ``name`` in a run (``lsgs`` -> ``scoring/``, else ``methods/<name>/``)."""
    if name != LSGS_METHOD:
        check_method_name(name, "--method")
    return check_run_folder(run_dir).stage(method_stage_key(name))


def load_method(run_dir: str | Path, name: str) -> Any:
    """Method ``name`` of a finished run, rebuilt by the evaluation harness, ready for ``Trainer.predict``
    (calibrated; see ``lsgs.evaluation.load_method``). One ``ConfigError`` line when it did not finish."""
    stage = method_stage(run_dir, name)
    if not stage.done.is_file() or not stage.config.is_file():
        finished = [m.name for m in evaluated_methods(run_dir) if m.kind != ABLATION_KIND]
        raise ConfigError(
            f"--method {name}: '{stage.folder}' holds no finished evaluation ({stage.done.name} and "
            f"{stage.config.name} are needed); finished in this run: {finished or 'none'}"
        )
    from lsgs.evaluation import load_method as harness_load_method

    return harness_load_method(stage.folder)
