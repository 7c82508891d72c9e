"""Run orchestration: an experiment config -> planned stages -> run, skipped or resumed, in one run folder.

- :mod:`lsgs.run.experiment`: the ``lsgs pipeline`` parser (experiment YAML + overrides -> ``Namespace``).
- :mod:`lsgs.run.plan`: every active stage's LightningCLI config, hash and folder (nothing runs).
- :mod:`lsgs.run.runner`: runs, skips or resumes the planned stages; ``done.json`` marks a finished stage.
- :mod:`lsgs.run.loggers`: CSV, W&B and TensorBoard loggers of a stage.

File names come from :mod:`lsgs.layout`; stages are built by :mod:`lsgs.stage_cli`.
"""

from lsgs.run.experiment import build_parser, parse_experiment
from lsgs.run.plan import Experiment, StagePlan, plan_experiment
from lsgs.run.runner import is_global_zero, open_run_folder, run_experiment

__all__ = [
    "Experiment",
    "StagePlan",
    "build_parser",
    "is_global_zero",
    "open_run_folder",
    "parse_experiment",
    "plan_experiment",
    "run_experiment",
]
