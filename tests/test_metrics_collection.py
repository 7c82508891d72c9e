"""AnomalyMetrics: per-category / mean / pooled structure and values vs sklearn and the AUPRO reference."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from test_metrics_aupro import reference_aupro
from test_metrics_histogram import brute_dice, distinct_bin_scores

from lsgs.errors import ConfigError, DataError
from lsgs.metrics import METRIC_NAMES, AnomalyMetrics, flatten_results

NB = 16
CATEGORIES = ["bottle", "cable", "screw"]


def make_test_set(seed: int = 0, n: int = 15, size: int = 10):
    """Maps [n, 1, H, W] with distinct-bin scores, masks (some all-normal images), labels, categories."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, 1, size, size), dtype=bool)
    for i in range(n):
        if i % 4:  # three quarters of the images are anomalous, one or two rectangles each
            for _ in range(1 + i % 2):
                y, x = rng.integers(0, size - 3, 2)
                masks[i, 0, y : y + rng.integers(1, 4), x : x + rng.integers(1, 4)] = True
    values = np.sort(distinct_bin_scores(rng, masks.size, NB))
    rank = np.argsort(np.argsort(rng.random(masks.size) + 0.4 * masks.ravel()))
    maps = values[rank].reshape(masks.shape)
    categories = [CATEGORIES[i % len(CATEGORIES)] for i in range(n)]
    valid = rng.random(masks.shape) < 0.85
    valid[:, :, 0, 0] = True  # every image keeps a valid pixel
    return (
        torch.from_numpy(maps),
        torch.from_numpy(masks),
        torch.from_numpy(masks.any(axis=(1, 2, 3))),
        categories,
        torch.from_numpy(valid),
    )


def expected_values(maps, masks, labels, valid, threshold):
    """Every metric of one group of images, computed directly (sklearn, brute force, AUPRO reference)."""
    keep = valid if valid is not None else torch.ones_like(masks)
    scores, truth = maps[keep].numpy(), masks[keep].numpy()
    dice, dice_t = brute_dice(scores, truth)
    pred = scores >= threshold
    image_scores = maps.masked_fill(~keep, -math.inf).flatten(1).amax(1).numpy()
    return {
        "pixel_ap": average_precision_score(truth, scores),
        "pixel_auroc": roc_auc_score(truth, scores),
        "dice_best": dice,
        "dice_best_threshold": float(dice_t),
        "dice_val": 2 * np.sum(pred & truth) / (np.sum(pred) + np.sum(truth)),
        "val_threshold": threshold,
        "image_auroc": roc_auc_score(labels.numpy(), image_scores),
        "aupro": reference_aupro(
            maps[:, 0].numpy(), masks[:, 0].numpy(), None if valid is None else valid[:, 0].numpy()
        ),
    }


@pytest.mark.parametrize("use_valid", [False, True])
def test_per_category_mean_and_pooled_values(use_valid):
    maps, masks, labels, categories, valid = make_test_set()
    valid = valid if use_valid else None
    threshold = float(np.quantile(maps.numpy(), 0.7, method="lower"))  # an actual score: exact Dice
    metric = AnomalyMetrics(CATEGORIES, num_bits=NB, val_threshold=threshold)
    for part in (slice(0, 4), slice(4, 5), slice(5, 15)):  # mixed-category batches of uneven size
        metric.update(
            maps[part], masks[part], labels[part], categories[part], None if valid is None else valid[part]
        )
    result = metric.compute()
    assert list(result) == ["per_category", "mean", "pooled"]
    assert list(result["per_category"]) == CATEGORIES
    for category in CATEGORIES:
        assert list(result["per_category"][category]) == list(METRIC_NAMES)
        idx = [i for i, c in enumerate(categories) if c == category]
        expected = expected_values(
            maps[idx], masks[idx], labels[idx], None if valid is None else valid[idx], threshold
        )
        for name, value in expected.items():
            assert result["per_category"][category][name] == pytest.approx(value, abs=1e-9), (category, name)
    for name in METRIC_NAMES:
        assert result["mean"][name] == pytest.approx(
            np.mean([result["per_category"][c][name] for c in CATEGORIES]), abs=1e-15
        )
    pooled = expected_values(maps, masks, labels, valid, threshold)
    for name, value in pooled.items():
        assert result["pooled"][name] == pytest.approx(value, abs=1e-9), name
    flat = flatten_results(result)
    assert len(flat) == (2 + len(CATEGORIES)) * len(METRIC_NAMES)
    assert flat["pooled/pixel_auroc"] == result["pooled"]["pixel_auroc"]
    assert flat["screw/aupro"] == result["per_category"]["screw"]["aupro"]
    assert next(iter(flat)) == "pooled/pixel_ap" and "mean/dice_val" in flat


