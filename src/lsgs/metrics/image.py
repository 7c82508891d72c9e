"""Exact image-level AUROC (a few hundred images per category: keeping every score is cheap)."""

import math
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from lsgs.errors import DataError
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
