"""albumentations pipelines built from config specs.

A spec is a mapping `{"name": <albumentations class>, **kwargs}`, e.g. `{"name": "HorizontalFlip", "p": 0.5}`.
Compositions nest: `{"name": "OneOf", "transforms": [{...}, {...}], "p": 0.5}`. Spatial transforms move the
image, the anomaly mask and the region of interest together (they are passed as `masks`); pixel transforms
touch the image only. Unknown names or arguments raise `ConfigError` when the data module is constructed,
not mid-epoch.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from typing import Any

# albumentations asks PyPI for a newer version when it is imported, unless this is set; the project never uses
# the network (a user's explicit setting is kept).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A
import numpy as np
from albumentations.core.composition import BaseCompose
from albumentations.core.transforms_interface import BasicTransform

from lsgs.errors import ConfigError


def _transform_names() -> list[str]:
    return sorted(
        n
        for n, obj in vars(A).items()
        if isinstance(obj, type) and issubclass(obj, (BasicTransform, BaseCompose))
    )


def build_transform(
    spec: Mapping[str, Any], where: str = "train_transforms[0]"
) -> BasicTransform | BaseCompose:
    """Instantiate one albumentations transform (or composition) from its spec.

    Args:
        spec: `{"name": "<class name>", **constructor kwargs}`; compositions take `"transforms": [spec, ...]`.
        where: position of the spec in the config, used in error messages.

    Returns:
        The transform instance.

    Raises:
        ConfigError: the spec is not a mapping with a string "name", the name is not an albumentations
            transform, or the arguments are rejected.
    """
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise ConfigError(f"{where}: expected a mapping with a string 'name' key, got {spec!r}")
    kwargs = dict(spec)
    name = kwargs.pop("name")
    cls = getattr(A, name, None)
    if not (isinstance(cls, type) and issubclass(cls, (BasicTransform, BaseCompose))):
        close = difflib.get_close_matches(name, _transform_names(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"{where}: unknown albumentations transform {name!r}{hint}")
    try:
        if issubclass(cls, BaseCompose):
            children = kwargs.pop("transforms", None)
            if not isinstance(children, Sequence) or isinstance(children, str):
                raise ConfigError(
                    f"{where}: composition {name!r} needs a 'transforms' list, got {children!r}"
                )
            built = [build_transform(c, f"{where}.transforms[{i}]") for i, c in enumerate(children)]
            return cls(built, **kwargs)
        # strict=True turns albumentations' "invalid argument" warning into an error.
        return cls(**kwargs, strict=True)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: invalid arguments for {name!r} {kwargs!r}: {exc}") from exc


def build_transforms(specs: Sequence[Mapping[str, Any]] | None) -> A.Compose | None:
    """Compose a list of specs; `None` or an empty list gives `None` (no augmentation).

    Args:
        specs: list of transform specs (see module docstring).

    Returns:
        An `A.Compose` applied as `compose(image=[H, W, C] array, masks=[[H, W] mask, [H, W] roi])`, or None.
    """
    if not specs:
        return None
    if isinstance(specs, (str, Mapping)) or not isinstance(specs, Sequence):
        raise ConfigError(f"train_transforms: expected a list of transform specs, got {specs!r}")
    return A.Compose([build_transform(s, f"train_transforms[{i}]") for i, s in enumerate(specs)])


def apply_transform(
    compose: A.Compose, image: np.ndarray, mask: np.ndarray, roi: np.ndarray, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply `compose` jointly to an image, its anomaly mask and its region of interest.

    Args:
        compose: the pipeline from `build_transforms`.
        image: [H, W, C] uint8 or [H, W] float32.
        mask: [H, W] uint8 in {0, 1}.
        roi: [H, W] uint8 in {0, 1}.
        seed: seeds this call; drawn from torch's RNG by the caller so `seed_everything` and DataLoader worker
            seeding make augmentation reproducible.

    Returns:
        (image, mask, roi) with the same shapes and dtypes.

    Raises:
        ConfigError: the pipeline changed the spatial size (the batch contract needs H = W = image_size).
    """
    compose.set_random_seed(seed)
    out = compose(image=image, masks=[mask, roi])
    new_image, (new_mask, new_roi) = out["image"], out["masks"]
    if new_image.shape[:2] != image.shape[:2] or new_mask.shape != mask.shape:
        raise ConfigError(
            f"train_transforms changed the image size from {image.shape[:2]} to {new_image.shape[:2]}; "
            "size-changing transforms must be followed by a Resize back to image_size"
        )
    return new_image, new_mask, new_roi
