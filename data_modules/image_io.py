"""Reading 2-D images from disk (PIL): listing, decoding, 8-bit conversion, resizing; shared by the data modules.

Masks are decoded with these functions too, and checked and binarised in `data_modules.masks`.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from lsgs.errors import DataError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
RESAMPLE = Image.Resampling.BILINEAR  # the resize filter of images (masks: nearest neighbour, data_modules.masks)
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


def _decode_error(path: Path, exc: Exception) -> DataError:
    return DataError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})")


def open_image(path: Path) -> Image.Image:
    """Decode an image file as PIL gives it (any mode, original size).

    Raises:
        DataError: the file cannot be decoded.
    """
    try:
        img = Image.open(path)
        img.load()
    except _READ_ERRORS as exc:
        raise _decode_error(path, exc) from exc
    return img


def read_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image from its header alone, without decoding the pixels.

    Raises:
        DataError: the header cannot be read.
    """
    try:
        with Image.open(path) as img:
            return img.size
    except _READ_ERRORS as exc:
        raise _decode_error(path, exc) from exc


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and float images rescaled to 8-bit grey ("L") by their dtype range; other modes unchanged."""
    # PIL's convert("L") clips 16-bit and float values instead of rescaling them.
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
    img = open_image(path)
    return prepare_image(img, size, channels), img.size


def prepare_image(img: Image.Image, size: int, channels: int = 3) -> np.ndarray:
    """What ``read_image`` does after decoding: 8-bit (``to_8bit``), RGB (grayscale replicated, alpha dropped)
    or L, bilinear resize to size x size. The ``Inferencer`` prepares images in memory with it, so an array and
    the same pixels written to a file give the model the same input.

    Returns:
        [size, size, 3] uint8 if channels == 3 else [size, size] uint8.
    """
    img = to_8bit(img).convert("RGB" if channels == 3 else "L")
    if img.size != (size, size):
        img = img.resize((size, size), RESAMPLE)
    return np.asarray(img, dtype=np.uint8)


def resize_float_planes(planes: np.ndarray, size: int) -> np.ndarray:
    """``[C, H, W]`` float planes resized to ``[C, size, size]`` float32 by the filter ``prepare_image`` uses (PIL
    bilinear on 32-bit float planes, no rounding to 8 bits); unchanged (as float32) at that size already."""
    planes = planes.astype(np.float32, copy=False)
    if planes.shape[1:] == (size, size):
        return planes
    return np.stack(
        [np.asarray(Image.fromarray(plane).resize((size, size), RESAMPLE)) for plane in planes]  # float32 -> "F"
    )


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """Cached image to the batch layout.

    Args:
        image: [H, W, C] or [H, W]; uint8 (scaled by 1/255) or float (kept).

    Returns:
        float32 [C, H, W].
    """
    t = torch.from_numpy(np.ascontiguousarray(image))
    t = t.to(torch.float32)
    if image.dtype == np.uint8:
        t = t.div_(255.0)
    if t.ndim == 2:
        return t[None]
    return t.permute(2, 0, 1).contiguous()  # [H, W, C] -> [C, H, W]


def read_original(path: Path, channels: int = 3) -> np.ndarray:
    """Decode an image as the data modules do (8-bit, RGB with grayscale replicated and alpha dropped, or L), at its
    own size: ``prepare_image`` without the resize (``lsgs detect`` draws its heatmaps at the input's resolution).

    Returns:
        ``[H, W, 3]`` uint8 if channels == 3 else ``[H, W]`` uint8 (a writable copy).

    Raises:
        DataError: the file cannot be decoded.
    """
    return np.array(to_8bit(open_image(path)).convert("RGB" if channels == 3 else "L"), dtype=np.uint8)


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """An ``[H, W, 3]`` RGB or ``[H, W]`` grayscale uint8 image as ``channels`` = 3 (RGB, grayscale replicated) or
    1 (``[H, W]``, PIL's RGB -> L conversion), as ``read_original`` gives a file (video frames)."""
    if channels == 3:
        return image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
    return image if image.ndim == 2 else np.array(Image.fromarray(image).convert("L"), dtype=np.uint8)


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
