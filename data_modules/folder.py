"""`FolderDataModule`: a labelled data set in your own folder layout (normal images to train on, anomalous ones
with masks to test), and the scanning of that layout.

Masks are paired, checked and binarised by `data_modules.masks`; unlabelled folders are
`data_modules.image_folder.ImageFolderDataModule`'s.
"""

from __future__ import annotations

import fnmatch
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from data_modules import image_io
from data_modules.base import AnomalyDataModule, Item, check_fraction, decode_workers, n_holdout
from data_modules.cache import build_entry, cache_key, read_index, write_image_arrays, write_index
from data_modules.masks import decode_mask, index_by_stem, mask_foreground
from lsgs.contracts import predict_split_of
from lsgs.errors import ConfigError, DataError, DataNotFoundError

NORMAL, NORMAL_TEST, ANOMALOUS = "normal", "normal_test", "anomalous"


@dataclass(frozen=True)
class FolderSample:
    """One image of a labelled folder data set.

    Attributes:
        path: the image file.
        role: "normal" (train/val pool), "normal_test" (from `normal_test_dir`) or "anomalous".
        category: the anomalous image's category (its folder's name); "" for normal images (assigned at split).
        mask_path: the ground-truth mask of an anomalous image; None for normal images and, with
            `allow_missing_masks`, for anomalous images without one.
    """

    path: Path
    role: str
    category: str = ""
    mask_path: Path | None = None

    @property
    def label(self) -> int:
        return int(self.role == ANOMALOUS)


def as_list(value: str | Sequence[str] | None, key: str) -> list[str]:
    """A folder setting (one string or a list) as a list; ConfigError on an empty entry or list."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    if not items or any(not isinstance(v, str) or not v.strip() for v in items):
        raise ConfigError(f"{key} must be a folder or a non-empty list of folders, got {value!r}")
    return items


def category_names(folders: Sequence[str]) -> list[str]:
    """Category name of each abnormal folder: its last path component; where two folders share it, their
    relative paths as written (e.g. `MT_Crack/Imgs`), so names stay unique. Folders are never merged."""
    last = [PurePosixPath(f.replace("\\", "/")).name or f for f in folders]
    return [name if last.count(name) == 1 else f.strip("/") for name, f in zip(last, folders)]


def _matches(path: Path, pattern: str | None) -> bool:
    # Case-insensitive, like the image-suffix check: "*.jpg" also takes "x.JPG".
    return pattern is None or fnmatch.fnmatchcase(path.name.lower(), pattern.lower())


def resolve_folder(root: Path, folder: str, key: str) -> Path:
    """`root / folder`, which must be a directory (DataNotFoundError naming the setting otherwise)."""
    path = root / folder
    if not path.is_dir():
        raise DataNotFoundError(f"{key}: folder {path} does not exist or is not a directory")
    return path


def list_folder_images(directory: Path, key: str) -> list[Path]:
    """Image files of a folder (sorted; hidden files and non-images skipped); DataError when there are none."""
    files = image_io.list_images(directory)
    if not files:
        subfolders = sorted(p.name for p in directory.iterdir() if p.is_dir() and image_io.is_visible(p))
        hint = f"; sub-folders are not searched, list them instead: {subfolders[:3]}" if subfolders else ""
        raise DataError(
            f"{key}: folder {directory} is empty (no .png/.jpg/.jpeg/.bmp/.tif image files){hint}"
        )
    return files


def select_glob(
    files: Sequence[Path], pattern: str | None, directory: Path, key: str, what: str
) -> list[Path]:
    """The files whose name matches `pattern` (None = all); DataError when the glob matches none of them."""
    chosen = [p for p in files if _matches(p, pattern)]
    if not chosen:
        raise DataError(
            f"{key}: {what} {pattern!r} matches none of the {len(files)} image files in {directory} "
            f"(e.g. {files[0].name})"
        )
    return chosen


def decode_folder_sample(
    sample: FolderSample, size: int, channels: int, threshold: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Decode one sample: ([size, size, 3] or [size, size] uint8 image, [size, size] uint8 mask in {0, 1})."""
    image, original = image_io.read_image(sample.path, size, channels=channels)
    if sample.mask_path is None:
        return image, np.zeros((size, size), dtype=np.uint8)
    return image, decode_mask(sample.mask_path, size, original, threshold)


