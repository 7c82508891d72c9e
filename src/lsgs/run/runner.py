"""The stage runner: run, skip or resume every planned stage of an experiment, in order.

For every stage the runner fills in what depends on this run (upstream checkpoint paths, output folder, loggers,
callbacks), instantiates the stage through LightningCLI (``lsgs.stage_cli``), saves its config as
``<stage>/config.yaml`` (re-runnable alone with ``lsgs fit -c ...``) and runs it. The saved config names every path
inside the run relative to the stage folder (``lsgs.layout.store_paths``), so the run folder can be moved or copied.
Stages hand over through checkpoints only. ``done.json``, written last and atomically, marks a finished stage; an
unfinished stage with the same hash resumes from ``checkpoints/last.ckpt``.

An evaluation stage whose data has no labelled test set (``lsgs.contracts.has_test_set_of``: normal images only)
calibrates its thresholds on the validation normals instead of testing
(``AnomalyMapModule.calibrate_without_test_set``), so the run still serves ``lsgs detect``.
"""

from __future__ import annotations

import copy
import shutil
import time
import uuid
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.plugins import CheckpointIO

from lsgs.classpath import import_class
from lsgs.contracts import has_test_set_of
from lsgs.errors import ConfigError
from lsgs.io import atomic_write_json, atomic_write_text, read_json, read_json_or_none, remove_partial_writes
from lsgs.layout import LAYOUT_VERSION, METHOD_STAGE_PREFIX, RunLayout, store_paths
from lsgs.machine import cpu_name
from lsgs.run.experiment import ALL_METHODS, STAGE_NAMES
from lsgs.run.loggers import finish_loggers, stage_loggers
from lsgs.run.plan import Experiment, StagePlan
from lsgs.run_record import layout_mismatch, read_run_record
from lsgs.stage_cli import instantiate_stage


def is_global_zero() -> bool:
    """True on the process that writes run-level files (rank 0, or the only process)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def run_experiment(experiment: Experiment, only: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Run (or skip, or resume) every active stage in order; return the scoring results when scoring ran."""
    unknown = set(only or ()) - {*STAGE_NAMES, ALL_METHODS}
    if unknown:
        raise ConfigError(f"--stages has unknown stage(s) {sorted(unknown)}; valid: {[*STAGE_NAMES, ALL_METHODS]}")
    run_info = open_run_folder(experiment.layout)
    requested = set(only or experiment.plans)
    if ALL_METHODS in requested:
        requested |= {key for key in experiment.plans if key.startswith(f"{METHOD_STAGE_PREFIX}.")}
    for stage, plan in experiment.plans.items():
        if plan.is_done():
            print(f"[lsgs] {stage}: finished earlier with the same config ({plan.folder}), skipping", flush=True)
            continue
        if stage not in requested:
            needed_later = any(stage in p.inputs.values() for s, p in experiment.plans.items() if s in requested)
            if needed_later:
                raise ConfigError(
                    f"stage '{stage}' is needed by the requested stages but has not finished with this config; "
                    f"run it too (add it to --stages)"
                )
            continue
        _run_stage(experiment, plan, run_info)
    scoring = experiment.plans.get("scoring")
    if scoring is not None and scoring.is_done():
        results = read_json(scoring.layout.results_json, "scoring results")
        _publish_results(experiment, scoring)
        return results
    return None


def open_run_folder(layout: RunLayout) -> dict[str, Any]:
    """Create the run folder (or check an existing one) and return ``run.json``: a run id kept across re-runs
    (resumed stages log into the same W&B group) and the layout version.

    A folder made by an lsgs with another layout version (older ones wrote ``run.json`` without one) whose stages
    exist cannot resume, because its stage hashes and paths mean something else: one ``ConfigError`` line says to
    start a new run. No ``run.json`` means a new run: under DDP the other ranks may create stage folders before
    rank 0 writes it (they list the folders before reading it, so they never see rank 0's new folders beside an
    old record).
    """
    layout.root.mkdir(parents=True, exist_ok=True)
    problem = layout_mismatch(layout)
    if problem:
        raise ConfigError(problem)
    info = read_run_record(layout)
    version = info.get("layout_version") if info is not None else None
    if version != LAYOUT_VERSION:
        info = {
            "run_id": uuid.uuid4().hex[:8],
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "layout_version": LAYOUT_VERSION,
        }
        if is_global_zero():
            atomic_write_json(layout.run_record, info)
    return info


