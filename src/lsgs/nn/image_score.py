"""Image anomaly scores of final anomaly maps: the reductions every method can be scored with (pure torch).

The evaluation harness (image AUROC, the image threshold, ``image_scores.csv``), ``lsgs detect`` and the
``Inferencer`` all score an image with these functions, so a score means the same everywhere.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lsgs.errors import ConfigError, DataError

# Image-score reductions of an anomaly map (harness argument ``image_score``): "max" is the paper's (and the
# default); "topk_mean" averages the highest fraction of the pixels, so one bright pixel of normal texture (a
# tread edge) weighs less than a small region of anomalous ones.
IMAGE_SCORES = ("max", "topk_mean")
# What the harness's ``effective_image_score`` (and an export's ``scoring.image_score``) says for a method scored
# by its own image score (PatchCore, HVQ-Trans) instead of a reduction of its map.
OWN = "own"


def _flat_valid(maps: Tensor, valid: Tensor | None) -> Tensor | None:
    """``valid`` as ``[B, N]`` bool (None stays None); ``DataError`` when an image has no valid pixel."""
    if valid is None:
        return None
    flat_valid = valid.reshape(valid.shape[0], -1)
    empty = ~flat_valid.any(dim=1)
    if bool(empty.any()):
        raise DataError(f"image(s) {empty.nonzero().flatten().tolist()} of the batch have no valid pixel, so"
                        " no image score; drop them or pass image_scores")
    return flat_valid


def image_scores_from_maps(maps: Tensor, valid: Tensor | None = None) -> Tensor:
    """Image anomaly score = maximum of the map (over ``valid`` pixels when given), as in the paper's method.

    Args:
        maps: ``[B, 1, H, W]`` (or any ``[B, ...]``) float maps.
        valid: optional bool mask of the same shape.

    Returns:
        ``[B]`` scores.

    Raises:
        DataError: when an image has no valid pixel.
    """
    flat = maps.reshape(maps.shape[0], -1)
    flat_valid = _flat_valid(maps, valid)
    if flat_valid is None:
        return flat.amax(dim=1)
    return flat.masked_fill(~flat_valid, -math.inf).amax(dim=1)


def topk_count(num_pixels: Tensor, fraction: float) -> Tensor:
    """How many pixels ``topk_mean`` averages: ``max(1, round(fraction * n))``, at most ``n``.

    The nearest integer (halves to even, as Python's ``round``), not ``ceil``: 7 % of 100 pixels is 7, where
    ``ceil(0.07 * 100)`` gives 8 by float rounding.

    Args:
        num_pixels: ``[B]`` int counts of valid pixels (each >= 1).
        fraction: in (0, 1].

    Returns:
        ``[B]`` int64 counts.
    """
    k = torch.round(num_pixels.double() * fraction).long()
    return torch.minimum(k.clamp(min=1), num_pixels.long())


def topk_mean_scores(maps: Tensor, fraction: float, valid: Tensor | None = None) -> Tensor:
    """Image anomaly score = mean of the ``topk_count(n, fraction)`` largest of the ``n`` (valid) pixels.

    ``fraction`` -> 0 gives the maximum (k = 1); ``fraction`` = 1 gives the mean of the map.

    Args:
        maps: ``[B, 1, H, W]`` (or any ``[B, ...]``) float maps.
        fraction: q in (0, 1], e.g. 0.01 for the top 1 % of the pixels.
        valid: optional bool mask of the same shape as ``maps``.

    Returns:
        ``[B]`` scores, in the dtype of ``maps`` (the mean is accumulated in float64).

    Raises:
        DataError: when an image has no valid pixel.
        ValueError: when ``fraction`` is not in (0, 1].
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    flat = maps.reshape(maps.shape[0], -1)
    flat_valid = _flat_valid(maps, valid)
    if flat_valid is None:
        counts = torch.full((flat.shape[0],), flat.shape[1], dtype=torch.long, device=flat.device)
    else:
        flat = flat.masked_fill(~flat_valid, -math.inf)  # never among the top k: k <= the valid count
        counts = flat_valid.sum(dim=1)
    k = topk_count(counts, fraction)  # [B]
    top = flat.topk(int(k.max()), dim=1, sorted=True).values.double()  # [B, k_max], descending
    keep = torch.arange(top.shape[1], device=flat.device)[None, :] < k[:, None]  # [B, k_max]
    return (top.masked_fill(~keep, 0.0).sum(dim=1) / k.double()).to(maps.dtype)


def reduce_image_scores(
    maps: Tensor, method: str = "max", topk: float = 0.01, valid: Tensor | None = None
) -> Tensor:
    """Image anomaly scores of a batch of maps by one of ``IMAGE_SCORES``.

    Args:
        maps: ``[B, 1, H, W]`` (or any ``[B, ...]``) float maps.
        method: ``max`` (``image_scores_from_maps``, exactly) or ``topk_mean`` (``topk_mean_scores``).
        topk: the fraction q of ``topk_mean``; ignored by ``max``.
        valid: optional bool mask of the same shape as ``maps``.

    Returns:
        ``[B]`` scores.

    Raises:
        ConfigError: on an unknown ``method``.
        DataError: when an image has no valid pixel.
    """
    if method == "max":
        return image_scores_from_maps(maps, valid)
    if method == "topk_mean":
        return topk_mean_scores(maps, topk, valid)
    raise ConfigError(f"image_score={method!r} is not one of {IMAGE_SCORES}")
