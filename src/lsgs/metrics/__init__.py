"""Evaluation metrics: constant-memory pixel AP / AUROC / Dice / AUPRO, exact image AUROC, score quantiles."""

from lsgs.metrics.aupro import AUPRO
from lsgs.metrics.collection import METRIC_NAMES, AnomalyMetrics, flatten_results
from lsgs.metrics.histogram import DEFAULT_NUM_BITS
from lsgs.metrics.image import ImageAUROC
from lsgs.metrics.pixel import PixelMetrics
from lsgs.metrics.quantile import ScoreQuantile

__all__ = ["AUPRO", "DEFAULT_NUM_BITS", "METRIC_NAMES", "AnomalyMetrics", "ImageAUROC", "PixelMetrics",
           "ScoreQuantile", "flatten_results"]
