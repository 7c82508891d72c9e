"""``lsgs detect``: anomaly heatmaps and scores for unlabelled images and videos, from a finished run.

    lsgs detect --run_dir RUN --images FOLDER|IMAGE|VIDEO [--method NAME] [--recursive true]
                [--image_threshold T] [--pixel_threshold T] [--category NAME] [--output DIR]
    lsgs detect --export EXPORT_DIR --images ...        (an ``lsgs export`` folder: no run, no Lightning)

Any evaluated method of the run scores (``--method``, default ``lsgs``; the built-in methods and any other
configured method by name). It is rebuilt from its stage folder (``load_method``) with the thresholds its stage set
on the validation normals (``calibration.json``), unless ``--image_threshold`` / ``--pixel_threshold`` override
them: the pixel threshold draws the predicted region, the image threshold decides the ``anomalous`` column. With
``--export`` the exported graphs score instead (``lsgs.Inferencer.from_export``: onnxruntime, or torch for a
TorchScript export), with the thresholds of the export's ``metadata.json``.

``--images`` is a folder of images and videos (``--recursive``: its sub-folders too), one image file or one video
file (``.mp4 .m4v .mov .avi .mkv``). An image is scored at the run's size and its map resized back to the image's
own resolution; a video is scored frame by frame. The images take the name of the folder given (or of the folder
holding the file given) as their category unless ``--category`` names one (per-category methods need it).
Outputs (``--output``, default ``RUN/detect/<name>`` or ``EXPORT_DIR/detect/<name>``; names from
``lsgs.layout.DetectLayout``: an output keeps its input's path relative to ``--images``, so no two inputs share an
output file)::

    scores.csv          one row per image or video frame: path, frame, score, anomalous, output
    thresholds.json     the thresholds used, and the calibrated ones
    heatmaps/<path>     an image's panel: input | anomaly map over the input | predicted region, at its resolution
    videos/<path>       a video with the anomaly map over every frame and its score (same frames, same rate)

Only the parser is imported up front: ``lsgs detect --help`` loads neither torch nor Lightning. The scoring itself
is one call, :meth:`RunScorer.score` (or :meth:`ExportScorer.score`); everything else reads inputs or writes
outputs.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser

from lsgs.errors import ConfigError, DataError, DataNotFoundError
from lsgs.layout import DETECT_FOLDER, LSGS_METHOD, DetectLayout, RunLayout

SCORES_COLUMNS = ("path", "frame", "score", "anomalous", "output")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lsgs detect", description=__doc__)
    parser.add_argument("--run_dir", type=str | None, default=None, help="a finished pipeline run folder")
    parser.add_argument(
        "--export", type=str | None, default=None, help="an lsgs export folder, instead of --run_dir and --method"
    )
    parser.add_argument(
        "--images", type=str, required=True, help="a folder of images and videos, one image or one video file"
    )
    parser.add_argument(
        "--method", type=str, default=LSGS_METHOD, help="which evaluated method of the run scores (lsgs, ae, ...)"
    )
    parser.add_argument("--output", type=str | None, default=None, help="default: <run_dir>/detect/<name>")
    parser.add_argument("--recursive", type=bool, default=False, help="also score inputs in sub-folders")
    parser.add_argument(
        "--image_threshold", type=float | None, default=None, help="image score above which an input is anomalous "
        "(default: the run's calibrated one)",
    )  # fmt: skip
    parser.add_argument(
        "--pixel_threshold", type=float | None, default=None, help="map value above which a pixel is in the "
        "predicted region (default: the run's calibrated one)",
    )  # fmt: skip
    parser.add_argument(
        "--category", type=str | None, default=None, help="the inputs' category (default: the folder's name)"
    )
    parser.add_argument("--batch_size", type=int, default=8, help="images or frames scored together")
    parser.add_argument("--accelerator", type=str, default="auto", help=f"one of {list(ACCELERATORS)}")
    return parser


# ------------------------------------------------------------------------------------------- scoring
class RunScorer:
    """The scoring call of ``lsgs detect``: a method of a finished run, rebuilt by ``load_method`` with its
    calibrated thresholds, scoring images of any size.

    Args:
        run_dir: a finished run folder.
        method: an evaluated method of the run.
        accelerator: ``auto`` (CUDA when available, else CPU), ``cpu``, ``gpu``/``cuda`` or ``mps``.
    """

    def __init__(self, run_dir: str | Path, method: str = LSGS_METHOD, accelerator: str = "auto") -> None:
        from lsgs.layout import read_stage_config
        from lsgs.methods.registry import load_method, method_stage

        self.device = _device(accelerator)
        self.model = load_method(run_dir, method)
        data = read_stage_config(method_stage(run_dir, method).config).get("data", {}).get("init_args") or {}
        self.evaluation_size = int(data.get("image_size", 128))  # the size the thresholds were calibrated at
        self.input_size = int(data.get("model_input_size") or self.evaluation_size)  # the size the method reads
        self.channels = int(self.model.num_image_channels)
        self.model.to(self.device)
        self.image_threshold = float(self.model.image_threshold)
        self.pixel_threshold = float(self.model.pixel_threshold)

    def score(
        self, images: Sequence[Any], indices: Sequence[int], category: str
    ) -> list[tuple[Any, float]]:
        """Score a batch of images as the method's test stage scores its test images.

        Args:
            images: ``[H, W, 3]`` (or ``[H, W]`` for a 1-channel method) uint8 arrays, each of its own size, as
                ``data_modules.image_io.read_original`` decodes a file.
            indices: each image's position (in its folder's list, or its frame number): it seeds LSGS's
                resampling per image, as a dataset index does in a test stage.
            category: the images' category (per-category methods pick their statistics or thresholds by it).

        Returns:
            Per image, its final anomaly map ``[H, W]`` float32 resized (bilinear) to the image's own size and
            its image score.
        """
        import numpy as np
        import torch
        from PIL import Image

        from data_modules.image_io import image_to_tensor, prepare_image
        from lsgs.nn.anomaly_map import resize_map

        count, side = len(images), self.evaluation_size
        inputs = [np.array(prepare_image(Image.fromarray(image), self.input_size, self.channels)) for image in images]
        batch = {
            # [B, C, s, s] at the method's input size, prepared (resized) as the data modules prepare files.
            "image": torch.stack([image_to_tensor(image) for image in inputs]),
            "mask": torch.zeros(count, 1, side, side),
            "label": torch.full((count,), -1, dtype=torch.int64),
            "roi": torch.ones(count, 1, side, side),
            "category": [category] * count,
            "path": [f"detect:{index}" for index in indices],
            "slice_index": torch.full((count,), -1, dtype=torch.int64),
            "index": torch.tensor(list(indices), dtype=torch.int64),
            "has_mask": torch.zeros(count, dtype=torch.bool),
        }
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.inference_mode():
            maps, _, own = self.model.scored_maps(batch)  # [B, 1, side, side]
            scores = self.model.image_scores(maps, own=own)  # [B]
            return [
                (resize_map(maps[i : i + 1].float(), image.shape[:2])[0, 0].cpu().numpy(), float(scores[i]))
                for i, image in enumerate(images)
            ]


class ExportScorer:
    """The scoring call of ``lsgs detect --export``: an ``lsgs export`` folder run by ``lsgs.Inferencer`` (no run
    folder, no Lightning), with the thresholds of its ``metadata.json``; the same call as :class:`RunScorer`."""

    def __init__(self, export_dir: str | Path, batch_size: int = 8) -> None:
        from lsgs.inference import Inferencer

        self.inferencer = Inferencer.from_export(export_dir, batch_size=batch_size)
        self.channels = int(self.inferencer.channels)
        self.image_threshold = float(self.inferencer.image_threshold)
        self.pixel_threshold = float(self.inferencer.pixel_threshold)

    def score(self, images: Sequence[Any], indices: Sequence[int], category: str) -> list[tuple[Any, float]]:
        """As :meth:`RunScorer.score`: per image, its final map at the image's own size and its image score."""
        seeds = self.inferencer.noise_seeds(list(indices))
        predictions = self.inferencer.predict(list(images), category=category, seed=seeds)
        return [(prediction.anomaly_map, float(prediction.score)) for prediction in predictions]


