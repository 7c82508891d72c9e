"""Pictures: image grids, heatmap overlays and panels, ROC/PR curves, PNG files, and handing pictures to whichever
loggers are attached.

Pure presentation (no run folder): the stages, the evaluation harness, ``lsgs detect`` and the run report all
draw with these functions, so a heatmap looks the same everywhere. torchvision's ``make_grid`` is not available
here (its PyPI wheel does not load beside the CPU torch build this project installs), so the grid is a few lines
of numpy.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lsgs.io import atomic_write_bytes


def to_uint8_image(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[C, H, W]`` float in [0, 1] (C = 1 or 3) -> ``[H, W, 3]`` uint8, clipped."""
    array = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3):
        array = np.transpose(array, (1, 2, 0))
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def image_grid(rows: Sequence[torch.Tensor], padding: int = 2) -> np.ndarray:
    """Stack rows of images into one picture.

    Args:
        rows: each ``[N, C, H, W]`` in [0, 1]; all rows the same N, H, W.
        padding: pixels of white between tiles.

    Returns:
        ``[rows*(H+p)+p, N*(W+p)+p, 3]`` uint8.
    """
    num_rows, num_cols = len(rows), rows[0].shape[0]
    height, width = rows[0].shape[-2:]
    grid = np.full(
        (num_rows * (height + padding) + padding, num_cols * (width + padding) + padding, 3), 255, np.uint8
    )
    for r, row in enumerate(rows):
        for c in range(num_cols):
            top, left = padding + r * (height + padding), padding + c * (width + padding)
            grid[top : top + height, left : left + width] = to_uint8_image(row[c])
    return grid


def colorize(values: np.ndarray, vmin: float, vmax: float, cmap: str = "jet") -> np.ndarray:
    """``[H, W]`` floats -> ``[H, W, 3]`` uint8 through a matplotlib colour map."""
    from matplotlib import colormaps

    scaled = np.clip((values - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    return (colormaps[cmap](scaled)[..., :3] * 255.0 + 0.5).astype(np.uint8)


def heatmap_overlay(image: np.ndarray, anomaly: np.ndarray, vmax: float | None = None) -> np.ndarray:
    """An anomaly map in colour over its image, half and half.

    Args:
        image: ``[H, W, 3]`` uint8 (see :func:`to_uint8_image`).
        anomaly: ``[H, W]`` map values.
        vmax: map value at the top of the colour map (default: the map's maximum, 1 for an all-zero map).

    Returns:
        ``[H, W, 3]`` uint8.
    """
    vmax = vmax if vmax else float(anomaly.max()) or 1.0
    return (0.5 * image + 0.5 * colorize(anomaly, 0.0, vmax)).astype(np.uint8)


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Write an ``[H, W, 3]`` uint8 picture as PNG (atomically)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return atomic_write_bytes(path, buffer.getvalue())


def save_picture(image: np.ndarray, path: str | Path) -> Path:
    """Write an ``[H, W, 3]`` uint8 picture in the format its file name says (``.png``, ``.jpg`` at quality 95,
    ``.tif``, ``.bmp``, ...), atomically."""
    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    options = {"quality": 95} if image_format == "JPEG" else {}
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=image_format, **options)
    return atomic_write_bytes(path, buffer.getvalue())


def log_image(
    loggers: Sequence[Any], key: str, image: np.ndarray, step: int, caption: str | None = None
) -> None:
    """Send one ``[H, W, 3]`` uint8 picture to every attached logger that takes images (W&B, TensorBoard)."""
    for logger in loggers:
        name = type(logger).__name__
        if name == "WandbLogger":
            extra = {"caption": [caption]} if caption else {}
            logger.log_image(key=key, images=[image], step=step, **extra)
        elif name == "TensorBoardLogger":
            logger.experiment.add_image(key, image, global_step=step, dataformats="HWC")


def log_table(loggers: Sequence[Any], key: str, columns: list[str], rows: list[list[Any]]) -> None:
    """Send a table to W&B loggers (others have no table type; results files carry the same numbers)."""
    for logger in loggers:
        if type(logger).__name__ == "WandbLogger":
            logger.log_table(key=key, columns=columns, data=rows)


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
    overlay = heatmap_overlay(image, anomaly, scale)
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
        pictures[kind] = np.array(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))
    return pictures
