"""``lsgs report``: the run summary ``summary.{md,csv}`` (one row per evaluated method) and ``report.html``.

A run folder holds LSGS's scoring outputs, the other methods' (``methods/<name>/``) and, after ``lsgs ablate``,
the ablation variants'; the registry (:func:`lsgs.methods.registry.evaluated_methods`) lists them. All of them
were produced by the same evaluation harness on the same test set, so they compare directly.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from lsgs.errors import ConfigError
from lsgs.io import atomic_write_text, read_json
from lsgs.layout import RunLayout
from lsgs.methods.registry import evaluated_methods
from lsgs.reports.html import render_html
from lsgs.reports.tables import NO_TEST_SET, comparison_tables, has_test_set

SUMMARY_TITLE = "All methods on the same test set (values in %; mean over categories when there are several)"


def write_summary(run_dir: str | Path) -> str | None:
    """Write ``summary.md``/``summary.csv`` (one row per method) and ``report.html``; return the markdown, or
    None when the run holds no finished evaluation."""
    layout = RunLayout.of(run_dir)
    methods = evaluated_methods(layout.root)
    if not methods:
        return None
    named = [(m.label, read_json(m.stage.results_json, "results")) for m in methods]
    markdown, table = comparison_tables(named, kinds={m.label: m.kind for m in methods})
    markdown = f"{SUMMARY_TITLE}\n\n{markdown}"
    untested = [label for label, results in named if not has_test_set(results)]
    if untested:
        markdown += (
            f"\n{NO_TEST_SET.capitalize()} for {', '.join(untested)} (the data holds normal images only): no "
            "metrics; the thresholds were calibrated on the validation normals, so the run serves `lsgs detect`.\n"
        )
    atomic_write_text(layout.summary_md, markdown)
    atomic_write_text(layout.summary_csv, table)
    atomic_write_text(layout.report_html, render_html(layout.root, methods, named, markdown))
    return markdown


def main(argv: Sequence[str] | None = None) -> None:
    """``lsgs report --run_dir RUN``: (re)write summary.md/csv and report.html of a run."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="lsgs report", description=__doc__)
    parser.add_argument("--run_dir", type=str, required=True, help="a pipeline run folder")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    markdown = write_summary(args.run_dir)
    if markdown is None:
        raise ConfigError(f"--run_dir '{args.run_dir}' holds no finished evaluation (no */results.json)")
    print(markdown)
    print(f"report: {RunLayout.of(args.run_dir).report_html}")
