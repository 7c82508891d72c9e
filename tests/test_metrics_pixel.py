"""PixelMetrics, ScoreQuantile and ImageAUROC against sklearn / numpy / brute force."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from test_metrics_histogram import brute_dice, distinct_bin_scores

from lsgs.errors import ConfigError, DataError
from lsgs.metrics import ImageAUROC, PixelMetrics, ScoreQuantile
from lsgs.metrics._inputs import check_binary
from lsgs.metrics.histogram import bin_of_threshold, num_bins
from lsgs.metrics.image import exact_auroc
from lsgs.nn.image_score import image_scores_from_maps

NB = 16


def make_batch(seed: int, batch: int = 6, size: int = 10):
    """[B, 1, H, W] maps with distinct-bin scores (anomalies tend higher), masks and a random valid mask."""
    rng = np.random.default_rng(seed)
    masks = rng.random((batch, 1, size, size)) < 0.25
    values = np.sort(distinct_bin_scores(rng, masks.size, NB))
    rank = np.argsort(np.argsort(rng.random(masks.size) + 0.5 * masks.ravel()))
    maps = values[rank].reshape(masks.shape)
    valid = rng.random(masks.shape) < 0.7
    return torch.from_numpy(maps), torch.from_numpy(masks), torch.from_numpy(valid)


@pytest.mark.parametrize("use_valid", [False, True])
def test_pixel_metrics_equal_sklearn_and_brute_force(use_valid):
    maps, masks, valid = make_batch(0, batch=12)
    metric = PixelMetrics(num_bits=NB)
    for part in (slice(0, 5), slice(5, 6), slice(6, 12)):  # uneven batches
        metric.update(maps[part], masks[part], valid[part] if use_valid else None)
    keep = valid if use_valid else torch.ones_like(valid)
    scores, labels = maps[keep].numpy(), masks[keep].numpy()
    result = metric.compute()
    assert list(result) == ["pixel_ap", "pixel_auroc", "dice_best", "dice_best_threshold"]
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert result["pixel_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    ref_dice, ref_t = brute_dice(scores, labels)
    assert result["dice_best"] == pytest.approx(ref_dice, abs=1e-12)
    assert result["dice_best_threshold"] == ref_t  # scores are bin lower edges here
    for q in (0.3, 0.5, 0.9, 0.99):
        t = float(np.quantile(scores, q, method="lower"))  # an actual score, i.e. a bin edge: exact
        pred = scores >= t
        ref = 2 * np.sum(pred & labels) / (np.sum(pred) + np.sum(labels))
        assert metric.dice_at(t) == pytest.approx(ref, abs=1e-12)


def test_single_batch_exact_and_batching_invariance():
    maps, masks, valid = make_batch(10, batch=8)
    whole, parts = PixelMetrics(num_bits=NB), PixelMetrics(num_bits=NB)
    whole.update(maps, masks, valid)
    for i in (3, 0, 7, 1, 6, 2, 5, 4):
        parts.update(maps[i : i + 1], masks[i : i + 1], valid[i : i + 1])
    assert torch.equal(whole.hist, parts.hist)
    assert whole.compute() == parts.compute()
    scores, labels = maps[valid].numpy(), masks[valid].numpy()
    assert whole.compute()["pixel_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    # Input dtypes: float64 maps, 0/1 float masks, 0/1 int valid give the same histogram.
    other = PixelMetrics(num_bits=NB)
    other.update(maps.double(), masks.float(), valid.int())
    assert torch.equal(other.hist, whole.hist)
    assert whole.hist.shape == (2, num_bins(NB)) and whole.hist.dtype == torch.int64


def test_forward_reset_curves_and_histogram():
    maps, masks, _ = make_batch(12)
    metric = PixelMetrics(num_bits=NB)
    batch_values = metric(maps[:3], masks[:3])  # torchmetrics forward: batch values, and accumulates
    first = PixelMetrics(num_bits=NB)
    first.update(maps[:3], masks[:3])
    assert batch_values == first.compute()
    metric.update(maps[3:], masks[3:])
    reference = PixelMetrics(num_bits=NB)
    reference.update(maps, masks)
    assert metric.compute() == reference.compute()
    hist = metric.histogram()
    assert torch.equal(hist, metric.hist) and hist.data_ptr() != metric.hist.data_ptr()  # a copy
    curves = metric.curves(max_points=50)
    assert set(curves) == {"fpr", "tpr", "roc_thresholds", "precision", "recall", "pr_thresholds"}
    assert len(curves["fpr"]) <= 51 and len(curves["precision"]) <= 50
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float64 for v in curves.values())
    metric.reset()
    assert int(metric.hist.sum()) == 0


def test_pixel_metrics_undefined_and_constant():
    metric = PixelMetrics(num_bits=NB)
    metric.update(torch.rand(2, 1, 4, 4), torch.zeros(2, 1, 4, 4, dtype=torch.bool))
    result = metric.compute()
    assert all(math.isnan(v) for v in result.values()) and math.isnan(metric.dice_at(0.5))
    constant = PixelMetrics(num_bits=NB)
    masks = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) < 0.3
    constant.update(torch.full((2, 1, 8, 8), 0.7), masks)
    result = constant.compute()
    assert result["pixel_auroc"] == 0.5
    assert result["pixel_ap"] == pytest.approx(float(masks.float().mean()), abs=1e-15)
    assert result["dice_best_threshold"] <= 0.7 and result["dice_best"] == pytest.approx(
        2 * masks.float().mean().item() / (1 + masks.float().mean().item())
    )


def test_pixel_metrics_errors():
    metric = PixelMetrics(num_bits=NB)
    maps = torch.rand(2, 1, 4, 4)
    with pytest.raises(ConfigError, match="num_bits"):
        PixelMetrics(num_bits=8)
    with pytest.raises(DataError, match="masks must have the shape"):
        metric.update(maps, torch.zeros(2, 1, 4, 5))
    with pytest.raises(DataError, match="masks must have the shape"):
        metric.update(maps, np.zeros((2, 1, 4, 4)))
    with pytest.raises(DataError, match="valid must have the shape"):
        metric.update(maps, torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 3, dtype=torch.bool))
    with pytest.raises(DataError, match="valid must have the shape"):
        metric.update(maps, torch.zeros(2, 1, 4, 4), [1])
    with pytest.raises(DataError, match="binary"):
        metric.update(maps, torch.full((2, 1, 4, 4), 2))
    with pytest.raises(DataError, match="binary"):
        metric.update(maps, torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), 0.5))
    with pytest.raises(DataError, match="finite"):
        metric.update(maps.masked_fill(maps > 0.5, math.inf), torch.zeros(2, 1, 4, 4))
    with pytest.raises(DataError, match="floating-point"):
        metric.update(torch.ones(2, 1, 4, 4, dtype=torch.int64), torch.zeros(2, 1, 4, 4))
    with pytest.raises(DataError, match=r"torch\.Tensor"):
        metric.update(np.ones((2, 1, 4, 4)), torch.zeros(2, 1, 4, 4))
    with pytest.raises(ConfigError, match="threshold"):
        metric.dice_at(math.nan)
    with pytest.raises(DataError, match=r"masks must be a torch\.Tensor"):
        check_binary([0, 1], "masks")  # the helper on its own (callers check shapes first)
    assert int(metric.hist.sum()) == 0, "failed updates must not leave partial counts"


# ---------------------------------------------------------------------------------------- ScoreQuantile


def test_score_quantile_matches_numpy_lower_within_its_bin():
    rng = np.random.default_rng(0)
    scores = torch.from_numpy(rng.lognormal(-1, 2, (4, 1, 16, 16)) * (rng.random((4, 1, 16, 16)) < 0.6))
    valid = torch.from_numpy(rng.random((4, 1, 16, 16)) < 0.8)
    metric = ScoreQuantile(q=0.9, num_bits=NB)
    metric.update(scores[:2], valid[:2])
    metric.update(scores[2:], valid[2:])
    kept = scores[valid].float().numpy()
    for q in (0.0, 0.5, 0.9, 0.99, 1.0):
        ref = float(np.quantile(kept, q, method="lower"))
        got = metric.quantile(q)
        assert got <= ref and bin_of_threshold(got, NB) == bin_of_threshold(ref, NB)
    assert metric.compute() == metric.quantile(0.9)
    nll = ScoreQuantile(num_bits=NB)  # any shape: e.g. [B, 256] code NLLs
    nll.update(torch.arange(512, dtype=torch.float32).reshape(2, 256))
    # q=0.5: the 255th value, 255.0 (a bin edge); q=0.99: the 505th, 505.0, whose bin (width 2 at 16 bits)
    # starts at 504.
    assert nll.quantile(0.5) == 255.0 and nll.compute() == 504.0
    assert math.isnan(ScoreQuantile(num_bits=NB).quantile(0.5))


def test_score_quantile_errors():
    for bad in (1.5, -0.01, math.nan):
        with pytest.raises(ConfigError, match="quantile"):
            ScoreQuantile(q=bad)
    metric = ScoreQuantile(num_bits=NB)
    with pytest.raises(ConfigError, match="quantile"):
        metric.quantile(2.0)
    with pytest.raises(DataError, match="finite"):
        metric.update(torch.tensor([1.0, math.nan]))
    with pytest.raises(DataError, match="valid must have the shape"):
        metric.update(torch.ones(4), torch.ones(3, dtype=torch.bool))
    with pytest.raises(DataError, match="binary"):
        metric.update(torch.ones(4), torch.full((4,), 3))


# ------------------------------------------------------------------------------------------ ImageAUROC


def test_image_auroc_is_exact_with_ties():
    rng = np.random.default_rng(1)
    scores = rng.choice([0.0, -0.0, 0.1, 0.5, 0.5000001, 2.0], size=200).astype(np.float32)
    labels = rng.random(200) < 0.4
    metric = ImageAUROC()
    metric.update(torch.from_numpy(scores[:77]), torch.from_numpy(labels[:77]))
    metric.update(torch.from_numpy(scores[77:]), torch.from_numpy(labels[77:]).int())
    assert metric.compute() == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    values, flags = metric.values()
    assert values.shape == flags.shape == (200,) and flags.dtype == torch.bool
    assert math.isnan(exact_auroc(torch.ones(3), torch.ones(3, dtype=torch.bool)))
    assert math.isnan(exact_auroc(torch.zeros(0), torch.zeros(0, dtype=torch.bool)))
    empty = ImageAUROC()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(empty.compute())


def test_image_scores_from_maps_and_errors():
    maps = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).reshape(2, 1, 3, 3)
    assert torch.equal(image_scores_from_maps(maps), torch.tensor([8.0, 17.0]))
    valid = torch.zeros(2, 1, 3, 3, dtype=torch.bool)
    valid[:, 0, 0, 0] = True
    assert torch.equal(image_scores_from_maps(maps, valid), torch.tensor([0.0, 9.0]))
    valid[1] = False
    with pytest.raises(DataError, match=r"image\(s\) \[1\]"):
        image_scores_from_maps(maps, valid)
    metric = ImageAUROC()
    with pytest.raises(DataError, match="same shape"):
        metric.update(torch.ones(3), torch.ones(4))
    with pytest.raises(DataError, match="same shape"):
        metric.update(torch.ones(3, 1), torch.ones(3, 1))
    with pytest.raises(DataError, match="binary"):
        metric.update(torch.ones(3), torch.tensor([0, 1, 2]))
    with pytest.raises(DataError, match="finite"):
        metric.update(torch.tensor([1.0, math.inf]), torch.tensor([0, 1]))


def test_zero_state_defaults_stay_one_element_and_reset_works():
    metric = PixelMetrics(num_bits=NB)
    default = metric._defaults["hist"]  # torchmetrics' reset() copy; see lsgs.metrics._state
    assert default.shape == (2, num_bins(NB)) and default.untyped_storage().nbytes() == 8
    metric = metric.to("cpu").to(torch.float64)  # device / dtype moves re-create defaults: still one element
    assert metric._defaults["hist"].untyped_storage().nbytes() == 8 and metric.hist.dtype == torch.int64
    maps, masks, _ = make_batch(3)
    metric.update(maps, masks)
    first = metric.compute()
    metric.reset()
    assert metric.hist.is_contiguous() and int(metric.hist.sum()) == 0
    metric.update(maps, masks)  # in-place accumulation works on the re-created state
    assert metric.compute() == first
