"""The stage runner: one experiment config -> VQ-VAE -> aggregation -> fine-tune -> transformer -> scoring.

An experiment config (``experiments/*.yaml``) holds a shared ``data`` section, a shared ``trainer`` section, and one
section per stage with that stage's ``model`` (``class_path``/``init_args``) and ``trainer`` keys. For every stage
the runner resolves one ordinary LightningCLI config (seed, trainer, model, data), instantiates it through
LightningCLI, saves it as ``<run_dir>/<stage>/config.yaml`` (re-runnable alone with ``lsgs fit -c ...``) and runs
the stage. Stages hand over through checkpoints only; the runner injects the upstream checkpoint paths.

Resumability: a stage's *hash* covers its resolved config (minus presentation settings such as loggers and
progress bars) and the hashes of the stages it reads from. ``done.json``, written last and atomically, marks a
finished stage; re-running the same command skips it. An unfinished stage with the same hash resumes from
``checkpoints/last.ckpt``; a stage whose hash changed is discarded and re-run, and so are the stages after it,
because their hashes include its hash.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from lightning.pytorch import LightningDataModule, LightningModule

from lsgs.distributed import process_group_teardown
from lsgs.errors import ConfigError
from lsgs.io import atomic_write_json, atomic_write_text
from lsgs.machine import cpu_name

STAGE_NAMES = ("vqvae", "aggregator", "finetune", "transformer", "scoring")
BASELINE_NAMES = ("intensity", "pixel_gaussian", "ae", "vae")
DONE_FILE = "done.json"
STAGE_FILE = "stage.json"
# Settings that change how a run is displayed, not what it computes: excluded from stage hashes.
PRESENTATION_TRAINER_KEYS = (
    "logger",
    "callbacks",
    "enable_progress_bar",
    "enable_model_summary",
    "default_root_dir",
    "log_every_n_steps",
)
OUTPUT_ARGUMENTS = ("output_dir",)


@dataclass(frozen=True)
class StageSpec:
    """What a stage runs and what it leaves behind.

    Attributes:
        name: stage name (also its folder in the run directory).
        trainer_fn: the ``Trainer`` method that runs it.
        output: the file a finished stage must have produced.
    """

    name: str
    trainer_fn: Literal["fit", "predict", "test", "fit_test"]
    output: str


STAGE_SPECS = {
    "vqvae": StageSpec("vqvae", "fit", "vqvae.ckpt"),
    "aggregator": StageSpec("aggregator", "predict", "aggregated.ckpt"),
    "finetune": StageSpec("finetune", "fit", "vqvae_ft.ckpt"),
    "transformer": StageSpec("transformer", "fit", "transformer.ckpt"),
    "scoring": StageSpec("scoring", "test", "results.json"),
}


def build_parser() -> ArgumentParser:
    """The ``lsgs pipeline`` argument parser (also reads experiment YAML files via ``--config``)."""
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
        help=f"run only these stages (of {[*STAGE_NAMES, 'baselines']}); the others must be finished when "
        "needed",
    )
    parser.add_argument(
        "--run_baselines",
        type=bool,
        default=True,
        help="also evaluate the configured baselines (baselines.*) with the same data and metrics",
    )
    parser.add_argument(
        "--trainer",
        type=dict[str, Any],
        default={},
        help="Trainer arguments for EVERY stage; they take precedence over each stage's own trainer keys",
    )
    parser.add_subclass_arguments(LightningDataModule, "data", help="the data module shared by all stages")
    for stage in (*STAGE_NAMES, *(f"baselines.{name}" for name in BASELINE_NAMES)):
        parser.add_subclass_arguments(LightningModule, f"{stage}.model", required=False)
        parser.add_argument(f"--{stage}.trainer", type=dict[str, Any], default={})
    parser.add_argument(
        "--fault_injection", type=str | None, default=None, help="testing only: STAGE:EPOCH:BATCH[:KILL|TERM]"
    )
    return parser


def parse_experiment(argv: Sequence[str]) -> tuple[ArgumentParser, Namespace]:
    """Parse ``lsgs pipeline`` arguments; a bad key or value becomes one ``ConfigError`` line."""
    from jsonargparse import ArgumentError

    parser = build_parser()
    try:
        return parser, parser.parse_args(list(argv))
    except ArgumentError as error:
        raise ConfigError(condense_parser_error(str(error))) from None


def condense_parser_error(text: str) -> str:
    """jsonargparse's multi-line validation report -> the one line that says what is wrong."""
    import inspect
    import re

    unknown = re.search(r"Option '([^']+)' is not accepted", text)
    owner = re.search(r"Problem with given class_path '([^']+)'", text)
    key = re.search(r'Parser key "([^"]+)"', text)
    where = key.group(1) if key else "config"
    if unknown and owner:
        try:
            cls = import_class(owner.group(1))
            names = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "args", "kwargs")]
            valid = f"; valid: {', '.join(names)}"
        except Exception:  # the class itself may be the problem; the message is still useful without the list
            valid = ""
        return f"{where}: {owner.group(1)} has no argument '{unknown.group(1)}'{valid}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    useful = [
        line for line in lines
        if not line.startswith(("Subtypes:", "Errors:", "Given value", "- Expected a <class 'NoneType'>",
                                "Does not validate against any of the Union subtypes"))
    ]
    return " ".join(useful) if useful else text


