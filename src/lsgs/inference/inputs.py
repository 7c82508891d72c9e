"""Images in memory or on disk -> the model's input batch, exactly as the data modules prepare files.

Accepted, per image: a path, a PIL image, an ``H x W`` or ``H x W x C`` (C = 1, 3, 4) ``uint8`` array, or a float
array in [0, 1] of those shapes. A batch is a list (or tuple) of those, or an ``N x H x W x C`` array. 8-bit
images (files, PIL images, ``uint8`` arrays) go through ``data_modules.image_io.prepare_image``, the function the
data modules decode files with: a grayscale image given to a 3-channel model is repeated, RGBA loses its alpha,
an RGB image given to a 1-channel model becomes PIL's luma ``L``, and resizing is PIL's bilinear filter from the
original pixels; so an array and the same pixels written to a PNG give the model the same input. Float images
follow the same rules in float (no rounding to 8 bits). Everything else is a one-line ``DataError``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from data_modules.image_io import image_to_tensor, open_image, prepare_image, resize_float_planes
from lsgs.errors import DataError, DataNotFoundError

CHANNELS_LAST = (1, 3, 4)  # gray, RGB, RGBA
# PIL's "L" conversion of RGB (ITU-R 601-2 luma), applied to float images as PIL applies it to 8-bit ones.
LUMA = np.array([299 / 1000, 587 / 1000, 114 / 1000], dtype=np.float32)


def _describe(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return f"an array of shape {x.shape} and dtype {x.dtype}"
    return f"a {type(x).__name__}"


def split_batch(x: Any) -> tuple[list[Any], bool]:
    """The images of ``x`` and whether ``x`` was a batch (a list/tuple, or a 4-D array)."""
    if isinstance(x, list | tuple):
        if not x:
            raise DataError("predict got an empty list; pass at least one image")
        return list(x), True
    if isinstance(x, np.ndarray) and x.ndim == 4:
        if x.shape[0] == 0:
            raise DataError(f"predict got {_describe(x)}: an empty batch")
        return list(x), True
    return [x], False


def load_image(x: Any, size: int, channels: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """One image -> (``[channels, size, size]`` float32 input, its own ``(H, W)``).

    Raises:
        DataNotFoundError: a path that does not exist.
        DataError: anything that is not an image of the accepted kinds (message names what was received).
    """
    if isinstance(x, str | os.PathLike):
        path = Path(x)
        if not path.is_file():
            raise DataNotFoundError(f"predict got the path '{path}', which is not a file")
        x = open_image(path)
    if isinstance(x, Image.Image):
        return _to_tensor(prepare_image(x, size, channels)), (x.height, x.width)
    if not isinstance(x, np.ndarray):
        raise DataError(
            f"predict got {_describe(x)}; pass a path, a PIL image, an H x W (x C) uint8 array or a float array in "
            "[0, 1], or a list of them"
        )
    planes = _planes(x)
    if x.dtype == np.uint8:
        # PIL reads the mode off the array: [H, W] -> L, [H, W, 3] -> RGB, [H, W, 4] -> RGBA.
        image = Image.fromarray(np.ascontiguousarray(planes[0] if planes.shape[0] == 1 else np.moveaxis(planes, 0, -1)))
        return _to_tensor(prepare_image(image, size, channels)), (image.height, image.width)
    return torch.from_numpy(resize_float_planes(_float_channels(planes, channels), size)), tuple(x.shape[:2])


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    """A prepared 8-bit image as the data modules' ``image_to_tensor`` gives it (from a writable copy: PIL's arrays
    are read-only)."""
    return image_to_tensor(np.array(image))


def _planes(x: np.ndarray) -> np.ndarray:
    """An image array checked and as ``[C, H, W]`` planes (C in 1, 3, 4), in its own dtype."""
    if not (x.dtype == np.uint8 or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"predict got {_describe(x)}; images must be uint8, or float in [0, 1]")
    if x.ndim not in (2, 3) or (x.ndim == 3 and x.shape[-1] not in CHANNELS_LAST):
        raise DataError(
            f"predict got {_describe(x)}; an image is H x W or H x W x C with C = 1, 3 or 4 (channels last), a "
            "batch a list of images or an N x H x W x C array"
        )
    if x.size == 0:
        raise DataError(f"predict got {_describe(x)}: an empty image")
    if np.issubdtype(x.dtype, np.floating):
        if not np.isfinite(x).all():
            raise DataError(f"predict got {_describe(x)} holding NaN or infinite values")
        low, high = float(x.min()), float(x.max())
        if low < 0.0 or high > 1.0:
            raise DataError(
                f"predict got {_describe(x)} with values in [{low:.4g}, {high:.4g}]; float images must lie in [0, 1]"
                " (pass 8-bit images as uint8)"
            )
    return x[None] if x.ndim == 2 else np.moveaxis(x, -1, 0)  # [H, W(, C)] -> [C, H, W]


def _float_channels(planes: np.ndarray, channels: int) -> np.ndarray:
    """Float ``[C, H, W]`` planes converted to the model's channels as PIL converts 8-bit images."""
    planes = planes[:3] if planes.shape[0] == 4 else planes  # RGBA: alpha dropped
    if planes.shape[0] == channels:
        return planes.astype(np.float32, copy=False)
    if channels == 3:  # gray to RGB: repeated
        return np.repeat(planes.astype(np.float32, copy=False), 3, axis=0)
    return np.tensordot(LUMA, planes.astype(np.float32, copy=False), axes=1)[None]  # RGB -> L: [1, H, W]


def load_batch(x: Any, size: int, channels: int) -> tuple[torch.Tensor, list[tuple[int, int]], bool]:
    """``x`` (an image or a batch, see the module docstring) -> (``[N, channels, size, size]`` float32, each image's
    own ``(H, W)``, whether ``x`` was a batch)."""
    images, batched = split_batch(x)
    loaded = [load_image(image, size, channels) for image in images]
    return torch.stack([tensor for tensor, _ in loaded]), [shape for _, shape in loaded], batched


def as_per_image(value: Any, count: int, name: str) -> Sequence[Any]:
    """``value`` repeated for ``count`` images, or ``value`` itself when it is a sequence (list, tuple, range, 1-D
    array) of ``count``."""
    if isinstance(value, list | tuple | range) or (isinstance(value, np.ndarray) and value.ndim == 1):
        if len(value) != count:
            raise DataError(f"predict got {len(value)} values of {name} for {count} images")
        return [v.item() if isinstance(v, np.generic) else v for v in value]
    return [value] * count
