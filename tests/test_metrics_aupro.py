"""AUPRO against a straightforward per-threshold reference (MVTec AD definition)."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from lsgs.errors import ConfigError, DataError
from lsgs.metrics import AUPRO
from lsgs.metrics import aupro as aupro_module
from lsgs.metrics.aupro import label_regions, partial_auc
from lsgs.metrics.histogram import bin_of_threshold, bin_to_threshold

NB = 16


def reference_aupro(
    maps: np.ndarray,
    masks: np.ndarray,
    valid: np.ndarray | None = None,
    limit: float = 0.3,
    connectivity: int = 8,
) -> float:
    """Thresholds = unique scores; PRO = mean region overlap; FPR over normal pixels; cut at the limit."""
    valid = np.ones_like(masks) if valid is None else valid
    structure = np.ones((3, 3)) if connectivity == 8 else ndimage.generate_binary_structure(2, 1)
    regions = []
    for i in range(len(masks)):
        labels, n = ndimage.label(masks[i] & valid[i], structure=structure)
        regions += [(i, labels == k) for k in range(1, n + 1)]
    normal = ~masks & valid
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps[valid])[::-1]:
        pred = maps >= t
        fprs.append((pred & normal).sum() / normal.sum())
        pros.append(np.mean([pred[i][region].mean() for i, region in regions]))
    x, y = np.array(fprs), np.array(pros)
    end = np.searchsorted(x, limit, side="right")
    if end < len(x):
        y_cut = y[end - 1] + (y[end] - y[end - 1]) * (limit - x[end - 1]) / (x[end] - x[end - 1])
        x, y = np.append(x[:end], limit), np.append(y[:end], y_cut)
    return float(np.trapezoid(y, x)) / limit


def make_case(seed: int, n: int = 4, size: int = 12, diagonal: bool = True):
    """Scores in distinct bins (no binning loss), blob masks, plus a diagonal-only region in image 0."""
    rng = np.random.default_rng(seed)
    masks = ndimage.gaussian_filter(rng.random((n, size, size)), (0, 1.2, 1.2)) > 0.56
    masks[-1] = False  # one all-normal image: its pixels still count for the FPR
    if diagonal:
        masks[0, :6, :6] = False
        for k in range(1, 5):
            masks[0, k, k] = (
                True  # four pixels touching only at corners: 1 region (8-conn), 4 regions (4-conn)
            )
    bins = np.sort(
        rng.choice(
            np.arange(bin_of_threshold(0.01, NB), bin_of_threshold(10.0, NB)), masks.size, replace=False
        )
    )
    values = bin_to_threshold(torch.as_tensor(bins), NB).numpy()
    # Anomalous pixels tend to get the higher of the distinct values: a realistic, imperfect detector.
    rank = np.argsort(np.argsort(rng.random(masks.size) + 0.6 * masks.ravel()))
    return values[rank].reshape(masks.shape), masks


def test_label_regions_is_8_connected_per_image():
    masks = np.zeros((2, 5, 5), dtype=bool)
    masks[0, [0, 1, 2], [0, 1, 2]] = True  # diagonal: one region
    masks[1, 0, 0] = masks[1, 4, 4] = True  # two regions
    labels, n = label_regions(masks)
    assert n == 3 and labels.shape == (2, 5, 5)
    assert len(np.unique(labels[0][masks[0]])) == 1
    # Same pixel position in two images never joins: regions do not connect across the batch axis.
    stacked = np.ones((2, 3, 3), dtype=bool)
    assert label_regions(stacked)[1] == 2


@pytest.mark.parametrize("seed", range(3))
def test_aupro_equals_reference(seed):
    maps, masks = make_case(seed)
    metric = AUPRO(num_bits=NB)
    metric.update(torch.from_numpy(maps).unsqueeze(1), torch.from_numpy(masks).unsqueeze(1))  # [B, 1, H, W]
    assert metric.compute() == pytest.approx(reference_aupro(maps, masks), abs=1e-9)


def test_diagonal_region_uses_8_connectivity():
    maps, masks = make_case(11)
    metric = AUPRO(num_bits=NB)
    metric.update(torch.from_numpy(maps), torch.from_numpy(masks))  # [B, H, W] works too
    value = metric.compute()
    assert value == pytest.approx(reference_aupro(maps, masks, connectivity=8), abs=1e-9)
    assert abs(value - reference_aupro(maps, masks, connectivity=4)) > 1e-4, (
        "case must tell 4- from 8-conn apart"
    )


@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_fpr_limit_and_valid_mask(limit):
    maps, masks = make_case(21)
    rng = np.random.default_rng(3)
    valid = rng.random(maps.shape) < 0.8
    metric = AUPRO(fpr_limit=limit, num_bits=NB)
    metric.update(torch.from_numpy(maps), torch.from_numpy(masks), torch.from_numpy(valid))
    assert metric.compute() == pytest.approx(reference_aupro(maps, masks, valid, limit), abs=1e-9)


def test_batching_and_order_do_not_change_the_result_at_all():
    maps, masks = (torch.from_numpy(a) for a in make_case(4, n=6))
    whole, parts = AUPRO(num_bits=NB), AUPRO(num_bits=NB)
    whole.update(maps, masks)
    for i in (5, 2, 0, 3, 1, 4):  # shuffled, one image at a time
        parts.update(maps[i : i + 1], masks[i : i + 1])
    assert torch.equal(whole.hist, parts.hist) and int(whole.num_regions) == int(parts.num_regions)
    assert whole.compute() == parts.compute()


def test_partial_auc_cuts_by_interpolation():
    x = np.array([0.0, 0.1, 0.2, 0.5, 1.0])
    y = np.array([0.0, 0.5, 0.6, 0.9, 1.0])
    # Up to 0.3: full trapezoids to 0.2, then to y(0.3) = 0.7 linearly.
    assert partial_auc(x, y, 0.3) == pytest.approx(0.025 + 0.055 + 0.1 * (0.6 + 0.7) / 2)
    assert partial_auc(x, y, 0.2) == pytest.approx(0.025 + 0.055)  # limit on a point: no extra piece
    assert partial_auc(x, y, 1.0) == pytest.approx(np.trapezoid(y, x))
    # A vertical step exactly at the limit adds no area.
    assert partial_auc(np.array([0.0, 0.3, 0.3, 1.0]), np.array([0.0, 0.2, 0.9, 1.0]), 0.3) == pytest.approx(
        0.03
    )


def test_perfect_and_undefined_cases():
    maps, masks = make_case(5, diagonal=False)
    perfect = AUPRO(num_bits=NB)
    perfect.update(torch.from_numpy(masks.astype(np.float32)), torch.from_numpy(masks))
    assert perfect.compute() == pytest.approx(1.0, abs=1e-9)
    empty = AUPRO(num_bits=NB)
    empty.update(torch.from_numpy(maps), torch.zeros(maps.shape, dtype=torch.bool))
    with pytest.warns(UserWarning, match="undefined"):
        assert math.isnan(empty.compute())


def test_errors(monkeypatch):
    for bad in (0.0, 1.5, -0.1, "0.3", True):
        with pytest.raises(ConfigError, match="fpr_limit"):
            AUPRO(fpr_limit=bad)
    with pytest.raises(ConfigError, match="num_bits"):
        AUPRO(num_bits=40)
    metric = AUPRO(num_bits=NB)
    with pytest.raises(DataError, match="per image"):
        metric.update(torch.rand(10, 10)[0], torch.zeros(10, 10, dtype=torch.bool)[0])
    with pytest.raises(DataError, match="shape"):
        metric.update(torch.rand(2, 1, 8, 8), torch.zeros(2, 1, 8, 9))
    with pytest.raises(DataError, match="binary"):
        metric.update(torch.rand(2, 1, 8, 8), torch.full((2, 1, 8, 8), 0.5))
    with pytest.raises(DataError, match="finite"):
        metric.update(torch.full((2, 1, 8, 8), math.nan), torch.zeros(2, 1, 8, 8))
    maps, masks = make_case(6)
    monkeypatch.setattr(aupro_module, "MAX_REGIONS", 2)
    with pytest.raises(DataError, match="at most 2"):
        metric.update(torch.from_numpy(maps), torch.from_numpy(masks))
    metric.num_regions += 3  # as if other ranks had added regions
    with pytest.raises(DataError, match="at most 2"):
        metric.compute()