def validate_stage_config(stage: str, config: dict[str, Any]) -> None:
    """Check a stage's LightningCLI config (trainer keys, model and data arguments and their types) up front,
    so a typo fails before any stage trains, not when its stage comes."""
    from jsonargparse import ArgumentError
    from lightning.pytorch import Trainer
    from lightning.pytorch.cli import LightningArgumentParser

    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(Trainer, "trainer")
    parser.add_lightning_class_args(LightningModule, "model", subclass_mode=True)
    parser.add_lightning_class_args(LightningDataModule, "data", subclass_mode=True)
    parser.add_argument("--seed_everything", type=bool | int, default=True)
    try:
        parser.parse_object(config)
    except ArgumentError as error:
        raise ConfigError(f"stage '{stage}': {condense_parser_error(str(error))}") from None


@dataclass
class StagePlan:
    """One stage, resolved: its LightningCLI config, its hash and its folder."""

    spec: StageSpec
    config: dict[str, Any]
    inputs: dict[str, str | None]  # model argument -> upstream stage (None: explicitly no input)
    digest: str
    folder: Path

    @property
    def output_path(self) -> Path:
        return self.folder / self.spec.output

    def is_done(self) -> bool:
        done = _read_json(self.folder / DONE_FILE)
        return bool(done) and done.get("hash") == self.digest and self.output_path.is_file()


@dataclass
class Experiment:
    """A parsed experiment config and the stage plans derived from it."""

    config: Namespace
    run_dir: Path
    plans: dict[str, StagePlan] = field(default_factory=dict)
    reuse_dirs: list[Path] = field(default_factory=list)

    @property
    def attention(self) -> str:
        model = self.config.transformer.model
        return str(model.init_args.get("attention", "global")) if model is not None else "none"

    def active_stages(self) -> list[str]:
        """Stage keys in run order: the LSGS stages, then ``baselines.<name>`` for each configured baseline."""
        stages = ["vqvae"]
        if self.config.aggregate:
            stages += ["aggregator", "finetune"]
        if self.attention != "none":
            stages.append("transformer")
        stages.append("scoring")
        if self.config.run_baselines:
            stages += [
                f"baselines.{n}" for n in BASELINE_NAMES if self.config[f"baselines.{n}.model"] is not None
            ]
        return stages

    def baseline_plans(self) -> list[StagePlan]:
        return [plan for key, plan in self.plans.items() if key.startswith("baselines.")]


def stage_inputs(stage: str, aggregate: bool, attention: str) -> dict[str, str | None]:
    """Model arguments the runner fills with upstream checkpoints."""
    if stage.startswith("baselines."):
        return {}
    final_vqvae = "finetune" if aggregate else "vqvae"
    return {
        "vqvae": {},
        "aggregator": {"vqvae_checkpoint": "vqvae"},
        "finetune": {"init_from": "aggregator"},
        "transformer": {"vqvae_checkpoint": final_vqvae},
        "scoring": {
            "vqvae_checkpoint": final_vqvae,
            "transformer_checkpoint": None if attention == "none" else "transformer",
        },
    }[stage]


