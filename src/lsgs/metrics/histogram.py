"""Constant-memory score histograms: the sufficient statistics behind every pixel metric.

A float32 score is mapped to an order-preserving integer key (its IEEE-754 bits with the sign handled so that
signed-integer order equals float order) and the top ``num_bits`` bits of that key are its bin. Bins therefore
follow the float format: every power-of-two range ("binade") is cut into ``2 ** (num_bits - 9)`` equal-width
bins, so the relative bin width is the same from 1e-30 to 1e30 and no score range has to be chosen in advance.
Scores in the same bin are treated as exact ties; scores in different bins keep their order exactly.

Per-class histograms over these bins are integer counts that merge across batches and DDP ranks by summation,
and every metric below is computed from them in O(number of bins), independent of the number of pixels.

Conventions shared by all functions here:
    * ``pos`` / ``neg``: ``[num_bins]`` integer histograms of positive (anomalous) and negative (normal)
      scores, bin 0 = lowest scores. ``num_bins`` is ``2 ** num_bits`` whenever a threshold is returned (the
      number of bits is then inferred from the length); AUROC and AP accept any length (image AUROC uses one
      bin per unique score).
    * Predictions at a threshold ``t`` are ``score >= t``; thresholds returned are bin lower edges (the
      smallest float32 that maps to the bin), so ``score >= t`` selects exactly the bins ``>= bin(t)``.
    * Undefined values (no positives, no negatives where the metric needs them) are ``nan``, never an
      exception.
"""

import math

import numpy as np
import torch
from torch import Tensor

from lsgs.errors import ConfigError, DataError

MIN_NUM_BITS = 9  # sign + 8 exponent bits: below this, bins would mix finite scores with inf/NaN bit patterns
MAX_NUM_BITS = 24  # 2**24 int64 bins = 128 MiB per histogram
# Chosen by measurement (benchmarks/metrics.py, 49M realistic pixels vs sklearn's exact values). AP is the
# binding metric: its tie rule is pessimistic, so merging scores into a bin biases it by about one relative
# bin width times a constant (|dAP| 1.2e-3 at 16 bits, 2.9e-4 at 18, 7e-5 at 20, halving per bit); AUROC's
# 0.5-per-tie rule is unbiased (|dAUROC| < 1e-6 from 16 bits on). 20 bits keeps |dAP| an order of magnitude
# below the 0.1 % that tables print, at 8 MiB per histogram.
DEFAULT_NUM_BITS = 20


def check_num_bits(num_bits: int) -> int:
    """Validate a histogram resolution.

    Args:
        num_bits: number of leading bits of the order-preserving float32 key used as the bin index.

    Returns:
        ``num_bits`` unchanged.

    Raises:
        ConfigError: when ``num_bits`` is not an int in ``[MIN_NUM_BITS, MAX_NUM_BITS]``.
    """
    if isinstance(num_bits, bool) or not isinstance(num_bits, int) or not (
            MIN_NUM_BITS <= num_bits <= MAX_NUM_BITS):
        raise ConfigError(
            f"num_bits must be an int in [{MIN_NUM_BITS}, {MAX_NUM_BITS}] (histogram of 2**num_bits bins), "
            f"got {num_bits!r}"
        )
    return num_bits


def num_bins(num_bits: int) -> int:
    """Number of histogram bins for ``num_bits`` (``2 ** num_bits``)."""
    return 1 << check_num_bits(num_bits)


def check_finite(scores: Tensor, name: str = "scores") -> None:
    """Raise DataError when ``scores`` holds NaN or +-inf (they have no place in a ranking).

    Args:
        scores: ``[*]`` float tensor.
        name: what to call the tensor in the error message.
    """
    finite = torch.isfinite(scores)
    if not bool(finite.all()):
        bad = scores[~finite]
        raise DataError(
            f"{name} must be finite: got {bad.numel()} NaN/inf value(s) out of {scores.numel()} "
            f"(first: {bad[0].item()}); check the anomaly maps fed to the metric"
        )


