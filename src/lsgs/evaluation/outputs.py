"""What the harness collects for its outputs besides the metrics: the heatmap choice, the pooled curves, and the
per-rank lists gathered on every rank."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule

from lsgs.metrics import AnomalyMetrics
from lsgs.metrics.histogram import pr_curve_from_histograms, roc_curve_from_histograms


def select_panel_indices(dataset: Any, per_category: int, seed: int) -> set[int]:
    """A seeded choice of test items to draw, ``per_category`` per category, anomalous ones first."""
    if per_category <= 0 or not hasattr(dataset, "items"):
        return set()
    rng = np.random.default_rng(seed)
    by_category: dict[str, list[int]] = {}
    for index, item in enumerate(dataset.items):
        by_category.setdefault(item.category, []).append(index)
    chosen: set[int] = set()
    for category in sorted(by_category):
        indices = np.array(by_category[category])
        anomalous = [i for i in indices if dataset.items[i].label == 1]
        pool = np.array(anomalous if len(anomalous) >= per_category else indices)
        chosen.update(int(i) for i in rng.choice(pool, size=min(per_category, len(pool)), replace=False))
    return chosen


def pooled_pixel_curves(metrics: AnomalyMetrics, max_points: int = 2048) -> dict[str, np.ndarray]:
    """ROC and PR curves of all evaluated pixels (every category pooled); a collective under DDP."""
    hist = sum(pixel.histogram() for pixel in metrics.pixel)  # [2, bins]: row 0 normal, row 1 anomalous
    fpr, tpr, _ = roc_curve_from_histograms(hist[1], hist[0], max_points)
    precision, recall, _ = pr_curve_from_histograms(hist[1], hist[0], max_points)
    return {"fpr": fpr, "tpr": tpr, "precision": precision, "recall": recall}


def gather_lists(module: LightningModule, items: list[Any]) -> list[Any]:
    """Concatenate a per-rank Python list over all ranks (rank order)."""
    if module.trainer.world_size == 1:
        return list(items)
    gathered: list[Any] = [None] * module.trainer.world_size
    torch.distributed.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]
