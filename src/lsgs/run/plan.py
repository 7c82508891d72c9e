"""The stage planner: a parsed experiment -> every active stage's LightningCLI config, hash and folder.

Sizes that follow from elsewhere are filled in here, never retyped: every model's ``in_channels`` is the data
module's ``num_channels``, and a method's ``pipeline_defaults`` (e.g. the AE/VAE take the VQ-VAE's shape) fill what
its own config leaves unset. A stage's *hash* covers its resolved config (minus presentation settings such as
loggers, progress bars and the callbacks that only display or log) and the hashes of the stages it reads from.
``done.json`` with the same hash marks a finished stage, which the runner skips; a stage whose hash changed is
discarded and re-run, and so are the stages after it, because their hashes include its hash. Planning runs and
writes nothing.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jsonargparse import Namespace

from lsgs.classpath import import_class
from lsgs.contracts import channels_of
from lsgs.errors import ConfigError
from lsgs.evaluation import AnomalyMapModule
from lsgs.io import read_json_or_none
from lsgs.layout import METHOD_STAGE_PREFIX, RunLayout, StageLayout
from lsgs.methods.registry import configured_methods
from lsgs.run.experiment import data_location, method_names
from lsgs.stage_cli import validate_stage_config

# Settings that change how a run is displayed, not what it computes: excluded from stage hashes.
PRESENTATION_TRAINER_KEYS = (
    "logger",
    "enable_progress_bar",
    "enable_model_summary",
    "default_root_dir",
    "log_every_n_steps",
)
# Callbacks that only display or log (by class name): left out of stage hashes. Any other callback (EarlyStopping,
# StochasticWeightAveraging, GradientAccumulationScheduler, a user's own...) may change what a stage computes, so
# adding, removing or re-configuring one re-runs the stage.
PRESENTATION_CALLBACKS = (
    "TQDMProgressBar",
    "RichProgressBar",
    "ModelSummary",
    "RichModelSummary",
    "LearningRateMonitor",
    "DeviceStatsMonitor",
)
OUTPUT_ARGUMENTS = ("output_dir",)


@dataclass(frozen=True)
class StageSpec:
    """What a stage runs.

    Attributes:
        name: stage key (``vqvae``, ..., ``methods.<method>``); its folder is ``RunLayout.stage(name)``.
        trainer_fn: the ``Trainer`` method that runs it (``fit_test``: fit, then test, in one stage).
    """

    name: str
    trainer_fn: Literal["fit", "predict", "test", "fit_test"]


STAGE_SPECS = {
    "vqvae": StageSpec("vqvae", "fit"),
    "aggregator": StageSpec("aggregator", "predict"),
    "finetune": StageSpec("finetune", "fit"),
    "transformer": StageSpec("transformer", "fit"),
    "scoring": StageSpec("scoring", "test"),
}


@dataclass
class StagePlan:
    """One stage, resolved: its LightningCLI config, its hash and its folder."""

    spec: StageSpec
    config: dict[str, Any]
    inputs: dict[str, str | None]  # model argument -> upstream stage (None: explicitly no input)
    digest: str
    layout: StageLayout

    @property
    def folder(self) -> Path:
        return self.layout.folder

    @property
    def output_path(self) -> Path:
        """The file a finished stage must have produced."""
        return self.layout.output(self.spec.name)

    def is_done(self) -> bool:
        done = read_json_or_none(self.layout.done)
        return bool(done) and done.get("hash") == self.digest and self.output_path.is_file()


@dataclass
class Experiment:
    """A parsed experiment config and the stage plans derived from it."""

    config: Namespace
    layout: RunLayout
    plans: dict[str, StagePlan] = field(default_factory=dict)
    reuse: list[RunLayout] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return self.layout.root

    @property
    def has_transformer(self) -> bool:
        """Whether the experiment trains a transformer (``transformer.model: null``: the "w/o" row of Table 4)."""
        return self.config.transformer.model is not None

    def active_stages(self) -> list[str]:
        """Stage keys in run order: the LSGS stages, then ``methods.<name>`` for each configured method."""
        stages = ["vqvae"]
        if self.config.aggregate:
            stages += ["aggregator", "finetune"]
        if self.has_transformer:
            stages.append("transformer")
        stages.append("scoring")
        if self.config.run_methods:
            names = configured_methods(self.config, method_names(self.config))
            stages += [f"{METHOD_STAGE_PREFIX}.{name}" for name in names]
        return stages

    def method_plans(self) -> list[StagePlan]:
        return [plan for key, plan in self.plans.items() if key.startswith(f"{METHOD_STAGE_PREFIX}.")]


def stage_inputs(stage: str, aggregate: bool, has_transformer: bool) -> dict[str, str | None]:
    """Model arguments the runner fills with upstream checkpoints."""
    if stage.startswith(f"{METHOD_STAGE_PREFIX}."):
        return {}
    final_vqvae = "finetune" if aggregate else "vqvae"
    return {
        "vqvae": {},
        "aggregator": {"vqvae_checkpoint": "vqvae"},
        "finetune": {"init_from": "aggregator"},
        "transformer": {"vqvae_checkpoint": final_vqvae},
        "scoring": {
            "vqvae_checkpoint": final_vqvae,
            "transformer_checkpoint": "transformer" if has_transformer else None,
        },
    }[stage]


def plan_experiment(config: Namespace, reuse_dirs: Sequence[str | Path] = ()) -> Experiment:
    """Resolve every active stage's config and hash (nothing runs, nothing is written)."""
    # Absolute paths in memory (the stages run from the working directory); the runner stores the paths inside
    # the run relative to it (hashes ignore them).
    experiment = Experiment(
        config=config,
        layout=RunLayout.for_experiment(config).resolved(),
        reuse=[RunLayout.of(p).resolved() for p in reuse_dirs],
    )
    data_channels = _data_channels(config)
    for stage in experiment.active_stages():
        section = config[stage]
        if section.model is None:
            raise ConfigError(f"stage '{stage}' has no model: set {stage}.model in the experiment config")
        inputs = stage_inputs(stage, config.aggregate, experiment.has_transformer)
        stage_config = _stage_config(config, stage, data_channels)
        # A copy: jsonargparse's parse_object turns nested dicts (callback configs) into Namespaces in place, which
        # the stage hash and its filter of presentation callbacks must not see.
        validate_stage_config(stage, copy.deepcopy(stage_config))
        upstream = {arg: experiment.plans[src].digest if src else None for arg, src in inputs.items()}
        digest = _stage_digest(stage, stage_config, upstream)
        layout = _find_stage_layout(experiment, stage, digest)
        experiment.plans[stage] = StagePlan(_spec(stage, stage_config), stage_config, inputs, digest, layout)
    return experiment


