"""``Inferencer``: score images in memory (or files) with a finished run's method or with an export of it.

    from lsgs import Inferencer
    inferencer = Inferencer.from_export("runs/demo-mvtec/exports/lsgs-onnx")   # or Inferencer.from_run(run, "ae")
    prediction = inferencer.predict(frame)          # an H x W x 3 uint8 array, a path, a PIL image, or a list
    prediction.anomaly_map, prediction.score, prediction.normalized_score, prediction.label, prediction.region

The graphs (``lsgs.nn.export``) run in torch (``from_run``: eager; a TorchScript export), onnxruntime or OpenVINO;
what the evaluation harness does around a method's raw map (resize to the evaluation size, ROI of ones,
smoothing, image score, thresholds) and LSGS's restoration run here, with the same functions of ``lsgs.nn`` the
harness and ``ScoringModule`` call. ``from_export`` imports neither Lightning nor the harness.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lsgs.errors import ConfigError, DataError, DataNotFoundError
from lsgs.inference.backends import (
    BACKENDS,
    GraphBackend,
    OnnxRuntimeBackend,
    OpenVinoBackend,
    TorchBackend,
)
from lsgs.inference.inputs import as_per_image, load_batch
from lsgs.inference.metadata import check_metadata
from lsgs.io import read_json
from lsgs.layout import ExportLayout
from lsgs.nn.anomaly_map import final_anomaly_map, resize_map
from lsgs.nn.export import (
    CLASS_INDEX,
    CODES,
    DECODED,
    IMAGE_SCORE,
    IMAGES,
    LOGITS,
    MAP,
    RUNTIME_RESTORATION,
)
from lsgs.nn.image_score import OWN, reduce_image_scores
from lsgs.nn.restoration import image_noise_seeds, per_image_uniforms, restoration_score_map, restore_global

# The backends that can run each export format (the first is the default).
FORMAT_BACKENDS = {"onnx": ("onnxruntime", "openvino"), "openvino": ("openvino",), "torchscript": ("torch",)}


@dataclass(frozen=True)
class Prediction:
    """What ``Inferencer.predict`` returns per image.

    Attributes:
        anomaly_map: ``[H, W]`` float32 at the input's own resolution: the final map at the evaluation size (as
            the run's evaluation and ``lsgs detect`` compute it), resized bilinearly to the input's size.
        score: the raw image score, computed as in the run (at the evaluation size).
        normalized_score: ``sigmoid((score - t) / s)``, ``t`` the calibrated image threshold and ``s`` the standard
            deviation of the validation normals' image scores: monotone in ``score``, 0.5 exactly at the
            threshold (a step function when ``s`` is 0).
        label: ``score > t``: the image is anomalous.
        region: ``[H, W]`` bool, ``anomaly_map >`` the calibrated pixel threshold.
    """

    anomaly_map: np.ndarray
    score: float
    normalized_score: float
    label: bool
    region: np.ndarray


def normalized_score(score: float, threshold: float, scale: float) -> float:
    """``sigmoid((score - threshold) / scale)`` without overflow; the step function's limit when ``scale`` is 0."""
    if scale == 0:
        return 0.5 if score == threshold else float(score > threshold)
    z = (score - threshold) / scale
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