def scores_to_bins(scores: Tensor, num_bits: int) -> Tensor:
    """Map scores to order-preserving histogram bins.

    Args:
        scores: ``[*]`` finite scores of any float dtype (converted to float32 first).
        num_bits: bin resolution, see ``check_num_bits``.

    Returns:
        ``[*]`` int64 bins in ``[0, 2 ** num_bits)``; ``a <= b`` implies ``bin(a) <= bin(b)``.

    Raises:
        DataError: when ``scores`` is not floating point or holds NaN/inf.
    """
    check_num_bits(num_bits)
    if not scores.is_floating_point():
        raise DataError(f"scores must be a floating-point tensor, got dtype {scores.dtype}")
    check_finite(scores)
    # + 0.0 turns -0.0 into +0.0: they compare equal, so they must share a bin.
    x = scores.detach().to(torch.float32).contiguous() + 0.0
    bits = x.view(torch.int32)
    # Negative floats order backwards by their bits; flipping the magnitude bits makes int order = float order
    key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    # Arithmetic shift keeps the top bits (floor division); the offset maps the range to [0, 2**num_bits).
    return ((key >> (32 - num_bits)) + (1 << (num_bits - 1))).long()


def bin_to_threshold(bins: Tensor, num_bits: int) -> Tensor:
    """Lower edge of each bin: the smallest float32 that ``scores_to_bins`` maps to it.

    Args:
        bins: ``[*]`` integer bins in ``[0, 2 ** num_bits)``.
        num_bits: bin resolution used to make the bins.

    Returns:
        ``[*]`` float32 thresholds; ``scores >= bin_to_threshold(b)`` iff ``scores_to_bins(scores) >= b``.
        Bins that can only hold NaN/inf bit patterns (never filled, since such scores are rejected) give NaN
        or +inf.

    Raises:
        DataError: when a bin is outside ``[0, 2 ** num_bits)``.
    """
    n = num_bins(num_bits)
    bins = torch.as_tensor(bins).long()
    if bins.numel() and (int(bins.min()) < 0 or int(bins.max()) >= n):
        raise DataError(
            f"bins must lie in [0, {n}) for num_bits={num_bits}, got range [{bins.min()}, {bins.max()}]"
        )
    key = ((bins - (1 << (num_bits - 1))) << (32 - num_bits)).to(torch.int32)
    bits = torch.where(key < 0, key ^ 0x7FFFFFFF, key)
    return bits.view(torch.float32)


def threshold_of_bin(bin_index: int, num_bits: int) -> float:
    """``bin_to_threshold`` for one bin, as a Python float (exactly the float32 value)."""
    return float(bin_to_threshold(torch.tensor([bin_index]), num_bits)[0])


def bin_of_threshold(threshold: float, num_bits: int) -> int:
    """Bin of one finite threshold value (``scores >= threshold`` is read as ``bin >= bin_of_threshold``).

    A threshold inside a bin is thereby rounded down to the bin's lower edge: scores in its bin are ties at
    this resolution. Thresholds from ``quantile_from_histogram`` / ``best_dice_from_histograms`` are lower
    edges already.

    Raises:
        ConfigError: when ``threshold`` is not a finite number.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ConfigError(f"threshold must be a finite number, got {threshold!r}")
    return int(scores_to_bins(torch.tensor([float(threshold)], dtype=torch.float32), num_bits)[0])


def infer_num_bits(hist: Tensor) -> int:
    """Number of bits of a ``[2 ** num_bits]`` histogram.

    Raises:
        DataError: when the length is not ``2 ** num_bits`` for an allowed ``num_bits``.
    """
    n = hist.shape[-1] if hist.dim() else 0
    num_bits = n.bit_length() - 1
    if n <= 0 or n != 1 << num_bits or not MIN_NUM_BITS <= num_bits <= MAX_NUM_BITS:
        raise DataError(
            f"histogram length must be 2**num_bits with num_bits in [{MIN_NUM_BITS}, {MAX_NUM_BITS}], got {n}"
        )
    return num_bits


def _check_pair(pos: Tensor, neg: Tensor) -> None:
    if pos.dim() != 1 or pos.shape != neg.shape:
        raise DataError(f"pos and neg must be 1-D histograms of equal length, got {tuple(pos.shape)} and "
                        f"{tuple(neg.shape)}")


def _nonempty(pos: Tensor, neg: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Bins holding any score, and both histograms restricted to them.

    Empty bins change no metric, and real score distributions fill a small fraction of the 2**num_bits bins,
    so every function works on the compressed arrays.

    Returns:
        ``bins`` ``[M]`` int64 (ascending), ``pos[bins]``, ``neg[bins]``.
    """
    bins = torch.nonzero((pos + neg) > 0).flatten()
    return bins, pos[bins], neg[bins]


