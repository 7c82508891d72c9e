"""MVTec AD: scanning and validating the on-disk layout, caching, and `MVTecDataModule`.

Layout (official): `<root>/<category>/train/good/*.png`, `<root>/<category>/test/<defect>/*.png` (`good` =
normal), `<root>/<category>/ground_truth/<defect>/<stem>_mask.png`. Hidden files and directories and non-image
files (readme, license) are ignored; .png/.jpg/.jpeg/.bmp/.tif(f) are accepted in any case.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_modules import image_io
from data_modules.base import AnomalyDataModule, Item, decode_workers, n_holdout
from data_modules.cache import build_entry, cache_key, read_index, write_image_arrays, write_index
from data_modules.masks import index_by_stem, read_mask
from lsgs.errors import ConfigError, DataError, DataNotFoundError

MVTEC_CATEGORIES: tuple[str, ...] = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
GOOD = "good"


@dataclass(frozen=True)
class MVTecSample:
    """One image of a category: its split ("train"/"val"/"test"), defect type ("good" = normal) and mask file."""

    path: Path
    split: str
    defect: str
    mask_path: Path | None

    @property
    def label(self) -> int:
        return int(self.defect != GOOD)


def find_categories(root: Path, marker: str = "train/good", dataset: str = "MVTec") -> list[str]:
    """Category directories under `root` that have a `marker` directory (`train/good`), sorted by name.

    `marker` and `dataset` (used in messages) let layouts with another marker (MVTec 3D-AD) share this.

    Raises:
        DataNotFoundError: `root` is not a directory.
    """
    if not root.is_dir():
        raise DataNotFoundError(f"{dataset} root {root} does not exist or is not a directory")
    return sorted(p.name for p in root.iterdir() if image_io.is_visible(p) and (p / marker).is_dir())


def resolve_categories(
    root: Path, category: str | list[str], marker: str = "train/good", dataset: str = "MVTec"
) -> list[str]:
    """The categories selected by `category` ("all", one name, or a list), in the order given.

    `marker` and `dataset` as in `find_categories`.

    Raises:
        DataNotFoundError: the root is missing, "all" finds nothing, or a name is not a category under root.
        ConfigError: an empty selection or a repeated name.
    """
    found = find_categories(root, marker, dataset)
    if category == "all":
        if not found:
            raise DataNotFoundError(f"{root}: no category directory with a {marker} folder found")
        return found
    names = [category] if isinstance(category, str) else list(category)
    if not names:
        raise ConfigError("category: an empty list selects nothing; use 'all' or category names")
    if len(set(names)) != len(names):
        raise ConfigError(f"category: repeated names in {names}")
    for name in names:
        if name not in found:
            raise DataNotFoundError(
                f"{dataset} category {name!r} not found under {root} (a category has <root>/<name>/{marker}); "
                f"valid categories found: {found or 'none'}"
            )
    return names


def _mask_index(directory: Path) -> dict[str, Path]:
    """Masks of one defect directory keyed by their exact stem (`000_mask`)."""
    if not directory.is_dir():
        return {}
    return index_by_stem(image_io.list_images(directory), directory, "masks")


def scan_category(root: Path, category: str) -> list[MVTecSample]:
    """All samples of a category: train/good, then test defects in name order; masks paired by exact stem.

    Raises:
        DataError: no train images, no test images, or a test defect image without `<stem>_mask.*`.
    """
    base = root / category
    train_dir = base / "train" / GOOD
    train = [MVTecSample(p, "train", GOOD, None) for p in image_io.list_images(train_dir)]
    if not train:
        raise DataError(f"MVTec category {category!r}: no training images in {train_dir}")
    test_root = base / "test"
    if not test_root.is_dir():
        raise DataError(f"MVTec category {category!r}: missing test directory {test_root}")
    test: list[MVTecSample] = []
    for defect_dir in sorted(p for p in test_root.iterdir() if image_io.is_visible(p) and p.is_dir()):
        defect = defect_dir.name
        masks = {} if defect == GOOD else _mask_index(base / "ground_truth" / defect)
        for path in image_io.list_images(defect_dir):
            mask = None
            if defect != GOOD:
                mask = masks.get(f"{path.stem}_mask")
                if mask is None:
                    raise DataError(
                        f"{path}: defect image without its mask; expected "
                        f"{base / 'ground_truth' / defect / (path.stem + '_mask.png')}"
                    )
            test.append(MVTecSample(path, "test", defect, mask))
    if not test:
        raise DataError(f"MVTec category {category!r}: no test images under {test_root}")
    return train + test


def decode_sample(sample: MVTecSample, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode one sample at `size`.

    Returns:
        (image [size, size, 3] uint8, mask [size, size] uint8 in {0, 1}; zeros for normal images).
    """
    image, original = image_io.read_image(sample.path, size, channels=3)
    if sample.mask_path is None:
        return image, np.zeros((size, size), dtype=np.uint8)
    return image, read_mask(sample.mask_path, size, original)


