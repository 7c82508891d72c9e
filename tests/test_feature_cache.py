"""The training-feature cache of the feature methods (``lsgs.methods.feature_cache``): computed once, read back in
dataset order, keyed by everything the features depend on, atomic, bypassed (with a message) under augmentation."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data_cache import dead_pid

from data_modules import MVTecDataModule
from data_modules.cache import FEATURES, OWNER_FILE, TMP_PREFIX, array_path, is_complete
from lsgs.methods.feature_cache import FEATURE_CACHE_FOLDER, feature_cache_key, train_features

BACKBONE = {"name": "lite0", "fingerprint": "0123456789abcdef", "strides": [8, 16]}
TRANSFORM = {"neck": "test", "grid": [2, 2]}


def datamodule(root: Path, cache: Path, **kwargs) -> MVTecDataModule:
    kwargs = {"category": ["nut", "fabric"], "image_size": 32, "eval_batch_size": 5, **kwargs}
    return MVTecDataModule(str(root), cache_dir=str(cache), **kwargs)


class CountingFeatures:
    """``features_of`` of the tests: ``[B, 3, H, W]`` -> ``[B, 3, 2, 2]`` (2x2 average pooling), counting calls."""

    def __init__(self, fail_at_call: int | None = None) -> None:
        self.calls = 0
        self.fail_at_call = fail_at_call

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise KeyboardInterrupt("killed in the middle of the build")
        return torch.nn.functional.adaptive_avg_pool2d(images, 2)


def cached(dm: MVTecDataModule, features: CountingFeatures, backbone=BACKBONE, transform=TRANSFORM, log=print):
    return train_features(dm, features, backbone, transform, torch.device("cpu"), log=log)


def feature_entries(cache: Path) -> list[str]:
    folder = cache / FEATURE_CACHE_FOLDER
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_features_are_computed_once_and_read_back_in_dataset_order(demo_mvtec_root: Path, tmp_path: Path) -> None:
    dm = datamodule(demo_mvtec_root, tmp_path)
    first = CountingFeatures()
    values = cached(dm, first)
    train = dm.dataset("train_eval")
    expected = torch.stack([train[i]["image"] for i in range(len(train))])  # [N, 3, 32, 32], dataset order
    expected = torch.nn.functional.adaptive_avg_pool2d(expected, 2).numpy()
    assert values.shape == (len(train), 3, 2, 2) and values.dtype == np.float32
    np.testing.assert_allclose(values, expected, rtol=1e-6)
    assert first.calls == -(-len(train) // dm.eval_batch_size)  # one call per batch of the training split
    # A second run (a new data module, as a second fit or run would have) reads the entry: no call at all.
    second = CountingFeatures()
    again = cached(datamodule(demo_mvtec_root, tmp_path), second)
    assert second.calls == 0 and isinstance(again, np.memmap)
    np.testing.assert_array_equal(again, values)
    # The rows follow the training split's batch["index"]: the shuffled training loader's indices pick them.
    batch = next(iter(dm.train_dataloader()))
    np.testing.assert_allclose(
        values[batch["index"].numpy()], torch.nn.functional.adaptive_avg_pool2d(batch["image"], 2).numpy(), rtol=1e-6
    )


def test_the_key_follows_backbone_weights_input_size_grid_and_data(demo_mvtec_root: Path, tmp_path: Path) -> None:
    def key_of(**data_kwargs) -> str:
        data = datamodule(demo_mvtec_root, tmp_path, **data_kwargs)
        return feature_cache_key(data, "train_eval", BACKBONE, TRANSFORM)

    dm = datamodule(demo_mvtec_root, tmp_path)
    key = feature_cache_key(dm, "train_eval", BACKBONE, TRANSFORM)
    assert key_of() == key  # same inputs, fresh data module: same key (a content key, not a run's)

    others = {
        "backbone": feature_cache_key(dm, "train_eval", {**BACKBONE, "name": "b0"}, TRANSFORM),
        "weights": feature_cache_key(dm, "train_eval", {**BACKBONE, "fingerprint": "fedcba9876543210"}, TRANSFORM),
        "strides": feature_cache_key(dm, "train_eval", {**BACKBONE, "strides": [4, 8]}, TRANSFORM),
        "grid": feature_cache_key(dm, "train_eval", BACKBONE, {**TRANSFORM, "grid": [4, 4]}),
        "input size": key_of(model_input_size=64),
        "items": key_of(category=["nut"]),
        "split seed": key_of(seed=1),
    }
    assert key not in others.values() and len(set(others.values())) == len(others), others
    # Each key is its own entry.
    cached(dm, CountingFeatures())
    cached(dm, CountingFeatures(), transform={**TRANSFORM, "grid": [4, 4]})
    assert feature_entries(tmp_path) == sorted([key, others["grid"]])


def test_a_killed_build_leaves_nothing_a_later_run_trusts(demo_mvtec_root: Path, tmp_path: Path) -> None:
    dm = datamodule(demo_mvtec_root, tmp_path)
    key = feature_cache_key(dm, "train_eval", BACKBONE, TRANSFORM)
    # Interrupted in the middle (Ctrl-C, an exception): no entry, no temporary folder.
    with pytest.raises(KeyboardInterrupt):
        cached(dm, CountingFeatures(fail_at_call=2))
    assert feature_entries(tmp_path) == []
    # Killed hard (SIGKILL: nothing cleans up): a temporary folder of a dead process with half the features, and
    # a final folder without its completion marker. Neither is trusted; the next run builds the entry anew.
    folder = tmp_path / FEATURE_CACHE_FOLDER
    leftover = folder / f"{TMP_PREFIX}{key}-killed"
    leftover.mkdir(parents=True)
    array_path(leftover, FEATURES).write_bytes(b"half written")
    (leftover / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid()}))
    unmarked = folder / key
    unmarked.mkdir()
    np.save(array_path(unmarked, FEATURES), np.zeros((2, 3, 2, 2), np.float32))
    counting = CountingFeatures()
    values = cached(dm, counting)
    assert counting.calls > 0 and is_complete(folder / key) and feature_entries(tmp_path) == [key]
    assert values.shape[0] == len(dm.dataset("train_eval")) and float(np.abs(values).sum()) > 0
    assert not leftover.exists()


def test_train_transforms_bypass_the_cache_and_say_so(demo_mvtec_root: Path, tmp_path: Path) -> None:
    dm = datamodule(demo_mvtec_root, tmp_path, train_transforms=[{"name": "HorizontalFlip", "p": 0.5}])
    lines: list[str] = []
    counting = CountingFeatures()
    assert cached(dm, counting, log=lines.append) is None
    assert counting.calls == 0 and feature_entries(tmp_path) == []
    assert len(lines) == 1 and "train_transforms" in lines[0] and "without the feature cache" in lines[0]
    # Without a data module (plain dataloaders): no cache either, and a line says why.
    assert train_features(None, counting, BACKBONE, TRANSFORM, torch.device("cpu"), log=lines.append) is None
    assert len(lines) == 2 and "feature cache" in lines[1] and counting.calls == 0


def test_only_the_builder_builds_and_the_others_wait(demo_mvtec_root: Path, tmp_path: Path) -> None:
    """DDP: a non-building process waits at the barrier, then opens the entry the builder wrote."""
    dm = datamodule(demo_mvtec_root, tmp_path)
    order: list[str] = []

    def barrier() -> None:  # in DDP the builder (local rank 0) finishes before anyone passes this point
        order.append("barrier")
        cached(dm, CountingFeatures())

    follower = CountingFeatures()
    values = train_features(dm, follower, BACKBONE, TRANSFORM, torch.device("cpu"), is_builder=False, barrier=barrier)
    assert follower.calls == 0 and order == ["barrier"] and values.shape[0] == len(dm.dataset("train_eval"))
    key = feature_cache_key(dm, "train_eval", BACKBONE, TRANSFORM)
    assert os.path.basename(os.path.dirname(values.filename)) == key