def _descending_cumsum(hist: Tensor) -> Tensor:
    """``out[b] = hist[b:].sum()`` for an integer ``[N]`` hist (int cumsum: exact, deterministic on CUDA)."""
    return hist.flip(0).cumsum(0).flip(0)


def auroc_from_histograms(pos: Tensor, neg: Tensor) -> float:
    """Area under the ROC curve from class histograms (Mann-Whitney U; pairs in the same bin count 0.5).

    Equals sklearn's ``roc_auc_score`` when distinct scores fall in distinct bins.

    Args:
        pos: ``[N]`` counts of positive scores per bin (ascending score order).
        neg: ``[N]`` counts of negative scores per bin.

    Returns:
        AUROC in [0, 1]; constant scores give 0.5; ``nan`` when there are no positives or no negatives.
    """
    _check_pair(pos, neg)
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, pos, neg = _nonempty(pos, neg)
    neg_below = neg.cumsum(0) - neg
    pairs = (pos.double() * (neg_below.double() + 0.5 * neg.double())).sum()
    return float(pairs) / (float(n_pos) * float(n_neg))


def average_precision_from_histograms(pos: Tensor, neg: Tensor) -> float:
    """Average precision with sklearn's step definition, bins as thresholds.

    ``AP = sum_t (R_t - R_prev) * P_t`` over thresholds ``t`` in descending order: only bins holding positives
    contribute, each with ``pos[b] / P`` times the precision of ``score >= bin b``.

    Args:
        pos: ``[N]`` counts of positive scores per bin.
        neg: ``[N]`` counts of negative scores per bin.

    Returns:
        AP in [0, 1]; constant scores give the prevalence; ``nan`` when there are no positives; 1.0 when there
        are no negatives (every threshold has precision 1), as sklearn.
    """
    _check_pair(pos, neg)
    n_pos = int(pos.sum())
    if n_pos == 0:
        return math.nan
    _, pos, neg = _nonempty(pos, neg)
    has_pos = pos > 0
    tp = _descending_cumsum(pos)[has_pos].double()
    fp = _descending_cumsum(neg)[has_pos].double()
    return float((pos[has_pos].double() * (tp / (tp + fp))).sum()) / n_pos


def _dice(tp: Tensor, fp: Tensor, n_pos: int) -> Tensor:
    """Dice of ``score >= t`` from true/false positives: ``2TP / (2TP + FP + FN) = 2TP / (TP + FP + P)``."""
    return 2.0 * tp.double() / (tp + fp + n_pos).double()


def best_dice_from_histograms(pos: Tensor, neg: Tensor) -> tuple[float, float]:
    """Best Dice over all thresholds (bin lower edges), and that threshold.

    Optimistic by construction (the threshold is chosen on the data it scores), which is what the paper
    reports.

    Args:
        pos: ``[2 ** num_bits]`` counts of positive scores per bin.
        neg: ``[2 ** num_bits]`` counts of negative scores per bin.

    Returns:
        ``(dice, threshold)``: the largest Dice of ``score >= threshold`` over thresholds at non-empty bins,
        and that threshold (the highest one among equal Dice values). ``(nan, nan)`` without positives.
    """
    _check_pair(pos, neg)
    num_bits = infer_num_bits(pos)
    n_pos = int(pos.sum())
    if n_pos == 0:
        return math.nan, math.nan
    bins, pos, neg = _nonempty(pos, neg)  # thresholds at non-empty bins only
    dice = _dice(_descending_cumsum(pos), _descending_cumsum(neg), n_pos)
    # argmax returns the first maximum; searching the flipped array picks the highest threshold among ties.
    best = dice.numel() - 1 - int(torch.argmax(dice.flip(0)))
    return float(dice[best]), threshold_of_bin(int(bins[best]), num_bits)


