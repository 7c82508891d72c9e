"""The run summary and the self-contained HTML report: every evaluated method of a run, side by side.

A run folder holds LSGS's scoring outputs (``scoring/``), the baselines' (``baselines/<name>/``) and, after
``lsgs ablate``, the ablation variants' (``ablations/<table>-<variant>/scoring/``). All of them were produced by the
same evaluation harness on the same test set, so they compare directly. ``summary.{md,csv}`` holds one row per
method; ``report.html`` adds the per-category table, the ROC/PR curves of all methods on one plot, and the heatmap
panels of the same test images for every method, with the pictures embedded (one file to share).
"""

from __future__ import annotations

import base64
import html
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lsgs.io import atomic_write_text
from lsgs.reporting import comparison_tables, plot_curves, results_tables

SUMMARY_FILES = ("summary.md", "summary.csv", "report.html")


def collect_methods(run_dir: Path) -> list[tuple[str, Path]]:
    """``(row name, output folder)`` of every finished evaluation in a run: baselines, ablations, then LSGS."""
    run_dir = Path(run_dir)
    found: list[tuple[str, Path]] = []
    baselines = run_dir / "baselines"
    if baselines.is_dir():
        found += [
            (f"baseline: {d.name}", d) for d in sorted(baselines.iterdir()) if (d / "results.json").is_file()
        ]
    ablations = run_dir / "ablations"
    if ablations.is_dir():
        for variant in sorted(ablations.iterdir()):
            if (variant / "scoring" / "results.json").is_file():
                found.append((f"ablation: {variant.name}", variant / "scoring"))
    if (run_dir / "scoring" / "results.json").is_file():
        found.append(("LSGS", run_dir / "scoring"))
    return found


def write_summary(run_dir: Path) -> str | None:
    """Write ``summary.md``/``summary.csv`` (one row per method) and ``report.html``; return the markdown."""
    run_dir = Path(run_dir)
    methods = collect_methods(run_dir)
    if not methods:
        return None
    named = [(name, json.loads((folder / "results.json").read_text())) for name, folder in methods]
    markdown, table = comparison_tables(named)
    title = "All methods on the same test set (values in %; mean over categories when there are several)"
    markdown = f"{title}\n\n{markdown}"
    atomic_write_text(run_dir / "summary.md", markdown)
    atomic_write_text(run_dir / "summary.csv", table)
    atomic_write_text(run_dir / "report.html", render_html(run_dir, methods, named, markdown))
    return markdown


def _png_data_uri(picture: np.ndarray | Path) -> str:
    if isinstance(picture, Path):
        data = picture.read_bytes()
    else:
        buffer = io.BytesIO()
        Image.fromarray(picture).save(buffer, format="PNG")
        data = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _markdown_table_to_html(markdown: str) -> str:
    lines = [line for line in markdown.strip().splitlines() if line.startswith("|")]
    if len(lines) < 2:
        return f"<p>{html.escape(markdown)}</p>"
    cells = [[html.escape(c.strip()) for c in line.strip("|").split("|")] for line in lines]
    head = "".join(f"<th>{c}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[2:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(
    run_dir: Path,
    methods: Sequence[tuple[str, Path]],
    named: Sequence[tuple[str, dict[str, Any]]],
    summary: str,
) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>LSGS report</title><style>",
        "body{font-family:sans-serif;margin:2em;max-width:1400px} table{border-collapse:collapse;margin:1em 0}",
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right} td:first-child,th:first-child{text-align:left}",
        "img{image-rendering:pixelated;margin:2px} .panel{margin-bottom:1.5em}",
        "</style></head><body>",
        f"<h1>LSGS report: {html.escape(run_dir.name)}</h1>",
        f"<p>Run folder: <code>{html.escape(str(run_dir.resolve()))}</code>. Every row below went through the same "
        "evaluation code on the same test set; thresholds were set on validation normals only.</p>",
        "<h2>Summary</h2>",
        _markdown_table_to_html(summary),
    ]
    for name, results in named:
        per_category, _ = results_tables(results)
        parts += [f"<h3>{html.escape(name)}</h3>", _markdown_table_to_html(per_category.split("\n\n", 1)[1])]
        calibration = results.get("calibration", {})
        parts.append(f"<p><small>calibration: {html.escape(json.dumps(calibration))}</small></p>")
    curves = {}
    for name, folder in methods:
        path = folder / "curves" / "curves.npz"
        if path.is_file():
            with np.load(path) as data:
                curves[name] = {k: data[k] for k in data.files}
    if curves:
        parts.append("<h2>Pixel ROC and PR curves (all categories pooled)</h2>")
        parts += [f"<img src='{_png_data_uri(p)}'>" for p in plot_curves(curves).values()]
    parts.append(
        "<h2>Heatmaps of the same test images</h2><p>Tiles: input, ground truth, reconstruction, "
        "restoration (LSGS), anomaly map over the input.</p>"
    )
    reference = next((folder for name, folder in methods if name == "LSGS"), methods[-1][1])
    for panel in sorted((reference / "heatmaps").glob("*.png")) if (reference / "heatmaps").is_dir() else []:
        parts.append(f"<div class='panel'><b>{html.escape(panel.stem)}</b><br>")
        for name, folder in methods:
            candidate = folder / "heatmaps" / panel.name
            if candidate.is_file():
                parts.append(f"<div>{html.escape(name)}<br><img src='{_png_data_uri(candidate)}'></div>")
        parts.append("</div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    """``lsgs report --run_dir RUN``: (re)write summary.md/csv and report.html of a run."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog="lsgs report", description=__doc__)
    parser.add_argument("--run_dir", type=str, required=True, help="a pipeline run folder")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    from lsgs.errors import ConfigError

    markdown = write_summary(Path(args.run_dir))
    if markdown is None:
        raise ConfigError(f"--run_dir '{args.run_dir}' holds no finished evaluation (no */results.json)")
    print(markdown)
    print(f"report: {Path(args.run_dir) / 'report.html'}")
