"""Reading 2-D images and masks from disk (PIL), shared by the MVTec and image-folder data modules."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from lsgs.errors import DataError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, zlib.error, Image.DecompressionBombError)

T = TypeVar("T")
R = TypeVar("R")


def is_visible(path: Path) -> bool:
    """False for hidden entries (`.DS_Store`, `.ipynb_checkpoints`, ...)."""
    return not path.name.startswith(".")


def is_image_file(path: Path) -> bool:
    """A visible regular file with an image suffix (case-insensitive)."""
    return is_visible(path) and path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def list_images(directory: Path, recursive: bool = False) -> list[Path]:
    """Image files in `directory`, sorted by relative path; hidden files/dirs and non-images are skipped."""
    if not recursive:
        return sorted(p for p in directory.iterdir() if is_image_file(p))
    found = []
    for p in directory.rglob("*"):
        rel = p.relative_to(directory)
        if all(not part.startswith(".") for part in rel.parts) and is_image_file(p):
            found.append(p)
    return sorted(found, key=lambda p: p.relative_to(directory).as_posix())


def _open(path: Path) -> Image.Image:
    try:
        img = Image.open(path)
        img.load()
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from exc
    return img


def _to_8bit(img: Image.Image) -> Image.Image:
    # 16-bit and float images: PIL's convert("L") clips instead of rescaling, so rescale by the dtype range.
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L")
    return img


def read_image(path: Path, size: int, channels: int = 3) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode an image, convert it to RGB (grayscale replicated) or L, and resize it to size x size.

    Resizing uses PIL's bilinear filter, which widens its support when shrinking (anti-aliased, close to
    area averaging), unlike cv2's INTER_LINEAR.

    Args:
        path: image file.
        size: output height and width.
        channels: 3 for RGB output, 1 for grayscale.

    Returns:
        ([size, size, 3] uint8 if channels == 3 else [size, size] uint8, original (width, height)).

    Raises:
        DataError: the file cannot be decoded.
    """
    img = _to_8bit(_open(path))
    original = img.size
    img = img.convert("RGB" if channels == 3 else "L")
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8), original


def read_mask(path: Path, size: int, expected_size: tuple[int, int]) -> np.ndarray:
    """Decode a ground-truth mask, binarise it with `> 0` and resize it with nearest neighbour.

    Args:
        path: mask file.
        size: output height and width.
        expected_size: (width, height) of the image the mask belongs to.

    Returns:
        [size, size] uint8 in {0, 1}.

    Raises:
        DataError: the file cannot be decoded or its size differs from the image's.
    """
    img = _to_8bit(_open(path))
    if img.size != tuple(expected_size):
        raise DataError(
            f"{path}: mask size {img.size[0]}x{img.size[1]} differs from its image's "
            f"{expected_size[0]}x{expected_size[1]} (width x height)"
        )
    binary = Image.fromarray((np.asarray(img.convert("L")) > 0).astype(np.uint8))
    if binary.size != (size, size):
        binary = binary.resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(binary, dtype=np.uint8)


def parallel_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """`map(fn, items)` in order, on a thread pool when workers > 1.

    Threads suffice: PIL decoding, zlib inflation and torch resizing release the GIL.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        yield from pool.map(fn, items)
    finally:
        # On an error, do not decode the rest of the data set before reporting it.
        pool.shutdown(wait=True, cancel_futures=True)