def _device(accelerator: str) -> Any:
    import torch

    if accelerator not in ACCELERATORS:
        raise ConfigError(f"--accelerator {accelerator!r} is not one of {list(ACCELERATORS)}")
    if accelerator == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device("cuda" if accelerator == "gpu" else accelerator)


# ------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Inputs:
    """What ``--images`` names: the folder outputs are relative to, and its images and videos (sorted)."""

    folder: Path
    images: list[Path]
    videos: list[Path]

    def relative(self, path: Path) -> str:
        return path.relative_to(self.folder).as_posix()


def find_inputs(images: str | Path, recursive: bool = False) -> Inputs:
    """The images and videos ``--images`` names: a folder (its sub-folders too when ``recursive``) or one file."""
    from data_modules.image_io import is_image_file, list_images
    from data_modules.video import VIDEO_SUFFIXES, is_video_file, list_videos

    path = Path(images)
    if path.is_file():
        if is_video_file(path):
            return Inputs(path.parent, [], [path])
        if is_image_file(path):
            return Inputs(path.parent, [path], [])
        raise DataError(
            f"--images '{path}' is neither an image (.png/.jpg/.jpeg/.bmp/.tif) nor a video "
            f"({' '.join(sorted(VIDEO_SUFFIXES))})"
        )
    if not path.is_dir():
        raise DataNotFoundError(f"--images '{path}' does not exist")
    found = Inputs(path, list_images(path, recursive), list_videos(path, recursive))
    if not found.images and not found.videos:
        hint = "" if recursive else " (sub-folders are searched with --recursive true)"
        raise DataError(f"--images '{path}' holds no image or video file{hint}")
    return found


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ------------------------------------------------------------------------------------------- outputs
@dataclass(frozen=True)
class Thresholds:
    """The thresholds ``lsgs detect`` applies: ``image`` (a score above it is anomalous) and ``pixel`` (a map value
    above it is in the predicted region)."""

    image: float
    pixel: float


