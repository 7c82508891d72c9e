"""``lsgs detect``: anomaly heatmaps and image scores for a folder of unlabelled images, from a finished run.

Any evaluated method of the run can score (``--method``, default ``lsgs``; the built-in methods and any other
configured method by name). The method is rebuilt from its stage folder by the evaluation harness and uses the
thresholds its stage set on the validation normals (``calibration.json``): the pixel threshold draws the
predicted region, the image threshold decides the ``anomalous`` column of ``scores.csv``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override

from lsgs.io import atomic_write_text
from lsgs.layout import DetectLayout, RunLayout
from lsgs.methods.registry import LSGS_METHOD, load_method, method_stage
from lsgs.reports.figures import heatmap_overlay, save_png, to_uint8_image
from lsgs.reports.tables import csv_text


class HeatmapWriter(BasePredictionWriter):
    """Writes ``<stem>_heatmap.png`` (input | anomaly map over the input | predicted region) per image and
    ``scores.csv`` at the end."""

    def __init__(self, output_dir: str | Path, pixel_threshold: float, image_threshold: float) -> None:
        super().__init__(write_interval="batch")
        self.layout = DetectLayout(Path(output_dir))
        self.pixel_threshold, self.image_threshold = pixel_threshold, image_threshold
        self.rows: list[list[Any]] = []

    @override
    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        for i, path in enumerate(prediction["path"]):
            image = to_uint8_image(prediction["image"][i])
            anomaly = prediction["map"][i, 0].numpy()
            scale = 2.0 * self.pixel_threshold if self.pixel_threshold > 0 else None
            overlay = heatmap_overlay(image, anomaly, scale)
            region = np.repeat(((anomaly > self.pixel_threshold) * 255).astype(np.uint8)[..., None], 3, axis=2)
            gap = np.full((image.shape[0], 2, 3), 255, np.uint8)
            save_png(np.concatenate([image, gap, overlay, gap, region], axis=1), self.layout.heatmap(path))
            score = float(prediction["score"][i])
            self.rows.append([path, f"{score:.6g}", int(score > self.image_threshold)])

    @override
    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        atomic_write_text(self.layout.scores, csv_text(["path", "score", "anomalous"], sorted(self.rows)))
        header = f"# image threshold {self.image_threshold:.6g}, pixel threshold {self.pixel_threshold:.6g}\n"
        atomic_write_text(self.layout.thresholds, header)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lsgs detect", description=__doc__)
    parser.add_argument("--run_dir", type=str, required=True, help="a finished pipeline run folder")
    parser.add_argument("--images", type=str, required=True, help="folder of images to score")
    parser.add_argument(
        "--method", type=str, default=LSGS_METHOD, help="which evaluated method of the run scores (lsgs, ae, ...)"
    )
    parser.add_argument("--output", type=str | None, default=None, help="default: <run_dir>/detect/<folder>")
    parser.add_argument("--recursive", type=bool, default=False, help="also score images in sub-folders")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--accelerator", type=str, default="auto")
    return parser


def detect(
    run_dir: str | Path,
    images: str | Path,
    output: str | Path | None = None,
    recursive: bool = False,
    batch_size: int = 8,
    accelerator: str = "auto",
    method: str = LSGS_METHOD,
) -> Path:
    """Score every image of ``images`` with ``method`` of the finished run ``run_dir``; return the output folder."""
    from data_modules import ImageFolderDataModule

    model = load_method(run_dir, method)
    stage_config = yaml.safe_load(method_stage(run_dir, method).config.read_text())
    data_args = stage_config["data"].get("init_args", {})
    output_dir = Path(output) if output else RunLayout.of(run_dir).detect_dir(images)
    datamodule = ImageFolderDataModule(
        root=str(images),
        channels=model.num_image_channels,
        recursive=recursive,
        image_size=int(data_args.get("image_size", 128)),
        model_input_size=data_args.get("model_input_size"),
        batch_size=batch_size,
        cache_dir=data_args.get("cache_dir"),
    )
    writer = HeatmapWriter(output_dir, model.pixel_threshold, model.image_threshold)
    trainer = Trainer(
        accelerator=accelerator, devices=1, logger=False, callbacks=[writer], enable_checkpointing=False
    )
    trainer.predict(model, datamodule=datamodule, return_predictions=False)
    print(f"heatmaps and scores.csv written to {output_dir}")
    return output_dir


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    detect(args.run_dir, args.images, args.output, args.recursive, args.batch_size, args.accelerator, args.method)
