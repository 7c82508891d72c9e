"""AUPRO (MVTec AD standard): area under the per-region-overlap curve up to a false-positive rate, normalised.

Definition (Bergmann et al., MVTec AD evaluation code): for a threshold ``t``, PRO(t) is the mean over all
ground-truth regions (8-connected components of each image's mask) of the fraction of the region's pixels with
``score >= t``; FPR(t) is the fraction of all normal pixels (of all images) with ``score >= t``. The curve
(FPR, PRO), starting at (0, 0), is integrated with the trapezoidal rule over FPR in [0, fpr_limit], cut at
exactly ``fpr_limit`` by linear interpolation, and divided by ``fpr_limit``.

Constant memory: PRO(t) = (sum of ``1 / |region|`` over anomalous pixels with ``score >= t``) / (number of
regions), so a histogram of anomalous pixels weighted by ``1 / |region|``, a histogram of normal pixels and
the region count are sufficient and summable. The weights are stored in fixed point (``round(2**40 /
|region|)`` in int64) rather than float64: integer sums are exact and order-independent, so results do not
depend on batch order or the number of DDP ranks, and CUDA integer atomics are deterministic. The rounding
moves a region's PRO by at most ``|region| / 2**41`` (< 1e-8 for regions under 20,000 pixels).
"""

import math
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import rank_zero_warn

from lsgs.errors import ConfigError, DataError
from lsgs.metrics._inputs import check_pixel_inputs
from lsgs.metrics._state import ZeroStateMixin, add_zero_state
from lsgs.metrics.histogram import DEFAULT_NUM_BITS, check_num_bits, num_bins, scores_to_bins

REGION_WEIGHT_SCALE = 2**40  # fixed-point unit: one whole region
# Sum of all weights ~ regions * 2**40 must stay below 2**63 (int64).
MAX_REGIONS = 2**23 - 1
# 8-connectivity inside each image plane, no connection across the batch axis: one label() call per batch.
_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE[1] = True


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components (8-connectivity) of each binary mask.

    Args:
        masks: ``[N, H, W]`` bool.

    Returns:
        ``labels`` ``[N, H, W]`` int32 (0 = background, 1..n unique over the whole batch) and ``n``.
    """
    labels, n = ndimage.label(masks, structure=_STRUCTURE)
    return labels, int(n)


def region_weights(labels: np.ndarray, num_regions: int) -> np.ndarray:
    """Fixed-point ``1 / |region|`` per label.

    Args:
        labels: ``[*]`` int labels from ``label_regions``.
        num_regions: number of labels (excluding background 0).

    Returns:
        ``[num_regions + 1]`` int64, entry 0 (background) is 0.
    """
    sizes = np.bincount(labels.ravel(), minlength=num_regions + 1)
    weights = np.zeros(num_regions + 1, dtype=np.int64)
    weights[1:] = np.rint(REGION_WEIGHT_SCALE / sizes[1:])
    return weights


def pro_curve_from_histograms(
    neg: Tensor, weighted: Tensor, num_regions: int
) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) points at every non-empty bin, in ascending FPR (descending threshold), starting at (0, 0).

    Args:
        neg: ``[num_bins]`` int64 counts of normal pixels per bin.
        weighted: ``[num_bins]`` int64 fixed-point ``1 / |region|`` sums of anomalous pixels per bin.
        num_regions: number of ground-truth regions.

    Returns:
        ``fpr``, ``pro`` float64 ``[M]``; nan-filled when there are no normal pixels or no regions.
    """
    bins = torch.nonzero((neg + weighted) > 0).flatten()  # empty bins add no curve point
    # Cumulative counts from the highest bin down (integer sums: exact), as float64 on the CPU.
    fp = neg[bins].flip(0).cumsum(0).double().cpu().numpy()
    covered = weighted[bins].flip(0).cumsum(0).double().cpu().numpy()
    n_neg = float(neg.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr = fp / n_neg if n_neg > 0 else np.full_like(fp, np.nan)
        # Clip: rounding of the fixed-point weights may overshoot 1 by < 1e-8.
        pro = np.minimum(covered / (float(REGION_WEIGHT_SCALE) * num_regions), 1.0) if num_regions else (
            np.full_like(fp, np.nan))
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], pro])


def partial_auc(x: np.ndarray, y: np.ndarray, x_limit: float) -> float:
    """Trapezoidal area under ``y(x)`` for ``x`` in ``[x[0], x_limit]``, cut at ``x_limit`` by interpolation.

    Same rule as the MVTec AD evaluation code's ``trapezoid(x, y, x_max)``.

    Args:
        x: ``[M]`` non-decreasing, ``x[0] <= x_limit``.
        y: ``[M]`` values.
        x_limit: upper integration limit.

    Returns:
        The area (not normalised).
    """
    end = int(np.searchsorted(x, x_limit, side="right"))  # first point beyond the limit
    area = float(np.trapezoid(y[:end], x[:end]))
    if end < len(x):
        x0, x1, y0, y1 = x[end - 1], x[end], y[end - 1], y[end]
        y_cut = y0 + (y1 - y0) * (x_limit - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_cut) * (x_limit - x0)
    return area


def aupro_from_histograms(neg: Tensor, weighted: Tensor, num_regions: int, fpr_limit: float = 0.3) -> float:
    """Normalised AUPRO from the sufficient statistics.

    Args:
        neg: ``[num_bins]`` int64 counts of normal pixels per bin.
        weighted: ``[num_bins]`` int64 fixed-point region weights of anomalous pixels per bin.
        num_regions: number of ground-truth regions.
        fpr_limit: integration limit in (0, 1].

    Returns:
        AUPRO in [0, 1]; ``nan`` without regions or without normal pixels.
    """
    if num_regions == 0 or int(neg.sum()) == 0:
        return math.nan
    fpr, pro = pro_curve_from_histograms(neg, weighted, num_regions)
    return partial_auc(fpr, pro, fpr_limit) / fpr_limit


