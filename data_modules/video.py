"""Reading video files frame by frame (OpenCV): listing, the stream's facts, and frames as the data modules give
images (8-bit RGB, or grayscale for 1-channel models), for ``lsgs detect``.

OpenCV (``opencv-python-headless``, decoding through FFmpeg) reads the containers listed in ``VIDEO_SUFFIXES``, and
writes them back with the ``mp4v`` codec keeping the frame count and rate (checked for each of them), which is
what an annotated copy needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from data_modules.image_io import is_visible, to_channels
from lsgs.errors import DataError

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv"})
DEFAULT_FPS = 25.0  # for a stream that does not say its rate


def is_video_file(path: Path) -> bool:
    """A visible regular file with a video suffix (case-insensitive)."""
    return is_visible(path) and path.suffix.lower() in VIDEO_SUFFIXES and path.is_file()


def list_videos(directory: Path, recursive: bool = False) -> list[Path]:
    """Video files in ``directory``, sorted by relative path; hidden files and folders are skipped."""
    candidates = directory.rglob("*") if recursive else directory.iterdir()
    found = [
        p for p in candidates
        if all(is_visible(Path(part)) for part in p.relative_to(directory).parts) and is_video_file(p)
    ]  # fmt: skip
    return sorted(found, key=lambda p: p.relative_to(directory).as_posix())


@dataclass(frozen=True)
class VideoInfo:
    """What an annotated copy of a video keeps: frame rate (frames/s), frame size, and the frame count the
    container states (an estimate for some containers: ``read_frames`` yields the frames there are)."""

    fps: float
    width: int
    height: int
    frame_count: int


def _open(path: Path) -> cv2.VideoCapture:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        capture.release()
        raise DataError(f"{path}: cannot open the video (OpenCV/FFmpeg); supported: {sorted(VIDEO_SUFFIXES)}")
    return capture


def video_info(path: Path) -> VideoInfo:
    """The stream facts of a video file; ``DataError`` when it cannot be opened."""
    capture = _open(path)
    try:
        fps = float(capture.get(cv2.CAP_PROP_FPS))
        return VideoInfo(
            fps=fps if fps > 0 and np.isfinite(fps) else DEFAULT_FPS,
            width=int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            height=int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            frame_count=int(capture.get(cv2.CAP_PROP_FRAME_COUNT)),
        )
    finally:
        capture.release()


def read_frames(path: Path, channels: int = 3) -> Iterator[np.ndarray]:
    """Every frame of a video in order, as ``[H, W, 3]`` RGB (channels 3) or ``[H, W]`` grayscale (channels 1)
    uint8, the layout ``data_modules.image_io.read_original`` gives an image file."""
    capture = _open(path)
    try:
        while True:
            ok, frame = capture.read()  # [H, W, 3] BGR uint8
            if not ok:
                return
            yield to_channels(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), channels)
    finally:
        capture.release()