class Inferencer:
    """Scores images with one method of a finished run, from the run (``from_run``) or from an export
    (``from_export``); both run the same graphs the same way, so they give the same predictions up to the
    runtime's float rounding.

    Args:
        metadata: the export metadata (``lsgs.inference.metadata``).
        backend: what runs the graphs.
        batch_size: images per pass through the graphs.
    """

    def __init__(self, metadata: dict[str, Any], backend: GraphBackend, batch_size: int = 8) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        self.metadata = metadata
        self.backend = backend
        self.batch_size = batch_size

    # ------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_run(cls, run_dir: str | Path, method: str = "lsgs", device: str = "cpu", batch_size: int = 8
                 ) -> Inferencer:  # fmt: skip
        """Method ``method`` of the finished run ``run_dir`` in torch eager mode (rebuilt by ``load_method``,
        with the thresholds its stage calibrated; no Trainer)."""
        from lsgs.inference.exporter import method_export

        export, metadata = method_export(run_dir, method)
        modules = {name: graph.module for name, graph in export.graphs.items()}
        return cls(metadata, TorchBackend(metadata["graphs"], modules, device), batch_size)

    @classmethod
    def from_export(cls, directory: str | Path, backend: str | None = None, batch_size: int = 8) -> Inferencer:
        """An export folder of ``lsgs export``: ONNX in onnxruntime (default) or OpenVINO (``backend="openvino"``),
        OpenVINO IR in OpenVINO, TorchScript in torch. Needs neither the run nor Lightning."""
        layout = ExportLayout(Path(directory))
        if not layout.metadata.is_file():
            raise DataNotFoundError(f"'{directory}' is not an lsgs export: {layout.metadata.name} is missing")
        metadata = check_metadata(read_json(layout.metadata, "export"), str(layout.metadata))
        export_format = metadata.get("format")
        allowed = FORMAT_BACKENDS.get(export_format)
        if allowed is None:
            raise ConfigError(f"{layout.metadata}: unknown format {export_format!r}")
        backend = backend or allowed[0]
        if backend not in allowed:
            raise ConfigError(
                f"backend={backend!r} cannot run a {export_format} export; use one of {list(allowed)} "
                f"(backends: {list(BACKENDS)})"
            )
        for name, spec in metadata["graphs"].items():
            if not (layout.folder / spec["file"]).is_file():
                raise DataNotFoundError(f"export '{directory}': graph {name!r} file {spec['file']} is missing")
        if backend == "onnxruntime":
            runner: GraphBackend = OnnxRuntimeBackend(layout.folder, metadata["graphs"])
        elif backend == "openvino":
            runner = OpenVinoBackend(layout.folder, metadata["graphs"])
        else:
            runner = TorchBackend.load_torchscript(layout.folder, metadata["graphs"])
        return cls(metadata, runner, batch_size)

    # ------------------------------------------------------------------------------------------- facts
    @property
    def method(self) -> str:
        return str(self.metadata["method"])

    @property
    def input_size(self) -> int:
        """Side of the square images the graphs take."""
        return int(self.metadata["input"]["size"])

    @property
    def channels(self) -> int:
        return int(self.metadata["input"]["channels"])

    @property
    def evaluation_size(self) -> int:
        """Side of the final maps (the run's ``data.image_size``), before resizing to each input's size."""
        return int(self.metadata["evaluation_size"])

    @property
    def image_threshold(self) -> float:
        return float(self.metadata["thresholds"]["image"])

    @property
    def pixel_threshold(self) -> float:
        return float(self.metadata["thresholds"]["pixel"])

    @property
    def categories(self) -> list[str] | None:
        """The classes of a per-class method (``category=`` picks one), None when the method has one model."""
        return self.metadata.get("categories")

    def noise_seeds(self, indices: Sequence[int]) -> list[int]:
        """The restoration noise seeds of images at positions ``indices`` under the run's seed (``seed_rule``):
        what ``lsgs detect`` gives the images of a sorted folder. Any method accepts them (only LSGS draws)."""
        return image_noise_seeds(int(self.metadata["scoring"].get("seed", 0)), indices)

    # ------------------------------------------------------------------------------------------- predict
    def predict(
        self, x: Any, category: str | Sequence[str | None] | None = None, seed: int | Sequence[int] | None = None
    ) -> Prediction | list[Prediction]:
        """Score one image or a batch.

        Args:
            x: a path, a PIL image, an ``H x W`` or ``H x W x C`` (C = 1, 3, 4) uint8 array or float array in
                [0, 1]; or a batch: a list of those or an ``N x H x W x C`` array (``lsgs.inference.inputs``).
            category: the images' category (one for all, or one per image), for a method with a model or
                threshold per class (``categories``); a method with one serves any category.
            seed: the restoration noise seed of each image (one for all, or one per image); None: image i of the
                call gets ``noise_seeds([i])``, as the i-th image of a folder in ``lsgs detect``.

        Returns:
            A ``Prediction``, or a list of them for a batch.
        """
        images, shapes, batched = load_batch(x, self.input_size, self.channels)
        count = images.shape[0]
        categories = as_per_image(category, count, "category")
        seeds = self.noise_seeds(range(count)) if seed is None else [int(s) for s in as_per_image(seed, count, "seed")]
        maps, scores = [], []
        for start in range(0, count, self.batch_size):
            part = slice(start, start + self.batch_size)
            batch_maps, batch_scores = self.score(images[part], categories[part], seeds[part])
            maps.append(batch_maps)
            scores.append(batch_scores)
        predictions = [self._prediction(m, float(s), shape)
                       for m, s, shape in zip(torch.cat(maps), torch.cat(scores), shapes)]  # fmt: skip
        return predictions if batched else predictions[0]

    def score(
        self, images: Tensor, categories: Sequence[str | None], seeds: Sequence[int]
    ) -> tuple[Tensor, Tensor]:
        """Final maps ``[B, 1, S, S]`` at the evaluation size and image scores ``[B]`` of prepared images
        ``[B, C, s, s]`` (float32 in [0, 1] at the input size), as the run's harness computes them."""
        scoring = self.metadata["scoring"]
        if self.metadata["runtime"] == RUNTIME_RESTORATION:
            raw, own = self._restoration_map(images, categories, seeds), None
        else:
            inputs = {IMAGES: images}
            rows = self._class_rows(categories)
            if rows is not None:
                inputs[CLASS_INDEX] = rows
            outputs = self.backend.run("map", inputs)
            raw, own = outputs[MAP], outputs.get(IMAGE_SCORE)
        size = self.evaluation_size
        roi = torch.ones(images.shape[0], 1, size, size)  # as lsgs detect: no region of interest for a folder
        maps = final_anomaly_map(raw, roi, scoring["smoothing"], scoring["smoothing_count_include_pad"])
        if scoring["image_score"] == OWN:
            if own is None:
                raise ConfigError(f"the {self.method} export scores images by its own score but has no {IMAGE_SCORE}")
            return maps, own.float()
        return maps, reduce_image_scores(maps, scoring["image_score"], scoring["image_topk"])

    def _restoration_map(self, images: Tensor, categories: Sequence[str | None], seeds: Sequence[int]) -> Tensor:
        """LSGS's raw map, as ``ScoringModule.raw_anomaly_map`` computes it (global transformer)."""
        options = self.metadata["scoring"]
        n = int(options["num_restorations"])
        codes = self.backend.run("encoder", {IMAGES: images})[CODES]  # [B, L]
        logits = self.backend.run("transformer", {CODES: codes})[LOGITS]  # [B, L, K]
        batch, length = codes.shape
        noise = per_image_uniforms(list(seeds), n, length)  # [B, n, L]
        restored = restore_global(logits, codes, self._nll_thresholds(categories), n,
                                  temperature=float(options["temperature"]), uniforms=noise)  # fmt: skip
        # X_hat and the n restorations of every image through the decoder in one call: [B + B * n, C, H, W].
        decoded = self.backend.run("decoder", {CODES: torch.cat([codes, restored.reshape(batch * n, length)])})
        decoded = decoded[DECODED]
        reconstruction, restorations = decoded[:batch], decoded[batch:].reshape(batch, n, *decoded.shape[1:])
        return restoration_score_map(images, reconstruction, restorations, options["map_reference"],
                                     float(options["softmax_k"]), float(options["reconstruction_weight"]))  # fmt: skip

    def _nll_thresholds(self, categories: Sequence[str | None]) -> Tensor:
        """``[B]`` resampling thresholds, as ``ScoringModule.nll_thresholds``: a single calibrated threshold (or
        a table of one) serves every image; a table of several needs each image's category."""
        nll = self.metadata["thresholds"]["nll"]
        if not isinstance(nll, dict):
            return torch.full((len(categories),), float(nll))
        if len(nll) == 1:
            return torch.full((len(categories),), float(next(iter(nll.values()))))
        unknown = sorted({c for c in categories if c not in nll}, key=str)
        if unknown:
            raise DataError(
                f"{self.method}: no NLL threshold for category {unknown[0] if len(unknown) == 1 else unknown!r} "
                f"(calibrated: {sorted(nll)}); pass category="
            )
        return torch.tensor([float(nll[c]) for c in categories])

    def _class_rows(self, categories: Sequence[str | None]) -> Tensor | None:
        """``[B]`` class index of each image for a per-class method (None for a method with one model)."""
        known = self.categories
        if known is None:
            return None
        if len(known) == 1:
            return torch.zeros(len(categories), dtype=torch.long)
        unknown = sorted({c for c in categories if c not in known}, key=str)
        if unknown:
            raise DataError(
                f"{self.method}: category {unknown[0] if len(unknown) == 1 else unknown!r} is not one of its classes "
                f"{known}; pass category="
            )
        return torch.tensor([known.index(c) for c in categories], dtype=torch.long)

    def _prediction(self, final_map: Tensor, score: float, shape: tuple[int, int]) -> Prediction:
        anomaly = resize_map(final_map[None].float(), shape)[0, 0].numpy()
        threshold = self.image_threshold
        scale = float(self.metadata["thresholds"]["image_score_std"])
        return Prediction(
            anomaly_map=anomaly,
            score=score,
            normalized_score=normalized_score(score, threshold, scale),
            label=score > threshold,
            region=anomaly > self.pixel_threshold,
        )
