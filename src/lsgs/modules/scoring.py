"""Stage 5: scoring. A model-agnostic evaluation harness, and the LSGS restoration-based scorer built on it.

``AnomalyMapModule`` evaluates anything that yields one anomaly map per image: it calibrates thresholds on the
validation normals (never on test data), applies the region of interest and the MinPool/AvgPool smoothing,
feeds the torchmetrics metrics (synced over DDP ranks), and writes results files, heatmap panels and curves
(rank 0 only). ``ScoringModule`` is the LSGS method; the baselines in ``lsgs.modules.baselines`` reuse the same
harness, so every method's numbers come out of exactly the same code.
"""

from __future__ import annotations

import abc
import math
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lsgs.checkpoints import state_fingerprint
from lsgs.errors import CheckpointError, ConfigError
from lsgs.io import read_json
from lsgs.metrics import AnomalyMetrics, ScoreQuantile
from lsgs.metrics.histogram import pr_curve_from_histograms, roc_curve_from_histograms
from lsgs.metrics.image import IMAGE_SCORES, reduce_image_scores
from lsgs.modules.transformer import load_code_transformer
from lsgs.modules.vqvae import VQVAE
from lsgs.nn.restoration import (
    code_nll,
    per_image_uniforms,
    reconstruction_error_map,
    restoration_anomaly_map,
    restore_causal,
    restore_global,
    smooth_anomaly_map,
)
from lsgs.progress import progress
from lsgs.reporting import write_evaluation_outputs

METRIC_REGIONS = ("all", "roi")


