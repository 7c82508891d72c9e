"""Histogram maths (lsgs.metrics.histogram) against sklearn, numpy and brute-force loops."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from lsgs.errors import ConfigError, DataError
from lsgs.metrics import histogram as H

NB = 16  # small histograms keep the tests fast; the maths does not depend on the resolution


def hists(scores: np.ndarray, labels: np.ndarray, num_bits: int = NB) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference-free histogram construction via bincount (independent of PixelMetrics' index_add_ path)."""
    bins = H.scores_to_bins(torch.as_tensor(scores, dtype=torch.float32), num_bits)
    labels = torch.as_tensor(labels, dtype=torch.bool)
    n = 1 << num_bits
    return torch.bincount(bins[labels], minlength=n), torch.bincount(bins[~labels], minlength=n)


def distinct_bin_scores(
    rng: np.random.Generator, n: int, num_bits: int = NB, lo: float = 1e-3, hi: float = 10.0
) -> np.ndarray:
    """n float32 scores in [lo, hi], each in its own bin (bin lower edges), so binning loses nothing."""
    bins = rng.choice(
        np.arange(H.bin_of_threshold(lo, num_bits), H.bin_of_threshold(hi, num_bits)), size=n, replace=False
    )
    return H.bin_to_threshold(torch.as_tensor(bins), num_bits).numpy()


