"""``pixel_gaussian``: a per-pixel Gaussian of the training images (a strong floor on aligned objects)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import override

from lsgs.contracts import image_size_of, trainer_data
from lsgs.errors import ConfigError, DataError
from lsgs.methods.base import StatisticsBaseline
from lsgs.methods.statistics import mean_and_variance, pixel_gaussian_map
from lsgs.nn.export import EXAMPLE_BATCH, IMAGES, MAP, RUNTIME_MAP, ExportGraph, MethodExport


class PixelGaussianBaseline(StatisticsBaseline):
    """Anomaly map = ``max_c |x - mu| / (sigma + eps)`` with a per-pixel Gaussian of the training images.

    ``mu`` and ``sigma`` ``[C, H, W]`` are the per-pixel mean and population standard deviation of all training
    images (every pixel; the ROI is applied to the map afterwards, as for every method), from one pass of sums and
    sums of squares in float64, all-reduced over DDP ranks. A strong floor on aligned objects.

    ``eps = eps_fraction * mean(sigma)``: relative, so it works whatever the intensity scale (BraTS "zscore"
    normalisation is not in [0, 1]). It stops pixels that never vary in training (constant background) from
    exploding: with an absolute 1e-3, one grey level (1/255) on a constant pixel would score 3.9, more than most
    real defects on textured pixels.

    Args:
        eps_fraction: ``eps`` as a fraction of the mean per-pixel standard deviation; > 0.
        in_channels, init_from, **kwargs: see ``MethodModule`` and ``AnomalyMapModule``.
    """

    method_name = "pixel_gaussian"
    _statistics = ("pixel_mean", "pixel_std", "eps")
    _counted = "images"

    def __init__(
        self,
        eps_fraction: float = 0.1,
        per_category: bool | None = None,
        in_channels: int = 3,
        init_from: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(per_category=per_category, in_channels=in_channels, init_from=init_from, **kwargs)
        if not (isinstance(eps_fraction, (int, float)) and 0.0 < eps_fraction < math.inf):
            raise ConfigError(f"model.eps_fraction must be a positive finite number, got {eps_fraction!r}")
        self.eps_fraction = float(eps_fraction)
        self.save_hyperparameters()
        self.register_buffer("pixel_mean", torch.zeros(0))  # [n_categories, C, H, W] once fitted
        self.register_buffer("pixel_std", torch.zeros(0))  # [n_categories, C, H, W] once fitted
        self.register_buffer("eps", torch.zeros(0))  # [n_categories] once fitted
        self._image_shape: tuple[int, ...] | None = None
        self._load_init_from()

    @override
    def _batch_sums(self, images: Tensor, roi: Tensor) -> Tensor:
        count = torch.tensor([images.shape[0]], dtype=images.dtype, device=images.device)
        return torch.cat([count, images.sum(dim=0).flatten(), images.square().sum(dim=0).flatten()])

    @override
    def _set_statistics(self, sums: Tensor) -> None:
        count, rest = sums[:, :1], sums[:, 1:]
        total, total_sq = rest.chunk(2, dim=1)
        mean, variance = mean_and_variance(count, total, total_sq)  # [n, C*H*W]
        std = variance.sqrt()
        for name, n, row in zip(self.categories, count[:, 0], std):
            if row.mean() <= 0:
                raise DataError(
                    f"pixel_gaussian baseline: the {int(n)} training images of '{name}' are identical; a per-pixel "
                    "standard deviation needs at least two different images"
                )
        shape = (len(self.categories), *self._image_shape)
        self.pixel_mean = mean.float().reshape(shape)
        self.pixel_std = std.float().reshape(shape)
        self.eps = (self.eps_fraction * std.mean(dim=1)).float()

    @override
    def calibration_phases(self) -> list[tuple[str, str]]:
        self._image_shape = self._datamodule_image_shape()
        return super().calibration_phases()

    def _datamodule_image_shape(self) -> tuple[int, int, int] | None:
        size = image_size_of(trainer_data(self._trainer))
        return (self.in_channels, int(size), int(size)) if size is not None else None

    @override
    def calibrate_step(self, phase: str, batch: dict[str, Any]) -> None:
        shape = tuple(batch["image"].shape[1:])
        if self._image_shape is None:
            self._image_shape = shape
        elif shape != self._image_shape:
            raise DataError(
                f"pixel_gaussian baseline: training images of shape {list(shape)} where {list(self._image_shape)}"
                " was expected; a per-pixel Gaussian needs one image size"
            )
        super().calibrate_step(phase, batch)

    @override
    def _empty_sums(self) -> Tensor:
        if self._image_shape is None:
            raise DataError("pixel_gaussian baseline: no training image and no data-module image_size")
        return torch.zeros(1 + 2 * math.prod(self._image_shape), dtype=torch.float64)

    @torch.no_grad()
    @override
    def raw_anomaly_map(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        images = self.fitted_input(batch)
        if tuple(images.shape[1:]) != tuple(self.pixel_mean.shape[1:]):
            raise DataError(
                f"pixel_gaussian baseline: images of shape {list(images.shape[1:])} but the per-pixel statistics "
                f"are for {list(self.pixel_mean.shape[1:])}; score at the training image_size"
            )
        rows = self.category_indices(batch, self.pixel_mean.device)
        mean = self.pixel_mean[rows]  # [B, C, H, W]: each image's category
        anomaly = pixel_gaussian_map(images, mean, self.pixel_std[rows], self.eps[rows])
        # The mean image is the model's "expected normal image": shown in the panels' reconstruction column.
        return anomaly, {"reconstruction": mean.to(images.device)}

    @override
    def export_graphs(self, input_size: int) -> MethodExport:
        categories = self.export_categories()
        shape = tuple(self.pixel_mean.shape[1:])
        if shape[1:] != (input_size, input_size):
            raise ConfigError(f"pixel_gaussian: statistics of {list(shape)} images, not {input_size} px")
        images = torch.rand(EXAMPLE_BATCH, *shape)
        graph = PixelGaussianMapGraph(self.pixel_mean, self.pixel_std, self.eps)
        inputs = {IMAGES: images, **self.example_class_index()}
        return MethodExport(RUNTIME_MAP, {"map": ExportGraph(graph, inputs, (MAP,))}, categories=categories)

    @override
    def method_info(self) -> dict[str, Any]:
        if not bool(self.fitted):
            return {"eps_fraction": self.eps_fraction}
        return {"eps_fraction": self.eps_fraction, "categories": self.categories, "eps": self.eps.tolist(),
                "mean_std": self.pixel_std.mean(dim=(1, 2, 3)).tolist()}


class PixelGaussianMapGraph(nn.Module):
    """The per-pixel Gaussian map as an export graph: ``images`` ``[B, C, H, W]`` (+ ``class_index`` ``[B]`` with
    several sets of statistics) -> ``map`` ``[B, 1, H, W]`` (``pixel_gaussian_map``).

    Args:
        pixel_mean: ``[n, C, H, W]`` per-pixel means, one per set of statistics.
        pixel_std: ``[n, C, H, W]`` per-pixel standard deviations.
        eps: ``[n]`` their ``eps``.
    """

    def __init__(self, pixel_mean: Tensor, pixel_std: Tensor, eps: Tensor) -> None:
        super().__init__()
        for name, value in (("pixel_mean", pixel_mean), ("pixel_std", pixel_std), ("eps", eps)):
            self.register_buffer(name, value.detach().float().cpu().clone())

    def forward(self, images: Tensor, class_index: Tensor | None = None) -> Tensor:
        rows = class_index if class_index is not None else torch.zeros_like(images[:, 0, 0, 0], dtype=torch.long)
        return pixel_gaussian_map(images, self.pixel_mean[rows], self.pixel_std[rows], self.eps[rows])