class AnomalyMapModule(LightningModule, abc.ABC):
    """Evaluation harness for any method that produces an anomaly map per image.

    Subclasses implement ``raw_anomaly_map``. ``trainer.test`` then (1) calibrates on the validation normals of
    the attached data module (pixel threshold for the honest Dice, image threshold, and whatever the subclass
    needs first, e.g. the LSGS NLL threshold), (2) scores the test set, (3) writes the outputs.

    Args:
        output_dir: where results, heatmaps and curves go (rank 0); None writes nothing.
        smoothing: MinPool 3x3 then AvgPool 7x7 on the ROI-masked map (Naval Marimont & Tarroni).
        smoothing_count_include_pad: whether the 7x7 average counts the zero padding at the image border, as
            the reference code does (PyTorch's default, True); False keeps border scores at their scale.
        val_quantile: quantile of the validation normals' pixel scores used as the honest Dice threshold.
        image_quantile: quantile of the validation normals' image scores used as the image anomaly threshold
            (``lsgs detect``).
        metric_region: ``all`` pixels (as the paper) or only ``roi`` pixels count in the pixel metrics.
        metric_bits: histogram resolution of the pixel metrics (2**bits bins over the float32 order).
        compute_aupro: compute AUPRO (MVTec standard); costs a connected-component pass per test image.
        heatmaps_per_category: test images per category drawn as heatmap panels (seeded choice).
        heatmap_seed: seed of that choice.
        calibration: a ``calibration.json`` of an earlier run to reuse instead of calibrating again.
        image_score: image score of a map (image AUROC, image threshold, ``lsgs detect``, ``image_scores.csv``):
            ``max`` (the paper's) or ``topk_mean``, the mean of the top ``image_topk`` fraction of the pixels.
        image_topk: fraction q in (0, 1] of ``topk_mean`` (0.01: the top 1 % of the pixels).
    """

    method_name = "method"

    def __init__(
        self,
        output_dir: str | None = None,
        smoothing: bool = True,
        smoothing_count_include_pad: bool = True,
        val_quantile: float = 0.99,
        image_quantile: float = 0.99,
        metric_region: str = "all",
        metric_bits: int = 20,
        compute_aupro: bool = True,
        heatmaps_per_category: int = 2,
        heatmap_seed: int = 0,
        calibration: str | None = None,
        image_score: str = "max",
        image_topk: float = 0.01,
    ) -> None:
        super().__init__()
        for name, value in (("val_quantile", val_quantile), ("image_quantile", image_quantile)):
            if not 0.0 < value < 1.0:
                raise ConfigError(f"model.{name} must be in (0, 1), got {value}")
        if metric_region not in METRIC_REGIONS:
            raise ConfigError(f"model.metric_region={metric_region!r} is not one of {METRIC_REGIONS}")
        if image_score not in IMAGE_SCORES:
            raise ConfigError(f"model.image_score={image_score!r} is not one of {IMAGE_SCORES}")
        if not 0.0 < image_topk <= 1.0:
            raise ConfigError(f"model.image_topk must be in (0, 1], got {image_topk}")
        self.image_score = image_score
        self.image_topk = image_topk
        self.output_dir = Path(output_dir) if output_dir else None
        self.smoothing = smoothing
        self.smoothing_count_include_pad = smoothing_count_include_pad
        self.val_quantile = val_quantile
        self.image_quantile = image_quantile
        self.metric_region = metric_region
        self.metric_bits = metric_bits
        self.compute_aupro = compute_aupro
        self.heatmaps_per_category = heatmaps_per_category
        self.heatmap_seed = heatmap_seed
        self.calibration: dict[str, float] = {}
        if calibration is not None:
            self.calibration = read_json(calibration, "model.calibration")
        self.results: dict[str, Any] | None = None

    # ------------------------------------------------------------------------------------------- subclass API
    @abc.abstractmethod
    def raw_anomaly_map(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The method's anomaly map before ROI masking and smoothing.

        Returns:
            ``[B, 1, H, W]`` map (higher = more anomalous) and named ``[B, C, H, W]`` pictures for the heatmap
            panels (e.g. ``reconstruction``, ``restoration``).
        """

    def calibration_phases(self) -> list[tuple[str, str]]:
        """``(phase, split)`` passes to run before the pixel-threshold pass, in order.

        ``split`` is ``"val"`` (validation normals) or ``"train"`` (the whole training split, in order, without
        augmentation; e.g. for statistics of the training images). Never test data. LSGS: ``[("nll", "val")]``.
        """
        return []

    def calibrate_step(self, phase: str, batch: dict[str, Any]) -> None:
        """Accumulate the statistics of ``phase`` on one validation batch."""

    def finish_calibration(self, phase: str) -> None:
        """Turn the (already DDP-synced) statistics of ``phase`` into ``self.calibration`` entries."""

    def method_info(self) -> dict[str, Any]:
        """Extra facts about the method for the results file."""
        return {}

    # ------------------------------------------------------------------------------------------- maps
    def anomaly_map(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The final map: raw map x ROI, then smoothed. Returns ``[B, 1, H, W]`` and the panel pictures."""
        raw, pictures = self.raw_anomaly_map(batch)
        masked = raw.float() * batch["roi"].to(raw.device, torch.float32)
        if not self.smoothing:
            return masked, pictures
        return smooth_anomaly_map(masked, count_include_pad=self.smoothing_count_include_pad), pictures

    def image_scores(self, maps: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``[B]`` image scores of ``[B, 1, H, W]`` final maps by ``image_score`` (over ``valid`` pixels if given)."""
        return reduce_image_scores(maps, self.image_score, self.image_topk, valid)

    # ------------------------------------------------------------------------------------------- calibration
    def calibrate(self) -> dict[str, float]:
        """Run every calibration pass over the validation normals of the attached data module."""
        if self.calibration:
            rank_zero_info(f"[lsgs] using the given calibration: {self.calibration}")
            return self.calibration
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "val_dataloader"):
            raise ConfigError("scoring needs a data module with validation normals to set its thresholds")
        for phase, split in [*self.calibration_phases(), ("threshold", "val")]:
            if split not in ("val", "train"):
                raise ConfigError(
                    f"calibration phase {phase!r} asks for split {split!r}; only val/train exist"
                )
            if phase == "threshold":
                self._pixel_quantile = ScoreQuantile(num_bits=self.metric_bits).to(self.device)
                self._image_quantile = ScoreQuantile(num_bits=self.metric_bits).to(self.device)
            loader = datamodule.val_dataloader() if split == "val" else datamodule.train_eval_dataloader()
            dataset = getattr(loader, "dataset", None)
            if hasattr(dataset, "__len__") and len(dataset) == 0:
                # Otherwise the thresholds come out NaN and fail later with a message that hides the cause.
                fraction = getattr(datamodule, "val_fraction", "?")
                hint = f" (data.val_fraction={fraction})" if split == "val" else ""
                raise ConfigError(
                    f"calibration phase {phase!r} needs images, but {type(datamodule).__name__}'s {split} split "
                    f"is empty{hint}; scoring sets its thresholds on normal images held back from training"
                )
            for batch in progress(loader, f"calibration ({phase})", self.trainer.is_global_zero):
                batch = move_data_to_device(batch, self.device)
                # The precision context test_step/predict_step run in (autocast under bf16-mixed): the
                # thresholds must be set on maps of the same precision as the maps they are applied to.
                with torch.no_grad(), self._step_precision_context():
                    if phase == "threshold":
                        self._threshold_step(batch)
                    else:
                        self.calibrate_step(phase, batch)
            if phase == "threshold":
                self.calibration["val_threshold"] = self._pixel_quantile.quantile(self.val_quantile)
                self.calibration["image_threshold"] = self._image_quantile.quantile(self.image_quantile)
                self.calibration["val_quantile"] = self.val_quantile
                self.calibration["image_quantile"] = self.image_quantile
            else:
                self.finish_calibration(phase)
        rank_zero_info(f"[lsgs] calibration on validation normals: {self.calibration}")
        return self.calibration

    def _step_precision_context(self) -> Any:
        """The context Lightning runs ``test_step`` (or ``predict_step``) in, e.g. autocast for bf16-mixed."""
        plugin = self.trainer.precision_plugin
        return plugin.predict_step_context() if self.trainer.predicting else plugin.test_step_context()

    def _threshold_step(self, batch: dict[str, Any]) -> None:
        maps, _ = self.anomaly_map(batch)
        roi = batch["roi"] > 0.5
        self._pixel_quantile.update(maps, valid=roi)
        self._image_quantile.update(self.image_scores(maps))

    # ------------------------------------------------------------------------------------------- test
    @override
    def on_test_start(self) -> None:
        self.calibrate()
        datamodule = self.trainer.datamodule
        categories = list(getattr(datamodule, "test_categories", None) or ["all"])
        self.metrics = AnomalyMetrics(categories, num_bits=self.metric_bits, compute_aupro=self.compute_aupro)
        self.metrics = self.metrics.to(self.device)
        self.metrics.set_val_threshold(self.calibration["val_threshold"])
        self._panel_indices = (
            select_panel_indices(datamodule.dataset("test"), self.heatmaps_per_category, self.heatmap_seed)
            if hasattr(datamodule, "dataset")
            else set()
        )
        self._panels: list[dict[str, Any]] = []
        self._image_rows: list[dict[str, Any]] = []

    @override
    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        maps, pictures = self.anomaly_map(batch)
        valid = batch["roi"] > 0.5 if self.metric_region == "roi" else None
        metric_scores = self.image_scores(maps, valid)  # before the has_mask restriction below
        has_mask = batch.get("has_mask")
        if has_mask is not None and not bool(has_mask.all()):
            # Anomalous images without ground truth (FolderDataModule, allow_missing_masks): their all-zero
            # mask means "unknown", not "no defect", so they count for the image metrics only.
            keep = has_mask.to(maps.device).view(-1, 1, 1, 1).expand_as(maps)
            valid = keep if valid is None else valid & keep
        self.metrics.update(
            maps,
            batch["mask"],
            batch["label"],
            list(batch["category"]),
            valid=valid,
            image_scores=metric_scores,
        )
        scores = self.image_scores(maps)
        for i, index in enumerate(batch["index"].tolist()):
            self._image_rows.append(
                {
                    "index": index,
                    "path": batch["path"][i],
                    "slice_index": int(batch["slice_index"][i]),
                    "category": batch["category"][i],
                    "label": int(batch["label"][i]),
                    "score": float(scores[i]),
                }
            )
            if index in self._panel_indices:
                self._panels.append(
                    {
                        "index": index,
                        "category": batch["category"][i],
                        "label": int(batch["label"][i]),
                        "image": batch["image"][i].float().cpu(),
                        "mask": batch["mask"][i].float().cpu(),
                        "map": maps[i].float().cpu(),
                        **{name: picture[i].float().cpu() for name, picture in pictures.items()},
                    }
                )

    @override
    def on_test_epoch_end(self) -> None:
        values = self.metrics.compute()
        rows, panels = _gather_lists(self, self._image_rows), _gather_lists(self, self._panels)
        curves = pooled_pixel_curves(self.metrics)
        self.results = {
            "method": self.method_name,
            "method_info": self.method_info(),
            "calibration": self.calibration,
            "metric_region": self.metric_region,
            "num_test_images": len(rows),
            **values,
        }
        for name, value in values["mean"].items():
            self.log(f"test/{name}", float(value), sync_dist=False, rank_zero_only=True)
        if self.trainer.is_global_zero and self.output_dir is not None:
            write_evaluation_outputs(
                self.output_dir,
                self.results,
                sorted(rows, key=lambda r: r["index"]),
                sorted(panels, key=lambda p: p["index"]),
                curves,
                self.calibration,
                self.loggers,
            )

    # ------------------------------------------------------------------------------------------- predict
    @override
    def on_predict_start(self) -> None:
        self.calibrate()

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        maps, _ = self.anomaly_map(batch)
        scores = self.image_scores(maps)
        return {
            "path": list(batch["path"]),
            "image": batch["image"].float().cpu(),
            "map": maps.float().cpu(),
            "score": scores.float().cpu(),
            "anomalous": (scores > self.calibration["image_threshold"]).cpu(),
        }

    def stage_summary(self) -> dict[str, Any]:
        return {"mean": self.results["mean"]} if self.results else {}

    @override
    def configure_optimizers(self) -> None:
        return None


MAP_REFERENCES = ("reconstruction", "input")
NLL_THRESHOLD_SCOPES = ("all", "category")


class ScoringCache:
    """Memo of the parts of ``ScoringModule``'s maps that its scoring options do not change.

    ``lsgs study scoring`` re-scores one run under many settings; with a cache attached (``module.cache``), the
    codes, transformer logits and ``X_hat`` of a batch are computed once for all settings, and the decoded
    restorations once per restoration setting (thresholds, n, temperature, seed). Entries are keyed by the batch's
    image paths and slice indices, so they are only reused for the very same batch; the values are what the
    module would compute, so a cached run gives exactly the uncached numbers.

    Memory: ``N * (L * K + C * H * W) * 4`` bytes for the base entries of N images (always kept), plus at most
    ``max_restoration_bytes`` of decoded restorations (oldest evicted first; ``N * n * C * H * W * 4`` bytes
    per restoration setting).
    """

    def __init__(self, max_restoration_bytes: int = 2 * 2**30) -> None:
        self.max_restoration_bytes = max_restoration_bytes
        self.base: dict[Any, Any] = {}
        self.restorations: OrderedDict[Any, torch.Tensor] = OrderedDict()
        self.restoration_bytes = 0
        self.hits = 0

    def get_base(self, key: Any, compute: Callable[[], Any]) -> Any:
        if key not in self.base:
            self.base[key] = compute()
        else:
            self.hits += 1
        return self.base[key]

    def get_restorations(self, key: Any, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key in self.restorations:
            self.hits += 1
            return self.restorations[key]
        value = compute()
        size = value.numel() * value.element_size()
        while self.restorations and self.restoration_bytes + size > self.max_restoration_bytes:
            _, old = self.restorations.popitem(last=False)
            self.restoration_bytes -= old.numel() * old.element_size()
        if size <= self.max_restoration_bytes:
            self.restorations[key] = value
            self.restoration_bytes += size
        return value


class ScoringModule(AnomalyMapModule):
    """LSGS scoring: restoration of implausible codes by the transformer, restoration error as anomaly map.

    For a test image X with codes s: the transformer gives -log p(s_i | context) per position; positions above the
    NLL threshold are resampled ``num_restorations`` times; ``X_hat`` (the decoded original codes) and the
    restorations ``Y_1..Y_n`` are decoded; the map is ``AS = Σ_i w_i |R - Y_i| + λ |X - X_hat|`` (means over
    channels), ``w = softmax_i(k / mean|R - Y_i|)``, with the reference ``R = X_hat`` (paper Eq. 7) or ``R = X``.
    Without a transformer (``transformer_checkpoint=None``, the "w/o" row of Table 4) the map is the VQ-VAE
    reconstruction error ``|X - X_hat|`` and ``map_reference`` / ``reconstruction_weight`` have no effect.

    Args:
        vqvae_checkpoint: the (fine-tuned) VQ-VAE.
        transformer_checkpoint: the transformer trained on that VQ-VAE's codes; None = no transformer.
        num_restorations: n (default 15).
        nll_quantile: quantile of validation-normal code NLLs used as the resampling threshold (default 0.9);
            used when ``nll_threshold`` is None.
        nll_threshold: a fixed resampling threshold in nats (>= 0; ``inf`` resamples nothing) instead of the
            validation quantile; then no NLL calibration pass runs and ``nll_threshold_scope`` has no effect.
        nll_threshold_scope: ``all``: one quantile over the validation normals of every category pooled;
            ``category``: each test image uses the quantile of its own category's validation normals (a test
            category without validation normals is a ``ConfigError``).
        map_reference: ``reconstruction`` (``|X_hat - Y_i|``, paper Eq. 7, default) or ``input``
            (``|X - Y_i|``, as Naval Marimont & Tarroni's code); the softmax weights use the same reference:
            ``k / mean|X - Y_i|`` for ``input``, as in that code.
        reconstruction_weight: λ >= 0, weight of the VQ-VAE reconstruction error ``|X - X_hat|`` added to the
            map (default 0: the paper's map).
        softmax_k: k of the restoration weights (default 3).
        temperature: sampling temperature of the resampling distribution.
        seed: seed of the resampling (per image, from its dataset index, so DDP sharding does not matter).
        **kwargs: the harness arguments of ``AnomalyMapModule``.
    """

    method_name = "lsgs"

    def __init__(
        self,
        vqvae_checkpoint: str | None = None,
        transformer_checkpoint: str | None = None,
        num_restorations: int = 15,
        nll_quantile: float = 0.9,
        nll_threshold: float | None = None,
        nll_threshold_scope: str = "all",
        map_reference: str = "reconstruction",
        reconstruction_weight: float = 0.0,
        softmax_k: float = 3.0,
        temperature: float = 1.0,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if vqvae_checkpoint is None:
            raise ConfigError("model.vqvae_checkpoint is required (the pipeline fills it in)")
        if num_restorations < 1:
            raise ConfigError(f"model.num_restorations must be >= 1, got {num_restorations}")
        if not 0.0 < nll_quantile < 1.0:
            raise ConfigError(f"model.nll_quantile must be in (0, 1), got {nll_quantile}")
        if nll_threshold is not None and not nll_threshold >= 0.0:  # also rejects NaN
            raise ConfigError(
                f"model.nll_threshold must be null or a number of nats >= 0, got {nll_threshold}"
            )
        if nll_threshold_scope not in NLL_THRESHOLD_SCOPES:
            raise ConfigError(
                f"model.nll_threshold_scope={nll_threshold_scope!r} is not one of {NLL_THRESHOLD_SCOPES}"
            )
        if map_reference not in MAP_REFERENCES:
            raise ConfigError(f"model.map_reference={map_reference!r} is not one of {MAP_REFERENCES}")
        if not (reconstruction_weight >= 0.0 and math.isfinite(reconstruction_weight)):
            raise ConfigError(
                f"model.reconstruction_weight must be a finite number >= 0, got {reconstruction_weight}"
            )
        self.save_hyperparameters()
        self.cache: ScoringCache | None = None  # set by `lsgs study scoring`
        self.vqvae = VQVAE.from_checkpoint(vqvae_checkpoint, "model.vqvae_checkpoint")
        self.vqvae.requires_grad_(False)
        self.transformer = None
        self.attention = "none"
        if transformer_checkpoint is not None:
            self.transformer, meta = load_code_transformer(
                transformer_checkpoint, "model.transformer_checkpoint"
            )
            self.transformer.requires_grad_(False)
            fingerprint = state_fingerprint(self.vqvae.state_dict())
            if meta.get("vqvae_fingerprint") != fingerprint:
                raise CheckpointError(
                    f"model.transformer_checkpoint '{transformer_checkpoint}' was trained on the codes of another "
                    f"VQ-VAE ({meta.get('vqvae_checkpoint')}) than model.vqvae_checkpoint '{vqvae_checkpoint}'"
                )
            self.attention = self.transformer.config.attention
        self.method_name = {"none": "vqvae-reconstruction", "causal": "lsgs-causal", "global": "lsgs"}[
            self.attention
        ]

    @property
    def num_image_channels(self) -> int:
        return int(self.vqvae.hparams.in_channels)

    # ------------------------------------------------------------------------------------------- NLL threshold
    @override
    def calibration_phases(self) -> list[tuple[str, str]]:
        if self.transformer is None:
            return []
        if self.hparams.nll_threshold is not None:  # a fixed threshold needs no pass over the normals
            self.calibration["nll_threshold"] = float(self.hparams.nll_threshold)
            return []
        return [("nll", "val")]

    def _nll_categories(self) -> list[str]:
        """Categories that get their own NLL quantile: the evaluated ones (the same list on every DDP rank)."""
        datamodule = self.trainer.datamodule
        return list(getattr(datamodule, "test_categories", None) or [])

    def _new_nll_quantiles(self) -> dict[str, ScoreQuantile]:
        names = ["all"] if self.hparams.nll_threshold_scope == "all" else self._nll_categories()
        return {name: ScoreQuantile(num_bits=self.metric_bits).to(self.device) for name in names}

    @override
    def calibrate_step(self, phase: str, batch: dict[str, Any]) -> None:
        if not hasattr(self, "_nll_quantiles"):
            self._nll_quantiles = self._new_nll_quantiles()
        flat, logits, _ = self.encode_batch(batch)
        nll = code_nll(logits, flat)  # [B, L]
        if self.hparams.nll_threshold_scope == "all":
            self._nll_quantiles["all"].update(nll)
            return
        categories = list(batch["category"])
        for name, quantile in self._nll_quantiles.items():
            rows = [i for i, category in enumerate(categories) if category == name]
            if rows:
                quantile.update(nll[rows])

    @override
    def finish_calibration(self, phase: str) -> None:
        if not hasattr(self, "_nll_quantiles"):  # this DDP rank got no validation image; it must still sync
            self._nll_quantiles = self._new_nll_quantiles()
        q = self.hparams.nll_quantile
        thresholds = {
            name: quantile.quantile(q) for name, quantile in self._nll_quantiles.items()
        }  # collective
        del self._nll_quantiles
        self.calibration["nll_quantile"] = q
        if self.hparams.nll_threshold_scope == "all":
            self.calibration["nll_threshold"] = thresholds["all"]
            return
        missing = [name for name, value in thresholds.items() if math.isnan(value)]
        if missing:
            raise ConfigError(
                f"model.nll_threshold_scope=category: test categor{'y' if len(missing) == 1 else 'ies'} "
                f"{missing} ha{'s' if len(missing) == 1 else 've'} no validation normals to set its NLL threshold"
                " from; use nll_threshold_scope=all"
            )
        self.calibration["nll_thresholds"] = thresholds

    def nll_thresholds(self, batch: dict[str, Any]) -> torch.Tensor:
        """``[B]`` resampling threshold of each image of ``batch`` (its category's under scope ``category``).

        With per-category thresholds, an image of a category that has none (e.g. ``lsgs detect`` on a folder of a
        single-category run) uses the only one there is; with several, that is a ``ConfigError``.
        """
        size = len(batch["image"])
        if "nll_thresholds" not in self.calibration:
            return torch.full((size,), float(self.calibration["nll_threshold"]), device=self.device)
        table = self.calibration["nll_thresholds"]
        if len(table) == 1:
            return torch.full((size,), float(next(iter(table.values()))), device=self.device)
        unknown = sorted({c for c in batch["category"] if c not in table})
        if unknown:
            raise ConfigError(
                f"model.nll_threshold_scope=category: no NLL threshold for categor{'y' if len(unknown) == 1 else 'ies'}"
                f" {unknown} (calibrated: {sorted(table)})"
            )
        return torch.tensor([float(table[c]) for c in batch["category"]], device=self.device)

    # ------------------------------------------------------------------------------------------- maps
    def encode_batch(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """What no scoring option changes: codes ``[B, L]``, transformer logits ``[B, L, K]`` (None without a
        transformer) and ``X_hat`` ``[B, C, H, W]``; memoised in ``self.cache`` when one is attached."""

        def compute() -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
            codes = self.vqvae.net.encode_indices(batch["image"])  # [B, h, w]
            flat = codes.flatten(1)  # [B, L]
            logits = self.transformer(flat) if self.transformer is not None else None  # [B, L, K]
            return flat, logits, self.vqvae.net.decode_indices(codes)

        if self.cache is None:
            return compute()
        return self.cache.get_base(("base", *_batch_key(batch)), compute)

    def decode_restorations(
        self, batch: dict[str, Any], flat: torch.Tensor, logits: torch.Tensor | None
    ) -> torch.Tensor:
        """Resample the codes above the NLL threshold n times and decode them: ``[B, n, C, H, W]``."""
        n = self.hparams.num_restorations
        thresholds = self.nll_thresholds(batch)  # [B]

        def compute() -> torch.Tensor:
            batch_size, length = flat.shape
            # Noise seeded per image (by dataset index): results do not depend on batching or DDP sharding.
            seeds = [int(self.hparams.seed) * 1_000_003 + int(i) for i in batch["index"]]
            noise = per_image_uniforms(seeds, n, length, self.device)
            temperature = self.hparams.temperature
            if self.attention == "global":
                restored = restore_global(
                    logits, flat, thresholds, n, temperature=temperature, uniforms=noise
                )
            else:
                restored = restore_causal(
                    self.transformer, flat, thresholds, n, temperature=temperature, uniforms=noise
                )
            height, width = self.vqvae.code_grid
            # All n restorations of the batch through the decoder in one call: [B * n, C, H, W].
            decoded = self.vqvae.net.decode_indices(restored.reshape(batch_size * n, height, width))
            return decoded.reshape(batch_size, n, *decoded.shape[1:])

        if self.cache is None:
            return compute()
        key = (
            "restorations",
            *_batch_key(batch),
            tuple(thresholds.tolist()),
            n,
            self.hparams.temperature,
            self.hparams.seed,
        )
        return self.cache.get_restorations(key, compute)

    @torch.no_grad()
    @override
    def raw_anomaly_map(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = batch["image"]
        flat, logits, reconstruction = self.encode_batch(batch)
        if self.transformer is None:
            return reconstruction_error_map(images, reconstruction), {"reconstruction": reconstruction}
        restorations = self.decode_restorations(batch, flat, logits)  # [B, n, C, H, W]
        reference = reconstruction if self.hparams.map_reference == "reconstruction" else images
        anomaly = restoration_anomaly_map(reference, restorations, self.hparams.softmax_k)  # [B, 1, H, W]
        if self.hparams.reconstruction_weight:
            anomaly = anomaly + self.hparams.reconstruction_weight * reconstruction_error_map(
                images.float(), reconstruction.float()
            )
        return anomaly, {"reconstruction": reconstruction, "restoration": restorations[:, 0]}

    @override
    def method_info(self) -> dict[str, Any]:
        return {
            "attention": self.attention,
            "num_restorations": self.hparams.num_restorations,
            "softmax_k": self.hparams.softmax_k,
            "nll_quantile": self.hparams.nll_quantile,
            "nll_threshold": self.hparams.nll_threshold,
            "nll_threshold_scope": self.hparams.nll_threshold_scope,
            "map_reference": self.hparams.map_reference,
            "reconstruction_weight": self.hparams.reconstruction_weight,
        }


def _batch_key(batch: dict[str, Any]) -> tuple[Any, ...]:
    """Identity of a batch's images (paths and slice indices), for ``ScoringCache``."""
    return tuple(batch["path"]), tuple(int(i) for i in batch["slice_index"])


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


def _gather_lists(module: LightningModule, items: list[Any]) -> list[Any]:
    """Concatenate a per-rank Python list over all ranks (rank order)."""
    if module.trainer.world_size == 1:
        return list(items)
    gathered: list[Any] = [None] * module.trainer.world_size
    torch.distributed.all_gather_object(gathered, items)
    return [item for part in gathered for item in part]
