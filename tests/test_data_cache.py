"""The decoded-array cache: streaming .npy writer, keys, atomic builds, untrusted leftovers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_modules import MVTecDataModule
from data_modules.cache import (
    COMPLETE_MARKER,
    IMAGES,
    MASKS,
    OWNER_FILE,
    TMP_PREFIX,
    NpyStreamWriter,
    array_path,
    build_entry,
    cache_key,
    clean_abandoned,
    default_cache_dir,
    is_complete,
    open_arrays,
    read_index,
    write_image_arrays,
    write_index,
)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def fake_build(calls: list[int]):
    def build(tmp: Path) -> None:
        calls.append(1)
        np.save(array_path(tmp, IMAGES), np.arange(6, dtype=np.uint8).reshape(2, 3))
        write_index(tmp, {"n": 2})

    return build


@pytest.mark.parametrize("dtype", [np.uint8, np.float16, np.float32])
def test_stream_writer_matches_np_save(tmp_path: Path, dtype) -> None:
    rng = np.random.default_rng(0)
    blocks = [rng.uniform(0, 200, (n, 5, 4)).astype(dtype) for n in (3, 0, 1, 7)]
    writer = NpyStreamWriter(tmp_path / "a.npy", (5, 4), dtype)
    for block in blocks:
        writer.append(block)
    assert writer.close() == 11
    loaded = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert loaded.dtype == dtype and loaded.shape == (11, 5, 4)
    assert np.array_equal(loaded, np.concatenate(blocks))
    assert (tmp_path / "a.npy").stat().st_size == 128 + 11 * 20 * np.dtype(dtype).itemsize


def test_stream_writer_empty_and_wrong_shape(tmp_path: Path) -> None:
    writer = NpyStreamWriter(tmp_path / "e.npy", (2, 2, 3), np.uint8)
    with pytest.raises(ValueError, match="does not match rows"):
        writer.append(np.zeros((1, 2, 3), np.uint8))
    writer.close()
    assert np.load(tmp_path / "e.npy").shape == (0, 2, 2, 3)


def test_image_arrays_stream_rows_that_open_arrays_reads_back(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    masks = rng.integers(0, 2, (5, 4, 4), dtype=np.uint8)
    assert write_image_arrays(tmp_path, zip(images, masks), (4, 4, 3), 4) == 5
    arrays = open_arrays(tmp_path, [IMAGES, MASKS])
    assert np.array_equal(arrays[IMAGES], images) and np.array_equal(arrays[MASKS], masks)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(array_path(tmp_path, n).name for n in (IMAGES, MASKS))


def test_cache_key_tracks_files_config_and_root(tmp_path: Path) -> None:
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"1234")
    b.write_bytes(b"5678")
    key = cache_key("mvtec", tmp_path, {"image_size": 64}, [a, b])
    assert key == cache_key("mvtec", tmp_path, {"image_size": 64}, [a, b]) and len(key) == 24
    assert key != cache_key("mvtec", tmp_path, {"image_size": 32}, [a, b])
    assert key != cache_key("brats", tmp_path, {"image_size": 64}, [a, b])
    assert key != cache_key("mvtec", tmp_path / "other", {"image_size": 64}, [a, b])
    assert key != cache_key("mvtec", tmp_path, {"image_size": 64}, [a])
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    key_mtime = cache_key("mvtec", tmp_path, {"image_size": 64}, [a, b])
    assert key_mtime != key
    a.write_bytes(b"12345")
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert cache_key("mvtec", tmp_path, {"image_size": 64}, [a, b]) != key_mtime  # size changed


def test_build_once_then_reuse(tmp_path: Path) -> None:
    calls: list[int] = []
    entry = build_entry(tmp_path, "k1", fake_build(calls))
    assert entry == tmp_path / "k1" and is_complete(entry) and calls == [1]
    assert build_entry(tmp_path, "k1", fake_build(calls)) == entry and calls == [1]
    assert not (entry / OWNER_FILE).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["k1"]  # no temporary directory left


def test_final_dir_without_marker_is_not_trusted(tmp_path: Path) -> None:
    stale = tmp_path / "k2"
    stale.mkdir()
    array_path(stale, IMAGES).write_bytes(b"half written")
    calls: list[int] = []
    build_entry(tmp_path, "k2", fake_build(calls))
    assert calls == [1] and np.load(array_path(stale, IMAGES)).shape == (2, 3) and read_index(stale) == {"n": 2}
    # a marker naming another key is not trusted either
    (stale / COMPLETE_MARKER).write_text(json.dumps({"key": "other", "version": 1}))
    assert not is_complete(stale)
    build_entry(tmp_path, "k2", fake_build(calls))
    assert calls == [1, 1] and is_complete(stale)


def test_leftover_temp_dirs(tmp_path: Path) -> None:
    import socket

    def leftover(name: str, pid: int, age: float = 0.0) -> Path:
        d = tmp_path / f"{TMP_PREFIX}{name}"
        d.mkdir()
        array_path(d, IMAGES).write_bytes(b"partial")
        (d / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": pid}))
        if age:
            os.utime(d, (time.time() - age, time.time() - age))
        return d

    killed = leftover("k3-killed", dead_pid())
    alive = leftover("k3-alive", os.getpid())
    ancient = leftover("k3-ancient", os.getpid(), age=7 * 3600)
    other_key = leftover("k9-killed", dead_pid())
    calls: list[int] = []
    entry = build_entry(tmp_path, "k3", fake_build(calls))
    assert calls == [1] and is_complete(entry)
    assert not killed.exists() and not ancient.exists() and not other_key.exists()
    assert alive.exists()  # its builder may still be running
    assert clean_abandoned(tmp_path) == []


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    def broken(tmp: Path) -> None:
        array_path(tmp, IMAGES).write_bytes(b"x")
        raise RuntimeError("decoder exploded")

    with pytest.raises(RuntimeError, match="exploded"):
        build_entry(tmp_path, "k4", broken)
    assert list(tmp_path.iterdir()) == []


def test_lost_race_keeps_the_winner(tmp_path: Path) -> None:
    calls: list[int] = []

    def racing(tmp: Path) -> None:
        fake_build(calls)(tmp)
        # another process completes the same entry while we are still building
        winner = tmp_path / "k5"
        shutil.copytree(tmp, winner)
        (winner / "winner").write_text("1")
        (winner / COMPLETE_MARKER).write_text(json.dumps({"key": "k5", "version": 1}))

    entry = build_entry(tmp_path, "k5", racing)
    assert (entry / "winner").exists() and [p.name for p in tmp_path.iterdir()] == ["k5"]


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LSGS_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LSGS_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "lsgs"


def test_changed_dataset_is_not_served_from_a_stale_cache(demo_mvtec_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "mvtec"
    shutil.copytree(demo_mvtec_root / "nut", root / "nut")
    cache = tmp_path / "cache"
    kwargs = {"cache_dir": str(cache), "image_size": 16, "val_fraction": 0.0}
    before = MVTecDataModule(str(root), **kwargs).dataset("train")[0]["image"]
    target = root / "nut" / "train" / "good" / "000.png"
    Image.fromarray(np.full((128, 128, 3), 7, np.uint8)).save(target)
    after = MVTecDataModule(str(root), **kwargs).dataset("train")[0]["image"]
    assert not torch.equal(before, after)
    assert torch.allclose(after, torch.full_like(after, 7 / 255))
    assert len([p for p in cache.iterdir() if is_complete(p)]) == 2
    # a different image size is a different entry too
    MVTecDataModule(str(root), **{**kwargs, "image_size": 24}).setup()
    assert len([p for p in cache.iterdir() if is_complete(p)]) == 3
