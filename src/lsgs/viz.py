"""Pictures: image grids, heatmap panels, ROC/PR curves, and handing them to whichever loggers are attached.

torchvision's ``make_grid`` is not available here (its PyPI wheel does not load beside the CPU torch build this
project installs), so the grid is a few lines of numpy.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image


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


def save_png(image: np.ndarray, path: str | Path) -> Path:
    from lsgs.io import atomic_write_bytes

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
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