class AUPRO(ZeroStateMixin, Metric):
    """AUPRO over all images seen (all ranks), in constant memory; the module docstring has the definition.

    State: a ``[2, 2 ** num_bits]`` int64 histogram (row 0: normal pixel counts, row 1: fixed-point region
    weights of anomalous pixels) and the region count, all summed across ranks: ``2 * 2 ** num_bits * 8``
    bytes (16 MiB at 20 bits). Connected components are found on the CPU (scipy), one call per batch.

    Args:
        fpr_limit: upper FPR of the integral, in (0, 1] (MVTec standard 0.3).
        num_bits: histogram resolution, in [9, 24].
        **kwargs: torchmetrics ``Metric`` options.

    Raises:
        ConfigError: when ``fpr_limit`` is outside (0, 1] or ``num_bits`` is invalid.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    _zero_states = ("hist",)
    hist: Tensor
    num_regions: Tensor

    def __init__(self, fpr_limit: float = 0.3, num_bits: int = DEFAULT_NUM_BITS, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(fpr_limit, bool) or not isinstance(fpr_limit, (int, float)) or not (
                0.0 < fpr_limit <= 1.0):
            raise ConfigError(f"fpr_limit must be a number in (0, 1], got {fpr_limit!r}")
        self.fpr_limit = float(fpr_limit)
        self.num_bits = check_num_bits(num_bits)
        add_zero_state(self, "hist", (2, num_bins(num_bits)))
        self.add_state("num_regions", default=torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, maps: Tensor, masks: Tensor, valid: Tensor | None = None) -> None:
        """Add a batch.

        Args:
            maps: ``[B, 1, H, W]`` (or ``[B, H, W]``) float anomaly maps; each ``[H, W]`` plane is one image.
            masks: same shape, ground truth in {0, 1} or bool.
            valid: optional same-shape bool mask: only these pixels count, and regions are the components of
                ``masks & valid``.

        Raises:
            DataError: on shape mismatches, fewer than 3 dimensions, non-binary masks, NaN/inf scores, or more
                than ``MAX_REGIONS`` regions in total.
        """
        maps, masks, valid = check_pixel_inputs(maps, masks, valid)
        if maps.dim() < 3:
            raise DataError(f"AUPRO needs [B, 1, H, W] or [B, H, W] maps (regions are per image), got "
                            f"{tuple(maps.shape)}")
        height, width = maps.shape[-2:]
        regions = masks if valid is None else masks & valid
        labels, n = label_regions(regions.reshape(-1, height, width).cpu().numpy())
        if int(self.num_regions) + n > MAX_REGIONS:
            raise DataError(f"AUPRO supports at most {MAX_REGIONS} ground-truth regions in total "
                            f"(fixed-point int64 state), got {int(self.num_regions) + n}")
        device = self.hist.device
        weight_of_label = torch.from_numpy(region_weights(labels, n)).to(device)
        anomalous = regions.reshape(-1).to(device)
        label_of_pixel = torch.from_numpy(labels).to(device).reshape(-1).long()
        weight = torch.where(anomalous, weight_of_label[label_of_pixel], 1)  # normal pixels count 1 in row 0
        index = scores_to_bins(maps.reshape(-1), self.num_bits).to(device)
        index.add_(anomalous, alpha=num_bins(self.num_bits))  # anomalous pixels go to row 1 of the flat view
        if valid is not None:
            keep = valid.reshape(-1).to(device)
            index, weight = index[keep], weight[keep]
        self.hist.view(-1).index_add_(0, index, weight)
        self.num_regions += n

    def compute(self) -> float:
        """Normalised AUPRO; ``nan`` (with a warning) without anomalous regions or without normal pixels.

        Raises:
            DataError: when all ranks together saw more than ``MAX_REGIONS`` regions (sums could overflow).
        """
        return aupro_from_state(self.hist, self.num_regions, self.fpr_limit)


def aupro_from_state(hist: Tensor, num_regions: Tensor | int, fpr_limit: float, name: str = "AUPRO") -> float:
    """``aupro_from_histograms`` on an ``AUPRO`` state, with the overflow check and a warning when undefined.

    Args:
        hist: ``[2, num_bins]`` int64 (row 0 normal counts, row 1 fixed-point region weights).
        num_regions: number of regions (int or 0-dim tensor).
        fpr_limit: integration limit in (0, 1].
        name: what to call the value in the warning (e.g. the category).

    Returns:
        AUPRO, or ``nan`` with a warning.

    Raises:
        DataError: when ``num_regions`` exceeds ``MAX_REGIONS`` (the int64 sums could have overflowed).
    """
    num_regions = int(num_regions)
    if num_regions > MAX_REGIONS:
        raise DataError(
            f"{name}: at most {MAX_REGIONS} ground-truth regions are supported in total, got {num_regions}"
        )
    value = aupro_from_histograms(hist[0], hist[1], num_regions, fpr_limit)
    if math.isnan(value):
        rank_zero_warn(
            f"{name} is undefined (nan): {num_regions} anomalous region(s) and {int(hist[0].sum())} normal "
            "pixel(s) seen; it needs at least one of each.",
            UserWarning,
        )
    return value
