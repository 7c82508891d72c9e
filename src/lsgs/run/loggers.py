"""Experiment trackers of a run: the CSV log every stage writes, plus W&B or TensorBoard.

W&B is offline unless ``WANDB_MODE=online`` and off with ``WANDB_MODE=disabled``; every W&B run of one pipeline
run shares the group ``<experiment name>-<run id>`` (the run id is kept in ``run.json`` across re-runs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lsgs.layout import StageLayout


def wandb_enabled(logger_choice: str) -> bool:
    """W&B is used when the experiment asks for it and ``WANDB_MODE`` does not disable it."""
    return logger_choice == "wandb" and os.environ.get("WANDB_MODE", "").lower() != "disabled"


def wandb_offline() -> bool:
    """Offline unless the user set ``WANDB_MODE=online``."""
    return os.environ.get("WANDB_MODE", "offline").lower() != "online"


def wandb_group(experiment_name: str, run_id: str) -> str:
    return f"{experiment_name}-{run_id}"


def stage_loggers(config: Any, stage: str, digest: str, folder: Path, run_id: str) -> list[dict[str, Any]]:
    """Logger configs (``class_path``/``init_args``) of one stage of the experiment ``config``."""
    loggers: list[dict[str, Any]] = [
        {
            "class_path": "lightning.pytorch.loggers.CSVLogger",
            "init_args": {"save_dir": str(folder), "name": StageLayout.LOGS, "version": ""},
        }
    ]
    if wandb_enabled(config.logger):
        group = wandb_group(config.name, run_id)
        loggers.append(
            {
                "class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {
                    "project": config.wandb.project,
                    "entity": config.wandb.entity,
                    "tags": list(config.wandb.tags),
                    "group": group,
                    "name": stage,
                    "job_type": stage,
                    "id": f"{group}-{stage}-{digest[:6]}",
                    "save_dir": str(folder),
                    "offline": wandb_offline(),
                    "resume": "allow",
                    "log_model": False,
                },
            }
        )
    elif config.logger == "tensorboard":
        loggers.append(
            {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(folder), "name": StageLayout.TENSORBOARD, "version": ""},
            }
        )
    return loggers


def finish_loggers(trainer: Any) -> None:
    """Close the W&B run of a finished stage, so the next stage starts its own."""
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            import wandb

            if wandb.run is not None:
                wandb.finish()


def log_table_to_wandb(config: Any, run_id: str, name: str, folder: Path, table_csv: str) -> None:
    """A CSV table as a W&B table, in a small run ``name`` of the experiment's group (nothing when W&B is off)."""
    if not wandb_enabled(config.logger):
        return
    import csv
    import io

    import wandb

    rows = list(csv.reader(io.StringIO(table_csv)))
    data = [[_number(cell) for cell in row] for row in rows[1:]]
    run = wandb.init(
        project=config.wandb.project, entity=config.wandb.entity, group=wandb_group(config.name, run_id),
        name=name, job_type=name.split("-")[0], dir=str(folder),
        mode="offline" if wandb_offline() else "online",
    )  # fmt: skip
    run.log({name.replace("-", "/", 1): wandb.Table(columns=rows[0], data=data)})
    run.finish()


def _number(cell: str) -> float | str:
    try:
        return float(cell)
    except ValueError:
        return cell
