"""The evaluation harness: ``AnomalyMapModule`` evaluates anything that yields one anomaly map per image.

It calibrates thresholds on the validation normals (never on test data), applies the region of interest and the
MinPool/AvgPool smoothing, feeds the torchmetrics metrics (synced over DDP ranks), and writes results files,
heatmap panels and curves (rank 0 only, ``lsgs.evaluation.writers``). LSGS (``lsgs.modules.ScoringModule``) and
every method of ``lsgs.methods`` subclass it, so every method's numbers come out of exactly the same code.
"""

from __future__ import annotations

import abc
import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lsgs.contracts import categories_of, trainer_data, val_fraction_of
from lsgs.errors import ConfigError
from lsgs.evaluation.outputs import gather_lists, pooled_pixel_curves, select_panel_indices
from lsgs.evaluation.writers import write_evaluation_outputs
from lsgs.io import read_json
from lsgs.layout import StageLayout
from lsgs.metrics import AnomalyMetrics, ScoreQuantile
from lsgs.nn.anomaly_map import final_anomaly_map, resize_map
from lsgs.nn.export import IMAGE_SCORE, MethodExport
from lsgs.nn.image_score import IMAGE_SCORES, OWN, reduce_image_scores
from lsgs.options import Check, check_options, flag, fraction, one_of
from lsgs.progress import progress

METRIC_REGIONS = ("all", "roi")
# The checks of the harness arguments that take a value from a fixed set or range (the others are typed by their
# signature alone); ``lsgs study scoring`` validates its grid with them.
HARNESS_OPTIONS: dict[str, Check] = {
    "smoothing": flag(null="the method's default_smoothing"),
    "smoothing_count_include_pad": flag(),
    "val_quantile": fraction(),
    "image_quantile": fraction(),
    "metric_region": one_of(METRIC_REGIONS),
    "image_score": one_of(IMAGE_SCORES, null="the method's own"),
    "image_topk": fraction(include_one=True),
}
# The key of a method's own [B] image scores among the extras ``raw_anomaly_map`` returns: the name of the same
# output of an exported graph. ``effective_image_score`` is ``OWN`` when they score the images.
OWN_IMAGE_SCORE = IMAGE_SCORE
# What calibration on the validation normals set (``calibration.json``): ``val_threshold``, ``image_threshold``,
# ``val_quantile``, ``image_quantile``, ``image_score_std`` (the standard deviation of the normals' image scores,
# the scale of the ``Inferencer``'s normalised score) (numbers), and what a method adds (LSGS: ``nll_threshold``,
# or ``nll_thresholds``, a ``{category: threshold}`` table).
Calibration = dict[str, float | dict[str, float]]


