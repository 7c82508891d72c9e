"""MVTec 3D-AD (RGB images and masks only): scanning and validating its layout, and `MVTec3DDataModule`.

Layout (official): `<root>/<category>/train/good/rgb/*.png`, `<root>/<category>/validation/good/rgb/*.png`,
`<root>/<category>/test/<defect>/{rgb,gt}/*.png` (`good` = normal; its `gt` masks are all zero). A mask in
`gt/` pairs with the image of the same exact stem in `rgb/` (`000.png` <-> `000.png`). Masks store a class id
per defect (e.g. 253, 254, 255): they are binarised with `> 0`. The point clouds (`xyz/`), `calibration/` and
the text files are never read, and may be absent. Images (800x800 or 800x600 in the release) are resized to
image_size x image_size like MVTec AD, so a non-square image is squeezed.

Caching, the batch contract and the bad-input errors are MVTec AD's (`data_modules.mvtec`), whose helpers
this module reuses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_modules import image_io
from data_modules.masks import index_by_stem
from data_modules.mvtec import (
    GOOD,
    MVTecDataModule,
    MVTecSample,
    build_category_cache,
    decode_sample,
    resolve_categories,
)
from lsgs.errors import DataError

DATASET = "MVTec 3D-AD"
MARKER = "train/good/rgb"  # what makes a directory under root a category
RGB, GT = "rgb", "gt"


def _images_by_stem(directory: Path) -> dict[str, Path]:
    """Images of one `rgb` or `gt` directory keyed by their exact stem; two files with one stem are an error."""
    return index_by_stem(image_io.list_images(directory), directory, "images")


def _normals(base: Path, split: str, folder: str) -> list[MVTecSample]:
    """The images of `<base>/<folder>/good/rgb` as samples of `split`.

    Raises:
        DataError: the directory is missing or holds no image.
    """
    directory = base / folder / GOOD / RGB
    if not directory.is_dir():
        raise DataError(f"{DATASET} category {base.name!r}: missing directory {directory}")
    images = _images_by_stem(directory)
    if not images:
        raise DataError(f"{DATASET} category {base.name!r}: no images in {directory}")
    return [MVTecSample(images[stem], split, GOOD, None) for stem in sorted(images)]


def _defect_samples(defect_dir: Path) -> list[MVTecSample]:
    """The test samples of one `test/<defect>` directory, masks paired by exact stem.

    A defect directory needs a mask for every image; `good` may omit `gt/` altogether (all-zero masks).

    Raises:
        DataError: `rgb/` (or a defect's `gt/`) missing, an image without its mask, or a mask without its
            image.
    """
    defect = defect_dir.name
    rgb_dir, gt_dir = defect_dir / RGB, defect_dir / GT
    if not rgb_dir.is_dir():
        raise DataError(f"{defect_dir}: missing image directory {rgb_dir}")
    if defect != GOOD and not gt_dir.is_dir():
        raise DataError(f"{defect_dir}: missing mask directory {gt_dir}")
    images = _images_by_stem(rgb_dir)
    masks = _images_by_stem(gt_dir) if gt_dir.is_dir() else {}
    if masks or defect != GOOD:
        for stem in sorted(images):
            if stem not in masks:
                raise DataError(
                    f"{images[stem]}: image without its mask; expected {gt_dir / (stem + '.png')}"
                )
        for stem in sorted(masks):
            if stem not in images:
                raise DataError(
                    f"{masks[stem]}: mask without its image; expected {rgb_dir / (stem + '.png')}"
                )
    return [MVTecSample(images[stem], "test", defect, masks.get(stem)) for stem in sorted(images)]


def scan_category_3d(root: Path, category: str) -> list[MVTecSample]:
    """All samples of a category: train/good, validation/good, then the test defects in name order.

    Raises:
        DataError: a missing train/validation/test directory, no images in one of them, or an unpaired image
            or mask (see `_defect_samples`).
    """
    base = root / category
    samples = _normals(base, "train", "train") + _normals(base, "val", "validation")
    test_root = base / "test"
    if not test_root.is_dir():
        raise DataError(f"{DATASET} category {category!r}: missing test directory {test_root}")
    test: list[MVTecSample] = []
    for defect_dir in sorted(p for p in test_root.iterdir() if image_io.is_visible(p) and p.is_dir()):
        test += _defect_samples(defect_dir)
    if not test:
        raise DataError(f"{DATASET} category {category!r}: no test images under {test_root}/<defect>/{RGB}")
    return samples + test


def decode_sample_3d(sample: MVTecSample, size: int) -> tuple[np.ndarray, np.ndarray]:
    """`decode_sample`, plus a check that the mask of a normal (`good`) test image is empty.

    Returns:
        (image [size, size, 3] uint8, mask [size, size] uint8 in {0, 1}).

    Raises:
        DataError: undecodable file, mask size differing from its image's, or foreground in a `good` mask.
    """
    image, mask = decode_sample(sample, size)
    # Labels come from the folder; a normal image with a non-empty mask would contradict its label. Checked
    # at full resolution (the resized mask can lose small regions); decode_sample has validated the file.
    if sample.defect == GOOD and sample.mask_path is not None:
        with Image.open(sample.mask_path) as full:
            foreground = int(np.count_nonzero(np.asarray(full)))
        if foreground:
            raise DataError(
                f"{sample.mask_path}: mask of a normal (test/good) image has {foreground} foreground pixels"
            )
    return image, mask


class MVTec3DDataModule(MVTecDataModule):
    """MVTec 3D-AD's RGB images and masks, one or several categories.

    Validation normals are the official `validation/good` images (train/good is not split, and validation
    images are never trained on). Everything else is `MVTecDataModule`'s: batch contract (`roi` all ones,
    `slice_index` -1), per-category cache entries, category selection, evaluation per category.

    Args:
        root: MVTec 3D-AD root (the directory holding the category folders, e.g. `tire`).
        category: a category name, a list of names, or "all" (every directory under root with train/good/rgb).
        **kwargs: the arguments every data module takes (`image_size`, `batch_size`, ...) but `val_fraction`:
            see `AnomalyDataModule`.
    """

    def __init__(
        self,
        root: str,
        category: str | list[str] = "all",
        **kwargs: Any,
    ) -> None:
        # No `val_fraction`: the official validation split is used instead.
        super().__init__(root=root, category=category, val_fraction=0.0, **kwargs)

    @property
    def test_categories(self) -> list[str]:
        if self._categories is None:
            self._categories = resolve_categories(self.root, self.category, MARKER, DATASET)
        return list(self._categories)

    def _build_cache(self) -> list[Path]:
        # Scan every category before decoding any, so a layout error surfaces at once.
        scans = {name: scan_category_3d(self.root, name) for name in self.test_categories}
        return [
            build_category_cache(
                self.root, name, self.image_size, self.cache_root, samples, "mvtec3d", decode_sample_3d
            )
            for name, samples in scans.items()
        ]