def counts_at_threshold(pos: Tensor, neg: Tensor, threshold: float, num_bits: int) -> tuple[int, int, int]:
    """True positives, false positives and positives of ``score >= threshold``.

    Exact when ``threshold`` is a bin lower edge (as from ``quantile_from_histogram``); otherwise it is
    rounded down to the lower edge of its bin (see ``bin_of_threshold``).

    Args:
        pos: ``[2 ** num_bits]`` counts of positive scores per bin.
        neg: ``[2 ** num_bits]`` counts of negative scores per bin.
        threshold: finite decision threshold.
        num_bits: bin resolution of the histograms.

    Returns:
        ``(tp, fp, n_pos)`` as ints.

    Raises:
        ConfigError: when ``threshold`` is not finite or ``num_bits`` does not match the histograms.
    """
    _check_pair(pos, neg)
    if pos.numel() != num_bins(num_bits):
        raise ConfigError(f"num_bits={num_bits} does not match histograms of length {pos.numel()}")
    b = bin_of_threshold(threshold, num_bits)
    return int(pos[b:].sum()), int(neg[b:].sum()), int(pos.sum())


def dice_from_counts(tp: int, fp: int, n_pos: int) -> float:
    """Dice ``2TP / (TP + FP + P)`` (= ``2TP / (2TP + FP + FN)``); ``nan`` when there are no positives."""
    return math.nan if n_pos == 0 else 2.0 * tp / (tp + fp + n_pos)


def dice_at_threshold(pos: Tensor, neg: Tensor, threshold: float, num_bits: int) -> float:
    """Dice of ``score >= threshold`` (the honest Dice when the threshold comes from validation normals).

    Args:
        pos: ``[2 ** num_bits]`` counts of positive scores per bin.
        neg: ``[2 ** num_bits]`` counts of negative scores per bin.
        threshold: finite decision threshold, read as in ``counts_at_threshold``.
        num_bits: bin resolution of the histograms.

    Returns:
        Dice in [0, 1]; ``nan`` when there are no positives.

    Raises:
        ConfigError: when ``threshold`` is not finite or ``num_bits`` does not match the histograms.
    """
    return dice_from_counts(*counts_at_threshold(pos, neg, threshold, num_bits))


def quantile_from_histogram(hist: Tensor, q: float, num_bits: int) -> float:
    """Lower quantile of the histogrammed scores, rounded down to its bin's lower edge.

    Same order statistic as ``numpy.quantile(scores, q, method="lower")`` (the ``floor((n - 1) q)``-th
    smallest score, 0-based); the returned value is the lower edge of that score's bin, so it is within one
    bin of numpy's value and ``score >= quantile`` keeps whole bins.

    Args:
        hist: ``[2 ** num_bits]`` counts per bin.
        q: quantile in [0, 1].
        num_bits: bin resolution of the histogram.

    Returns:
        The threshold; ``nan`` for an empty histogram.

    Raises:
        ConfigError: when ``q`` is outside [0, 1] or ``num_bits`` does not match the histogram.
    """
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 <= q <= 1.0:
        raise ConfigError(f"quantile q must be a number in [0, 1], got {q!r}")
    if hist.dim() != 1 or hist.numel() != num_bins(num_bits):
        raise ConfigError(f"num_bits={num_bits} does not match a histogram of shape {tuple(hist.shape)}")
    cum = hist.cumsum(0)
    n = int(cum[-1])
    if n == 0:
        return math.nan
    k = int(np.floor((n - 1) * float(q)))  # numpy's "lower" virtual index, in float64 as numpy computes it
    b = int(torch.searchsorted(cum, torch.tensor([k], device=cum.device), right=True)[0])
    return threshold_of_bin(b, num_bits)


