"""Quantiles of a score stream (e.g. validation-normal pixel scores or code NLLs) in constant memory."""

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lsgs.errors import DataError
from lsgs.metrics._inputs import check_binary, check_maps
from lsgs.metrics._state import ZeroStateMixin, add_zero_state
from lsgs.metrics._sync import synced_states
from lsgs.metrics.histogram import (
    DEFAULT_NUM_BITS,
    check_num_bits,
    num_bins,
    quantile_from_histogram,
    scores_to_bins,
)


class ScoreQuantile(ZeroStateMixin, Metric):
    """Histogram of scores with quantile queries; sets decision thresholds from normal data only.

    Typical use: feed the anomaly maps of validation normals (never test data), then ``quantile(0.99)`` is the
    threshold for ``PixelMetrics.dice_at`` / ``AnomalyMetrics.set_val_threshold``; or feed code NLLs of
    validation normals to get the restoration threshold. Quantiles are numpy's ``method="lower"`` order
    statistic rounded down to its bin's lower edge (within one bin of the exact value; exact as a threshold on
    binned scores).

    Memory: ``2 ** num_bits * 8`` bytes of state (8 MiB at 20 bits).

    Args:
        q: quantile returned by ``compute()``, in [0, 1]; ``quantile(q)`` answers any other.
        num_bits: histogram resolution, in [9, 24].
        **kwargs: torchmetrics ``Metric`` options.
    """

    is_differentiable = False
    full_state_update = False
    _zero_states = ("hist",)
    hist: Tensor

    def __init__(self, q: float = 0.99, num_bits: int = DEFAULT_NUM_BITS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_bits = check_num_bits(num_bits)
        # Validates q now (on an empty histogram) so a bad config fails at construction, not after an epoch.
        quantile_from_histogram(torch.zeros(num_bins(num_bits), dtype=torch.int64), q, num_bits)
        self.q = float(q)
        add_zero_state(self, "hist", (num_bins(num_bits),))

    def update(self, scores: Tensor, valid: Tensor | None = None) -> None:
        """Add scores.

        Args:
            scores: ``[*]`` finite float scores (e.g. ``[B, 1, H, W]`` maps or ``[B, 256]`` NLLs).
            valid: optional bool mask of the same shape; only these scores are counted.

        Raises:
            DataError: on NaN/inf or non-float scores, or a ``valid`` of another shape or non-binary values.
        """
        check_maps(scores, "scores")
        if valid is not None:
            if not isinstance(valid, Tensor) or valid.shape != scores.shape:
                got = tuple(valid.shape) if isinstance(valid, Tensor) else type(valid).__name__
                raise DataError(f"valid must have the shape of scores {tuple(scores.shape)}, got {got}")
            scores = scores[check_binary(valid, "valid")]
        bins = scores_to_bins(scores.reshape(-1), self.num_bits).to(self.hist.device)
        one = torch.ones(1, dtype=self.hist.dtype, device=self.hist.device)
        self.hist.index_add_(0, bins, one.expand(bins.numel()))

    def compute(self) -> float:
        """The ``q`` quantile given at construction (``nan`` before any score)."""
        return quantile_from_histogram(self.hist, self.q, self.num_bits)

    def quantile(self, q: float) -> float:
        """Any quantile of the scores seen on all ranks (a collective under DDP).

        Args:
            q: in [0, 1].

        Returns:
            The threshold (``nan`` before any score).

        Raises:
            ConfigError: when ``q`` is outside [0, 1].
        """
        return quantile_from_histogram(synced_states(self)["hist"], q, self.num_bits)


def score_quantile(scores: Tensor, q: float, num_bits: int = DEFAULT_NUM_BITS) -> float:
    """The ``q`` quantile of one tensor of scores, exactly as ``ScoreQuantile`` computes it from a stream.

    This is the one implementation of the thresholds set from validation normals (pixel threshold, image
    threshold, restoration NLL threshold): the scoring stage streams batches into ``ScoreQuantile``; benchmarks
    and tests that hold all the scores at once call this, and get the same number.

    Args:
        scores: ``[*]`` finite float scores, e.g. ``[N, L]`` code NLLs of validation normals.
        q: quantile in [0, 1].
        num_bits: histogram resolution (the scoring stage uses its ``metric_bits``).

    Returns:
        numpy's ``method="lower"`` quantile rounded down to its bin's lower edge (``nan`` for no scores).

    Raises:
        ConfigError: on ``q`` outside [0, 1] or a bad ``num_bits``; DataError: on NaN/inf scores.
    """
    metric = ScoreQuantile(q=q, num_bits=num_bits, sync_on_compute=False).to(scores.device)
    metric.update(scores)
    return metric.quantile(q)