def test_per_category_thresholds_and_threshold_changes():
    maps, masks, labels, categories, _ = make_test_set(1)
    metric = AnomalyMetrics(CATEGORIES, num_bits=NB, compute_aupro=False)
    metric.update(maps, masks, labels, categories)
    result = metric.compute()
    assert "aupro" not in result["pooled"] and "aupro" not in result["mean"]
    assert math.isnan(result["pooled"]["dice_val"]) and math.isnan(
        result["per_category"]["cable"]["val_threshold"]
    )
    thresholds = {
        c: float(np.quantile(maps.numpy(), q, method="lower")) for c, q in zip(CATEGORIES, (0.5, 0.7, 0.9))
    }
    metric.set_val_threshold(thresholds)
    result = metric.compute()  # not cached: the threshold changed
    tp = fp = n_pos = 0
    for category in CATEGORIES:
        idx = [i for i, c in enumerate(categories) if c == category]
        scores, truth = maps[idx].numpy().ravel(), masks[idx].numpy().ravel()
        pred = scores >= thresholds[category]
        assert result["per_category"][category]["dice_val"] == pytest.approx(
            2 * np.sum(pred & truth) / (np.sum(pred) + np.sum(truth)), abs=1e-12
        )
        assert result["per_category"][category]["val_threshold"] == thresholds[category]
        tp, fp, n_pos = tp + np.sum(pred & truth), fp + np.sum(pred & ~truth), n_pos + np.sum(truth)
    assert result["pooled"]["dice_val"] == pytest.approx(2 * tp / (tp + fp + n_pos), abs=1e-12)
    assert math.isnan(result["pooled"]["val_threshold"])
    metric.set_val_threshold(None)
    assert math.isnan(metric.compute()["mean"]["dice_val"])


def test_single_category_string_image_scores_forward_and_reset():
    maps, masks, labels, _, _ = make_test_set(2, n=6)
    metric = AnomalyMetrics(["brain"], num_bits=NB, compute_aupro=False)
    image_scores = maps.flatten(1).mean(1)  # a caller-defined image score overrides the map maximum
    assert metric(maps, masks, labels, "brain", image_scores=image_scores) is None  # forward = update
    result = metric.compute()
    np.testing.assert_equal(result["pooled"], result["mean"])  # nan == nan here (no val threshold)
    np.testing.assert_equal(result["pooled"], result["per_category"]["brain"])
    assert result["pooled"]["image_auroc"] == pytest.approx(
        roc_auc_score(labels.numpy(), image_scores.numpy())
    )
    metric.reset()
    assert int(metric.pixel[0].hist.sum()) == 0 and not metric.image[0].scores


def test_category_without_data_is_nan_in_mean():
    maps, masks, labels, _, _ = make_test_set(3, n=4)
    metric = AnomalyMetrics(["seen", "unseen"], num_bits=NB)
    metric.update(maps, masks, labels, "seen")
    with pytest.warns(UserWarning, match="'unseen'"):
        result = metric.compute()
    assert not math.isnan(result["per_category"]["seen"]["pixel_auroc"])
    assert math.isnan(result["per_category"]["unseen"]["pixel_auroc"]) and math.isnan(
        result["mean"]["pixel_auroc"]
    )
    assert result["pooled"]["pixel_auroc"] == result["per_category"]["seen"]["pixel_auroc"]


def test_errors():
    for bad in ([], "bottle", ["a", ""], ["a", 3]):
        with pytest.raises(ConfigError, match="non-empty"):
            AnomalyMetrics(bad)
    with pytest.raises(ConfigError, match="unique"):
        AnomalyMetrics(["a", "a"])
    with pytest.raises(ConfigError, match="num_bits"):
        AnomalyMetrics(["a"], num_bits=30)
    with pytest.raises(ConfigError, match="fpr_limit"):
        AnomalyMetrics(["a"], fpr_limit=0)
    with pytest.raises(ConfigError, match="threshold"):
        AnomalyMetrics(["a"], val_threshold=math.inf)
    metric = AnomalyMetrics(["a", "b"], num_bits=NB)
    with pytest.raises(ConfigError, match="missing \\['b'\\]"):
        metric.set_val_threshold({"a": 0.5})
    with pytest.raises(ConfigError, match="unknown \\['c'\\]"):
        metric.set_val_threshold({"a": 0.5, "b": 0.5, "c": 0.1})
    with pytest.raises(ConfigError, match="threshold"):
        metric.set_val_threshold({"a": 0.5, "b": math.nan})
    maps, masks, labels = torch.rand(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), torch.tensor([0, 1])
    with pytest.raises(ConfigError, match="\\['z'\\] are not among"):
        metric.update(maps, masks, labels, ["a", "z"])
    with pytest.raises(DataError, match="each of the 2 images"):
        metric.update(maps, masks, labels, ["a"])
    with pytest.raises(DataError, match="labels must be"):
        metric.update(maps, masks, labels[:1], "a")
    with pytest.raises(DataError, match="binary"):
        metric.update(maps, masks, torch.tensor([0, 2]), "a")
    with pytest.raises(DataError, match="maps must be"):
        metric.update(maps[:, 0, 0], masks[:, 0, 0], labels, "a")
    with pytest.raises(DataError, match="image_scores must be"):
        metric.update(maps, masks, labels, "a", image_scores=torch.ones(3))
    with pytest.raises(DataError, match="finite"):
        metric.update(maps, masks, labels, "a", image_scores=torch.tensor([1.0, math.nan]))
    with pytest.raises(DataError, match="no valid pixel"):
        metric.update(maps, masks, labels, "a", valid=torch.zeros(2, 1, 4, 4, dtype=torch.bool))
