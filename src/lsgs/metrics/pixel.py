"""Pooled pixel metrics (AP, AUROC, best Dice, Dice at a threshold) on constant-memory histograms."""

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from lsgs.metrics._inputs import select_pixels
from lsgs.metrics._state import ZeroStateMixin, add_zero_state
from lsgs.metrics._sync import synced_states
from lsgs.metrics.histogram import (
    DEFAULT_NUM_BITS,
    auroc_from_histograms,
    average_precision_from_histograms,
    best_dice_from_histograms,
    check_num_bits,
    dice_at_threshold,
    num_bins,
    pr_curve_from_histograms,
    roc_curve_from_histograms,
    scores_to_bins,
)


def accumulate_class_histograms(hist: Tensor, scores: Tensor, labels: Tensor, num_bits: int) -> None:
    """Add scores to a ``[2, 2 ** num_bits]`` histogram in place: row 0 negatives, row 1 positives.

    Args:
        hist: ``[2, 2 ** num_bits]`` int64 counts, modified in place.
        scores: ``[N]`` finite float scores.
        labels: ``[N]`` bool, True = positive (anomalous).
        num_bits: bin resolution.
    """
    index = scores_to_bins(scores, num_bits)
    index.add_(labels.to(index.device), alpha=num_bins(num_bits))  # positives go to row 1 of the flat view
    # One index_add_ over both rows: fastest on CPU, integer atomics on CUDA (deterministic), and no per-call
    # allocation of a 2**num_bits output as bincount would make.
    one = torch.ones(1, dtype=hist.dtype, device=hist.device)
    hist.view(-1).index_add_(0, index.to(hist.device), one.expand(index.numel()))


class PixelMetrics(ZeroStateMixin, Metric):
    """Pixel AP, pixel AUROC and Dice pooled over every evaluated pixel, in constant memory.

    The state is one ``[2, 2 ** num_bits]`` int64 histogram (row 0: normal pixels, row 1: anomalous pixels)
    over order-preserving float32 bins (see ``lsgs.metrics.histogram``), summed across batches and DDP ranks.
    Scores in one bin are exact ties; with distinct scores in distinct bins every value equals sklearn's
    exactly.

    Memory: ``2 * 2 ** num_bits * 8`` bytes of state (16 MiB at the default 20 bits); under DDP, ``compute()``
    briefly gathers one copy per rank. Update cost is a few elementwise passes over the batch plus one
    ``index_add_``; compute is O(non-empty bins).

    Undefined values are ``nan``: AUROC without positives or negatives, AP / Dice without positives (AP is 1.0
    without negatives, as sklearn). Constant scores give AUROC 0.5 and AP = prevalence.

    Args:
        num_bits: histogram resolution (bins per power of two = ``2 ** (num_bits - 9)``), in [9, 24].
        **kwargs: torchmetrics ``Metric`` options (``sync_on_compute``, ``process_group``, ...).

    Example:
        >>> metric = PixelMetrics()
        >>> metric.update(maps, masks)  # [B, 1, H, W] float, [B, 1, H, W] {0, 1}
        >>> metric.compute()["pixel_auroc"]
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    _zero_states = ("hist",)
    hist: Tensor

    def __init__(self, num_bits: int = DEFAULT_NUM_BITS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_bits = check_num_bits(num_bits)
        add_zero_state(self, "hist", (2, num_bins(num_bits)))

    def update(self, maps: Tensor, masks: Tensor, valid: Tensor | None = None) -> None:
        """Add a batch.

        Args:
            maps: ``[B, 1, H, W]`` float anomaly maps, higher = more anomalous (any shape shared by all
                three).
            masks: ``[B, 1, H, W]`` ground truth, bool or {0, 1}.
            valid: optional ``[B, 1, H, W]`` bool; only these pixels are evaluated (e.g. a brain ROI).

        Raises:
            DataError: on shape mismatches, non-binary masks, or NaN/inf scores.
        """
        scores, labels = select_pixels(maps, masks, valid)
        accumulate_class_histograms(self.hist, scores, labels, self.num_bits)

    def compute(self) -> dict[str, float]:
        """Pooled metrics over everything seen (all ranks).

        Returns:
            ``pixel_ap``, ``pixel_auroc``, ``dice_best`` (best Dice over all thresholds, optimistic) and
            ``dice_best_threshold`` (the threshold reaching it; predictions are ``score >= threshold``).
        """
        return metrics_from_histogram(self.hist)

    def histogram(self) -> Tensor:
        """Global ``[2, 2 ** num_bits]`` int64 histogram (row 0 normal, row 1 anomalous), summed over ranks.

        A collective under DDP (like ``compute``): call it on every rank.
        """
        return synced_states(self)["hist"]

    def dice_at(self, threshold: float) -> float:
        """Dice of ``score >= threshold`` over everything seen (all ranks; a collective under DDP).

        Args:
            threshold: e.g. ``ScoreQuantile.quantile(q)`` of validation-normal scores (exact then); other
                values are rounded down to their bin's lower edge.

        Returns:
            Dice in [0, 1]; ``nan`` without positive pixels.
        """
        hist = self.histogram()
        return dice_at_threshold(hist[1], hist[0], threshold, self.num_bits)

    def curves(self, max_points: int = 2048) -> dict[str, np.ndarray]:
        """ROC and PR curves for plotting (all ranks; a collective under DDP).

        Args:
            max_points: most points per curve (kept at even steps along the ROC path).

        Returns:
            ``fpr``, ``tpr``, ``roc_thresholds`` and ``precision``, ``recall``, ``pr_thresholds``: float64
                arrays
            in descending-threshold order (see ``roc_curve_from_histograms`` / ``pr_curve_from_histograms``).
        """
        hist = self.histogram()
        fpr, tpr, roc_thr = roc_curve_from_histograms(hist[1], hist[0], max_points)
        precision, recall, pr_thr = pr_curve_from_histograms(hist[1], hist[0], max_points)
        return {"fpr": fpr, "tpr": tpr, "roc_thresholds": roc_thr,
                "precision": precision, "recall": recall, "pr_thresholds": pr_thr}


def metrics_from_histogram(hist: Tensor) -> dict[str, float]:
    """``PixelMetrics.compute()``'s dict from a ``[2, 2 ** num_bits]`` histogram (rows: normal, anomalous)."""
    pos, neg = hist[1], hist[0]
    dice, threshold = best_dice_from_histograms(pos, neg)
    return {
        "pixel_ap": average_precision_from_histograms(pos, neg),
        "pixel_auroc": auroc_from_histograms(pos, neg),
        "dice_best": dice,
        "dice_best_threshold": threshold,
    }
