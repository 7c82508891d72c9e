"""Moved: tables to :mod:`lsgs.reports.tables`, pictures to :mod:`lsgs.reports.figures`, the evaluation's file
writing to the evaluation harness. This module only re-exports them until every importer has switched
(issue 11, in progress); import from the new places.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lsgs.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from lsgs.reports.figures import heatmap_panel, log_image, log_table, plot_curves, save_png
from lsgs.reports.tables import (
    METRIC_COLUMNS,
    comparison_tables,
    csv_text,
    format_value,
    markdown_table,
    result_rows,
    results_tables,
)

__all__ = [
    "METRIC_COLUMNS",
    "RESULTS_FILES",
    "comparison_tables",
    "csv_text",
    "format_value",
    "heatmap_panel",
    "markdown_table",
    "plot_curves",
    "result_rows",
    "results_tables",
    "write_evaluation_outputs",
]
RESULTS_FILES = ("results.json", "results.csv", "results.md", "image_scores.csv", "calibration.json")


def write_evaluation_outputs(
    output_dir: Path,
    results: dict[str, Any],
    image_rows: list[dict[str, Any]],
    panels: list[dict[str, Any]],
    curves: dict[str, np.ndarray],
    calibration: dict[str, float],
    loggers: Sequence[Any] = (),
) -> None:
    """Write results.{json,csv,md}, image_scores.csv, calibration.json, heatmaps/*.png, curves/*.png."""
    output_dir = Path(output_dir)
    markdown, table = results_tables(results)
    atomic_write_text(output_dir / "results.md", markdown)
    atomic_write_text(output_dir / "results.csv", table)
    atomic_write_json(output_dir / "calibration.json", calibration)
    if image_rows:
        header = list(image_rows[0])
        atomic_write_text(
            output_dir / "image_scores.csv", csv_text(header, [[r[k] for k in header] for r in image_rows])
        )
    scale = 2.0 * float(calibration.get("val_threshold", 0.0)) or None
    for panel in panels:
        picture = heatmap_panel(panel, scale)
        name = f"{panel['category']}_{panel['index']:05d}.png"
        save_png(picture, output_dir / "heatmaps" / name)
        log_image(loggers, f"heatmaps/{panel['category']}", picture, step=None, caption=name)
    if curves:
        import io

        buffer = io.BytesIO()
        np.savez(buffer, **{k: np.asarray(v) for k, v in curves.items()})
        atomic_write_bytes(output_dir / "curves" / "curves.npz", buffer.getvalue())
        for kind, picture in plot_curves({results.get("method", "method"): curves}).items():
            save_png(picture, output_dir / "curves" / f"{kind}.png")
            log_image(loggers, f"curves/{kind}", picture, step=None)
    header = ["category", *(key for key, _ in METRIC_COLUMNS)]
    log_table(
        loggers,
        "results",
        header,
        [[name, *(values.get(k) for k in header[1:])] for name, values in result_rows(results)],
    )
    # Written last: a results.json on disk means every other output is complete.
    atomic_write_json(output_dir / "results.json", results)