def _spec(stage: str, stage_config: dict[str, Any]) -> StageSpec:
    if not stage.startswith(f"{METHOD_STAGE_PREFIX}."):
        return STAGE_SPECS[stage]
    # A method that learns (AE, VAE) is fitted, then tested, in one stage; the others are only tested.
    trainable = getattr(import_class(stage_config["model"]["class_path"]), "requires_fit", False)
    return StageSpec(stage, "fit_test" if trainable else "test")


def harness_arguments() -> tuple[str, ...]:
    """Evaluation settings of the harness (``AnomalyMapModule``) that every evaluated method must share."""
    names = inspect.signature(AnomalyMapModule.__init__).parameters
    return tuple(n for n in names if n not in ("self", "output_dir", "calibration"))


def _data_channels(config: Namespace) -> int | None:
    """``num_channels`` of the experiment's data module (built from its config: cheap, reads no data)."""
    data = namespace_to_dict(config.data)
    module = import_class(data["class_path"])(**(data.get("init_args") or {}))
    return channels_of(module)


def _stage_config(config: Namespace, stage: str, data_channels: int | None) -> dict[str, Any]:
    """The LightningCLI config of ``stage`` before run-specific injections (inputs, folders, loggers)."""
    section = config[stage]
    model = namespace_to_dict(section.model)
    trainer = namespace_to_dict(section.trainer or {})
    model_class = import_class(model["class_path"])
    init_args = model.setdefault("init_args", {})
    if data_channels is not None and "in_channels" in inspect.signature(model_class.__init__).parameters:
        init_args["in_channels"] = data_channels
    for target, source in getattr(model_class, "pipeline_defaults", {}).items():
        section_name, _, key = target.partition(".")
        values = trainer if section_name == "trainer" else init_args
        key = key.removeprefix("init_args.")
        value = _lookup(config, source)
        if values.get(key) is None and value is not None:
            values[key] = copy.deepcopy(value)
    if stage.startswith(f"{METHOD_STAGE_PREFIX}.") and config.scoring.model is not None:
        # Methods are evaluated with exactly the scoring stage's harness settings (smoothing, quantiles,
        # metric region, bins, heatmaps), so every row of the results table comes from the same protocol.
        scoring_args = namespace_to_dict(config.scoring.model).get("init_args", {})
        shared = {k: scoring_args[k] for k in harness_arguments() if k in scoring_args}
        model.setdefault("init_args", {}).update(shared)
    data = data_location(namespace_to_dict(config.data))
    if stage.startswith(f"{METHOD_STAGE_PREFIX}.") and init_args.get("input_size") is not None:
        # A method at its own input size gets its images resized from the originals to that size; masks and
        # metrics stay at the run's evaluation size (data.image_size).
        data.setdefault("init_args", {})["model_input_size"] = init_args["input_size"]
    trainer = {**trainer, **namespace_to_dict(config.trainer or {})}
    return {
        "seed_everything": config.seed_everything,
        "trainer": trainer,
        "model": model,
        "data": data,
    }


