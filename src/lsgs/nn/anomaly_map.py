"""From a method's raw anomaly map to the final map every method of a run is evaluated on (pure torch).

A method computes its map at its own input size (a feature method at 224 px, LSGS at the run's size); the final
map is at the run's evaluation size (the size of the masks), masked by the region of interest, then smoothed
when the method's post-processing asks for it. The evaluation harness, ``lsgs detect`` and the ``Inferencer``
all call :func:`final_anomaly_map`, so a map (and the thresholds calibrated on it) means the same everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lsgs.nn.restoration import smooth_anomaly_map


def resize_map(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """``[B, C, h, w]`` maps resized to ``size`` = ``(H, W)``: bilinear (``align_corners=False``), unchanged when
    the size already matches (bit-exact, no interpolation pass)."""
    if maps.dim() != 4:
        raise ValueError(f"maps must be [B, C, H, W], got {tuple(maps.shape)}")
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def final_anomaly_map(
    raw: Tensor, roi: Tensor, smoothing: bool, count_include_pad: bool = True
) -> Tensor:
    """The final map: the raw map resized to the ROI's size, times the ROI, then (optionally) MinPool 3x3 and
    AvgPool 7x7 (:func:`lsgs.nn.restoration.smooth_anomaly_map`).

    Args:
        raw: ``[B, 1, h, w]`` raw map at the method's input size (any float dtype; computed in float32).
        roi: ``[B, 1, H, W]`` region of interest in {0, 1} at the evaluation size (all ones outside BraTS).
        smoothing: apply the MinPool/AvgPool smoothing.
        count_include_pad: whether the 7x7 average counts the zero padding (see ``smooth_anomaly_map``).

    Returns:
        ``[B, 1, H, W]`` float32.
    """
    masked = resize_map(raw.float(), tuple(roi.shape[-2:])) * roi.to(raw.device, torch.float32)
    if not smoothing:
        return masked
    return smooth_anomaly_map(masked, count_include_pad=count_include_pad)
