"""The files of one evaluation (rank 0 only), named by ``lsgs.layout.StageLayout``.

Written in this order: tables, calibration, image scores, heatmap panels, curves, the method's learned state
(when it has one), and ``results.json`` last, so a ``results.json`` on disk means every other output is complete.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lsgs.io import atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text
from lsgs.layout import StageLayout
from lsgs.reports.figures import heatmap_panel, log_image, log_table, plot_curves, save_png
from lsgs.reports.tables import METRIC_COLUMNS, csv_text, result_rows, results_tables


def write_evaluation_outputs(
    output_dir: str | Path,
    results: dict[str, Any],
    image_rows: list[dict[str, Any]],
    panels: list[dict[str, Any]],
    curves: dict[str, np.ndarray],
    calibration: dict[str, Any],
    loggers: Sequence[Any] = (),
    learned_state: dict[str, Any] | None = None,
) -> None:
    """Write every output of one evaluation into ``output_dir`` (see ``StageLayout`` for the names).

    Args:
        output_dir: the stage folder.
        results: the metrics and method facts (``results.json``, also rendered as ``results.{md,csv}``).
        image_rows: one dict per test image (``image_scores.csv``, columns in the first row's key order).
        panels: heatmap panels (``image``, ``mask``, ``map`` and pictures; ``category`` and ``index`` name them).
        curves: pooled pixel ROC/PR curves (``fpr``, ``tpr``, ``precision``, ``recall``).
        calibration: the thresholds set on the validation normals.
        loggers: the trainer's loggers (panels, curves and the results table are logged to them too).
        learned_state: a checkpoint of what the method learned during the evaluation (``load_method`` reads it
            back from ``StageLayout.last_checkpoint``), or None.
    """
    layout = StageLayout.of(output_dir)
    markdown, table = results_tables(results)
    atomic_write_text(layout.results_md, markdown)
    atomic_write_text(layout.results_csv, table)
    atomic_write_json(layout.calibration, calibration)
    if image_rows:
        header = list(image_rows[0])
        atomic_write_text(layout.image_scores, csv_text(header, [[r[k] for k in header] for r in image_rows]))
    scale = 2.0 * float(calibration.get("val_threshold", 0.0)) or None
    for panel in panels:
        picture = heatmap_panel(panel, scale)
        path = layout.heatmap(panel["category"], panel["index"])
        save_png(picture, path)
        # Logger keys mirror the folder names (heatmaps/<category>, curves/<kind>).
        log_image(loggers, f"{layout.heatmaps_dir.name}/{panel['category']}", picture, step=None, caption=path.name)
    if curves:
        buffer = io.BytesIO()
        np.savez(buffer, **{k: np.asarray(v) for k, v in curves.items()})
        atomic_write_bytes(layout.curves, buffer.getvalue())
        for kind, picture in plot_curves({results.get("method", "method"): curves}).items():
            save_png(picture, layout.curve_plot(kind))
            log_image(loggers, f"{layout.curves_dir.name}/{kind}", picture, step=None)
    header = ["category", *(key for key, _ in METRIC_COLUMNS)]
    log_table(
        loggers,
        "results",
        header,
        [[name, *(values.get(k) for k in header[1:])] for name, values in result_rows(results)],
    )
    if learned_state is not None:
        atomic_torch_save(learned_state, layout.last_checkpoint)
    atomic_write_json(layout.results_json, results)
