"""Validation and flattening of the (maps, masks, valid) triple every pixel metric receives."""

import torch
from torch import Tensor

from lsgs.errors import DataError
from lsgs.metrics.histogram import check_finite


def check_binary(x: Tensor, name: str) -> Tensor:
    """Return ``x`` as a bool tensor, raising DataError unless it is bool or holds only 0 and 1.

    Args:
        x: ``[*]`` mask of any dtype.
        name: what to call it in the error message.

    Returns:
        ``[*]`` bool tensor.
    """
    if not isinstance(x, Tensor):
        raise DataError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.bool:
        return x
    binary = (x == 0) | (x == 1)
    if not bool(binary.all()):
        bad = x[~binary]
        raise DataError(
            f"{name} must be binary (bool or 0/1): got {bad.numel()} other value(s), e.g. {bad[0].item()}; "
            "binarise ground truth with `> 0`"
        )
    return x != 0


def check_maps(maps: Tensor, name: str = "maps") -> None:
    """Raise DataError unless ``maps`` is a floating-point tensor of finite values."""
    if not isinstance(maps, Tensor):
        raise DataError(f"{name} must be a torch.Tensor, got {type(maps).__name__}")
    if not maps.is_floating_point():
        raise DataError(f"{name} must be a floating-point tensor (anomaly scores), got dtype {maps.dtype}")
    check_finite(maps, name)


def check_pixel_inputs(
    maps: Tensor, masks: Tensor, valid: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Validate an anomaly-map batch.

    Args:
        maps: ``[B, 1, H, W]`` float anomaly maps (any shape works if ``masks`` and ``valid`` share it).
        masks: same shape, ground truth in {0, 1} or bool.
        valid: optional bool (or 0/1) mask of the same shape: pixels outside it are not evaluated (e.g. a
            brain ROI).

    Returns:
        ``maps`` unchanged, ``masks`` and ``valid`` as bool tensors (``valid`` stays None when not given).

    Raises:
        DataError: on a shape mismatch, non-float or non-finite maps, or non-binary masks.
    """
    check_maps(maps)
    if not isinstance(masks, Tensor) or masks.shape != maps.shape:
        got = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
        raise DataError(f"masks must have the shape of maps {tuple(maps.shape)}, got {got}")
    masks = check_binary(masks, "masks")
    if valid is not None:
        if not isinstance(valid, Tensor) or valid.shape != maps.shape:
            got = tuple(valid.shape) if isinstance(valid, Tensor) else type(valid).__name__
            raise DataError(f"valid must have the shape of maps {tuple(maps.shape)}, got {got}")
        valid = check_binary(valid, "valid")
    return maps, masks, valid


def select_pixels(maps: Tensor, masks: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Validate, flatten and keep the evaluated pixels.

    Args:
        maps: ``[B, 1, H, W]`` float anomaly maps (any shape shared by all three).
        masks: same shape, binary ground truth.
        valid: optional same-shape mask of evaluated pixels.

    Returns:
        ``scores`` ``[N]`` (the maps' dtype) and ``labels`` ``[N]`` bool, ``N`` = number of evaluated pixels.
    """
    maps, masks, valid = check_pixel_inputs(maps, masks, valid)
    if valid is None:
        return maps.reshape(-1), masks.reshape(-1)
    return maps[valid], masks[valid]