def plan_experiment(config: Namespace, reuse_dirs: Sequence[str | Path] = ()) -> Experiment:
    """Resolve every active stage's config and hash (nothing runs, nothing is written)."""
    # Absolute paths: the saved stage configs then work from any working directory (hashes ignore paths).
    run_dir = Path(config.run_dir or Path("runs") / config.name).resolve()
    experiment = Experiment(
        config=config, run_dir=run_dir, reuse_dirs=[Path(p).resolve() for p in reuse_dirs]
    )
    for stage in experiment.active_stages():
        section = config[stage]
        if section.model is None:
            raise ConfigError(f"stage '{stage}' has no model: set {stage}.model in the experiment config")
        inputs = stage_inputs(stage, config.aggregate, experiment.attention)
        stage_config = _stage_config(config, stage)
        validate_stage_config(stage, stage_config)
        upstream = {arg: experiment.plans[src].digest if src else None for arg, src in inputs.items()}
        digest = _stage_digest(stage, stage_config, upstream)
        folder = _find_stage_folder(experiment, stage, digest)
        experiment.plans[stage] = StagePlan(_spec(stage, stage_config), stage_config, inputs, digest, folder)
    return experiment


def _spec(stage: str, stage_config: dict[str, Any]) -> StageSpec:
    if not stage.startswith("baselines."):
        return STAGE_SPECS[stage]
    # A baseline that learns (AE, VAE) is fitted, then tested, in one stage; the others are only tested.
    trainable = getattr(import_class(stage_config["model"]["class_path"]), "requires_fit", False)
    return StageSpec(stage, "fit_test" if trainable else "test", "results.json")


def harness_arguments() -> tuple[str, ...]:
    """Evaluation settings of ``AnomalyMapModule`` that every evaluated method must share."""
    import inspect

    from lsgs.modules.scoring import AnomalyMapModule

    names = inspect.signature(AnomalyMapModule.__init__).parameters
    return tuple(n for n in names if n not in ("self", "output_dir", "calibration"))


def _stage_config(config: Namespace, stage: str) -> dict[str, Any]:
    """The LightningCLI config of ``stage`` before run-specific injections (inputs, folders, loggers)."""
    section = config[stage]
    model = _namespace_to_dict(section.model)
    if stage.startswith("baselines.") and config.scoring.model is not None:
        # Baselines are evaluated with exactly the scoring stage's harness settings (smoothing, quantiles,
        # metric region, bins, heatmaps), so every row of the results table comes from the same protocol.
        scoring_args = _namespace_to_dict(config.scoring.model).get("init_args", {})
        shared = {k: scoring_args[k] for k in harness_arguments() if k in scoring_args}
        model.setdefault("init_args", {}).update(shared)
    trainer = {**_namespace_to_dict(section.trainer or {}), **_namespace_to_dict(config.trainer or {})}
    return {
        "seed_everything": config.seed_everything,
        "trainer": trainer,
        "model": model,
        "data": _namespace_to_dict(config.data),
    }


