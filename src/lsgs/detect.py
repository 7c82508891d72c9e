"""``lsgs detect``: anomaly heatmaps and image scores for a folder of unlabelled images, from a finished run.

The scorer is rebuilt from the run's ``scoring/config.yaml`` and uses the thresholds the run set on its
validation normals (``scoring/calibration.json``): the pixel threshold draws the predicted region, the image
threshold decides the ``anomalous`` column of ``scores.csv``.
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

from lsgs.errors import ConfigError
from lsgs.io import atomic_write_text, read_json
from lsgs.reports.figures import colorize, save_png, to_uint8_image
from lsgs.reports.tables import csv_text


class HeatmapWriter(BasePredictionWriter):
    """Writes ``<stem>_heatmap.png`` (input | anomaly map over the input | predicted region) per image and
    ``scores.csv`` at the end."""

    def __init__(self, output_dir: str | Path, pixel_threshold: float, image_threshold: float) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
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
            vmax = 2.0 * self.pixel_threshold if self.pixel_threshold > 0 else float(anomaly.max()) or 1.0
            overlay = (0.5 * image + 0.5 * colorize(anomaly, 0.0, vmax)).astype(np.uint8)
            region = np.repeat(
                ((anomaly > self.pixel_threshold) * 255).astype(np.uint8)[..., None], 3, axis=2
            )
            gap = np.full((image.shape[0], 2, 3), 255, np.uint8)
            stem = Path(path).stem
            save_png(
                np.concatenate([image, gap, overlay, gap, region], axis=1),
                self.output_dir / f"{stem}_heatmap.png",
            )
            score = float(prediction["score"][i])
            self.rows.append([path, f"{score:.6g}", int(score > self.image_threshold)])

    @override
    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        table = csv_text(["path", "score", "anomalous"], sorted(self.rows))
        atomic_write_text(self.output_dir / "scores.csv", table)
        header = f"# image threshold {self.image_threshold:.6g}, pixel threshold {self.pixel_threshold:.6g}\n"
        atomic_write_text(self.output_dir / "thresholds.txt", header)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lsgs detect", description=__doc__)
    parser.add_argument("--run_dir", type=str, required=True, help="a finished pipeline run folder")
    parser.add_argument("--images", type=str, required=True, help="folder of images to score")
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
) -> Path:
    from data_modules import ImageFolderDataModule
    from lsgs.classpath import import_class

    run_dir = Path(run_dir)
    config_path, calibration_path = (
        run_dir / "scoring" / "config.yaml",
        run_dir / "scoring" / "calibration.json",
    )
    if not config_path.is_file() or not calibration_path.is_file():
        raise ConfigError(
            f"--run_dir '{run_dir}' has no finished scoring stage ({config_path} and {calibration_path} are "
            f"needed); run the pipeline first"
        )
    stage = yaml.safe_load(config_path.read_text())
    calibration = read_json(calibration_path, "calibration")
    model_class = import_class(stage["model"]["class_path"])
    init_args = {
        **stage["model"].get("init_args", {}),
        "output_dir": None,
        "calibration": str(calibration_path),
    }
    model = model_class(**init_args)
    data_args = stage["data"].get("init_args", {})
    output_dir = Path(output) if output else run_dir / "detect" / Path(images).resolve().name
    datamodule = ImageFolderDataModule(
        root=str(images),
        channels=model.num_image_channels,
        recursive=recursive,
        image_size=int(data_args.get("image_size", 128)),
        batch_size=batch_size,
        cache_dir=data_args.get("cache_dir"),
    )
    writer = HeatmapWriter(output_dir, calibration["val_threshold"], calibration["image_threshold"])
    trainer = Trainer(
        accelerator=accelerator, devices=1, logger=False, callbacks=[writer], enable_checkpointing=False
    )
    trainer.predict(model, datamodule=datamodule, return_predictions=False)
    print(f"heatmaps and scores.csv written to {output_dir}")
    return output_dir


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    detect(args.run_dir, args.images, args.output, args.recursive, args.batch_size, args.accelerator)
