"""``hvq_trans``: HVQ-Trans (Lu et al., NeurIPS 2023), the related method of the seed documents, on the shared harness.

The network and every choice the paper leaves open are in :mod:`lsgs.nn.hvq_trans` (decided by the official code,
each with its source); this module trains it on the frozen backbone's features of the training split (cached once,
:mod:`lsgs.methods.feature_cache`), switches codebooks by category, and scores with its own map and image score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, Strategy
from torch import Tensor
from typing_extensions import override

from lsgs.checkpoints import METHOD_KIND, load_checkpoint
from lsgs.errors import ConfigError, TrainingDivergedError
from lsgs.evaluation import OWN_IMAGE_SCORE
from lsgs.methods.feature_cache import train_features
from lsgs.methods.feature_method import FeatureMethod, export_feature_graph
from lsgs.nn.export import MethodExport
from lsgs.nn.feature_export import HVQTransMapGraph
from lsgs.nn.hvq_trans import HVQTransConfig, HVQTransNet, align_features, hvq_image_score


class HVQTransMethod(FeatureMethod):
    """HVQ-Trans: a hierarchical vector-quantised transformer reconstructs the frozen backbone's features, with one
    codebook set and output projection per category (the paper's unified model for all categories).

    Training (``trainer.fit``): the backbone maps at strides 2/4/8/16 aligned to the ``input_size / 16`` grid are the
    target; loss = feature MSE + 0.25 x the commitment terms; AdamW, a step schedule per epoch (gradient clipping
    0.1 is the trainer's ``gradient_clip_val``). Scoring: map = the per-token L2 reconstruction error + 80 x the
    prototype-transport score, upsampled to ``input_size``; its own image score is the maximum of the
    ``image_score_pool``-px average-pooled map (the official evaluator). The classes are the data module's
    categories when each has normals of its own (MVTec AD: one model for all categories), one class otherwise.

    Args:
        hidden_dim, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout, codebook_size,
            ema_decay, commitment_weight, ot_weight, feature_jitter_scale, feature_jitter_prob, neighbor_size,
            neighbor_mask: see :class:`lsgs.nn.hvq_trans.HVQTransConfig` (defaults: the official model).
        image_score_pool: side in input pixels of the average pool of the image score (official: 16 at 224).
        lr: AdamW learning rate (official 1e-4).
        weight_decay: AdamW weight decay (official 1e-4).
        lr_step_epochs: epochs between learning-rate drops (official 800 of 1000).
        lr_gamma: factor of each drop (official 0.1).
        backbone, weights, pretrained, output_strides, input_size, in_channels, init_from, **kwargs: see
            ``FeatureMethod``; the official backbone is EfficientNet-B4 at strides 2/4/8/16, 224 px.
    """

    method_name = "hvq_trans"
    kind = "method"
    requires_fit = True
    own_image_score = "pooled max"
    _fit_hint = "run trainer.fit first"

    def __init__(
        self,
        backbone: str = "lite0",
        weights: str | None = "lite0-package",
        pretrained: bool = False,
        output_strides: Sequence[int] = (2, 4, 8, 16),
        input_size: int = 224,
        hidden_dim: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        codebook_size: int = 512,
        ema_decay: float = 0.99,
        commitment_weight: float = 0.25,
        ot_weight: float = 80.0,
        feature_jitter_scale: float = 0.0,
        feature_jitter_prob: float = 1.0,
        neighbor_size: Sequence[int] = (7, 7),
        neighbor_mask: Sequence[bool] = (False, False, False),
        image_score_pool: int = 16,
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        lr_step_epochs: int = 800,
        lr_gamma: float = 0.1,
        in_channels: int = 3,
        init_from: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(backbone, weights, pretrained, output_strides, input_size, in_channels, init_from, **kwargs)
        self.save_hyperparameters()
        self.net: HVQTransNet | None = None
        self._train_features: np.ndarray | None = None
        # Checked now (a bad size fails before any training), built per data set in setup (classes).
        self._net_config(1)
        if init_from is not None:
            meta = load_checkpoint(init_from, METHOD_KIND, "model.init_from")["lsgs"]
            self._build(list(meta.get("categories") or []))
            self._load_init_from()

    def _net_config(self, num_classes: int) -> HVQTransConfig:
        hp = self.hparams
        # Every network setting the method takes is the config field of the same name (sequences as tuples).
        shared = {f.name: hp[f.name] for f in fields(HVQTransConfig) if f.name in hp}
        shared = {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in shared.items()}
        return HVQTransConfig(
            **shared,
            feature_channels=(sum(self.backbone.channels),),  # the aligned maps, concatenated (the neck's output)
            image_size=(self.input_size, self.input_size),
            token_stride=max(self.backbone.strides),
            num_classes=num_classes,
        )

    def _build(self, categories: list[str]) -> None:
        self.categories = categories
        self.net = HVQTransNet(self._net_config(len(categories)))

    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.net is None:
            # The random state seed_everything left, as a DDP launch restores it before setup: the initial weights
            # (built here, once the classes are known) are then the same whatever the number of processes.
            reset_seed()
            self._build(self.categories_from_data())
        if stage == "fit":
            check_ddp_strategy(self.trainer.strategy, self.categories)

    # ------------------------------------------------------------------------------------------- features
    @property
    def token_grid(self) -> tuple[int, int]:
        side = self.input_size // max(self.backbone.strides)
        return side, side

    def aligned_features(self, images: Tensor) -> Tensor:
        """The neck: ``[B, C, S, S]`` images -> ``[B, sum C_i, S / 16, S / 16]`` aligned backbone maps."""
        return align_features(self.backbone_features(images), self.token_grid)

    @override
    def on_fit_start(self) -> None:
        trainer = self.trainer
        self._train_features = train_features(
            trainer.datamodule,
            self.aligned_features,
            self.backbone.describe(),
            {"neck": "hvq-trans aligned maps", "grid": list(self.token_grid)},
            self.device,
            is_builder=trainer.local_rank == 0,  # one builder per node: node-local cache folders work too
            barrier=trainer.strategy.barrier,
            log=lambda line: print(line, flush=True) if trainer.is_global_zero else None,
        )

    def _batch_features(self, batch: dict[str, Any], cached: bool) -> Tensor:
        if cached and self._train_features is not None:
            rows = batch["index"].cpu().numpy()
            return torch.from_numpy(np.ascontiguousarray(self._train_features[rows])).to(self.device)
        return self.aligned_features(batch["image"])

    # ------------------------------------------------------------------------------------------- training
    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        assert self.net is not None
        out = self.net([self._batch_features(batch, cached=True)], self.category_indices(batch))
        loss = self.net.loss(out)
        if not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"hvq_trans loss is not finite at epoch {self.current_epoch}, step {self.global_step}; lower "
                f"model.lr (now {self.hparams.lr}) or check the input data"
            )
        size = len(batch["image"])
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/quant_loss", out.quant_loss, batch_size=size)
        return loss

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        assert self.net is not None
        out = self.net([self._batch_features(batch, cached=False)], self.category_indices(batch))
        self.log("val/loss", self.net.loss(out), sync_dist=True, batch_size=len(batch["image"]))

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After every optimiser step: epoch checkpoints (what init_from and resumed runs load) say it is trained.
        self.fitted.fill_(True)

    @override
    def configure_optimizers(self) -> Any:
        assert self.net is not None
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=hp.lr, betas=(0.9, 0.999), weight_decay=hp.weight_decay)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=hp.lr_step_epochs, gamma=hp.lr_gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}

    # ------------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    @override
    def raw_anomaly_map(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        images = self.fitted_input(batch)
        assert self.net is not None
        out = self.net([self.aligned_features(images)], self.category_indices(batch))
        maps = self.net.anomaly_map(out)  # [B, 1, S, S] at the input size
        pool = (self.hparams.image_score_pool, self.hparams.image_score_pool)
        return maps, {OWN_IMAGE_SCORE: hvq_image_score(maps, pool)}

    @override
    def export_graphs(self, input_size: int) -> MethodExport:
        self._check_fitted()
        assert self.net is not None
        graph = HVQTransMapGraph(self.backbone, self.net.eval(), self.token_grid, self.hparams.image_score_pool)
        return export_feature_graph(self, graph.eval(), input_size)

    @override
    def method_info(self) -> dict[str, Any]:
        return {**super().method_info(), "image_score_pool": self.hparams.image_score_pool,
                "ot_weight": self.hparams.ot_weight}  # fmt: skip


def check_ddp_strategy(strategy: Strategy, categories: Sequence[str]) -> None:
    """Refuse, in one line and before training, a DDP strategy that would stop at the first step.

    With several classes a batch rarely holds all of them, and the output projections of the absent ones take no
    part in the loss; DDP must then be told to look for unused parameters (the official code wraps the model in
    ``DistributedDataParallel(..., find_unused_parameters=True)``), else it fails in the next step. One class
    uses every parameter in every step, so plain DDP works.
    """
    if len(categories) < 2 or not isinstance(strategy, DDPStrategy):
        return
    if not strategy._ddp_kwargs.get("find_unused_parameters", False):  # Lightning keeps DDP's kwargs only there
        raise ConfigError(
            f"hvq_trans has {len(categories)} classes and DDP without find_unused_parameters: a batch without some "
            "classes leaves their output projections unused, which stops DDP; set "
            "--trainer.strategy=ddp_find_unused_parameters_true"
        )