def _run_stage(experiment: Experiment, plan: StagePlan, run_info: dict[str, Any]) -> None:
    stage, layout = plan.spec.name, plan.layout
    recorded = read_json_or_none(layout.stage_record)
    if recorded is not None and recorded.get("hash") != plan.digest:
        print(f"[lsgs] {stage}: config changed since the last run, discarding {layout.folder}", flush=True)
        if is_global_zero():
            shutil.rmtree(layout.folder, ignore_errors=True)
    layout.folder.mkdir(parents=True, exist_ok=True)
    config = _inject_run_settings(experiment, plan, run_info)
    last = layout.last_checkpoint
    resume = plan.spec.trainer_fn in ("fit", "fit_test") and last.is_file()
    if is_global_zero():
        # What a run killed while saving left beside last.ckpt (which the atomic writer kept whole).
        remove_partial_writes(layout.checkpoints_dir)
    print(f"[lsgs] {stage}: {'resuming from ' + str(last) if resume else 'starting'} ({layout.folder})", flush=True)
    cli = instantiate_stage(config)
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    if trainer.is_global_zero:
        atomic_write_json(layout.stage_record, {"stage": stage, "hash": plan.digest})
        atomic_write_text(layout.config, _stage_config_text(experiment, plan, cli))
    started = time.time()
    if plan.spec.trainer_fn in ("fit", "fit_test"):
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(last) if resume else None)
    if plan.spec.trainer_fn == "fit":
        trainer.save_checkpoint(plan.output_path, weights_only=True)
    elif plan.spec.trainer_fn == "predict":
        trainer.predict(model, datamodule=datamodule, return_predictions=False)
    elif has_test_set_of(datamodule):
        trainer.test(model, datamodule=datamodule)
    else:
        print(f"[lsgs] {stage}: the data has no labelled test set; calibrating on the validation normals only",
              flush=True)  # fmt: skip
        model.calibrate_without_test_set(trainer, datamodule)
    summary = {k: _to_float(v) for k, v in trainer.callback_metrics.items()}
    summary.update(getattr(model, "stage_summary", lambda: {})())
    if trainer.is_global_zero:
        if not plan.output_path.is_file():
            raise RuntimeError(f"stage '{stage}' finished without writing {plan.output_path}")
        atomic_write_json(
            layout.done,
            {
                "stage": stage,
                "hash": plan.digest,
                "seconds": round(time.time() - started, 2),
                "output": plan.output_path.name,
                "metrics": summary,
                "environment": compute_environment(trainer.world_size),
            },
        )
    trainer.strategy.barrier("lsgs-stage-done")
    finish_loggers(trainer)


def _stage_config_text(experiment: Experiment, plan: StagePlan, cli: Any) -> str:
    """The stage's config as ``config.yaml`` holds it: what the stage ran with, every path inside the run (or a
    run it reuses stages of) written relative to the stage folder."""
    import yaml

    config = yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))
    roots = [experiment.layout.root, *(run.root for run in experiment.reuse)]
    stored = store_paths(config, plan.folder, roots)
    return yaml.safe_dump(stored, sort_keys=False, default_flow_style=False, allow_unicode=True)


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
    layout, stage = plan.layout, plan.spec.name
    init_args = config["model"].setdefault("init_args", {})
    for argument, source in plan.inputs.items():
        init_args[argument] = str(experiment.plans[source].output_path) if source else None
    if stage in ("aggregator", "scoring") or stage.startswith(f"{METHOD_STAGE_PREFIX}."):
        init_args["output_dir"] = str(layout.folder)
    trainer = config["trainer"]
    trainer["default_root_dir"] = str(layout.folder)
    trainer.setdefault("num_sanity_val_steps", 0)
    trainer["logger"] = stage_loggers(experiment.config, stage, plan.digest, layout.folder, run_info["run_id"])
    callbacks = list(trainer.get("callbacks") or [])
    if plan.spec.trainer_fn in ("fit", "fit_test"):
        callbacks = [
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                # One rolling checkpoint (checkpoints/last.ckpt), rewritten (atomically) at the end of every epoch.
                "init_args": {
                    "dirpath": str(layout.checkpoints_dir),
                    "filename": layout.last_checkpoint.stem,
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
            _, epoch, batch, *mode = fault.split(":")
            fault_args = {"epoch": int(epoch), "batch": int(batch), "mode": "".join(mode) or "KILL"}
            callbacks.append({"class_path": "lsgs.callbacks.FaultInjection", "init_args": fault_args})
        trainer["plugins"] = _with_atomic_checkpoints(trainer.get("plugins"))
    else:
        trainer["enable_checkpointing"] = False
    trainer["callbacks"] = callbacks
    return config


def _with_atomic_checkpoints(plugins: Any) -> list[Any]:
    """The trainer's ``plugins`` plus ``lsgs.callbacks.AtomicCheckpointIO`` (checkpoints written atomically in their
    own folder), unless the config names a checkpoint writer of its own."""
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list | tuple) else [plugins]
    for plugin in plugins:
        class_path = plugin.get("class_path") if isinstance(plugin, dict) else None
        if class_path and issubclass(import_class(class_path), CheckpointIO):
            return plugins
    return [*plugins, {"class_path": "lsgs.callbacks.AtomicCheckpointIO"}]


def _to_float(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _publish_results(experiment: Experiment, scoring: StagePlan) -> None:
    """Copy the scoring results to the top of the run folder (rank 0)."""
    if not is_global_zero():
        return
    for source, target in zip(scoring.layout.results_files, experiment.layout.results_files, strict=True):
        if source.is_file():
            atomic_write_text(target, source.read_text())
