"""Results files, tables, heatmap panels and curves of an evaluation (written by rank 0 only)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lsgs.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from lsgs.viz import colorize, log_image, log_table, save_png, to_uint8_image

# (key in the results, column title); values are shown in percent like the paper's tables.
METRIC_COLUMNS = (
    ("pixel_auroc", "Pixel AUROC"),
    ("pixel_ap", "Pixel AP"),
    ("dice_best", "Dice (best thr.)"),
    ("dice_val", "Dice (val thr.)"),
    ("aupro", "AUPRO@0.3"),
    ("image_auroc", "Image AUROC"),
)
RESULTS_FILES = ("results.json", "results.csv", "results.md", "image_scores.csv", "calibration.json")


def format_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100.0 * float(value):.1f}"


def result_rows(results: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """Per-category rows then the mean (MVTec, paper Table 2); a single pooled row for one category (Table 1)."""
    per_category = results.get("per_category", {})
    if len(per_category) <= 1:
        return [(next(iter(per_category), "pooled"), results["pooled"])]
    return [*per_category.items(), ("mean", results["mean"]), ("pooled", results["pooled"])]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def results_tables(results: dict[str, Any]) -> tuple[str, str]:
    """``(markdown, csv)`` of one method's results."""
    keys = [key for key, _ in METRIC_COLUMNS]
    rows = result_rows(results)
    markdown = markdown_table(
        ["Category", *(title for _, title in METRIC_COLUMNS)],
        [[name, *(format_value(values.get(key)) for key in keys)] for name, values in rows],
    )
    table = csv_text(
        ["category", *keys], [[name, *(values.get(key, "") for key in keys)] for name, values in rows]
    )
    title = f"**{results.get('method', 'method')}** (values in %, {results.get('num_test_images', '?')} test images)"
    return f"{title}\n\n{markdown}", table


def comparison_tables(
    named_results: Sequence[tuple[str, dict[str, Any]]],
    row: str = "auto",
    extra: dict[str, dict] | None = None,
) -> tuple[str, str]:
    """One row per method (``mean`` over categories when there are several, else ``pooled``)."""
    keys = [key for key, _ in METRIC_COLUMNS]
    extra = extra or {}
    extra_keys = sorted({k for values in extra.values() for k in values})
    md_rows, csv_rows = [], []
    for name, results in named_results:
        which = row if row != "auto" else ("mean" if len(results.get("per_category", {})) > 1 else "pooled")
        values = results[which]
        md_rows.append(
            [
                name,
                *(format_value(values.get(k)) for k in keys),
                *(_plain(extra.get(name, {}).get(k)) for k in extra_keys),
            ]
        )
        csv_rows.append(
            [name, *(values.get(k, "") for k in keys), *(extra.get(name, {}).get(k, "") for k in extra_keys)]
        )
    markdown = markdown_table(["Method", *(t for _, t in METRIC_COLUMNS), *extra_keys], md_rows)
    return markdown, csv_text(["method", *keys, *extra_keys], csv_rows)


def _plain(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


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


def heatmap_panel(panel: dict[str, Any], scale: float | None = None, tile: int = 128) -> np.ndarray:
    """Input | ground truth | reconstruction | restoration | anomaly map over the input, side by side.

    Args:
        panel: ``image`` [C, H, W], ``mask`` [1, H, W], ``map`` [1, H, W], optional ``reconstruction`` and
            ``restoration`` [C, H, W].
        scale: map value shown at the top of the colour map (default: the map's maximum).
        tile: minimum tile side; small images are enlarged (nearest) so the panel stays readable.

    Returns:
        ``[tile, k * tile, 3]`` uint8.
    """
    image = to_uint8_image(panel["image"])
    anomaly = panel["map"][0].numpy() if isinstance(panel["map"], torch.Tensor) else panel["map"][0]
    vmax = scale if scale else float(anomaly.max()) or 1.0
    overlay = (0.5 * image + 0.5 * colorize(anomaly, 0.0, vmax)).astype(np.uint8)
    tiles = [image, to_uint8_image(panel["mask"])]
    tiles += [to_uint8_image(panel[name]) for name in ("reconstruction", "restoration") if name in panel]
    tiles.append(overlay)
    factor = max(1, math.ceil(tile / image.shape[0]))
    tiles = [np.kron(t, np.ones((factor, factor, 1), dtype=np.uint8)) for t in tiles]
    gap = np.full((tiles[0].shape[0], 2, 3), 255, np.uint8)
    return np.concatenate([part for t in tiles for part in (t, gap)][:-1], axis=1)


def plot_curves(curves_by_method: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """ROC and PR curves of one or more methods, each as an ``[H, W, 3]`` uint8 picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pictures = {}
    for kind, (x_key, y_key, x_label, y_label) in {
        "roc": ("fpr", "tpr", "false positive rate", "true positive rate"),
        "pr": ("recall", "precision", "recall", "precision"),
    }.items():
        figure, axis = plt.subplots(figsize=(4.5, 4.5), dpi=100)
        for method, curves in curves_by_method.items():
            axis.plot(curves[x_key], curves[y_key], label=method, linewidth=1.5)
        if kind == "roc":
            axis.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
        axis.set(xlabel=x_label, ylabel=y_label, xlim=(0, 1), ylim=(0, 1.01), title=f"pixel {kind.upper()}")
        axis.legend(loc="lower right" if kind == "roc" else "upper right", fontsize=8)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        plt.close(figure)
        from PIL import Image

        pictures[kind] = np.array(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return pictures