def _stage_digest(stage: str, stage_config: dict[str, Any], upstream: dict[str, str | None]) -> str:
    hashed = copy.deepcopy(stage_config)
    for key in PRESENTATION_TRAINER_KEYS:
        hashed["trainer"].pop(key, None)
    init_args = hashed["model"].setdefault("init_args", {})
    for key in (*OUTPUT_ARGUMENTS, *upstream):
        init_args.pop(key, None)
    payload = json.dumps(
        {"stage": stage, "config": hashed, "upstream": upstream}, sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _find_stage_folder(experiment: Experiment, stage: str, digest: str) -> Path:
    """This run's folder for ``stage``, or a finished identical stage of a run listed in ``reuse_dirs``."""
    relative = Path(*stage.split("."))  # baselines.ae -> baselines/ae
    for other in experiment.reuse_dirs:
        done = _read_json(other / relative / DONE_FILE)
        if done and done.get("hash") == digest:
            return other / relative
    return experiment.run_dir / relative


def _namespace_to_dict(value: Any) -> Any:
    if isinstance(value, Namespace):
        return {key: _namespace_to_dict(val) for key, val in vars(value).items()}
    if isinstance(value, dict):
        return {k: _namespace_to_dict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_namespace_to_dict(v) for v in value]
    return value


def import_class(class_path: str) -> type:
    """The class named by a ``class_path`` (as in the YAML configs)."""
    import importlib

    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------------------------------- running


def run_experiment(experiment: Experiment, only: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Run (or skip, or resume) every active stage in order; return the scoring results when scoring ran."""
    run_dir = experiment.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    run_info = _run_info(run_dir)
    unknown = set(only or ()) - {*STAGE_NAMES, "baselines"}
    if unknown:
        raise ConfigError(
            f"--stages has unknown stage(s) {sorted(unknown)}; valid: {[*STAGE_NAMES, 'baselines']}"
        )
    requested = set(only or experiment.plans)
    if "baselines" in requested:
        requested |= {key for key in experiment.plans if key.startswith("baselines.")}
    for stage, plan in experiment.plans.items():
        if plan.is_done():
            print(
                f"[lsgs] {stage}: finished earlier with the same config ({plan.folder}), skipping", flush=True
            )
            continue
        if stage not in requested:
            needed_later = any(
                stage in p.inputs.values() for s, p in experiment.plans.items() if s in requested
            )
            if needed_later:
                raise ConfigError(
                    f"stage '{stage}' is needed by the requested stages but has not finished with this config; "
                    f"run it too (add it to --stages)"
                )
            continue
        _run_stage(experiment, plan, run_info)
    scoring = experiment.plans.get("scoring")
    if scoring is not None and scoring.is_done():
        results = json.loads(scoring.output_path.read_text())
        _publish_results(experiment, scoring)
        return results
    return None


def _publish_summary(run_dir: Path) -> str | None:
    """summary.md/csv and report.html over every method evaluated in this run (rank 0)."""
    if not _is_global_zero_env():
        return None
    from lsgs.report import write_summary

    return write_summary(run_dir)


def _run_info(run_dir: Path) -> dict[str, Any]:
    """A run id kept across re-runs, so resumed stages log into the same W&B group."""
    path = run_dir / "run.json"
    info = _read_json(path)
    if info is None:
        info = {"run_id": uuid.uuid4().hex[:8], "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        if _is_global_zero_env():
            atomic_write_json(path, info)
    return info


def _is_global_zero_env() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _run_stage(experiment: Experiment, plan: StagePlan, run_info: dict[str, Any]) -> None:
    from lsgs.cli import instantiate_stage

    stage, folder = plan.spec.name, plan.folder
    recorded = _read_json(folder / STAGE_FILE)
    if recorded is not None and recorded.get("hash") != plan.digest:
        print(f"[lsgs] {stage}: config changed since the last run, discarding {folder}", flush=True)
        if _is_global_zero_env():
            shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    config = _inject_run_settings(experiment, plan, run_info)
    last = folder / "checkpoints" / "last.ckpt"
    resume = plan.spec.trainer_fn in ("fit", "fit_test") and last.is_file()
    print(f"[lsgs] {stage}: {'resuming from ' + str(last) if resume else 'starting'} ({folder})", flush=True)
    cli = instantiate_stage(config)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    if trainer.is_global_zero:
        atomic_write_json(folder / STAGE_FILE, {"stage": stage, "hash": plan.digest})
        atomic_write_text(folder / "config.yaml", cli.parser.dump(cli.config, skip_none=False))
    started = time.time()
    if plan.spec.trainer_fn in ("fit", "fit_test"):
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(last) if resume else None)
    if plan.spec.trainer_fn == "fit":
        trainer.save_checkpoint(plan.output_path, weights_only=True)
    elif plan.spec.trainer_fn == "predict":
        trainer.predict(model, datamodule=datamodule, return_predictions=False)
    else:
        trainer.test(model, datamodule=datamodule)
    summary = {k: _to_float(v) for k, v in trainer.callback_metrics.items()}
    summary.update(getattr(model, "stage_summary", lambda: {})())
    if trainer.is_global_zero:
        if not plan.output_path.is_file():
            raise RuntimeError(f"stage '{stage}' finished without writing {plan.output_path}")
        atomic_write_json(
            folder / DONE_FILE,
            {
                "stage": stage,
                "hash": plan.digest,
                "seconds": round(time.time() - started, 2),
                "output": plan.spec.output,
                "metrics": summary,
                "environment": compute_environment(trainer.world_size),
            },
        )
    trainer.strategy.barrier("lsgs-stage-done")
    _finish_loggers(trainer)


def compute_environment(world_size: int = 1) -> dict[str, Any]:
    """What a stage's numbers depend on besides its config and seed: CPU training is bit-for-bit repeatable only
    with the same thread count, process count, CPU kind and library versions (float sums are split and
    vectorised differently), so every ``done.json`` records them."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    versions = {}
    for package in ("torch", "lightning", "numpy", "faiss-cpu", "faiss-gpu"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return {
        "torch_threads": torch.get_num_threads(),
        "world_size": int(world_size),
        "cpu": cpu_name(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "versions": versions,
    }


def _inject_run_settings(experiment: Experiment, plan: StagePlan, run_info: dict[str, Any]) -> dict[str, Any]:
    """Fill in what depends on this run: upstream checkpoints, output folders, loggers, callbacks."""
    config = copy.deepcopy(plan.config)
    folder, stage = plan.folder, plan.spec.name
    init_args = config["model"].setdefault("init_args", {})
    for argument, source in plan.inputs.items():
        init_args[argument] = str(experiment.plans[source].output_path) if source else None
    if stage in ("aggregator", "scoring") or stage.startswith("baselines."):
        init_args["output_dir"] = str(folder)
    trainer = config["trainer"]
    trainer["default_root_dir"] = str(folder)
    trainer.setdefault("num_sanity_val_steps", 0)
    trainer["logger"] = _loggers(experiment, stage, plan.digest, folder, run_info)
    callbacks = list(trainer.get("callbacks") or [])
    if plan.spec.trainer_fn in ("fit", "fit_test"):
        callbacks = [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                # One rolling checkpoint named last.ckpt, rewritten (atomically) at the end of every epoch.
                "init_args": {
                    "dirpath": str(folder / "checkpoints"),
                    "filename": "last",
                    "save_top_k": 1,
                    "monitor": None,
                    "every_n_epochs": 1,
                    "enable_version_counter": False,
                },
            },
            {"class_path": "lsgs.callbacks.RNGStateCheckpoint"},
            *callbacks,
        ]
        callbacks.append(
            {
                "class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
                "init_args": {"logging_interval": "epoch"},
            }
        )
        fault = experiment.config.get("fault_injection")
        if fault and fault.split(":")[0] == stage:
            _, epoch, batch, *signal_name = fault.split(":")
            fault_args = {"epoch": int(epoch), "batch": int(batch), "signal_name": "".join(signal_name) or "KILL"}
            callbacks.append({"class_path": "lsgs.callbacks.FaultInjection", "init_args": fault_args})
    else:
        trainer["enable_checkpointing"] = False
    trainer["callbacks"] = callbacks
    return config


def _loggers(experiment: Experiment, stage: str, digest: str, folder: Path, run_info: dict[str, Any]) -> list:
    loggers: list[dict[str, Any]] = [
        {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(folder), "name": "logs", "version": ""},
        }
    ]
    choice = experiment.config.logger
    if choice == "wandb" and os.environ.get("WANDB_MODE", "").lower() != "disabled":
        group = f"{experiment.config.name}-{run_info['run_id']}"
        loggers.append(
            {
                "class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {
                    "project": experiment.config.wandb.project,
                    "entity": experiment.config.wandb.entity,
                    "tags": list(experiment.config.wandb.tags),
                    "group": group,
                    "name": stage,
                    "job_type": stage,
                    "id": f"{group}-{stage}-{digest[:6]}",
                    "save_dir": str(folder),
                    "offline": os.environ.get("WANDB_MODE", "offline").lower() != "online",
                    "resume": "allow",
                    "log_model": False,
                },
            }
        )
    elif choice == "tensorboard":
        loggers.append(
            {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(folder), "name": "tensorboard", "version": ""},
            }
        )
    return loggers


