"""``patchcore``: PatchCore (Roth et al., CVPR 2022), the practitioner's baseline on frozen ImageNet features.

The maths is in :mod:`lsgs.nn.patchcore`; this module collects the training split's patch features, subsamples the
memory bank with the greedy coreset, keeps it as its learned state (``checkpoints/last.ckpt``, so ``lsgs detect
--method patchcore`` works from the run folder) and scores with PatchCore's own map and image score.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from typing_extensions import override

from lsgs.checkpoints import METHOD_KIND, load_checkpoint
from lsgs.contracts import categories_of, normals_per_category_of, trainer_data
from lsgs.errors import ConfigError, DataError
from lsgs.evaluation import OWN_IMAGE_SCORE
from lsgs.methods.feature_method import ALL_CATEGORIES, FeatureMethod, export_feature_graph
from lsgs.nn.export import MethodExport
from lsgs.nn.feature_export import PatchCoreMapGraph
from lsgs.nn.patchcore import SEARCHES, PatchCoreNet, greedy_coreset

MEMORY_BANK_PHASE = "memory_bank"


class PatchCoreBaseline(FeatureMethod):
    """PatchCore: the distance of each locally aware patch feature to its nearest neighbour in a memory bank of
    the training patches.

    The bank holds the 3x3-average-pooled features of two middle backbone stages (strides 8 and 16) of every
    training patch, subsampled by the greedy k-center coreset (random projection to ``projection_dim``,
    ``coreset_fraction`` of the patches); it is built in the evaluation's training-split pass (no gradient
    training). Map: the nearest-neighbour distance of each patch (FAISS exact search, or a matrix product and a
    minimum), upsampled to the input size and Gaussian-blurred (sigma 4); image score: the paper's re-weighted
    maximum (Eq. 7, ``num_neighbors`` = 9). One bank per category when each category has normals of its own
    (MVTec: PatchCore is a per-category model), one bank otherwise.

    Args:
        coreset_fraction: share of the training patches kept in the bank (paper: 1 %, 10 %, 25 %; default 10 %).
        projection_dim: dimension of the coreset's random projection (paper: 128); None: no projection.
        coreset_seed: seed of the projection and of the coreset's start point.
        patch_size: neighbourhood of the local average pooling (3).
        num_neighbors: bank neighbours of the image score's re-weighting (9).
        sigma: Gaussian blur of the map, in input pixels (4).
        search: ``faiss`` (exact ``IndexFlatL2``) or ``torch`` (matrix product and minimum; what an export runs).
        per_category: one bank per category; None: per category when each category has normals of its own.
        backbone, weights, pretrained, output_strides, input_size, in_channels, init_from, **kwargs: see
            ``FeatureMethod``.
    """

    method_name = "patchcore"
    kind = "baseline"
    own_image_score = "patchcore"
    learns_in_evaluation = True  # the memory bank: built in the evaluation's training-split pass
    _fit_hint = "let trainer.test build its memory bank (without model.calibration)"

    def __init__(
        self,
        backbone: str = "lite0",
        weights: str | None = "lite0-package",
        pretrained: bool = False,
        output_strides: Sequence[int] = (8, 16),
        input_size: int = 224,
        coreset_fraction: float = 0.1,
        projection_dim: int | None = 128,
        coreset_seed: int = 0,
        patch_size: int = 3,
        num_neighbors: int = 9,
        sigma: float = 4.0,
        search: str = "faiss",
        per_category: bool | None = None,
        in_channels: int = 3,
        init_from: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, weights, pretrained, output_strides, input_size, in_channels, init_from, **kwargs)
        if not 0.0 < coreset_fraction <= 1.0:
            raise ConfigError(f"model.coreset_fraction must be in (0, 1], got {coreset_fraction}")
        if search not in SEARCHES:
            raise ConfigError(f"model.search={search!r} is not one of {SEARCHES}")
        if not sigma > 0:
            raise ConfigError(f"model.sigma must be > 0, got {sigma}")
        self.save_hyperparameters()
        self.per_category = per_category
        self.nets = nn.ModuleList()
        if init_from is not None:
            meta = load_checkpoint(init_from, METHOD_KIND, "model.init_from")["lsgs"]
            self._build(list(meta.get("categories") or []))
            self._load_init_from()

    def _build(self, categories: list[str]) -> None:
        """One empty ``PatchCoreNet`` per class (its bank is filled by the training pass or by ``init_from``)."""
        hp = self.hparams
        self.categories = categories
        self.nets = nn.ModuleList(
            PatchCoreNet(hp.patch_size, hp.num_neighbors, hp.sigma, hp.search) for _ in categories
        ).to(self.device)

    # ------------------------------------------------------------------------------------------- memory bank
    @override
    def calibration_phases(self) -> list[tuple[str, str]]:
        if bool(self.fitted):  # a bank loaded with init_from is kept
            return []
        datamodule = trainer_data(self._trainer)
        categories = categories_of(datamodule)
        per_category = normals_per_category_of(datamodule) if self.per_category is None else self.per_category
        self._build(categories if per_category and categories else [ALL_CATEGORIES])
        self._patches: list[tuple[int, int, Tensor]] = []  # (dataset index, class, [h*w, D] patches)
        return [(MEMORY_BANK_PHASE, "train")]

    @override
    def calibrate_step(self, phase: str, batch: dict[str, Any]) -> None:
        assert phase == MEMORY_BANK_PHASE, phase
        images = batch["image"]
        self._check_images(images)
        classes = self.category_indices(batch).tolist()
        patches = self.nets[0].embed(self.backbone_features(images)).float().cpu()  # [B*h*w, D]
        per_image = patches.reshape(len(images), -1, patches.shape[1])  # [B, h*w, D]
        for i, index in enumerate(batch["index"].tolist()):
            self._patches.append((int(index), classes[i], per_image[i]))

    @override
    def finish_calibration(self, phase: str) -> None:
        assert phase == MEMORY_BANK_PHASE, phase
        patches = getattr(self, "_patches", [])
        self._patches = []
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, patches)
            patches = [item for part in gathered for item in part]
        # Dataset order, whatever the sharding: the coreset (and so the bank) equals the one-process bank.
        patches.sort(key=lambda item: item[0])
        hp = self.hparams
        for cls, (name, net) in enumerate(zip(self.categories, self.nets, strict=True)):
            rows = [p for _, c, p in patches if c == cls]
            if not rows:
                raise DataError(f"patchcore: no training image of '{name}' to build its memory bank from")
            embeddings = torch.cat(rows)  # [N, D]
            chosen = greedy_coreset(embeddings, hp.coreset_fraction, hp.projection_dim, hp.coreset_seed)
            net.set_memory_bank(embeddings[chosen])
        self.fitted.fill_(True)

    @override
    def _load_init_from(self) -> None:
        super()._load_init_from()
        # The banks were loaded through each net's resizing state-dict hook; checked here by size.
        if any(net.memory_bank.numel() == 0 for net in self.nets):
            raise ConfigError(f"model.init_from '{self.init_from}' holds no memory bank")

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if len(self.nets) != len(self.categories):
            self._build(self.categories)

    # ------------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    @override
    def raw_anomaly_map(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        images = self.fitted_input(batch)
        features = self.backbone_features(images)
        classes = self.category_indices(batch)
        size = (images.shape[-2], images.shape[-1])
        maps = images.new_zeros(len(images), 1, *size)
        scores = images.new_zeros(len(images))
        for cls in classes.unique().tolist():
            rows = (classes == cls).nonzero().flatten()
            out = self.nets[cls]([f[rows] for f in features], size)
            maps[rows] = out.anomaly_map.to(maps.dtype)
            scores[rows] = out.image_score.to(scores.dtype)
        return maps, {OWN_IMAGE_SCORE: scores}

    @override
    def export_graphs(self, input_size: int) -> MethodExport:
        self._check_fitted()
        graph = PatchCoreMapGraph(self.backbone, list(self.nets)).eval()
        return export_feature_graph(self, graph, input_size)

    @override
    def method_info(self) -> dict[str, Any]:
        banks = {name: int(net.memory_bank.shape[0]) for name, net in zip(self.categories, self.nets, strict=True)}
        return {**super().method_info(), "memory_bank": banks, "coreset_fraction": self.hparams.coreset_fraction}