class DetectWriter:
    """Writes the outputs of ``lsgs detect`` into ``folder`` (``DetectLayout``): a heatmap panel per image, an
    annotated copy per video, then ``scores.csv`` and ``thresholds.json``.

    Args:
        folder: the output folder.
        thresholds: the thresholds applied.
        record: what ``thresholds.json`` says besides them (method, calibrated thresholds, overrides).
    """

    def __init__(self, folder: str | Path, thresholds: Thresholds, record: dict[str, Any] | None = None) -> None:
        self.layout = DetectLayout(Path(folder))
        self.thresholds = thresholds
        self.record = record or {}
        # Colour scale of the maps: its top at twice the pixel threshold, so the region edge is mid-scale.
        self.scale = 2.0 * thresholds.pixel if thresholds.pixel > 0 else None
        self.rows: list[tuple[str, int, float, Path]] = []

    def image(self, relative: str, image: Any, anomaly: Any, score: float) -> None:
        """The panel of one image (``[H, W, 3]`` or ``[H, W]`` uint8) and its ``[H, W]`` map: input | map over the
        input | predicted region, in the input's own size and format."""
        import numpy as np

        from lsgs.reports.figures import heatmap_overlay, save_picture

        picture = _rgb(image)
        region = np.repeat(((anomaly > self.thresholds.pixel) * 255).astype(np.uint8)[..., None], 3, axis=2)
        gap = np.full((picture.shape[0], 2, 3), 255, np.uint8)
        overlay = heatmap_overlay(picture, anomaly, self.scale)
        path = self.layout.heatmap(relative)
        save_picture(np.concatenate([picture, gap, overlay, gap, region], axis=1), path)
        self.rows.append((relative, -1, score, path))

    @contextmanager
    def video(self, relative: str, fps: float) -> Iterator[Callable[[int, Any, Any, float], None]]:
        """A writer of the annotated copy of one video: call it with (frame number, frame, map, score) for every
        frame, in order. The copy has the input's frames, frame size and ``fps``, each frame showing its map and
        score; it is written to a temporary file and renamed when complete."""
        import cv2

        path = self.layout.video(relative)
        partial = path.with_name(f".{path.stem}.partial{path.suffix}")  # the suffix picks the container
        writer = None

        def frame(number: int, image: Any, anomaly: Any, score: float) -> None:
            nonlocal writer
            picture = annotate_frame(image, anomaly, score, score > self.thresholds.image, self.scale)
            if writer is None:
                partial.parent.mkdir(parents=True, exist_ok=True)
                size = (picture.shape[1], picture.shape[0])
                writer = cv2.VideoWriter(str(partial), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
                if not writer.isOpened():
                    raise DataError(f"cannot write the annotated video '{path}' (OpenCV, mp4v codec)")
            writer.write(cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
            self.rows.append((relative, number, score, path))

        try:
            yield frame
        except BaseException:
            if writer is not None:
                writer.release()
            partial.unlink(missing_ok=True)
            raise
        if writer is not None:
            writer.release()
            os.replace(partial, path)

    def finish(self) -> Path:
        """Write ``scores.csv`` (rows by input path, then frame) and ``thresholds.json``; return the folder."""
        from lsgs.io import atomic_write_json, atomic_write_text
        from lsgs.reports.tables import csv_text

        rows = [
            [relative, "" if frame < 0 else frame, f"{score:.6g}", int(score > self.thresholds.image),
             path.relative_to(self.layout.folder).as_posix()]
            for relative, frame, score, path in sorted(self.rows, key=lambda r: (r[0], r[1]))
        ]  # fmt: skip
        atomic_write_text(self.layout.scores, csv_text(SCORES_COLUMNS, rows))
        atomic_write_json(
            self.layout.thresholds,
            {"image_threshold": self.thresholds.image, "pixel_threshold": self.thresholds.pixel, **self.record},
        )
        return self.layout.folder


def annotate_frame(image: Any, anomaly: Any, score: float, anomalous: bool, scale: float | None) -> Any:
    """A video frame (``[H, W, 3]`` or ``[H, W]`` uint8) with its ``[H, W]`` map over it, its score in the top-left
    corner and, when ``anomalous``, a red border: ``[H, W, 3]`` uint8 RGB."""
    import cv2

    from lsgs.reports.figures import heatmap_overlay

    picture = heatmap_overlay(_rgb(image), anomaly, scale)
    height, width = picture.shape[:2]
    font, font_scale = cv2.FONT_HERSHEY_SIMPLEX, max(0.35, height / 600)
    thickness = max(1, round(2 * font_scale))
    text = f"score {score:.4g}" + (" ANOMALOUS" if anomalous else "")
    (text_width, text_height), baseline = cv2.getTextSize(text, font, font_scale, thickness)
    cv2.rectangle(picture, (0, 0), (text_width + 8, text_height + baseline + 8), (0, 0, 0), -1)
    colour = (255, 60, 60) if anomalous else (255, 255, 255)
    cv2.putText(picture, text, (4, text_height + 4), font, font_scale, colour, thickness, cv2.LINE_AA)
    if anomalous:
        border = max(2, height // 80)
        cv2.rectangle(picture, (0, 0), (width - 1, height - 1), (255, 0, 0), border)
    return picture


def _rgb(image: Any) -> Any:
    """``[H, W, 3]`` uint8 as is, ``[H, W]`` grayscale replicated to ``[H, W, 3]``."""
    import numpy as np

    return image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)


# ------------------------------------------------------------------------------------------- command
def _checked(value: float | None, option: str) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ConfigError(f"{option} must be a finite number, got {value}")
    return value


def detect(
    run_dir: str | Path | None,
    images: str | Path,
    output: str | Path | None = None,
    recursive: bool = False,
    batch_size: int = 8,
    accelerator: str = "auto",
    method: str = LSGS_METHOD,
    image_threshold: float | None = None,
    pixel_threshold: float | None = None,
    category: str | None = None,
    export: str | Path | None = None,
) -> Path:
    """Score every image and video frame ``images`` names with ``method`` of the finished run ``run_dir`` (or with
    the ``lsgs export`` folder ``export``); return the output folder. The arguments are the command's options (see
    the module docstring)."""
    from data_modules.image_io import read_original
    from data_modules.video import read_frames, video_info
    from lsgs.progress import progress

    if batch_size < 1:
        raise ConfigError(f"--batch_size must be >= 1, got {batch_size}")
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"--accelerator {accelerator!r} is not one of {list(ACCELERATORS)}")
    given = {"image_threshold": _checked(image_threshold, "--image_threshold"),
             "pixel_threshold": _checked(pixel_threshold, "--pixel_threshold")}  # fmt: skip
    if (run_dir is None) == (export is None):
        raise ConfigError("give one of --run_dir (a run folder) and --export (an lsgs export folder)")
    inputs = find_inputs(images, recursive)  # before the model loads: a wrong path fails at once
    scorer: RunScorer | ExportScorer
    if export is not None:
        scorer = ExportScorer(export, batch_size)
        method = scorer.inferencer.method
        default_output = Path(export) / DETECT_FOLDER / Path(images).resolve().name
    else:
        scorer = RunScorer(run_dir, method, accelerator)
        default_output = RunLayout.of(run_dir).detect_dir(images)
    category = category or inputs.folder.resolve().name
    thresholds = Thresholds(
        scorer.image_threshold if image_threshold is None else image_threshold,
        scorer.pixel_threshold if pixel_threshold is None else pixel_threshold,
    )
    record = {
        "method": method,
        "category": category,
        "calibrated": {"image_threshold": scorer.image_threshold, "pixel_threshold": scorer.pixel_threshold},
        "overridden": [name for name, value in given.items() if value is not None],
    }
    writer = DetectWriter(Path(output) if output else default_output, thresholds, record)
    numbered = list(enumerate(inputs.images))
    for batch in progress(list(_batches(numbered, batch_size)), "detect (images)"):
        originals = [read_original(path, scorer.channels) for _, path in batch]
        scored = scorer.score(originals, [index for index, _ in batch], category)
        for (_, path), original, (anomaly, score) in zip(batch, originals, scored, strict=True):
            writer.image(inputs.relative(path), original, anomaly, score)
    frames = 0
    for video in inputs.videos:
        with writer.video(inputs.relative(video), video_info(video).fps) as write_frame:
            for batch in _batches(enumerate(read_frames(video, scorer.channels)), batch_size):
                scored = scorer.score([frame for _, frame in batch], [number for number, _ in batch], category)
                for (number, frame), (anomaly, score) in zip(batch, scored, strict=True):
                    write_frame(number, frame, anomaly, score)
                frames += len(batch)
    folder = writer.finish()
    videos = f" and {frames} frames of {len(inputs.videos)} video(s)" if inputs.videos else ""
    print(f"{len(inputs.images)} image(s){videos} scored by {method}: scores.csv and heatmaps written to {folder}")
    return folder


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    detect(
        args.run_dir, args.images, args.output, args.recursive, args.batch_size, args.accelerator, args.method,
        args.image_threshold, args.pixel_threshold, args.category, args.export,
    )  # fmt: skip
