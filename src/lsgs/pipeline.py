"""``lsgs pipeline``: parse an experiment, plan its stages, run them, publish the results and the report."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from lsgs.distributed import process_group_teardown
from lsgs.io import atomic_write_text
from lsgs.run import is_global_zero, open_run_folder, parse_experiment, plan_experiment, run_experiment
from lsgs.run.experiment import experiment_record


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """``lsgs pipeline``: parse, plan, run, print the results table and the run folder; return the results.

    Under DDP (torchrun or Lightning-launched) every rank ends with a barrier and destroys the process group,
    also when a stage fails (then without the barrier), so no rank aborts at interpreter exit.
    """
    from lsgs.reports.summary import write_summary

    parser, config = parse_experiment(sys.argv[1:] if argv is None else argv)
    experiment = plan_experiment(config)
    layout = experiment.layout
    open_run_folder(layout)  # an unusable old run folder fails here, before anything is written into it
    if is_global_zero():
        atomic_write_text(layout.experiment, experiment_record(parser, config))
    with process_group_teardown():
        results = run_experiment(experiment, only=config.stages)
    if not is_global_zero():
        return results
    summary = write_summary(layout.root)
    if layout.results_md.is_file():
        print()
        print(layout.results_md.read_text())
    if summary is not None:
        print(summary)
        print(f"report: {layout.report_html}")
    print(f"run directory: {layout.root}")
    return results