def _finish_loggers(trainer: Any) -> None:
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:
                wandb.finish()


def _to_float(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _publish_results(experiment: Experiment, scoring: StagePlan) -> None:
    """Copy the scoring results to the top of the run folder (rank 0)."""
    if not _is_global_zero_env():
        return
    for name in ("results.json", "results.csv", "results.md"):
        source = scoring.folder / name
        if source.is_file():
            atomic_write_text(experiment.run_dir / name, source.read_text())


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """``lsgs pipeline``: parse, plan, run, print the results table and the run folder.

    Under DDP (torchrun or Lightning-launched) every rank ends with a barrier and destroys the process group,
    also when a stage fails (then without the barrier), so no rank aborts at interpreter exit.
    """
    parser, config = parse_experiment(sys.argv[1:] if argv is None else argv)
    experiment = plan_experiment(config)
    if _is_global_zero_env():
        experiment.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(experiment.run_dir / "experiment.yaml", parser.dump(config, skip_none=False))
    with process_group_teardown():
        results = run_experiment(experiment, only=config.stages)
    summary = _publish_summary(experiment.run_dir)
    if _is_global_zero_env():
        table = experiment.run_dir / "results.md"
        if table.is_file():
            print()
            print(table.read_text())
        if summary is not None:
            print(summary)
            print(f"report: {experiment.run_dir / 'report.html'}")
        print(f"run directory: {experiment.run_dir}")
    return results
