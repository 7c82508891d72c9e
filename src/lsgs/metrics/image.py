"""Exact image-level AUROC (a few hundred images per category: keeping every score is cheap)."""

import math
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lsgs.errors import ConfigError, DataError
from lsgs.metrics._inputs import check_binary, check_maps
from lsgs.metrics._sync import synced_states
from lsgs.metrics.histogram import auroc_from_histograms


def exact_auroc(scores: Tensor, labels: Tensor) -> float:
    """Exact AUROC (ties count 0.5), equal to sklearn's ``roc_auc_score``.

    One histogram bin per unique score makes the histogram AUROC exact, so the same tested function serves
    both.

    Args:
        scores: ``[N]`` finite scores.
        labels: ``[N]`` bool, True = anomalous.

    Returns:
        AUROC; ``nan`` without positives or without negatives.
    """
    if scores.numel() == 0:
        return math.nan
    unique, inverse = torch.unique(scores.double() + 0.0, return_inverse=True)  # + 0.0: -0.0 ties with 0.0
    pos = torch.bincount(inverse[labels], minlength=unique.numel())
    neg = torch.bincount(inverse[~labels], minlength=unique.numel())
    return auroc_from_histograms(pos, neg)


# Image-score reductions of an anomaly map (harness argument ``image_score``): "max" is the paper's (and the
# default); "topk_mean" averages the highest fraction of the pixels, so one bright pixel of normal texture (a
# tread edge) weighs less than a small region of anomalous ones.
IMAGE_SCORES = ("max", "topk_mean")


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


class ImageAUROC(Metric):
    """Exact image-level AUROC over all images seen (all ranks).

    States are the concatenated scores and labels (``dist_reduce_fx="cat"``), both float32 so that a rank
    without data syncs with torchmetrics' empty float placeholder: 8 bytes per image.

    Args:
        **kwargs: torchmetrics ``Metric`` options.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    scores: list[Tensor]
    labels: list[Tensor]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, labels: Tensor) -> None:
        """Add image scores.

        Args:
            scores: ``[B]`` float image scores (e.g. ``image_scores_from_maps(maps)``).
            labels: ``[B]`` bool or {0, 1}, 1 = anomalous image.

        Raises:
            DataError: on shape mismatch, NaN/inf scores, or non-binary labels.
        """
        check_maps(scores, "image scores")
        if scores.dim() != 1 or not isinstance(labels, Tensor) or labels.shape != scores.shape:
            got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise DataError(
                f"image scores must be [B] and labels the same shape, got {tuple(scores.shape)} and {got}"
            )
        self.scores.append(scores.detach().float())
        self.labels.append(check_binary(labels, "labels").float())

    def compute(self) -> float:
        """Exact AUROC; ``nan`` without anomalous or without normal images."""
        return exact_auroc(_cat(self.scores), _cat(self.labels).bool())

    def values(self) -> tuple[Tensor, Tensor]:
        """All ranks' ``[N]`` float32 scores and ``[N]`` bool labels (a collective under DDP)."""
        states = synced_states(self)
        return _cat(states["scores"]), _cat(states["labels"]).bool()


def _cat(state: list[Tensor] | Tensor) -> Tensor:
    """A ``cat`` state as one tensor: a list before a DDP sync, a tensor after it, possibly empty."""
    if isinstance(state, Tensor):
        return state
    return dim_zero_cat(state) if state else torch.zeros(0)