def _lookup(config: Namespace, key: str) -> Any:
    """The value of a dotted experiment key (through nested sections and plain dicts such as ``<stage>.trainer``),
    or None."""
    value: Any = namespace_to_dict(config)
    for part in key.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _stage_digest(stage: str, stage_config: dict[str, Any], upstream: dict[str, str | None]) -> str:
    hashed = copy.deepcopy(stage_config)
    for key in PRESENTATION_TRAINER_KEYS:
        hashed["trainer"].pop(key, None)
    hashed["trainer"]["callbacks"] = [
        callback for callback in hashed["trainer"].get("callbacks") or [] if not _is_presentation(callback)
    ]
    init_args = hashed["model"].setdefault("init_args", {})
    for key in (*OUTPUT_ARGUMENTS, *upstream):
        init_args.pop(key, None)
    payload = json.dumps({"stage": stage, "config": hashed, "upstream": upstream}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _is_presentation(callback: Any) -> bool:
    """Whether a callback config (``{class_path, init_args}``, or a class path) only displays or logs."""
    class_path = callback.get("class_path", "") if isinstance(callback, dict) else str(callback)
    return class_path.rpartition(".")[2] in PRESENTATION_CALLBACKS


def _find_stage_layout(experiment: Experiment, stage: str, digest: str) -> StageLayout:
    """This run's folder for ``stage``, or a finished identical stage of a run listed in ``reuse``."""
    for other in experiment.reuse:
        done = read_json_or_none(other.stage(stage).done)
        if done and done.get("hash") == digest:
            return other.stage(stage)
    return experiment.layout.stage(stage)


def namespace_to_dict(value: Any) -> Any:
    """A parsed jsonargparse ``Namespace`` (nested) as plain dicts and lists."""
    if isinstance(value, Namespace):
        return {key: namespace_to_dict(val) for key, val in vars(value).items()}
    if isinstance(value, dict):
        return {k: namespace_to_dict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [namespace_to_dict(v) for v in value]
    return value