def brute_dice(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Best Dice of score >= t over all unique scores t, highest t among ties."""
    best, best_t = -1.0, math.nan
    for t in np.unique(scores)[::-1]:
        pred = scores >= t
        dice = 2 * np.sum(pred & labels) / (np.sum(pred) + np.sum(labels))
        if dice > best:
            best, best_t = dice, t
    return best, best_t


# ---------------------------------------------------------------------------------------------- bins


@pytest.mark.parametrize("num_bits", [9, 13, 20, 24])
def test_bins_preserve_order_and_lower_edges_are_tight(num_bits):
    g = torch.Generator().manual_seed(num_bits)
    x = torch.randn(20000, generator=g) * torch.exp(torch.randn(20000, generator=g) * 20)
    x = x[torch.isfinite(x)]  # exp overflows now and then
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, 1.0, -1.0])])
    bins = H.scores_to_bins(x, num_bits)
    assert bins.dtype == torch.int64 and bins.shape == x.shape
    assert int(bins.min()) >= 0 and int(bins.max()) < 1 << num_bits
    order = torch.argsort(x)
    assert bool((bins[order].diff() >= 0).all()), "bins must be monotone in the score"
    edges = H.bin_to_threshold(bins, num_bits)
    assert edges.dtype == torch.float32 and edges.shape == x.shape
    assert bool((edges <= x).all())
    assert torch.equal(H.scores_to_bins(edges, num_bits), bins)
    below = torch.nextafter(edges, torch.tensor(-math.inf))
    finite = torch.isfinite(below)
    assert bool((H.scores_to_bins(below[finite], num_bits) < bins[finite]).all()), (
        "edge is the smallest float"
    )


def test_bins_shapes_zero_signs_and_dtypes():
    x = torch.tensor([[-0.0, 0.0], [2.0, -2.0]], dtype=torch.float64)
    bins = H.scores_to_bins(x, 12)
    assert bins.shape == (2, 2) and bins[0, 0] == bins[0, 1], "-0.0 and 0.0 compare equal, so share a bin"
    assert torch.equal(H.scores_to_bins(x.half(), 12), bins)
    assert H.threshold_of_bin(int(bins[1, 0]), 12) == 2.0
    assert H.bin_of_threshold(2.0, 12) == int(bins[1, 0])


def test_bins_reject_bad_inputs():
    with pytest.raises(DataError, match="finite"):
        H.scores_to_bins(torch.tensor([1.0, math.nan]), 12)
    with pytest.raises(DataError, match="finite"):
        H.scores_to_bins(torch.tensor([math.inf]), 12)
    with pytest.raises(DataError, match="floating-point"):
        H.scores_to_bins(torch.tensor([1, 2]), 12)
    for bad in (8, 25, 20.0, True, "20"):
        with pytest.raises(ConfigError, match="num_bits"):
            H.check_num_bits(bad)
    with pytest.raises(DataError, match="bins must lie"):
        H.bin_to_threshold(torch.tensor([1 << 12]), 12)
    with pytest.raises(DataError, match="bins must lie"):
        H.bin_to_threshold(torch.tensor([-1]), 12)
    for bad in (math.nan, math.inf, "1", None):
        with pytest.raises(ConfigError, match="threshold"):
            H.bin_of_threshold(bad, 12)
    with pytest.raises(DataError, match="2\\*\\*num_bits"):
        H.infer_num_bits(torch.zeros(1000))
    with pytest.raises(DataError, match="2\\*\\*num_bits"):
        H.infer_num_bits(torch.zeros(1 << 8))


# ---------------------------------------------------------------------------------------- AUROC / AP


@pytest.mark.parametrize("seed", range(5))
def test_auroc_ap_equal_sklearn_when_bins_are_distinct(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 400))
    scores = distinct_bin_scores(rng, n)
    labels = rng.random(n) < rng.uniform(0.05, 0.95)
    labels[0], labels[1] = True, False
    pos, neg = hists(scores, labels)
    assert H.auroc_from_histograms(pos, neg) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert H.average_precision_from_histograms(pos, neg) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )


@pytest.mark.parametrize(
    "case",
    [
        "ties",
        "constant",
        "single_positive",
        "single_negative",
        "negative_scores",
        "many_magnitudes",
        "all_zero_but_one",
    ],
)
def test_auroc_ap_edge_cases_equal_sklearn(case):
    rng = np.random.default_rng(7)
    n = 300
    labels = rng.random(n) < 0.3
    if case == "ties":  # exact ties are ties in sklearn too
        scores = rng.choice(distinct_bin_scores(rng, 6), size=n)
    elif case == "constant":
        scores = np.full(n, 0.25, dtype=np.float32)
    elif case == "single_positive":
        scores, labels = distinct_bin_scores(rng, n), np.zeros(n, dtype=bool)
        labels[17] = True
    elif case == "single_negative":
        scores, labels = distinct_bin_scores(rng, n), np.ones(n, dtype=bool)
        labels[3] = False
    elif case == "negative_scores":
        scores = distinct_bin_scores(rng, n, lo=-50.0, hi=-1e-6)
    elif case == "many_magnitudes":  # 1e-30 .. 1e30, still distinct bins at 20 bits
        scores = (10.0 ** rng.uniform(-30, 30, n)).astype(np.float32)
    else:
        scores = np.zeros(n, dtype=np.float32)
        scores[5] = 1.0
    num_bits = 20 if case == "many_magnitudes" else NB
    assert len(np.unique(H.scores_to_bins(torch.as_tensor(scores), num_bits))) == len(np.unique(scores))
    pos, neg = hists(scores, labels, num_bits)
    assert H.auroc_from_histograms(pos, neg) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert H.average_precision_from_histograms(pos, neg) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )
    if case == "constant":
        assert H.auroc_from_histograms(pos, neg) == 0.5
        assert H.average_precision_from_histograms(pos, neg) == pytest.approx(labels.mean(), abs=1e-15)


def test_undefined_cases_are_nan():
    scores = np.linspace(0, 1, 50, dtype=np.float32)
    pos, neg = hists(scores, np.zeros(50, dtype=bool))  # all normal
    assert math.isnan(H.auroc_from_histograms(pos, neg))
    assert math.isnan(H.average_precision_from_histograms(pos, neg))
    dice, threshold = H.best_dice_from_histograms(pos, neg)
    assert math.isnan(dice) and math.isnan(threshold)
    assert math.isnan(H.dice_at_threshold(pos, neg, 0.5, NB))
    pos, neg = hists(scores, np.ones(50, dtype=bool))  # no negatives
    assert math.isnan(H.auroc_from_histograms(pos, neg))
    assert (
        H.average_precision_from_histograms(pos, neg) == 1.0
    )  # precision is 1 at every threshold, as sklearn
    empty = torch.zeros(1 << NB, dtype=torch.int64)
    assert math.isnan(H.quantile_from_histogram(empty, 0.5, NB))


def test_pair_shape_errors():
    with pytest.raises(DataError, match="equal length"):
        H.auroc_from_histograms(torch.zeros(8), torch.zeros(9))
    with pytest.raises(DataError, match="equal length"):
        H.average_precision_from_histograms(torch.zeros(2, 8), torch.zeros(2, 8))


# ------------------------------------------------------------------------------------------------ Dice


@pytest.mark.parametrize("seed", range(6))
def test_best_dice_equals_brute_force_sweep(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(5, 300))
    scores = distinct_bin_scores(rng, n) if seed % 2 else rng.choice(distinct_bin_scores(rng, 8), n)
    labels = rng.random(n) < 0.3
    labels[0] = True
    pos, neg = hists(scores, labels)
    dice, threshold = H.best_dice_from_histograms(pos, neg)
    ref_dice, ref_t = brute_dice(scores, labels)
    assert dice == pytest.approx(ref_dice, abs=1e-12)
    assert threshold == ref_t  # distinct bins: the lower edge is the score itself (scores are bin edges)


def test_best_dice_threshold_is_lower_edge_within_a_bin():
    # Two scores share one bin: the threshold is the bin's lower edge, below both.
    scores = np.array([0.1, 1.0, 1.0001, 2.0], dtype=np.float32)
    labels = np.array([False, True, True, False])
    pos, neg = hists(scores, labels, 12)
    dice, threshold = H.best_dice_from_histograms(pos, neg)
    assert dice == pytest.approx(2 * 2 / (3 + 2))
    assert threshold <= 1.0 and H.bin_of_threshold(threshold, 12) == H.bin_of_threshold(1.0001, 12)


@pytest.mark.parametrize("seed", range(3))
def test_dice_at_threshold_equals_direct_count(seed):
    rng = np.random.default_rng(200 + seed)
    scores = distinct_bin_scores(rng, 200)
    labels = rng.random(200) < 0.4
    pos, neg = hists(scores, labels)
    for t in np.concatenate([rng.choice(scores, 5), [scores.min(), scores.max()]]):
        pred = scores >= t
        ref = 2 * np.sum(pred & labels) / (np.sum(pred) + np.sum(labels))
        assert H.dice_at_threshold(pos, neg, float(t), NB) == pytest.approx(ref, abs=1e-12)
        tp, fp, n_pos = H.counts_at_threshold(pos, neg, float(t), NB)
        assert (tp, fp, n_pos) == (np.sum(pred & labels), np.sum(pred & ~labels), np.sum(labels))
    with pytest.raises(ConfigError, match="does not match"):
        H.dice_at_threshold(pos, neg, 0.5, NB + 1)
    with pytest.raises(ConfigError, match="threshold"):
        H.dice_at_threshold(pos, neg, math.nan, NB)
    assert math.isnan(H.dice_from_counts(0, 5, 0))


# -------------------------------------------------------------------------------------------- quantile


@pytest.mark.parametrize("seed", range(3))
def test_quantile_is_numpy_lower_quantile_rounded_to_its_bin(seed):
    rng = np.random.default_rng(300 + seed)
    scores = (rng.lognormal(-2, 1.5, 5000) * (rng.random(5000) < 0.7)).astype(np.float32)  # many exact zeros
    hist = torch.bincount(H.scores_to_bins(torch.as_tensor(scores), NB), minlength=1 << NB)
    for q in (0.0, 0.1, 0.5, 0.9, 0.99, 0.999, 1.0):
        ref = float(np.quantile(scores, q, method="lower"))
        got = H.quantile_from_histogram(hist, q, NB)
        assert H.bin_of_threshold(got, NB) == H.bin_of_threshold(ref, NB) and got <= ref
        assert got == H.threshold_of_bin(H.bin_of_threshold(ref, NB), NB)


def test_quantile_errors():
    hist = torch.zeros(1 << NB, dtype=torch.int64)
    for bad in (-0.1, 1.1, math.nan, "0.5", True):
        with pytest.raises(ConfigError, match="quantile"):
            H.quantile_from_histogram(hist, bad, NB)
    with pytest.raises(ConfigError, match="does not match"):
        H.quantile_from_histogram(hist, 0.5, NB + 1)


# ---------------------------------------------------------------------------------------------- curves


def test_curves_equal_sklearn_without_thinning():
    rng = np.random.default_rng(5)
    scores = distinct_bin_scores(rng, 300)
    labels = rng.random(300) < 0.3
    pos, neg = hists(scores, labels)
    fpr, tpr, thr = H.roc_curve_from_histograms(pos, neg, max_points=1000)
    ref_fpr, ref_tpr, ref_thr = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, atol=1e-15)
    np.testing.assert_allclose(tpr, ref_tpr, atol=1e-15)
    np.testing.assert_array_equal(thr, ref_thr)  # both start at +inf
    precision, recall, pr_thr = H.pr_curve_from_histograms(pos, neg, max_points=1000)
    ref_p, ref_r, ref_pt = precision_recall_curve(labels, scores, drop_intermediate=False)
    # sklearn: ascending thresholds plus a final (precision 1, recall 0) point; ours: descending thresholds.
    np.testing.assert_allclose(precision, ref_p[:-1][::-1], atol=1e-15)
    np.testing.assert_allclose(recall, ref_r[:-1][::-1], atol=1e-15)
    np.testing.assert_array_equal(pr_thr, ref_pt[::-1])


def test_curves_are_thinned_monotone_and_keep_endpoints():
    rng = np.random.default_rng(6)
    scores = rng.lognormal(0, 2, 50000).astype(np.float32)
    labels = rng.random(50000) < 0.05
    pos, neg = hists(scores, labels)
    fpr, tpr, thr = H.roc_curve_from_histograms(pos, neg, max_points=100)
    assert fpr.shape == tpr.shape == thr.shape and len(fpr) <= 101
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0) and np.all(np.diff(thr) < 0)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    precision, recall, pr_thr = H.pr_curve_from_histograms(pos, neg, max_points=100)
    assert precision.shape == recall.shape == pr_thr.shape and len(recall) <= 100 and recall[-1] == 1.0
    with pytest.raises(ConfigError, match="max_points"):
        H.roc_curve_from_histograms(pos, neg, max_points=1)
    # Undefined parts are nan, not errors.
    fpr, tpr, _ = H.roc_curve_from_histograms(pos + neg, torch.zeros_like(neg))
    assert np.isnan(fpr).all() and not np.isnan(tpr).any()
    _, recall, _ = H.pr_curve_from_histograms(torch.zeros_like(pos), pos + neg)
    assert np.isnan(recall).all()
    fpr, tpr, _ = H.roc_curve_from_histograms(torch.zeros_like(pos), pos + neg)
    assert np.isnan(tpr).all()
