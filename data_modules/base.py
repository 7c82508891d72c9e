"""The shared LightningDataModule: arguments, cached datasets, samplers, dataloaders and the batch contract.

Batch contract (every later stage depends on it). Each item is a dict:
    image        float32 [C, H, W] in [0, 1] (C = 3 for MVTec, 1 for BraTS; BraTS "zscore" is not in [0, 1])
    mask         float32 [1, H, W] in {0, 1}, all zeros for normal images
    label        int64 scalar, 0 normal / 1 anomalous (-1 = unknown, image folders only)
    roi          float32 [1, H, W] in {0, 1}, the region to score (BraTS brain mask, MVTec all ones)
    category     str
    path         str, the source image / FLAIR file
    slice_index  int, BraTS axial slice index, -1 for 2-D images
    index        int, position of the item in its split's dataset
    has_mask     bool, False for an anomalous image without ground truth (FolderDataModule with
                 allow_missing_masks): image label only, left out of the pixel metrics
with H = W = image_size. The default collate stacks tensors and gives lists for the str fields.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from data_modules.cache import IMAGES, MASKS, ROI, array_path, default_cache_dir, open_arrays
from data_modules.image_io import image_to_tensor
from data_modules.samplers import EvalDistributedSampler
from data_modules.transforms import apply_transform, build_transforms
from lsgs.contracts import predict_split_of
from lsgs.errors import ConfigError, DataError

SPLITS = ("train", "train_eval", "val", "test")
MAX_IMAGE_SIZE = 4096


@dataclass(frozen=True)
class Item:
    """Where one dataset item lives in the cache, and its metadata."""

    entry: int  # index into the dataset's list of cache entries
    row: int  # row in that entry's arrays
    label: int
    category: str
    path: str
    slice_index: int = -1
    has_mask: bool = True  # False: anomalous without ground truth (`mask` all zeros, not "no defect")


def decode_workers() -> int:
    """Threads used to decode files while building a cache."""
    return max(1, min(8, os.cpu_count() or 1))


class CachedDataset(Dataset):
    """One split of a cached data set: rows of memory-mapped arrays turned into batch-contract dicts.

    Each cache entry holds the arrays (`data_modules.cache`) IMAGES ([N, H, W, 3] or [N, H, W] uint8, or
    [N, H, W] float16/32), MASKS ([N, H, W] uint8) and optionally ROI ([N, H, W] uint8; all ones when absent). The maps
    are opened lazily in each process and never pickled, so DataLoader workers started with spawn or
    forkserver do not copy the arrays.

    Args:
        entries: cache entry directories.
        items: the split's items, in dataset order.
        transform: albumentations pipeline applied jointly to image, mask and roi (train split only).
        image_entries: entries holding the same rows decoded at the model's input size, from which `image` is
            read (None: `entries`); mask and roi always come from `entries` (the evaluation size). A transform
            then runs on the image and on mask + roi separately with the same seed, so size-independent spatial
            transforms (flips, rotations) stay aligned.
    """

    def __init__(
        self,
        entries: Sequence[Path],
        items: Sequence[Item],
        transform: Any = None,
        image_entries: Sequence[Path] | None = None,
    ) -> None:
        self.entries = [Path(e) for e in entries]
        self.image_entries = [Path(e) for e in image_entries] if image_entries is not None else None
        self.items = list(items)
        self.transform = transform
        self._arrays: dict[int, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_arrays"] = {}
        return state

    def _entry_arrays(self, entry: int) -> dict[str, np.ndarray]:
        arrays = self._arrays.get(entry)
        if arrays is None:
            path = self.entries[entry]
            names = [IMAGES, MASKS] + ([ROI] if array_path(path, ROI).exists() else [])
            arrays = open_arrays(path, names)
            if self.image_entries is not None:
                arrays[IMAGES] = open_arrays(self.image_entries[entry], [IMAGES])[IMAGES]
            self._arrays[entry] = arrays
        return arrays

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.items[index]
        arrays = self._entry_arrays(item.entry)
        image = np.array(arrays[IMAGES][item.row])  # copy out of the read-only map
        mask = np.array(arrays[MASKS][item.row])
        roi = np.array(arrays[ROI][item.row]) if ROI in arrays else None
        if self.transform is not None:
            if roi is None:
                roi = np.ones_like(mask)
            if image.dtype == np.float16:  # albumentations/cv2 do not take float16
                image = image.astype(np.float32)
            # A seed from torch's RNG: reproducible under seed_everything, distinct per worker and epoch.
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
            if image.shape[:2] == mask.shape:
                image, mask, roi = apply_transform(self.transform, image, mask, roi, seed)
            else:  # image at the input size, mask and roi at the evaluation size: the same draw for both
                size = image.shape[:2]
                image, _, _ = apply_transform(self.transform, image, np.zeros(size, np.uint8), np.ones(size, np.uint8),
                                              seed)  # fmt: skip
                _, mask, roi = apply_transform(self.transform, np.zeros_like(mask), mask, roi, seed)
        return {
            "image": image_to_tensor(image),
            "mask": torch.from_numpy(np.ascontiguousarray(mask)).to(torch.float32)[None],
            "label": torch.tensor(item.label, dtype=torch.int64),
            "roi": (
                torch.ones((1, *mask.shape), dtype=torch.float32)
                if roi is None
                else torch.from_numpy(np.ascontiguousarray(roi)).to(torch.float32)[None]
            ),
            "category": item.category,
            "path": item.path,
            "slice_index": item.slice_index,
            "index": index,
            "has_mask": item.has_mask,
        }


def n_holdout(n: int, fraction: float) -> int:
    """How many of `n` items a fraction holds out: round(fraction * n), at least 1 when fraction > 0, and
    always leaving at least one item behind."""
    if fraction <= 0 or n <= 1:
        return 0
    return int(min(max(round(fraction * n), 1), n - 1))


def check_fraction(name: str, value: float) -> None:
    """ConfigError unless 0 <= value < 1."""
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ConfigError(f"{name} must be in [0, 1), got {value!r}")


class AnomalyDataModule(pl.LightningDataModule, abc.ABC):
    """Arguments, splits and dataloaders shared by every data module of the project.

    Subclasses implement `_build_cache` (scan and validate the data on disk, decode it into cache entries)
    and `_make_splits` (turn the cache indexes into train/val/test items), plus `num_channels` and
    `test_categories`.

    Args:
        root: data root directory.
        image_size: side of the square images given to the model, in pixels, and of the masks and maps the
            metrics compare (the evaluation size).
        model_input_size: None (= image_size), or the side of the images given to the model when it differs from the
            evaluation size (a feature method at 224 px in a 128 px run): `image` is then resized from the
            original files to this size and cached separately; `mask` and `roi` stay at `image_size`.
        batch_size: training batch size.
        eval_batch_size: batch size of evaluation loaders (val/test/predict/train_eval); None = batch_size.
        num_workers: DataLoader worker processes (0 = load in the main process).
        val_fraction: fraction of the training data held back as validation normals (never test data).
        seed: seed of the train/val (and BraTS patient) splits.
        train_transforms: albumentations specs applied to the train split only, e.g.
            `[{"name": "HorizontalFlip", "p": 0.5}]`; spatial ones move image, mask and roi together.
        cache_dir: root of the decoded-array cache; None = $LSGS_CACHE_DIR or ~/.cache/lsgs.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 128,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        train_transforms: list[dict] | None = None,
        cache_dir: str | None = None,
        model_input_size: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for name, value in (("image_size", image_size), ("model_input_size", model_input_size)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 8 <= value <= MAX_IMAGE_SIZE
            ):
                raise ConfigError(f"{name} must be an int in [8, {MAX_IMAGE_SIZE}], got {value!r}")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"num_workers must be an int >= 0, got {num_workers!r}")
        check_fraction("val_fraction", val_fraction)
        self.root = Path(root).expanduser()
        self.image_size = image_size
        self.input_size = image_size if model_input_size is None else model_input_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.cache_root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.train_transform = build_transforms(train_transforms)
        self._entries: list[Path] | None = None
        self._image_entries: list[Path] | None = None
        self._datasets: dict[str, CachedDataset] | None = None

    # ----------------------------------------------------------------------------------------- subclass API
    @property
    @abc.abstractmethod
    def num_channels(self) -> int:
        """Channels C of `image`: 3 (MVTec) or 1 (BraTS)."""

    @property
    @abc.abstractmethod
    def test_categories(self) -> list[str]:
        """Categories evaluated, in order."""

    @abc.abstractmethod
    def _build_cache(self) -> list[Path]:
        """Validate the data on disk, build any missing cache entries, return their directories."""

    @abc.abstractmethod
    def _make_splits(self, entries: list[Path]) -> Mapping[str, list[Item]]:
        """Items of the "train", "val" and "test" splits, from the cache entries' indexes."""

    # ------------------------------------------------------------------------------------- Lightning hooks
    def prepare_data(self) -> None:
        """Validate the data on disk and build the cache (Lightning calls this on local rank 0 only)."""
        self._entries = self._build_cache()
        self._image_entries = self._input_size_entries(self._entries)

    def _input_size_entries(self, entries: list[Path]) -> list[Path] | None:
        """The same cache entries decoded at `model_input_size` (None when it is the evaluation size): the subclass's
        own `_build_cache` run at that size, so the images are resized from the original files."""
        if self.input_size == self.image_size:
            return None
        evaluation_size = self.image_size
        self.image_size = self.input_size
        try:
            resized = self._build_cache()
        finally:
            self.image_size = evaluation_size
        for entry, other in zip(entries, resized, strict=True):
            rows, other_rows = (open_arrays(e, [IMAGES])[IMAGES].shape[0] for e in (entry, other))
            if rows != other_rows:
                raise DataError(
                    f"model_input_size={self.input_size}: the data decoded at that size has {other_rows} rows where "
                    f"image_size={evaluation_size} has {rows} ({entry.name}); this data set selects its items by "
                    "size, so its methods must run at image_size"
                )
        return resized

    def setup(self, stage: str | None = None) -> None:
        """Open the cache (building it if `prepare_data` did not run here) and make the splits.

        Works without a trainer attached; calling it again is a no-op.
        """
        if self._datasets is not None:
            return
        if self._entries is None:
            self._entries = self._build_cache()
            self._image_entries = self._input_size_entries(self._entries)
        splits = self._make_splits(self._entries)
        entries, images = self._entries, self._image_entries
        self._datasets = {
            "train": CachedDataset(entries, splits["train"], self.train_transform, images),
            "train_eval": CachedDataset(entries, splits["train"], None, images),
            "val": CachedDataset(entries, splits["val"], None, images),
            "test": CachedDataset(entries, splits["test"], None, images),
        }

    def image_cache_entries(self) -> list[Path]:
        """The cache entries the model's images are read from (at `model_input_size`); their names are content keys of
        the data and its preprocessing, so a cache derived from the images (backbone features) keys on them."""
        self.setup()
        assert self._entries is not None
        return list(self._image_entries if self._image_entries is not None else self._entries)

    def dataset(self, split: str) -> CachedDataset:
        """The dataset of a split ("train", "train_eval", "val", "test"); runs `setup()` if needed."""
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; expected one of {SPLITS}")
        self.setup()
        assert self._datasets is not None
        return self._datasets[split]

    @property
    def train_size(self) -> int:
        """Number of training images (runs `setup()` if needed)."""
        return len(self.dataset("train"))

    # ----------------------------------------------------------------------------------------- loaders
    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _eval_loader(self, split: str) -> DataLoader:
        data = self.dataset(split)
        world, rank = self._world()
        sampler = EvalDistributedSampler(data, num_replicas=world, rank=rank) if world > 1 else None
        return DataLoader(
            data,
            batch_size=self.eval_batch_size,
            shuffle=False,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented training normals.

        The order is a seeded permutation per epoch (`DistributedSampler`, seed = `seed`; Lightning sets the
        epoch), also on one device: rank r of R takes every R-th item of the same permutation, so R devices
        with batch size b/R see the same samples per step as one device with batch size b. That makes a
        multi-device run reproduce a single-device run (up to float summation order) and makes resumed runs
        replay the same order.
        """
        world, rank = self._world()
        data = self.dataset("train")
        return DataLoader(
            data,
            batch_size=self.batch_size,
            sampler=DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=self.seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_eval_dataloader(self) -> DataLoader:
        """The whole train split in order, without augmentation (k-means encoding, training statistics of the
        baseline methods)."""
        return self._eval_loader("train_eval")

    def val_dataloader(self) -> DataLoader:
        """Validation normals, held back from the training data."""
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        """The test set, in order (categories in `test_categories` order)."""
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        """The test set, unless the model being run asks for another split through a `predict_split`
        attribute: the codebook aggregator predicts over the whole training set ("train")."""
        trainer = getattr(self, "trainer", None)
        model = getattr(trainer, "lightning_module", None) if trainer is not None else None
        split = predict_split_of(model)
        return self._eval_loader("train_eval" if split == "train" else split)
