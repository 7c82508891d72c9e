"""A frozen backbone's features of the training split, computed once and cached like the decoded images.

A feature method (HVQ-Trans) trains for many epochs on the features of a frozen backbone; computing them anew every
epoch would cost a backbone pass per image and epoch. The cache follows the image cache's rules
(``data_modules.cache``): an entry is built in a temporary folder and renamed into place, trusted only with its
completion marker, and keyed by everything its values depend on: the image cache entries the images come from
(content keys of the data and its preprocessing at the method's input size), the split's items, the backbone's
description (name, weights fingerprint, normalisation, strides) and the feature transform's own settings.
Augmentation that changes pixels makes every epoch's features different, so a data module with train transforms
gets no cache (:func:`train_features` returns None and says why).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from data_modules.cache import FEATURES, NpyStreamWriter, array_path, build_entry, cache_key, open_arrays
from lsgs.progress import progress

FEATURE_CACHE_FOLDER = "features"  # under the data module's cache root


def feature_cache_key(datamodule: Any, split: str, backbone: dict[str, Any], transform: dict[str, Any]) -> str:
    """The key of the features of ``split`` (a content key: equal inputs give the same entry on every machine)."""
    items = [[item.entry, item.row] for item in datamodule.dataset(split).items]
    config = {
        "images": [entry.name for entry in datamodule.image_cache_entries()],
        "items": items,
        "input_size": datamodule.input_size,
        "backbone": backbone,
        "transform": transform,
    }
    return cache_key(FEATURES, datamodule.root, config, files=[])


def train_features(
    datamodule: Any,
    features_of: Callable[[Tensor], Tensor],
    backbone: dict[str, Any],
    transform: dict[str, Any],
    device: torch.device,
    is_builder: bool = True,
    barrier: Callable[[], None] = lambda: None,
    log: Callable[[str], None] = print,
) -> np.ndarray | None:
    """The features of the training split, in dataset order (``[N, ...]`` float32, memory-mapped), or None when
    the data module augments its training images.

    Args:
        datamodule: an ``AnomalyDataModule`` (its ``train_eval`` split: the training images in order, without
            augmentation; ``batch["index"]`` of the training split indexes the returned rows); anything else (no
            image cache, e.g. None when the trainer was given plain dataloaders) gets no feature cache.
        features_of: ``[B, C, H, W]`` images in [0, 1] -> ``[B, ...]`` features (the frozen backbone and the
            method's fixed transform of its maps), run under ``torch.no_grad``.
        backbone: the backbone's ``describe()`` (its weights fingerprint keys the entry).
        transform: the settings of what ``features_of`` does beyond the backbone (JSON-serialisable).
        device: where ``features_of`` runs.
        is_builder: whether this process builds a missing entry (DDP: rank 0; the others wait at ``barrier``).
        barrier: waits for every process (DDP), so no process opens an entry another one is still building.
        log: where the one-line notes go.
    """
    if not hasattr(datamodule, "image_cache_entries"):
        log(f"[lsgs] {type(datamodule).__name__} has no image cache to key features on: backbone features are "
            "computed per batch, without the feature cache")  # fmt: skip
        return None
    if datamodule.train_transform is not None:
        log("[lsgs] train_transforms change the training pixels every epoch: backbone features are computed per "
            "batch, without the feature cache")  # fmt: skip
        return None
    key = feature_cache_key(datamodule, "train_eval", backbone, transform)
    entry = Path(datamodule.cache_root) / FEATURE_CACHE_FOLDER / key

    def build(tmp: Path) -> None:
        dataset = datamodule.dataset("train_eval")
        loader = DataLoader(dataset, batch_size=datamodule.eval_batch_size, shuffle=False, num_workers=0)
        writer = None
        with torch.no_grad():
            for batch in progress(loader, "feature cache", True):
                features = features_of(batch["image"].to(device)).float().cpu().numpy()
                if writer is None:
                    writer = NpyStreamWriter(array_path(tmp, FEATURES), features.shape[1:], np.float32)
                writer.append(features)
        if writer is None:
            raise ValueError("the training split is empty: no features to cache")
        writer.close()
        (tmp / "key.json").write_text(json.dumps({"backbone": backbone, "transform": transform}, sort_keys=True))

    if is_builder:
        build_entry(entry.parent, key, build)
    barrier()
    return open_arrays(entry, [FEATURES])[FEATURES]
