"""The experiment parser: ``lsgs pipeline`` arguments and experiment YAML files -> one ``Namespace``.

An experiment config (``experiments/*.yaml``) holds a shared ``data`` section, a shared ``trainer`` section, and
one section per stage with that stage's ``model`` (``class_path``/``init_args``) and ``trainer`` keys: the LSGS
stages (``vqvae`` ... ``scoring``) and, under ``methods``, one ``<name>`` section per other evaluated method. The
``methods`` section may be a file name instead (``methods: methods/images.yaml``, relative to the experiment file):
jsonargparse composes that file in, so the default method set is written once. The method names are read off the
config files and the command line before the parser is built (:func:`lsgs.methods.registry.discover_method_names`),
so any method, built-in or not, takes overrides such as ``--methods.ae.trainer.max_epochs=1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ActionParser, ArgumentError, ArgumentParser, Namespace
from lightning.pytorch import LightningDataModule, LightningModule

from lsgs.errors import ConfigError
from lsgs.layout import LSGS_STAGES, METHOD_STAGE_PREFIX
from lsgs.methods.registry import builtin_method_names, discover_method_names
from lsgs.stage_cli import condense_parser_error

STAGE_NAMES = LSGS_STAGES
ALL_METHODS = METHOD_STAGE_PREFIX  # the --stages entry that selects every configured method but LSGS


def build_parser(method_names: Sequence[str] | None = None) -> ArgumentParser:
    """The ``lsgs pipeline`` argument parser (also reads experiment YAML files via ``--config``).

    Args:
        method_names: the ``methods.<name>`` sections to declare (default: the built-in methods).
    """
    method_names = builtin_method_names() if method_names is None else method_names
    parser = ArgumentParser(
        prog="lsgs pipeline",
        description=(
            "Run the LSGS stages of one experiment in order (VQ-VAE, codebook aggregation, fine-tuning, "
            "transformer, scoring), skipping finished stages and resuming interrupted ones. Any key can be "
            "overridden after --config, e.g. --vqvae.model.codebook_size=512 --trainer.max_epochs=50."
        ),
        default_env=False,
        exit_on_error=False,
    )
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="experiment YAML file")
    parser.add_argument("--name", type=str, default="lsgs", help="experiment name (run folder, W&B group)")
    parser.add_argument("--run_dir", type=str | None, default=None, help="run folder (default: runs/<name>)")
    parser.add_argument("--seed_everything", type=int, default=42, help="seed of every stage")
    parser.add_argument(
        "--logger",
        type=Literal["wandb", "tensorboard", "csv", "none"],
        default="wandb",
        help="experiment tracker beside the CSV logs that every stage writes; W&B is offline unless "
        "WANDB_MODE=online, and WANDB_MODE=disabled turns it off",
    )
    parser.add_argument("--wandb.project", type=str, default="lsgs")
    parser.add_argument("--wandb.entity", type=str | None, default=None)
    parser.add_argument("--wandb.tags", type=list[str], default=[])
    parser.add_argument(
        "--aggregate", type=bool, default=True, help="run stages 2-3 (aggregated codebook + fine-tuning)"
    )
    parser.add_argument(
        "--stages",
        type=list[str] | None,
        default=None,
        help=f"run only these stages (of {[*STAGE_NAMES, ALL_METHODS]}); the others must be finished when "
        "needed",
    )
    parser.add_argument(
        "--run_methods",
        type=bool,
        default=True,
        help=f"also evaluate the configured methods ({METHOD_STAGE_PREFIX}.*) with the same data and metrics",
    )
    parser.add_argument(
        "--trainer",
        type=dict[str, Any],
        default={},
        help="Trainer arguments for EVERY stage; they take precedence over each stage's own trainer keys",
    )
    parser.add_subclass_arguments(LightningDataModule, "data", help="the data module shared by all stages")
    for stage in STAGE_NAMES:
        _add_stage_arguments(parser, stage)
    methods = ArgumentParser(prog=f"lsgs pipeline --{METHOD_STAGE_PREFIX}", default_env=False, exit_on_error=False)
    for name in method_names:
        _add_stage_arguments(methods, name)
    parser.add_argument(
        f"--{METHOD_STAGE_PREFIX}",
        action=ActionParser(parser=methods),
        help="the other evaluated methods, one section each (or a method-set file of such sections)",
    )
    parser.add_argument(
        "--fault_injection",
        type=str | None,
        default=None,
        help="testing only: STAGE:EPOCH:BATCH[:KILL|TERM|CHECKPOINT] (lsgs.callbacks.FaultInjection)",
    )
    return parser


def _add_stage_arguments(parser: ArgumentParser, stage: str) -> None:
    """A stage's ``<stage>.model`` (any LightningModule, ``class_path``/``init_args``) and ``<stage>.trainer``."""
    parser.add_subclass_arguments(LightningModule, f"{stage}.model", required=False)
    parser.add_argument(f"--{stage}.trainer", type=dict[str, Any], default={})


def parse_experiment(argv: Sequence[str]) -> tuple[ArgumentParser, Namespace]:
    """Parse ``lsgs pipeline`` arguments; a bad key or value becomes one ``ConfigError`` line."""
    argv = list(argv)
    parser = build_parser(discover_method_names(argv))
    try:
        return parser, parser.parse_args(argv)
    except ArgumentError as error:
        raise ConfigError(condense_parser_error(str(error))) from None


def method_names(config: Namespace) -> list[str]:
    """The ``methods.<name>`` sections a parsed experiment declares, in declaration order."""
    section = config.get(METHOD_STAGE_PREFIX)
    return list(vars(section)) if isinstance(section, Namespace) else []


# Data arguments that name folders: the data's location, kept absolute (the data does not move with a run).
DATA_LOCATION_ARGUMENTS = ("root", "cache_dir")


def data_location(data: dict[str, Any]) -> dict[str, Any]:
    """A data section (``class_path``/``init_args``) with its folders (``DATA_LOCATION_ARGUMENTS``) as absolute
    paths (``~`` expanded), so a stage config read from any working directory finds the data."""
    init_args = dict(data.get("init_args") or {})
    for key in DATA_LOCATION_ARGUMENTS:
        if isinstance(init_args.get(key), str):
            init_args[key] = str(Path(init_args[key]).expanduser().absolute())
    return {**data, "init_args": init_args}


def experiment_record(parser: ArgumentParser, config: Namespace) -> str:
    """``experiment.yaml``: the parsed experiment as its run folder keeps it, the data's folders absolute and
    without ``run_dir`` (the record sits in the run folder, wherever that is now). Re-run or resume it with
    ``lsgs pipeline -c RUN/experiment.yaml --run_dir RUN``."""
    record = config.clone()
    record.run_dir = None
    for key in DATA_LOCATION_ARGUMENTS:
        value = record.get(f"data.init_args.{key}")
        if isinstance(value, str):
            record[f"data.init_args.{key}"] = data_location({"init_args": {key: value}})["init_args"][key]
    return parser.dump(record, skip_none=False)