def build_category_cache(
    root: Path,
    category: str,
    size: int,
    cache_root: Path,
    samples: list[MVTecSample] | None = None,
    kind: str = "mvtec",
    decode: Callable[[MVTecSample, int], tuple[np.ndarray, np.ndarray]] | None = None,
) -> Path:
    """Validate one category and return its (possibly freshly built) cache entry.

    The entry holds the arrays IMAGES [N, size, size, 3] uint8 and MASKS [N, size, size] uint8 and an index
    with one record per row (path, split, defect, label), train/good rows first.

    `samples` (default: `scan_category`), `kind` (cache-key namespace) and `decode` (default: `decode_sample`)
    let other MVTec-like layouts (MVTec 3D-AD) reuse this.
    """
    if samples is None:
        samples = scan_category(root, category)
    decode_fn = decode or decode_sample  # looked up at call time, so tests can patch decode_sample
    files = [s.path for s in samples] + [s.mask_path for s in samples if s.mask_path is not None]
    config = {"category": category, "image_size": size, "resize": "pil-bilinear+nearest"}
    key = cache_key(kind, root, config, files)

    def build(tmp: Path) -> None:
        rows = image_io.parallel_map(lambda s: decode_fn(s, size), samples, decode_workers())
        write_image_arrays(tmp, rows, (size, size, 3), size)
        records = [
            {"path": str(s.path), "split": s.split, "defect": s.defect, "label": s.label} for s in samples
        ]
        write_index(tmp, {"category": category, "image_size": size, "items": records})

    return build_entry(cache_root, key, build)


class MVTecDataModule(AnomalyDataModule):
    """MVTec AD, one or several categories (the paper trains ONE model on all and evaluates each).

    Validation is a seeded, per-category fraction of train/good (never test); a category's split depends only
    on (seed, category name), so it is the same whether the category is trained alone or with others.

    Args:
        root: MVTec AD root (the directory holding the category folders).
        category: a category name, a list of names, or "all" (every directory under root with train/good).
        **kwargs: the arguments every data module takes (`image_size`, `batch_size`, ...): see `AnomalyDataModule`.
    """

    def __init__(
        self,
        root: str,
        category: str | list[str] = "all",
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, **kwargs)
        self.category = category
        self._categories: list[str] | None = None

    @property
    def num_channels(self) -> int:
        return 3

    @property
    def test_categories(self) -> list[str]:
        if self._categories is None:
            self._categories = resolve_categories(self.root, self.category)
        return list(self._categories)

    def _build_cache(self) -> list[Path]:
        # Scan every category before decoding any, so a layout error surfaces at once.
        categories = self.test_categories
        for name in categories:
            scan_category(self.root, name)
        return [
            build_category_cache(self.root, name, self.image_size, self.cache_root) for name in categories
        ]

    def _make_splits(self, entries: list[Path]) -> Mapping[str, list[Item]]:
        splits: dict[str, list[Item]] = {"train": [], "val": [], "test": []}
        for entry_id, entry in enumerate(entries):
            index = read_index(entry)
            category = index["category"]
            records = index["items"]
            train_rows = np.array([i for i, r in enumerate(records) if r["split"] == "train"], dtype=np.int64)
            # Seeded by (seed, category) only: stable whatever else is selected.
            rng = np.random.default_rng([self.seed, zlib.crc32(category.encode())])
            perm = rng.permutation(train_rows)
            n_val = n_holdout(len(train_rows), self.val_fraction)
            # Rows recorded as "val" are official validation normals (MVTec 3D-AD); MVTec AD has none.
            official_val = [i for i, r in enumerate(records) if r["split"] == "val"]
            val_rows = np.concatenate([np.sort(perm[:n_val]), np.asarray(official_val, dtype=np.int64)])
            fit_rows = np.sort(perm[n_val:])
            test_rows = [i for i, r in enumerate(records) if r["split"] == "test"]
            for split, rows in (("train", fit_rows), ("val", val_rows), ("test", test_rows)):
                splits[split].extend(
                    Item(entry_id, int(i), records[i]["label"], category, records[i]["path"]) for i in rows
                )
        return splits
