"""All evaluation metrics of a test set, per category, averaged over categories, and pooled."""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import Metric

from lsgs.errors import ConfigError, DataError
from lsgs.metrics._inputs import check_binary, check_maps, check_pixel_inputs
from lsgs.metrics._sync import synced_states
from lsgs.metrics.aupro import AUPRO, aupro_from_state
from lsgs.metrics.histogram import DEFAULT_NUM_BITS, bin_of_threshold, counts_at_threshold, dice_from_counts
from lsgs.metrics.image import ImageAUROC, exact_auroc
from lsgs.metrics.pixel import PixelMetrics, metrics_from_histogram
from lsgs.nn.image_score import image_scores_from_maps

METRIC_NAMES = ("pixel_ap", "pixel_auroc", "dice_best", "dice_best_threshold", "dice_val", "val_threshold",
                "image_auroc", "aupro")
# Options that must reach the per-category metrics too, or their DDP sync would differ from the parent's.
_SYNC_OPTIONS = ("sync_on_compute", "process_group", "dist_sync_fn", "distributed_available_fn")


class AnomalyMetrics(Metric):
    """Pixel AP / AUROC, Dice (best and at a validation threshold), image AUROC and AUPRO for a test set.

    One group of metrics per category (``PixelMetrics``, ``ImageAUROC``, optionally ``AUPRO``), all created up
    front so that every DDP rank holds the same states and the all-reduce matches even when a rank sees no
    image of some category. ``compute()`` returns, for metric names in ``METRIC_NAMES``::

        {"per_category": {category: {name: value}},   # MVTec: paper Table 2 reports these ...
         "mean": {name: mean over categories},        # ... and their mean (nan if any category is nan)
         "pooled": {name: value}}                     # everything pooled (BraTS, paper Table 1)

    Pooled values are computed from the sum of the per-category states, so pooling costs no extra memory.
    ``val_threshold`` is the threshold used for ``dice_val`` (pooled: the global threshold, or nan with
    per-category thresholds, whose pooled Dice sums each category's TP/FP at its own threshold). ``aupro`` is
    only present with ``compute_aupro=True``. Image scores are the maximum of each map (over ``valid`` pixels)
    unless given.

    Memory per category: state bytes = bins x 8 x #histograms = ``2 ** num_bits * 8 * 4`` with AUPRO (x 2
    without), i.e. 32 MiB at the default 20 bits (16 MiB without AUPRO, 8 MiB with AUPRO at 18 bits), plus 8
    bytes per image: 480 MiB for MVTec's 15 categories. Under DDP, ``compute()`` gathers one category at a
    time (``world_size`` copies of its states, briefly). Lower ``num_bits`` trades memory for AP accuracy (see
    ``lsgs.metrics.histogram.DEFAULT_NUM_BITS``).

    Args:
        categories: every category name that can appear, in reporting order (same list on every rank).
        num_bits: histogram resolution, in [9, 24] (see ``lsgs.metrics.histogram``).
        compute_aupro: also track AUPRO (MVTec standard; doubles the pixel state).
        fpr_limit: AUPRO's FPR integration limit, in (0, 1].
        val_threshold: threshold for ``dice_val``: one float for all categories, a mapping category -> float,
            or None (then ``dice_val`` is nan until ``set_val_threshold``).
        **kwargs: torchmetrics ``Metric`` options (sync options are passed on to the per-category metrics).

    Raises:
        ConfigError: on an empty or duplicated category list, or invalid ``num_bits`` / ``fpr_limit`` /
            ``val_threshold``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        categories: Sequence[str],
        num_bits: int = DEFAULT_NUM_BITS,
        compute_aupro: bool = True,
        fpr_limit: float = 0.3,
        val_threshold: float | Mapping[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("compute_with_cache", False)  # results change with set_val_threshold
        super().__init__(**kwargs)
        names_ok = not isinstance(categories, str) and all(isinstance(c, str) and c for c in categories)
        if not categories or not names_ok:
            raise ConfigError(f"categories must be a non-empty list of non-empty names, got {categories!r}")
        if len(set(categories)) != len(categories):
            raise ConfigError(f"categories must be unique, got {list(categories)}")
        self.categories = list(categories)
        self.num_bits = num_bits
        self.compute_aupro = bool(compute_aupro)
        self.fpr_limit = fpr_limit
        self._index = {c: i for i, c in enumerate(self.categories)}
        child_kwargs = {k: kwargs[k] for k in _SYNC_OPTIONS if k in kwargs}
        self.pixel = nn.ModuleList(PixelMetrics(num_bits, **child_kwargs) for _ in self.categories)
        self.image = nn.ModuleList(ImageAUROC(**child_kwargs) for _ in self.categories)
        self.aupro = (nn.ModuleList(AUPRO(fpr_limit, num_bits, **child_kwargs) for _ in self.categories)
                      if self.compute_aupro else None)
        self.val_threshold: float | dict[str, float] | None = None
        self.set_val_threshold(val_threshold)

    def set_val_threshold(self, threshold: float | Mapping[str, float] | None) -> None:
        """Set the ``dice_val`` threshold (from validation normals, e.g. ``ScoreQuantile.quantile(0.99)``).

        Args:
            threshold: one finite float, a mapping with a finite float for every category, or None to clear.

        Raises:
            ConfigError: on a non-finite value or a mapping that misses or adds categories.
        """
        if threshold is None:
            self.val_threshold = None
        elif isinstance(threshold, Mapping):
            missing = [c for c in self.categories if c not in threshold]
            extra = [c for c in threshold if c not in self._index]
            if missing or extra:
                raise ConfigError(f"val_threshold mapping must have exactly the categories {self.categories}:"
                                  f" missing {missing}, unknown {extra}")
            for value in threshold.values():
                bin_of_threshold(value, self.num_bits)  # raises ConfigError unless finite
            self.val_threshold = {c: float(threshold[c]) for c in self.categories}
        else:
            bin_of_threshold(threshold, self.num_bits)
            self.val_threshold = float(threshold)

    def forward(self, *args: Any, **kwargs: Any) -> None:
        """Same as ``update``; torchmetrics' forward would reset the per-category states for batch values."""
        self.update(*args, **kwargs)

    def update(
        self,
        maps: Tensor,
        masks: Tensor,
        labels: Tensor,
        categories: Sequence[str] | str,
        valid: Tensor | None = None,
        image_scores: Tensor | None = None,
    ) -> None:
        """Add a batch.

        Args:
            maps: ``[B, 1, H, W]`` float anomaly maps (higher = more anomalous).
            masks: ``[B, 1, H, W]`` ground truth, bool or {0, 1}.
            labels: ``[B]`` image labels, bool or {0, 1} (1 = anomalous).
            categories: ``B`` category names, or one name for the whole batch.
            valid: optional ``[B, 1, H, W]`` bool mask of evaluated pixels (e.g. brain ROI).
            image_scores: optional ``[B]`` image scores; default the max of each map over valid pixels.

        Raises:
            DataError: on shape mismatches, non-binary masks / labels, NaN/inf scores, or an image without
                valid pixels (when its score comes from the map).
            ConfigError: on a category not given at construction.
        """
        maps, masks, valid = check_pixel_inputs(maps, masks, valid)
        if maps.dim() < 3:
            raise DataError(f"maps must be [B, 1, H, W], got {tuple(maps.shape)}")
        batch = maps.shape[0]
        if not isinstance(labels, Tensor) or labels.shape != (batch,):
            got = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise DataError(f"labels must be [B] = [{batch}], got {got}")
        labels = check_binary(labels, "labels")
        if isinstance(categories, str):
            categories = [categories] * batch
        if len(categories) != batch:
            raise DataError(f"categories must name each of the {batch} images, got {len(categories)} names")
        unknown = sorted({c for c in categories if c not in self._index})
        if unknown:
            raise ConfigError(
                f"categories {unknown} are not among AnomalyMetrics(categories={self.categories})"
            )
        if image_scores is None:
            image_scores = image_scores_from_maps(maps, valid)
        else:
            check_maps(image_scores, "image_scores")
            if image_scores.shape != (batch,):
                raise DataError(f"image_scores must be [B] = [{batch}], got {tuple(image_scores.shape)}")

        single = len(set(categories)) == 1
        for category in dict.fromkeys(categories):  # unique, in order of appearance
            i = self._index[category]
            # One category in the batch (the usual case) needs no copy; otherwise a CPU index, which works for
            # tensors on any device (a CUDA index would not for CPU labels).
            part = slice(None) if single else torch.tensor([j for j, c in enumerate(categories) if c == category])
            part_valid = None if valid is None else valid[part]
            self.pixel[i].update(maps[part], masks[part], part_valid)
            self.image[i].update(image_scores[part], labels[part])
            if self.aupro is not None:
                self.aupro[i].update(maps[part], masks[part], part_valid)

    def compute(self) -> dict[str, dict]:
        """All metrics over everything seen on all ranks (a collective under DDP: call it on every rank).

        Returns:
            ``{"per_category": {cat: {name: float}}, "mean": {name: float}, "pooled": {name: float}}``.
        """
        per_category: dict[str, dict[str, float]] = {}
        pooled_hist = pooled_aupro = None
        pooled_regions = 0
        pooled_scores, pooled_labels = [], []
        pooled_tp = pooled_fp = pooled_pos = 0
        for i, category in enumerate(self.categories):
            hist = self.pixel[i].histogram()
            values = metrics_from_histogram(hist)
            threshold = self._threshold_of(category)
            if threshold is None:
                values["dice_val"] = values["val_threshold"] = math.nan
            else:
                tp, fp, n_pos = counts_at_threshold(hist[1], hist[0], threshold, self.num_bits)
                values["dice_val"], values["val_threshold"] = dice_from_counts(tp, fp, n_pos), threshold
                pooled_tp, pooled_fp, pooled_pos = pooled_tp + tp, pooled_fp + fp, pooled_pos + n_pos
            scores, labels = self.image[i].values()
            values["image_auroc"] = exact_auroc(scores, labels)
            pooled_scores.append(scores.cpu())
            pooled_labels.append(labels.cpu())
            # In place: each synced histogram is a fresh copy, no longer needed once its values are computed.
            pooled_hist = hist if pooled_hist is None else pooled_hist.add_(hist)
            if self.aupro is not None:
                state = synced_states(self.aupro[i])
                values["aupro"] = aupro_from_state(state["hist"], state["num_regions"], self.fpr_limit,
                                                   f"AUPRO of category {category!r}")
                pooled_aupro = state["hist"] if pooled_aupro is None else pooled_aupro.add_(state["hist"])
                pooled_regions += int(state["num_regions"])
            per_category[category] = {n: values[n] for n in METRIC_NAMES if n in values}

        pooled = metrics_from_histogram(pooled_hist)
        if self.val_threshold is None:
            pooled["dice_val"] = pooled["val_threshold"] = math.nan
        else:
            pooled["dice_val"] = dice_from_counts(pooled_tp, pooled_fp, pooled_pos)
            pooled["val_threshold"] = (
                self.val_threshold if isinstance(self.val_threshold, float) else math.nan)
        pooled["image_auroc"] = exact_auroc(torch.cat(pooled_scores), torch.cat(pooled_labels))
        if pooled_aupro is not None:
            pooled["aupro"] = aupro_from_state(pooled_aupro, pooled_regions, self.fpr_limit, "pooled AUPRO")

        names = [n for n in METRIC_NAMES if n in pooled]
        mean = {n: float(np.mean([per_category[c][n] for c in self.categories])) for n in names}
        return {"per_category": per_category, "mean": mean, "pooled": {n: pooled[n] for n in names}}

    def reset(self) -> None:
        """Reset every per-category metric."""
        super().reset()
        for group in (self.pixel, self.image, self.aupro):
            for metric in group or ():
                metric.reset()

    def _threshold_of(self, category: str) -> float | None:
        if isinstance(self.val_threshold, dict):
            return self.val_threshold[category]
        return self.val_threshold


def flatten_results(results: Mapping[str, Any], sep: str = "/") -> dict[str, float]:
    """``AnomalyMetrics.compute()`` output as flat ``{"pooled/pixel_auroc": v, "bottle/aupro": v, ...}``.

    Handy for ``LightningModule.log_dict`` and result tables; per-category keys are ``<category><sep><name>``.

    Args:
        results: the nested dict from ``AnomalyMetrics.compute()``.
        sep: separator between group and metric name.

    Returns:
        flat mapping, pooled and mean first, then categories in reporting order.
    """
    flat = {}
    for group in ("pooled", "mean"):
        flat.update({f"{group}{sep}{name}": value for name, value in results[group].items()})
    for category, values in results["per_category"].items():
        flat.update({f"{category}{sep}{name}": value for name, value in values.items()})
    return flat