def _curve_points(pos: Tensor, neg: Tensor, max_points: int) -> tuple[Tensor, Tensor, Tensor]:
    """Cumulative TP / FP at each non-empty bin (descending thresholds), thinned to <= max_points.

    Points are kept at even steps of ``TP/P + FP/N`` (the ROC path length), so both steep and flat parts of
    the curve keep their shape; the first and last points are always kept.

    Returns:
        ``tp``, ``fp`` ``[M]`` int64 and ``bins`` ``[M]`` int64, thresholds in descending order.
    """
    if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 2:
        raise ConfigError(f"max_points must be an int >= 2, got {max_points!r}")
    bins, pos, neg = _nonempty(pos, neg)
    bins, tp, fp = bins.flip(0), pos.flip(0).cumsum(0), neg.flip(0).cumsum(0)  # from the highest bin down
    if bins.numel() > max_points:
        n_pos, n_neg = max(int(pos.sum()), 1), max(int(neg.sum()), 1)
        path = tp.double() / n_pos + fp.double() / n_neg  # non-decreasing from ~0 to 2
        targets = torch.linspace(float(path[0]), float(path[-1]), max_points, dtype=torch.float64,
                                 device=path.device)
        keep = torch.unique(torch.searchsorted(path, targets).clamp_(max=bins.numel() - 1))
        keep[-1] = bins.numel() - 1
        bins, tp, fp = bins[keep], tp[keep], fp[keep]
    return tp, fp, bins


def roc_curve_from_histograms(
    pos: Tensor, neg: Tensor, max_points: int = 2048
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve for plotting, thinned to at most ``max_points + 1`` points.

    Args:
        pos: ``[2 ** num_bits]`` counts of positive scores per bin.
        neg: ``[2 ** num_bits]`` counts of negative scores per bin.
        max_points: most thresholds kept (the (0, 0) start point is added on top).

    Returns:
        ``fpr``, ``tpr``, ``thresholds`` as float64 numpy arrays ``[M]`` in descending-threshold order,
        starting at ``(0, 0)`` with threshold ``+inf`` like sklearn's ``roc_curve``. ``fpr`` is nan without
        negatives, ``tpr`` without positives.
    """
    _check_pair(pos, neg)
    num_bits = infer_num_bits(pos)
    tp, fp, bins = _curve_points(pos, neg, max_points)
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.concatenate([[0.0], tp.cpu().double().numpy() / n_pos])
        fpr = np.concatenate([[0.0], fp.cpu().double().numpy() / n_neg])
    if n_pos == 0:
        tpr[:] = np.nan
    if n_neg == 0:
        fpr[:] = np.nan
    thresholds = np.concatenate([[np.inf], bin_to_threshold(bins.cpu(), num_bits).double().numpy()])
    return fpr, tpr, thresholds


def pr_curve_from_histograms(
    pos: Tensor, neg: Tensor, max_points: int = 2048
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curve for plotting, thinned to at most ``max_points`` points.

    Args:
        pos: ``[2 ** num_bits]`` counts of positive scores per bin.
        neg: ``[2 ** num_bits]`` counts of negative scores per bin.
        max_points: most thresholds kept.

    Returns:
        ``precision``, ``recall``, ``thresholds`` as float64 numpy arrays ``[M]`` in descending-threshold
        order (recall non-decreasing). ``recall`` is nan without positives.
    """
    _check_pair(pos, neg)
    num_bits = infer_num_bits(pos)
    tp, fp, bins = _curve_points(pos, neg, max_points)
    tp_np, fp_np = tp.cpu().double().numpy(), fp.cpu().double().numpy()
    n_pos = float(pos.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = tp_np / n_pos if n_pos > 0 else np.full_like(tp_np, np.nan)
        precision = tp_np / (tp_np + fp_np)
    return precision, recall, bin_to_threshold(bins.cpu(), num_bits).double().numpy()
