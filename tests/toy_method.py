"""A toy evaluated method, defined outside ``lsgs``: one class plus one config entry (``TOY_CONFIG``).

The anomaly map is the absolute difference of each pixel to the mean intensity of the training images, averaged
over the channels. The mean is learned in a calibration pass over the training split and kept in
``calibration.json``, so ``lsgs detect`` (which reloads the calibration) needs nothing else.
"""

from __future__ import annotations

from typing import Any

import torch

from lsgs.evaluation import AnomalyMapModule

TRAIN_MEAN = "train_mean"


class MeanDifference(AnomalyMapModule):
    """``|image - training mean|`` averaged over channels: ``[B, C, H, W]`` -> ``[B, 1, H, W]``.

    Args:
        in_channels: image channels (``lsgs detect`` loads images with this many).
        **kwargs: the harness arguments of ``AnomalyMapModule``.
    """

    method_name = "toy"

    def __init__(self, in_channels: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.in_channels = in_channels
        self._sum, self._count = 0.0, 0

    @property
    def num_image_channels(self) -> int:
        return self.in_channels

    def calibration_phases(self) -> list[tuple[str, str]]:
        return [(TRAIN_MEAN, "train")]

    def calibrate_step(self, phase: str, batch: dict[str, Any]) -> None:
        image = batch["image"].double()
        self._sum += float(image.sum())
        self._count += image.numel()

    def finish_calibration(self, phase: str) -> None:
        self.calibration[TRAIN_MEAN] = self._sum / self._count

    def raw_anomaly_map(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return toy_map(batch["image"], self.calibration[TRAIN_MEAN]), {}


def toy_map(images: torch.Tensor, mean: float) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, 1, H, W]``: the toy map before the harness's ROI masking and smoothing."""
    return (images.float() - mean).abs().mean(dim=1, keepdim=True)


# The config entry: a ``methods.<name>`` section of an experiment YAML (its in_channels comes from the data).
TOY_CONFIG = """\
methods:
  toy:
    model:
      class_path: toy_method.MeanDifference
"""
