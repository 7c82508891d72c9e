"""Ground-truth masks: pairing them to images by exact stem, decoding, checking and binarising them.

Two binarisations, one per kind of data set:
- `read_mask` (MVTec AD and 3D-AD, whose masks are binary or one class id per defect): 8-bit grey value > 0;
- `decode_mask` (`FolderDataModule`, masks of unknown origin): the mask must hold 0 and at most one other value
  (`mask_foreground`), or a user-given threshold applies.
Both check the mask against its image's original size and resize with nearest neighbour.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from data_modules import image_io
from lsgs.errors import DataError


def index_by_stem(paths: Iterable[Path], directory: Path, what: str) -> dict[str, Path]:
    """Files keyed by their exact stem, for pairing by name.

    Args:
        paths: the files of `directory`.
        directory: their folder, named in the error.
        what: what the files are ("masks", "images"), named in the error.

    Raises:
        DataError: two files share a stem (`x.png` and `x.bmp`: which one?).
    """
    index: dict[str, Path] = {}
    for path in paths:
        if path.stem in index:
            raise DataError(
                f"{directory}: two {what} share the stem {path.stem!r}: {index[path.stem].name}, {path.name}"
            )
        index[path.stem] = path
    return index


def _check_size(path: Path, img: Image.Image, expected_size: tuple[int, int]) -> None:
    """DataError unless the decoded mask has its image's (width, height)."""
    if img.size != tuple(expected_size):
        raise DataError(
            f"{path}: mask size {img.size[0]}x{img.size[1]} differs from its image's "
            f"{expected_size[0]}x{expected_size[1]} (width x height)"
        )


def _resize_nearest(foreground: np.ndarray, size: int) -> np.ndarray:
    """[H, W] bool -> [size, size] uint8 in {0, 1}, nearest neighbour (a mask gains no in-between values)."""
    binary = Image.fromarray(foreground.astype(np.uint8))
    if binary.size != (size, size):
        binary = binary.resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(binary, dtype=np.uint8)


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
    img = image_io.to_8bit(image_io.open_image(path))
    _check_size(path, img, expected_size)
    return _resize_nearest(np.asarray(img.convert("L")) > 0, size)


def mask_values(img: Image.Image) -> np.ndarray:
    """A decoded mask as one value per pixel: [H, W] (colour masks packed as 0xRRGGBB, alpha dropped)."""
    if img.mode not in ("1", "L", "I", "I;16", "I;16B", "I;16L", "F"):
        img = img.convert("RGB")  # palette, RGBA, LA, CMYK...: compare colours
    arr = np.asarray(img)
    if arr.ndim == 3:
        arr = arr.astype(np.uint32)
        arr = (arr[..., 0] << 16) | (arr[..., 1] << 8) | arr[..., 2]
    return arr


def mask_foreground(path: Path, expected_size: tuple[int, int], threshold: int | None) -> np.ndarray:
    """Decode a mask at its own resolution, check it and binarise it.

    Binary (threshold None): the mask holds 0 and at most ONE other value (0/255, 0/1, 0 and one class id or
    colour, 16-bit 0/65535...); foreground = value > 0. A mask with several non-zero values is rejected: it is
    soft (anti-aliased, resized with interpolation, saved as JPEG) or a multi-class label map, and `> 0` would
    silently grow every defect by its fuzzy border and compression noise. Soft masks are accepted with an
    explicit `threshold`: foreground = 8-bit grey value > threshold.

    Args:
        path: mask file.
        expected_size: (width, height) of the mask's image, at its original resolution.
        threshold: None (binary masks only) or an int in [0, 254].

    Returns:
        [H, W] bool at the mask's resolution.

    Raises:
        DataError: undecodable file, size different from the image's, or a non-binary mask without threshold.
    """
    img = image_io.open_image(path)
    _check_size(path, img, expected_size)
    if threshold is not None:
        return np.asarray(image_io.to_8bit(img).convert("L")) > threshold
    values = mask_values(img)
    found = np.unique(values)
    others = found[found != 0]
    if len(others) > 1 or (len(others) == 1 and others[0] < 0):
        shown = ", ".join(str(v) for v in others[:4].tolist())
        raise DataError(
            f"{path}: mask is not binary: {len(others)} non-zero values ({shown}{', ...' if len(others) > 4 else ''})"
            f", expected 0 and one foreground value; for soft/anti-aliased/JPEG masks set mask_threshold "
            f"(foreground = grey value > mask_threshold, e.g. 127)"
        )
    return values > 0


def decode_mask(path: Path, size: int, expected_size: tuple[int, int], threshold: int | None) -> np.ndarray:
    """`mask_foreground`, resized with nearest neighbour. Returns [size, size] uint8 in {0, 1}."""
    return _resize_nearest(mask_foreground(path, expected_size, threshold), size)