class AnomalyMapModule(LightningModule, abc.ABC):
    """Evaluation harness for any method that produces an anomaly map per image.

    Subclasses implement ``raw_anomaly_map``. ``trainer.test`` then (1) calibrates on the validation normals of
    the attached data module (pixel threshold for the honest Dice, image threshold, and whatever the subclass
    needs first, e.g. the LSGS NLL threshold), (2) scores the test set, (3) writes the outputs.

    What is shared by every method of a run (the pipeline copies the scoring stage's values to every method): the
    evaluation size (the masks'), ``metric_region``, the validation quantiles, ``metric_bits``, AUPRO, heatmaps.
    What is each method's own unless an experiment imposes one value on every method (sets it in the scoring
    stage): the post-processing (``smoothing``, default ``default_smoothing``) and the image score
    (``image_score``, default the method's own, ``own_image_score``, else the map's maximum).

    Args:
        output_dir: where results, heatmaps and curves go (rank 0); None writes nothing.
        smoothing: MinPool 3x3 then AvgPool 7x7 on the ROI-masked map (Naval Marimont & Tarroni); None: the
            method's ``default_smoothing`` (True for LSGS and the pixel-space baseline methods).
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
            ``max`` (the paper's) or ``topk_mean``, the mean of the top ``image_topk`` fraction of the pixels;
            None: the method's own (``own_image_score``: PatchCore's re-weighted maximum, HVQ-Trans's pooled
            maximum), else ``max``.
        image_topk: fraction q in (0, 1] of ``topk_mean`` (0.01: the top 1 % of the pixels).
    """

    method_name = "method"
    # ``baseline`` (a floor every method must beat: intensity, pixel_gaussian, ae, vae, patchcore) or ``method``
    # (LSGS, HVQ-Trans, and by default a user's own class); the summary labels each row with it.
    kind = "method"
    # Experiment keys the pipeline copies into this method's stage when its own config leaves them unset (None):
    # ``{"model.init_args.<arg>" or "trainer.<key>": "<stage>.model.init_args.<arg>" or "<stage>.trainer.<key>"}``.
    pipeline_defaults: ClassVar[dict[str, str]] = {}
    # The checks of the class's options (``lsgs.options``): the harness's; a subclass adds its own.
    option_checks: ClassVar[dict[str, Check]] = HARNESS_OPTIONS
    # The post-processing the method's maps get when the experiment imposes none (``smoothing`` left null).
    default_smoothing: ClassVar[bool] = True
    # The name of the method's own image score, which ``raw_anomaly_map`` returns under ``OWN_IMAGE_SCORE``; None:
    # the method has none and is scored by the map's maximum unless the experiment imposes another reduction.
    own_image_score: ClassVar[str | None] = None

    def __init__(
        self,
        output_dir: str | None = None,
        smoothing: bool | None = None,
        smoothing_count_include_pad: bool = True,
        val_quantile: float = 0.99,
        image_quantile: float = 0.99,
        metric_region: str = "all",
        metric_bits: int = 20,
        compute_aupro: bool = True,
        heatmaps_per_category: int = 2,
        heatmap_seed: int = 0,
        calibration: str | None = None,
        image_score: str | None = None,
        image_topk: float = 0.01,
    ) -> None:
        super().__init__()
        check_options(HARNESS_OPTIONS, locals())
        self.image_score = image_score
        self.image_topk = image_topk
        self.output_dir = Path(output_dir) if output_dir else None
        self.smoothing = self.default_smoothing if smoothing is None else bool(smoothing)
        self.smoothing_count_include_pad = smoothing_count_include_pad
        self.val_quantile = val_quantile
        self.image_quantile = image_quantile
        self.metric_region = metric_region
        self.metric_bits = metric_bits
        self.compute_aupro = compute_aupro
        self.heatmaps_per_category = heatmaps_per_category
        self.heatmap_seed = heatmap_seed
        self.calibration: Calibration = {}
        if calibration is not None:
            self.calibration = read_json(calibration, "model.calibration")
        self.results: dict[str, Any] | None = None
        self._without_test_set = False  # True while calibrate_without_test_set runs

    # ------------------------------------------------------------------------------------------- subclass API
    @abc.abstractmethod
    def raw_anomaly_map(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The method's anomaly map before resizing to the evaluation size, ROI masking and smoothing.

        Returns:
            ``[B, 1, h, w]`` map (higher = more anomalous) at the method's input size (``batch["image"]``'s; the
            harness resizes it to the masks' size) and named extras: ``[B, C, h, w]`` pictures for the heatmap
            panels (e.g. ``reconstruction``, ``restoration``) and, for a method with ``own_image_score``, its
            ``[B]`` image scores under ``OWN_IMAGE_SCORE``.
        """

    def calibration_phases(self) -> list[tuple[str, str]]:
        """``(phase, split)`` passes to run before the pixel-threshold pass, in order.

        ``split`` is ``"val"`` (validation normals) or ``"train"`` (the whole training split, in order, without
        augmentation; e.g. for statistics of the training images). Never test data. LSGS: ``[("nll", "val")]``.
        """
        return []

    def calibrate_step(self, phase: str, batch: dict[str, Any]) -> None:
        """Accumulate the statistics of ``phase`` on one batch of the split ``calibration_phases`` names for it
        (validation normals, or the training split)."""

    def finish_calibration(self, phase: str) -> None:
        """Turn the (already DDP-synced) statistics of ``phase`` into ``self.calibration`` entries."""

    def method_info(self) -> dict[str, Any]:
        """Extra facts about the method for the results file."""
        return {}

    def learned_state(self) -> dict[str, Any] | None:
        """A checkpoint of what the method learned during the evaluation itself, written into the stage folder
        (``StageLayout.last_checkpoint``) for ``load_method``; None when the stage has nothing to add (LSGS: its
        config names its upstream checkpoints; a method trained in its stage: the runner's training checkpoint).
        """
        return None

    @classmethod
    def loading_arguments(cls, stage: StageLayout) -> dict[str, Any]:
        """Constructor arguments, besides the stage's config, that rebuild the method a finished ``stage`` ran
        (``load_method``): e.g. ``init_from`` its learned state. Raises ``ConfigError`` when the folder lacks it."""
        return {}

    def export_graphs(self, input_size: int) -> MethodExport:
        """The method as pure torch graphs, for ``lsgs export`` (ONNX, OpenVINO, TorchScript) and the
        ``lsgs.Inferencer``, which runs them (eager, onnxruntime, OpenVINO, TorchScript) without Lightning or this
        harness. The contract (``lsgs.nn.export``):

        - Every graph is a plain ``nn.Module`` in eval mode, traceable by ``torch.jit.trace`` and both ONNX
          exporters: no Lightning, no Python-side value checks while tracing (``lsgs.nn.tracing.is_tracing``), no
          loop whose length depends on the batch. Axis 0 of every input and output is the batch (dynamic); the
          other axes are fixed by the examples. A graph returns a tensor, or a tuple in ``outputs`` order.
        - ``MethodExport.runtime`` says how the runtime combines the graphs:
          ``map`` (one graph ``map``): ``images`` ``[B, C, h, w]`` float32 in [0, 1] at ``input_size`` (as the data
          modules give them), plus ``class_index`` ``[B]`` int64 when ``categories`` is set (per-class statistics,
          PatchCore memory banks, HVQ-Trans's class-conditioned codebooks: row ``i`` is ``categories[i]``) ->
          ``map`` ``[B, 1, h', w']`` (the raw map of ``raw_anomaly_map``), plus ``image_score`` ``[B]`` (the
          method's own, ``OWN_IMAGE_SCORE``) for a method with ``own_image_score``. A nearest-neighbour search
          (PatchCore) is a matrix product and a minimum over the memory bank inside the graph.
          ``restoration`` (LSGS): graphs ``encoder`` (``images`` -> ``codes`` ``[B, L]`` int64), ``transformer``
          (``codes`` -> ``logits`` ``[B, L, K]``) and ``decoder`` (``codes`` ``[B', L]`` -> ``decoded``
          ``[B', C, h, w]``); the runtime draws the per-image noise, resamples, decodes and weights with the
          functions of ``lsgs.nn.restoration`` that ``ScoringModule`` calls, with the ``options`` given.
        - The runtime then applies, for every method, what this harness applies: ``final_anomaly_map`` (resize to
          the evaluation size, ROI of ones, ``smoothing``), the image score (``effective_image_score``) and the
          calibrated thresholds; ``lsgs export`` writes those settings into ``metadata.json``.

        Args:
            input_size: side of the square images the method scores (its stage's ``data.model_input_size``, else
                ``data.image_size``); the examples the graphs are traced with have this size.

        Raises:
            ConfigError: the method cannot be exported (the default: a method class that does not implement it).
        """
        raise ConfigError(
            f"the {self.method_name} method ({type(self).__name__}) cannot be exported: it does not implement "
            "AnomalyMapModule.export_graphs"
        )

    # ------------------------------------------------------------------------------------------- thresholds
    @property
    def pixel_threshold(self) -> float:
        """Calibrated pixel threshold (``val_quantile`` of the validation normals' map values): the predicted
        region of ``lsgs detect`` and the honest Dice."""
        return float(self.calibration["val_threshold"])

    @property
    def image_threshold(self) -> float:
        """Calibrated image threshold (``image_quantile`` of the validation normals' image scores)."""
        return float(self.calibration["image_threshold"])

    # ------------------------------------------------------------------------------------------- maps
    def anomaly_map(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The final map ``[B, 1, H, W]`` (``lsgs.nn.anomaly_map.final_anomaly_map``: the raw map resized to the
        masks' size, times the ROI, smoothed when ``smoothing``) and the panel pictures (at the map's size)."""
        maps, pictures, _ = self.scored_maps(batch)
        return maps, pictures

    def scored_maps(
        self, batch: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """``anomaly_map`` plus the method's own ``[B]`` image scores (None for a method without them)."""
        raw, extras = self.raw_anomaly_map(batch)
        extras = dict(extras)
        own = extras.pop(OWN_IMAGE_SCORE, None)
        roi = batch["roi"]
        maps = final_anomaly_map(raw, roi, self.smoothing, self.smoothing_count_include_pad)
        size = tuple(roi.shape[-2:])
        pictures = {name: resize_map(picture.float(), size) for name, picture in extras.items()}
        return maps, pictures, own

    @property
    def effective_image_score(self) -> str:
        """The image score in use: ``image_score`` when set, else ``own`` for a method with its own, else ``max``."""
        if self.image_score is not None:
            return self.image_score
        return OWN if self.own_image_score is not None else "max"

    def image_scores(
        self, maps: torch.Tensor, valid: torch.Tensor | None = None, own: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[B]`` image scores of ``[B, 1, H, W]`` final maps by ``effective_image_score`` (over ``valid``
        pixels if given); ``own`` are the method's own scores of the batch (``OWN_IMAGE_SCORE``)."""
        if self.effective_image_score != OWN:
            return reduce_image_scores(maps, self.effective_image_score, self.image_topk, valid)
        if own is None:
            raise RuntimeError(f"{type(self).__name__}.raw_anomaly_map returned no '{OWN_IMAGE_SCORE}'")
        return own.float()

    def image_score_name(self) -> str:
        """How this method scores an image, for the results and the summary (``max``, ``topk_mean 0.1``, or the
        method's own, e.g. ``patchcore (own)``)."""
        score = self.effective_image_score
        if score == OWN:
            return f"{self.own_image_score} (own)"
        return score if score == "max" else f"{score} {self.image_topk:g}"

    # ------------------------------------------------------------------------------------------- calibration
    def calibrate(self) -> Calibration:
        """Run every calibration pass over the validation normals of the attached data module."""
        if self.calibration:
            rank_zero_info(f"[lsgs] using the given calibration: {self.calibration}")
            return self.calibration
        datamodule = trainer_data(self.trainer)
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
                # count, sum and sum of squares of the image scores, float64 (summed over ranks below)
                self._image_moments = torch.zeros(3, dtype=torch.float64, device=self.device)
            loader = datamodule.val_dataloader() if split == "val" else datamodule.train_eval_dataloader()
            dataset = getattr(loader, "dataset", None)
            if hasattr(dataset, "__len__") and len(dataset) == 0:
                # Otherwise the thresholds come out NaN and fail later with a message that hides the cause.
                fraction = val_fraction_of(datamodule)
                hint = f" (data.val_fraction={'?' if fraction is None else fraction})" if split == "val" else ""
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
                self.calibration["image_score_std"] = self._image_score_std()
            else:
                self.finish_calibration(phase)
        rank_zero_info(f"[lsgs] calibration on validation normals: {self.calibration}")
        return self.calibration

    def _step_precision_context(self) -> Any:
        """The context Lightning runs ``test_step`` (or ``predict_step``) in, e.g. autocast for bf16-mixed."""
        plugin = self.trainer.precision_plugin
        return plugin.predict_step_context() if self.trainer.predicting else plugin.test_step_context()

    def _threshold_step(self, batch: dict[str, Any]) -> None:
        maps, _, own = self.scored_maps(batch)
        roi = batch["roi"] > 0.5
        self._pixel_quantile.update(maps, valid=roi)
        scores = self.image_scores(maps, own=own)
        self._image_quantile.update(scores)
        scores = scores.detach().double()
        self._image_moments += torch.stack([scores.new_tensor(scores.numel()), scores.sum(), scores.square().sum()])

    def _image_score_std(self) -> float:
        """Population standard deviation of the validation normals' image scores, over every DDP rank (a rank
        without validation images joins the sum with zeros)."""
        count, total, total_sq = self.trainer.strategy.reduce(self._image_moments, reduce_op="sum").tolist()
        if count == 0:
            return math.nan
        # One-pass moments, as the statistics methods (their sums all-reduce by plain summation); in float64.
        mean = total / count
        return math.sqrt(max(total_sq / count - mean * mean, 0.0))

    # ------------------------------------------------------------------------------------------- test
    @override
    def on_test_start(self) -> None:
        self.calibrate()
        datamodule = self.trainer.datamodule
        categories = categories_of(datamodule) or ["all"]
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
        maps, pictures, own = self.scored_maps(batch)
        valid = batch["roi"] > 0.5 if self.metric_region == "roi" else None
        metric_scores = self.image_scores(maps, valid, own)  # before the has_mask restriction below
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
        scores = self.image_scores(maps, own=own)
        self._image_rows += image_rows(batch, scores)
        for i, index in enumerate(batch["index"].tolist()):
            if index in self._panel_indices:
                self._panels.append(
                    {
                        "index": index,
                        "category": batch["category"][i],
                        "label": int(batch["label"][i]),
                        "image": resize_map(batch["image"][i : i + 1].float(), maps.shape[-2:])[0].cpu(),
                        "mask": batch["mask"][i].float().cpu(),
                        "map": maps[i].float().cpu(),
                        **{name: picture[i].float().cpu() for name, picture in pictures.items()},
                    }
                )

    @override
    def on_test_epoch_end(self) -> None:
        values = self.metrics.compute()
        rows, panels = gather_lists(self, self._image_rows), gather_lists(self, self._panels)
        curves = pooled_pixel_curves(self.metrics)
        self.results = {**self._results_head(has_test_set=True, num_test_images=len(rows)), **values}
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
                learned_state=self.learned_state(),
            )

    def _results_head(self, has_test_set: bool, num_test_images: int) -> dict[str, Any]:
        """The first keys of ``results.json``, with or without a labelled test set: the method and how it scored."""
        return {
            "method": self.method_name,
            "kind": self.kind,
            "image_score": self.image_score_name(),
            "method_info": self.method_info(),
            "calibration": self.calibration,
            "metric_region": self.metric_region,
            "has_test_set": has_test_set,
            "num_test_images": num_test_images,
        }

    # ------------------------------------------------------------------------------------------- no test set
    def calibrate_without_test_set(self, trainer: Trainer, datamodule: Any) -> None:
        """The evaluation of data without a labelled test set (normal images only, ``has_test_set`` False):
        calibrate on the validation normals, then write what needs no test set (rank 0, into ``output_dir``): the
        calibration, the validation normals' scores (``image_scores.csv``) and a ``results.json`` that says there
        was no labelled test set and holds no metrics. ``load_method`` and ``lsgs detect`` use the stage as any.

        It runs as a ``trainer.predict`` over the validation normals (``predict_split`` is ``val`` meanwhile): the
        predict loop gives calibration the trainer's device, precision and DDP set-up, as the test loop does, and
        its pass records the scores the thresholds flag.
        """
        self._without_test_set = True
        try:
            trainer.predict(self, datamodule=datamodule, return_predictions=False)
        finally:
            self._without_test_set = False

    @property
    def predict_split(self) -> str:
        """The split ``trainer.predict`` reads (``lsgs.contracts.PredictSplit``): the validation normals while
        :meth:`calibrate_without_test_set` runs, else the test set."""
        return "val" if self._without_test_set else "test"

    def _finish_without_test_set(self) -> None:
        rows = sorted(gather_lists(self, self._image_rows), key=lambda r: r["index"])
        threshold = float(self.calibration["image_threshold"])
        self.results = {
            **self._results_head(has_test_set=False, num_test_images=0),
            # image_scores.csv lists the validation normals: how many of them the image threshold flags.
            "validation": {"num_images": len(rows), "num_flagged": sum(r["score"] > threshold for r in rows)},
            "pooled": {},
            "mean": {},
            "per_category": {},
        }
        if self.trainer.is_global_zero and self.output_dir is not None:
            write_evaluation_outputs(
                self.output_dir, self.results, rows, [], {}, self.calibration, self.loggers,
                learned_state=self.learned_state(),
            )  # fmt: skip

    # ------------------------------------------------------------------------------------------- predict
    @override
    def on_predict_start(self) -> None:
        self.calibrate()
        self._image_rows = []

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        maps, _, own = self.scored_maps(batch)
        scores = self.image_scores(maps, own=own)
        if self._without_test_set:  # the validation normals' scores go to image_scores.csv; nothing is returned
            self._image_rows += image_rows(batch, scores)
            return {}
        return {
            "path": list(batch["path"]),
            "image": resize_map(batch["image"].float(), maps.shape[-2:]).cpu(),
            "map": maps.float().cpu(),
            "score": scores.float().cpu(),
            "anomalous": (scores > self.calibration["image_threshold"]).cpu(),
        }

    @override
    def on_predict_epoch_end(self) -> None:
        if self._without_test_set:
            self._finish_without_test_set()

    def stage_summary(self) -> dict[str, Any]:
        return {"mean": self.results["mean"]} if self.results else {}

    @override
    def configure_optimizers(self) -> None:
        return None


def image_rows(batch: dict[str, Any], scores: torch.Tensor) -> list[dict[str, Any]]:
    """One ``image_scores.csv`` row per image of ``batch``: its dataset index, file, slice, category, label and
    ``[B]`` image score."""
    return [
        {
            "index": index,
            "path": batch["path"][i],
            "slice_index": int(batch["slice_index"][i]),
            "category": batch["category"][i],
            "label": int(batch["label"][i]),
            "score": float(scores[i]),
        }
        for i, index in enumerate(batch["index"].tolist())
    ]
