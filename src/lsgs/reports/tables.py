"""Results tables: one method's per-category table and the one-row-per-method comparison, as markdown and CSV.

Pure presentation (no run folder, no I/O): the evaluation harness, the run report, the ablations and the studies
all format their numbers here, so every table shows the same columns the same way.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from typing import Any

# (key in the results, column title); values are shown in percent like the paper's tables.
METRIC_COLUMNS = (
    ("pixel_auroc", "Pixel AUROC"),
    ("pixel_ap", "Pixel AP"),
    ("dice_best", "Dice (best thr.)"),
    ("dice_val", "Dice (val thr.)"),
    ("aupro", "AUPRO@0.3"),
    ("image_auroc", "Image AUROC"),
)


def format_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100.0 * float(value):.1f}"


NO_TEST_SET = "no labelled test set"


def has_test_set(results: dict[str, Any]) -> bool:
    """Whether an evaluation had a labelled test set (results of data with normal images only say it has not)."""
    return results.get("has_test_set", True) is not False


def result_rows(results: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """Per-category rows then the mean (MVTec, paper Table 2); a single pooled row for one category (Table 1); one
    empty row named ``NO_TEST_SET`` for an evaluation without a labelled test set."""
    if not has_test_set(results):
        return [(NO_TEST_SET, {})]
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
    if not has_test_set(results):
        validation = results.get("validation", {})
        title = (
            f"**{results.get('method', 'method')}** ({NO_TEST_SET}: no metrics; thresholds calibrated on "
            f"{validation.get('num_images', '?')} validation normals, {validation.get('num_flagged', '?')} of them "
            "above the image threshold)"
        )
    return f"{title}\n\n{markdown}", table


def comparison_tables(
    named_results: Sequence[tuple[str, dict[str, Any]]],
    row: str = "auto",
    extra: dict[str, dict] | None = None,
    kinds: dict[str, str] | None = None,
) -> tuple[str, str]:
    """One row per method (``mean`` over categories when there are several, else ``pooled``).

    Args:
        named_results: ``(row name, results)`` in row order.
        row: which row of each results to show (``auto``, ``mean`` or ``pooled``).
        extra: more columns per row name, appended after the metrics (sorted by column name).
        kinds: a ``Kind`` column (``method``, ``baseline``, ``ablation``) after the row name.

    An ``Image score`` column (how each row scored an image, from its results' ``image_score``) follows the metrics
    when any results record one.
    """
    keys = [key for key, _ in METRIC_COLUMNS]
    extra = extra or {}
    extra_keys = sorted({k for values in extra.values() for k in values})
    with_score = any("image_score" in results for _, results in named_results)
    lead = ["Kind"] if kinds is not None else []
    md_rows, csv_rows = [], []
    for name, results in named_results:
        which = row if row != "auto" else ("mean" if len(results.get("per_category", {})) > 1 else "pooled")
        values = results[which]
        leading = [kinds.get(name, "")] if kinds is not None else []
        score = [results.get("image_score", "")] if with_score else []
        md_rows.append(
            [
                name,
                *leading,
                *(format_value(values.get(k)) for k in keys),
                *[s or "-" for s in score],
                *(_plain(extra.get(name, {}).get(k)) for k in extra_keys),
            ]
        )
        csv_rows.append(
            [name, *leading, *(values.get(k, "") for k in keys), *score,
             *(extra.get(name, {}).get(k, "") for k in extra_keys)]
        )  # fmt: skip
    score_title = ["Image score"] if with_score else []
    header = ["Method", *lead, *(t for _, t in METRIC_COLUMNS), *score_title, *extra_keys]
    markdown = markdown_table(header, md_rows)
    csv_header = ["method", *(c.lower() for c in lead), *keys, *(["image_score"] if with_score else []), *extra_keys]
    return markdown, csv_text(csv_header, csv_rows)


def _plain(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