def check_folder_sample(sample: FolderSample, threshold: int | None) -> bool:
    """Cheap pre-decoding check of one sample: the image header reads, and its mask (decoded: masks are
    small) has the image's size and is binary. Returns whether the mask is empty (anomalous images only)."""
    size = image_io.read_size(sample.path)
    if sample.mask_path is None:
        return False
    return not bool(mask_foreground(sample.mask_path, size, threshold).any())


class FolderDataModule(AnomalyDataModule):
    """A labelled data set in your own folder layout: normal images to train on, anomalous ones to test.

    Layout (every folder relative to `root`; a folder setting takes one folder or a list):
        normal_dir        normal images: training, validation and (without `normal_test_dir`) normal test
        normal_test_dir   optional normal test images
        abnormal_dir      optional anomalous test images; a list, or a mapping {category: folder}. Each folder
                          is one category, named after the folder (when two folders share a name, after
                          their paths), so metrics are reported per folder and pooled.
        mask_dir          optional mask folder (one for all abnormal folders, or a list parallel to
                          `abnormal_dir`). Without it, masks sit beside their images.
    A mask belongs to the image whose stem plus `mask_suffix` is its stem; it may have another extension
    (`crack_01.jpg` + `crack_01.png`, or `crack_01.png` + `crack_01_mask.png`). Beside the images, masks are told
    apart by `mask_suffix` or by `image_glob` / `mask_glob`.

    Splits (disjoint, seeded by `seed` and the name of the first normal folder, the rule `MVTecDataModule`
    uses with its category name, so a normal folder named like an MVTec category reproduces that category's
    split): without `normal_test_dir`, `normal_test_fraction` of the normal images are held out for testing,
    then `val_fraction` of the rest for validation (threshold calibration); with it, only the validation
    images are held out. Normal test images are spread evenly (seeded) over the categories, so each category
    has normal and anomalous images and every image counts once in the pooled metrics. Test items are ordered
    by category, then by file name. With no `abnormal_dir` there is no test set (`has_test_set` is False):
    all normal images train and validate, `test_dataloader` says so, and the pipeline's evaluations calibrate
    their thresholds on the validation normals only (a run that `lsgs detect` can use).

    Masks are binarised with `> 0` and must be binary (0 and one foreground value); soft masks need
    `mask_threshold`. Images of any size are resized to `image_size` (bilinear; masks nearest), each mask
    checked against its own image's original size. Anomalous images without a mask are an error unless
    `allow_missing_masks` is set: then they carry an image label only (`has_mask` False) and are left out of
    the pixel metrics. Every layout error names the file or setting and is raised before any image is decoded.

    Args:
        root: the data set's folder.
        normal_dir: folder(s) of normal images.
        abnormal_dir: folder(s) of anomalous images, or {category: folder}; None = train and validate only.
        mask_dir: mask folder, or one per abnormal folder; None = masks beside the images.
        normal_test_dir: folder(s) of normal test images; None = hold out `normal_test_fraction`.
        normal_test_fraction: share of the normal images held out for testing when there is no
            `normal_test_dir` (and there are anomalous images).
        image_glob: which files are images (e.g. "*.jpg"); None = every image type.
        mask_glob: which files are masks (e.g. "*.png"); None = every image type.
        mask_suffix: a mask's stem is its image's stem plus this (e.g. "_mask").
        mask_threshold: None = masks must be binary; an int t in [0, 254] = foreground is grey value > t.
        allow_missing_masks: anomalous images without a mask count for image metrics only.
        channels: 3 = RGB (grayscale replicated), 1 = grayscale.
        **kwargs: the arguments every data module takes (`image_size`, `batch_size`, ...): see `AnomalyDataModule`.
    """

    def __init__(
        self,
        root: str,
        normal_dir: str | list[str] = "good",
        abnormal_dir: str | list[str] | dict[str, str] | None = None,
        mask_dir: str | list[str] | None = None,
        normal_test_dir: str | list[str] | None = None,
        normal_test_fraction: float = 0.2,
        image_glob: str | None = None,
        mask_glob: str | None = None,
        mask_suffix: str = "",
        mask_threshold: int | None = None,
        allow_missing_masks: bool = False,
        channels: int = 3,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, **kwargs)
        if channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {channels!r}")
        # Lightning merges the data and model hparams for the loggers and rejects a key with two values: the
        # VQ-VAE's `channels` (layer widths) would clash with this one, so it is logged as `image_channels`.
        for hparams in (self._hparams, self._hparams_initial):
            hparams["image_channels"] = hparams.pop("channels")
        check_fraction("normal_test_fraction", normal_test_fraction)
        if mask_threshold is not None and (
            isinstance(mask_threshold, bool)
            or not isinstance(mask_threshold, int)
            or not 0 <= mask_threshold <= 254
        ):
            raise ConfigError(f"mask_threshold must be None or an int in [0, 254], got {mask_threshold!r}")
        self.normal_dirs = as_list(normal_dir, "normal_dir")
        if not self.normal_dirs:
            raise ConfigError("normal_dir must name at least one folder of normal images")
        self.normal_test_dirs = as_list(normal_test_dir, "normal_test_dir")
        if isinstance(abnormal_dir, Mapping):
            if not abnormal_dir:
                raise ConfigError("abnormal_dir: an empty mapping names no folder; omit it instead")
            self.categories = [str(k) for k in abnormal_dir]
            self.abnormal_dirs = as_list(list(abnormal_dir.values()), "abnormal_dir")
            if any(not c.strip() for c in self.categories):
                raise ConfigError(f"abnormal_dir: empty category name in {dict(abnormal_dir)}")
        else:
            self.abnormal_dirs = as_list(abnormal_dir, "abnormal_dir")
            self.categories = category_names(self.abnormal_dirs)
        self.mask_dirs = as_list(mask_dir, "mask_dir")
        if self.mask_dirs and not self.abnormal_dirs:
            raise ConfigError("mask_dir is set but abnormal_dir is not: masks belong to anomalous images")
        if len(self.mask_dirs) > 1 and len(self.mask_dirs) != len(self.abnormal_dirs):
            raise ConfigError(
                f"mask_dir lists {len(self.mask_dirs)} folders but abnormal_dir {len(self.abnormal_dirs)}; give "
                "one mask folder per abnormal folder, in the same order, or a single mask folder"
            )
        self.normal_test_fraction = float(normal_test_fraction)
        self.image_glob, self.mask_glob = image_glob, mask_glob
        self.mask_suffix = mask_suffix
        self.mask_threshold = mask_threshold
        self.allow_missing_masks = bool(allow_missing_masks)
        self.channels = channels
        beside = bool(self.abnormal_dirs) and not self.mask_dirs
        told_apart = bool(mask_suffix) or (
            image_glob is not None and mask_glob is not None and image_glob != mask_glob
        )
        # Masks beside the images with nothing to tell them apart: every file would be both. Without masks at
        # all (allow_missing_masks), every file is an image.
        self._masks_beside = beside and told_apart
        if beside and not told_apart and not self.allow_missing_masks:
            raise ConfigError(
                "abnormal_dir without mask_dir: masks beside the images must be told apart from them; set "
                "mask_suffix (e.g. '_mask') or image_glob and mask_glob (e.g. '*.jpg' and '*.png'), give "
                "mask_dir, or set allow_missing_masks=true"
            )
        self._split_summary: dict[str, Any] | None = None

    @property
    def num_channels(self) -> int:
        return self.channels

    @property
    def normals_per_category(self) -> bool:
        """False: the categories (abnormal folders) share one population of training normals."""
        return False

    @property
    def test_categories(self) -> list[str]:
        """One category per abnormal folder (empty without `abnormal_dir`: no test set)."""
        return list(dict.fromkeys(self.categories))

    @property
    def has_test_set(self) -> bool:
        """False without `abnormal_dir`: normal images only (the pipeline then calibrates its thresholds on the
        validation normals and reports no metrics)."""
        return bool(self.abnormal_dirs)

    # ------------------------------------------------------------------------------------------ scanning
    def scan(self) -> list[FolderSample]:
        """Every sample, normal first (folders in the given order, files sorted), then normal test, then
        anomalous; masks paired. Only lists folders and pairs names: no image is opened.

        Raises:
            DataNotFoundError: a folder is missing.
            DataError: an empty folder, a glob matching nothing, a missing or ambiguous mask.
        """
        if not self.root.is_dir():
            raise DataNotFoundError(f"root: folder {self.root} does not exist or is not a directory")
        samples: list[FolderSample] = []
        for key, folders, role in (
            ("normal_dir", self.normal_dirs, NORMAL),
            ("normal_test_dir", self.normal_test_dirs, NORMAL_TEST),
        ):
            for folder in folders:
                directory = resolve_folder(self.root, folder, key)
                files = list_folder_images(directory, f"{key} {folder!r}")
                images = select_glob(files, self.image_glob, directory, f"{key} {folder!r}", "image_glob")
                samples += [FolderSample(p, role) for p in images]
        shared_masks: dict[str, Path] | None = None
        if len(self.mask_dirs) == 1 and len(self.abnormal_dirs) > 1:
            shared_masks = self._masks_in(
                resolve_folder(self.root, self.mask_dirs[0], "mask_dir"), "mask_dir"
            )
        owner: dict[str, Path] = {}
        missing: list[tuple[Path, str]] = []  # (image, where its mask was looked for)
        for i, (folder, category) in enumerate(zip(self.abnormal_dirs, self.categories)):
            key = f"abnormal_dir {folder!r}"
            directory = resolve_folder(self.root, folder, "abnormal_dir")
            files = list_folder_images(directory, key)
            where = "beside it"
            if self._masks_beside:
                is_mask = [self._is_mask(p) for p in files]
                masks = index_by_stem([p for p, m in zip(files, is_mask) if m], directory, "masks")
                candidates = [p for p, m in zip(files, is_mask) if not m]
                if not candidates:
                    raise DataError(
                        f"{key}: all {len(files)} image files of {directory} look like masks (mask_glob "
                        f"{self.mask_glob!r}, mask_suffix {self.mask_suffix!r}); no anomalous image left"
                    )
                images = select_glob(candidates, self.image_glob, directory, key, "image_glob")
            else:
                images = select_glob(files, self.image_glob, directory, key, "image_glob")
                masks = {}
                if self.mask_dirs:
                    mask_folder = self.mask_dirs[0 if shared_masks is not None else i]
                    where = f"in mask_dir {mask_folder!r}"
                    masks = shared_masks or self._masks_in(
                        resolve_folder(self.root, mask_folder, "mask_dir"), "mask_dir"
                    )
            for path in images:
                stem = path.stem + self.mask_suffix
                mask = masks.get(stem)
                if mask is not None and shared_masks is not None:
                    if stem in owner:
                        raise DataError(
                            f"{path}: shares its stem with {owner[stem]}, so both would take the mask {mask.name} "
                            "of the single mask_dir; give mask_dir as a list parallel to abnormal_dir"
                        )
                    owner[stem] = path
                if mask is None:
                    missing.append((path, where))
                samples.append(FolderSample(path, ANOMALOUS, category, mask))
        if missing and not self.allow_missing_masks:
            (first, where), more = missing[0], len(missing) - 1
            raise DataError(
                f"{first}: anomalous image without a mask{f' (and {more} more)' if more else ''}: no "
                f"'{first.stem}{self.mask_suffix}.*' {where}; add the masks, or set allow_missing_masks=true to "
                "use such images for the image metrics only"
            )
        return samples

    def _is_mask(self, path: Path) -> bool:
        if not _matches(path, self.mask_glob):
            return False
        return path.stem.endswith(self.mask_suffix) if self.mask_suffix else True

    def _masks_in(self, directory: Path, key: str) -> dict[str, Path]:
        files = list_folder_images(directory, key)
        return index_by_stem(select_glob(files, self.mask_glob, directory, key, "mask_glob"), directory, "masks")

    # ------------------------------------------------------------------------------------------ caching
    def _build_cache(self) -> list[Path]:
        samples = self.scan()
        size, channels, threshold = self.image_size, self.channels, self.mask_threshold
        files = [s.path for s in samples] + [s.mask_path for s in samples if s.mask_path is not None]
        config = {
            "image_size": size,
            "channels": channels,
            "mask_threshold": threshold,
            "resize": "pil-bilinear+nearest",
            "roles": [[s.role, s.category, str(s.mask_path) if s.mask_path else None] for s in samples],
        }
        key = cache_key("folder-labelled", self.root, config, files)

        def build(tmp: Path) -> None:
            # Check every header and mask first (masks are small): a bad file fails before the long decode.
            workers = decode_workers()
            empty = sum(image_io.parallel_map(lambda s: check_folder_sample(s, threshold), samples, workers))
            if empty:
                rank_zero_warn(
                    f"FolderDataModule({self.root}): {empty} anomalous image(s) have an all-zero mask"
                )
            shape = (size, size, 3) if channels == 3 else (size, size)
            rows = image_io.parallel_map(
                lambda s: decode_folder_sample(s, size, channels, threshold), samples, workers
            )
            write_image_arrays(tmp, rows, shape, size)
            records = [
                {
                    "path": str(s.path),
                    "role": s.role,
                    "category": s.category,
                    "label": s.label,
                    "has_mask": s.role != ANOMALOUS or s.mask_path is not None,
                }
                for s in samples
            ]
            write_index(tmp, {"image_size": size, "channels": channels, "items": records})

        return [build_entry(self.cache_root, key, build)]

    # ------------------------------------------------------------------------------------------ splits
    def _make_splits(self, entries: list[Path]) -> Mapping[str, list[Item]]:
        records = read_index(entries[0])["items"]
        normal = np.array([i for i, r in enumerate(records) if r["role"] == NORMAL], dtype=np.int64)
        # Seeded like MVTecDataModule's per-category split (seed, name), so equal data gives equal splits.
        split_name = PurePosixPath(self.normal_dirs[0].replace("\\", "/")).name
        rng = np.random.default_rng([self.seed, zlib.crc32(split_name.encode())])
        perm = rng.permutation(normal)
        hold_out = self.has_test_set and not self.normal_test_dirs
        n_test = n_holdout(len(normal), self.normal_test_fraction) if hold_out else 0
        n_val = n_holdout(len(normal) - n_test, self.val_fraction)
        test_rows = np.sort(perm[:n_test])
        val_rows = np.sort(perm[n_test : n_test + n_val])
        fit_rows = np.sort(perm[n_test + n_val :])

        def item(row: int, category: str) -> Item:
            r = records[row]
            return Item(0, int(row), int(r["label"]), category, r["path"], has_mask=bool(r["has_mask"]))

        test: list[Item] = []
        if self.has_test_set:
            normal_test = [
                *test_rows.tolist(),
                *(i for i, r in enumerate(records) if r["role"] == NORMAL_TEST),
            ]
            # Spread the normal test images evenly (seeded) over the categories: each image counted once.
            categories = self.test_categories
            order = rng.permutation(len(normal_test))
            assigned = {normal_test[j]: categories[k % len(categories)] for k, j in enumerate(order)}
            for category in categories:
                rows = [i for i, c in assigned.items() if c == category]
                rows += [
                    i for i, r in enumerate(records) if r["role"] == ANOMALOUS and r["category"] == category
                ]
                rows.sort(key=lambda i: (Path(records[i]["path"]).name, records[i]["path"]))
                test += [item(i, category) for i in rows]
            if not normal_test:
                rank_zero_warn(
                    f"FolderDataModule({self.root}): no normal test image (normal_test_fraction=0 and no "
                    "normal_test_dir), so the image AUROC is undefined"
                )
        self._split_summary = {
            "seed": self.seed,
            "split_name": split_name,
            "train": len(fit_rows),
            "val": len(val_rows),
            "normal_test": sum(1 for i in test if i.label == 0),
            "normal_test_source": "held out"
            if hold_out
            else ("normal_test_dir" if self.has_test_set else "none"),
            "anomalous_test": sum(1 for i in test if i.label == 1),
            "anomalous_without_mask": sum(1 for i in test if not i.has_mask),
        }
        rank_zero_info(f"[lsgs] FolderDataModule({self.root}) splits: {self._split_summary}")
        # Training normals belong to no one defect folder; with a single category they take its name (so
        # the per-category statistics of the baseline methods work), otherwise "normal".
        train_category = self.test_categories[0] if len(self.test_categories) == 1 else "normal"
        return {
            "train": [item(int(i), train_category) for i in fit_rows],
            "val": [item(int(i), train_category) for i in val_rows],
            "test": test,
        }

    @property
    def split_summary(self) -> dict[str, Any]:
        """Counts of each split and the seed that drew them (runs `setup()` if needed)."""
        self.setup()
        assert self._split_summary is not None
        return dict(self._split_summary)

    # ------------------------------------------------------------------------------------------ loaders
    def _no_test(self) -> ConfigError:
        return ConfigError(
            f"FolderDataModule({self.root}) has no test set: abnormal_dir is not set, so there are no anomalous "
            "images to evaluate against (train and validate only); add abnormal_dir (and masks) to test"
        )

    def test_dataloader(self) -> DataLoader:
        if not self.has_test_set:
            raise self._no_test()
        return super().test_dataloader()

    def predict_dataloader(self) -> DataLoader:
        trainer = getattr(self, "trainer", None)
        model = getattr(trainer, "lightning_module", None) if trainer is not None else None
        if predict_split_of(model) == "test" and not self.has_test_set:
            raise self._no_test()
        return super().predict_dataloader()
