"""``report.html``: a self-contained page (pictures embedded) with every evaluated method of a run side by side."""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lsgs.methods.registry import EvaluatedMethod
from lsgs.reports.figures import plot_curves
from lsgs.reports.tables import results_tables


def png_data_uri(picture: np.ndarray | Path) -> str:
    """A PNG file or an ``[H, W, 3]`` uint8 picture as a ``data:`` URI to embed in the page."""
    if isinstance(picture, Path):
        data = picture.read_bytes()
    else:
        buffer = io.BytesIO()
        Image.fromarray(picture).save(buffer, format="PNG")
        data = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def markdown_table_to_html(markdown: str) -> str:
    lines = [line for line in markdown.strip().splitlines() if line.startswith("|")]
    if len(lines) < 2:
        return f"<p>{html.escape(markdown)}</p>"
    cells = [[html.escape(c.strip()) for c in line.strip("|").split("|")] for line in lines]
    head = "".join(f"<th>{c}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[2:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(
    run_dir: Path,
    methods: Sequence[EvaluatedMethod],
    named: Sequence[tuple[str, dict[str, Any]]],
    summary: str,
) -> str:
    """The report page: summary table, per-method tables, pooled ROC/PR curves, heatmaps of the same images."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>LSGS report</title><style>",
        "body{font-family:sans-serif;margin:2em;max-width:1400px} table{border-collapse:collapse;margin:1em 0}",
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right} td:first-child,th:first-child{text-align:left}",
        "img{image-rendering:pixelated;margin:2px} .panel{margin-bottom:1.5em}",
        "</style></head><body>",
        f"<h1>LSGS report: {html.escape(run_dir.name)}</h1>",
        f"<p>Run folder: <code>{html.escape(run_dir.resolve().name)}</code>. Every row below went through the same "
        "evaluation code on the same test set; thresholds were set on validation normals only.</p>",
        "<h2>Summary</h2>",
        markdown_table_to_html(summary),
    ]
    for name, results in named:
        per_category, _ = results_tables(results)
        parts += [f"<h3>{html.escape(name)}</h3>", markdown_table_to_html(per_category.split("\n\n", 1)[1])]
        calibration = results.get("calibration", {})
        parts.append(f"<p><small>calibration: {html.escape(json.dumps(calibration))}</small></p>")
    curves = {}
    for method in methods:
        if method.stage.curves.is_file():
            with np.load(method.stage.curves) as data:
                curves[method.label] = {k: data[k] for k in data.files}
    if curves:
        parts.append("<h2>Pixel ROC and PR curves (all categories pooled)</h2>")
        parts += [f"<img src='{png_data_uri(p)}'>" for p in plot_curves(curves).values()]
    parts.append(
        "<h2>Heatmaps of the same test images</h2><p>Tiles: input, ground truth, reconstruction, "
        "restoration (LSGS), anomaly map over the input.</p>"
    )
    reference = next((m.stage for m in methods if m.label == "LSGS"), methods[-1].stage)
    panels = sorted(reference.heatmaps_dir.glob("*.png")) if reference.heatmaps_dir.is_dir() else []
    for panel in panels:
        parts.append(f"<div class='panel'><b>{html.escape(panel.stem)}</b><br>")
        for method in methods:
            candidate = method.stage.heatmaps_dir / panel.name
            if candidate.is_file():
                parts.append(f"<div>{html.escape(method.label)}<br><img src='{png_data_uri(candidate)}'></div>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)
