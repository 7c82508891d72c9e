"""The evaluation shared by every method: the harness (``AnomalyMapModule``), its output files, and
``load_method``, which rebuilds any evaluated method from its finished stage folder (``lsgs detect``)."""

from lsgs.evaluation.harness import METRIC_REGIONS, OWN_IMAGE_SCORE, AnomalyMapModule
from lsgs.evaluation.loading import load_method

__all__ = ["METRIC_REGIONS", "OWN_IMAGE_SCORE", "AnomalyMapModule", "load_method"]
