"""`ImageFolderDataModule`: unlabelled images in a folder, scored with `predict` (what `lsgs detect` reads).

Items follow the batch contract with `label = -1` (unknown), an all-zero `mask` and an all-ones `roi`;
`category` is the folder's name. Only `predict_dataloader` is available: there are no labels to train,
validate or test with.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from data_modules import image_io
from data_modules.base import AnomalyDataModule, Item, decode_workers
from data_modules.cache import build_entry, cache_key, read_index, write_image_arrays, write_index
from lsgs.errors import ConfigError, DataError, DataNotFoundError

UNKNOWN_LABEL = -1


def decode_image(path: Path, size: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """One unlabelled image: ([size, size, 3] (channels=3) or [size, size] (channels=1) uint8, its all-zero
    [size, size] uint8 mask)."""
    image = image_io.read_image(path, size, channels=channels)[0]
    return image, np.zeros((size, size), dtype=np.uint8)


class ImageFolderDataModule(AnomalyDataModule):
    """Images found in `root` (optionally recursively), for `trainer.predict`.

    Args:
        root: folder of images (hidden files and non-images are ignored).
        channels: 3 = RGB (for MVTec-trained models; grayscale replicated), 1 = grayscale (BraTS-trained).
        recursive: also take images in sub-folders.
        val_fraction: see `AnomalyDataModule` (0 here: there is no training data to hold back).
        **kwargs: the arguments every data module takes (`image_size`, `batch_size`, ...): see `AnomalyDataModule`.
    """

    def __init__(
        self,
        root: str,
        channels: int = 3,
        recursive: bool = False,
        val_fraction: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, val_fraction=val_fraction, **kwargs)
        if channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3, got {channels!r}")
        self.channels = channels
        self.recursive = bool(recursive)

    @property
    def num_channels(self) -> int:
        return self.channels

    @property
    def test_categories(self) -> list[str]:
        return [self.root.resolve().name]

    def _build_cache(self) -> list[Path]:
        if not self.root.is_dir():
            raise DataNotFoundError(f"image folder {self.root} does not exist or is not a directory")
        paths = image_io.list_images(self.root, recursive=self.recursive)
        if not paths:
            raise DataError(f"image folder {self.root}: no image files (.png/.jpg/.jpeg/.bmp/.tif)")
        size, channels = self.image_size, self.channels
        key = cache_key("folder", self.root, {"image_size": size, "channels": channels}, paths)

        def build(tmp: Path) -> None:
            shape = (size, size, 3) if channels == 3 else (size, size)
            rows = image_io.parallel_map(lambda p: decode_image(p, size, channels), paths, decode_workers())
            write_image_arrays(tmp, rows, shape, size)
            write_index(tmp, {"image_size": size, "items": [str(p) for p in paths]})

        return [build_entry(self.cache_root, key, build)]

    def _make_splits(self, entries: list[Path]) -> Mapping[str, list[Item]]:
        category = self.test_categories[0]
        paths = read_index(entries[0])["items"]
        items = [Item(0, row, UNKNOWN_LABEL, category, path) for row, path in enumerate(paths)]
        return {"train": [], "val": [], "test": items}

    def _unavailable(self, what: str) -> DataLoader:
        raise ConfigError(
            f"ImageFolderDataModule({self.root}) has unlabelled images only: no {what} loader; use predict"
        )

    def train_dataloader(self) -> DataLoader:
        return self._unavailable("train")

    def train_eval_dataloader(self) -> DataLoader:
        return self._unavailable("train_eval")

    def val_dataloader(self) -> DataLoader:
        return self._unavailable("val")

    def test_dataloader(self) -> DataLoader:
        return self._unavailable("test")
