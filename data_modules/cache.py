"""Atomic, hash-keyed, memory-mapped array cache: decode a data set once, read it as `.npy` memory maps after.

Layout of one entry, `<cache_root>/<key>/` (this module names every file of it; the data modules use these
names and `array_path`, `write_index`, `read_index`, `open_arrays`, never a spelled-out file name):
    <name>.npy      one array per name (IMAGES, MASKS, optionally ROI), opened with `np.load(mmap_mode="r")`
    index.json      per-row metadata (paths, labels, categories, slice indices, case ids) and build info
    COMPLETE        completion marker, written last; an entry without it is never trusted

An entry is built in a temporary sibling directory `.tmp-<key>-<token>` (holding its owner's host and pid) and
renamed into place, so a killed build leaves only a temporary directory, which later builds ignore and delete
once its owner is gone.
The key hashes the format version, the absolute data root, the preprocessing config and every source file's
path, size and mtime, so a changed data set or config never reuses a stale entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lsgs.io import atomic_write_json

# Bump whenever the on-disk layout or the preprocessing code changes what a cached array contains.
CACHE_FORMAT_VERSION = 1
COMPLETE_MARKER = "COMPLETE"
INDEX_FILE = "index.json"
TMP_PREFIX = ".tmp-"
OWNER_FILE = ".owner.json"  # {host, pid} of the process building a temporary directory
# A temporary directory this old is treated as abandoned even if its owner lives on another host.
STALE_TMP_SECONDS = 6 * 3600.0
_NPY_HEADER_BYTES = 128  # fixed .npy v1.0 header size, a multiple of 64 as the format requires

# Array names of an entry, one `<name>.npy` file each: the batch contract's image, mask and region of interest.
IMAGES = "images"
MASKS = "masks"
ROI = "roi"  # optional: an entry without it has an all-ones region of interest
FEATURES = "features"  # a feature-cache entry: frozen-backbone features of one split, in dataset order
ARRAY_SUFFIX = ".npy"


def default_cache_dir() -> Path:
    """Cache root used when none is configured: `$LSGS_CACHE_DIR`, else `~/.cache/lsgs`."""
    env = os.environ.get("LSGS_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lsgs"


def file_fingerprint(paths: Iterable[Path]) -> list[list[Any]]:
    """`[absolute path, size in bytes, mtime in ns]` for each file, in the given order."""
    out = []
    for path in paths:
        st = Path(path).stat()
        out.append([str(Path(path).absolute()), st.st_size, st.st_mtime_ns])
    return out


def cache_key(kind: str, root: str | Path, config: Mapping[str, Any], files: Sequence[Path]) -> str:
    """Hash identifying one cache entry.

    Args:
        kind: data set kind, e.g. "mvtec" or "brats", so different readers never share an entry.
        root: data root; hashed as an absolute path.
        config: every preprocessing setting that changes the cached arrays (JSON-serialisable).
        files: every source file read to build the entry; their sizes and mtimes are hashed too.

    Returns:
        A 24-hex-digit key.
    """
    payload = {
        "version": CACHE_FORMAT_VERSION,
        "kind": kind,
        "root": str(Path(root).absolute()),
        "config": dict(config),
        "files": file_fingerprint(files),
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A .npy v1.0 header of fixed size, so it can be rewritten in place once the row count is known."""
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    text = f"{{'descr': {descr!r}, 'fortran_order': False, 'shape': {tuple(shape)!r}, }}"
    pad = _NPY_HEADER_BYTES - 10 - len(text) - 1
    if pad < 0:
        raise ValueError(f"shape {shape} does not fit the fixed .npy header")
    return (
        b"\x93NUMPY\x01\x00" + struct.pack("<H", _NPY_HEADER_BYTES - 10) + (text + " " * pad + "\n").encode()
    )


class NpyStreamWriter:
    """Write a C-ordered `.npy` file row block by row block when the row count is not known in advance.

    numpy's `open_memmap` needs the final shape up front; BraTS keeps a data-dependent number of slices per
    volume, and holding a whole data set in RAM to concatenate it would need gigabytes. So this writes a
    placeholder header, streams the rows, then rewrites the header with the true count (same byte length).
    The result is a standard .npy file that `np.load` reads.
    """

    def __init__(self, path: str | Path, row_shape: Sequence[int], dtype: np.dtype | type) -> None:
        self.path = Path(path)
        self.row_shape = tuple(int(s) for s in row_shape)
        self.dtype = np.dtype(dtype)
        self.rows = 0
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(_npy_header(self.dtype, (0, *self.row_shape)))

    def append(self, block: np.ndarray) -> None:
        """Append rows.

        Args:
            block: [N, *row_shape] array; cast to the writer's dtype.
        """
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.row_shape:
            raise ValueError(
                f"{self.path}: block of shape {block.shape} does not match rows {self.row_shape}"
            )
        self._file.write(block.tobytes())
        self.rows += block.shape[0]

    def close(self) -> int:
        """Finalise the header, fsync and close; returns the number of rows written."""
        self._file.seek(0)
        self._file.write(_npy_header(self.dtype, (self.rows, *self.row_shape)))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self.rows


def array_path(entry: str | Path, name: str) -> Path:
    """The file of array `name` (IMAGES, MASKS, ROI) in a cache entry, or in the directory building one."""
    return Path(entry) / f"{name}{ARRAY_SUFFIX}"


def write_image_arrays(
    entry: Path, rows: Iterable[tuple[np.ndarray, np.ndarray]], image_shape: Sequence[int], size: int
) -> int:
    """Stream decoded (image, mask) rows into the IMAGES and MASKS arrays of an entry being built.

    Args:
        entry: the directory `build_entry` hands to its `build` function.
        rows: (image `image_shape` uint8, mask [size, size] uint8) pairs, in row order.
        image_shape: one image's shape, [size, size, 3] or [size, size].
        size: side of the masks.

    Returns:
        The number of rows written.
    """
    images = NpyStreamWriter(array_path(entry, IMAGES), image_shape, np.uint8)
    masks = NpyStreamWriter(array_path(entry, MASKS), (size, size), np.uint8)
    for image, mask in rows:
        images.append(image[None])
        masks.append(mask[None])
    images.close()
    return masks.close()


def write_index(entry: Path, index: dict[str, Any]) -> None:
    """Write the JSON index of an entry being built (atomically, fsynced)."""
    atomic_write_json(entry / INDEX_FILE, index)


def read_index(entry: str | Path) -> dict[str, Any]:
    """The JSON index of a cache entry."""
    with open(Path(entry) / INDEX_FILE) as f:
        return json.load(f)


def open_arrays(entry: str | Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Open the named arrays of an entry as read-only memory maps."""
    return {name: np.load(array_path(entry, name), mmap_mode="r") for name in names}


def is_complete(entry: str | Path) -> bool:
    """True when `entry` holds a completion marker naming its own key (written last by `build_entry`)."""
    marker = Path(entry) / COMPLETE_MARKER
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(info, dict)
        and info.get("key") == Path(entry).name
        and info.get("version") == CACHE_FORMAT_VERSION
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _is_abandoned(tmp: Path) -> bool:
    """A temporary build directory whose builder is gone: its owner pid is dead on this host, or it is older
    than STALE_TMP_SECONDS (owners on other hosts of a shared disk cannot be probed)."""
    try:
        age = time.time() - tmp.stat().st_mtime
    except OSError:
        return False
    if age > STALE_TMP_SECONDS:
        return True
    try:
        owner = json.loads((tmp / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return owner.get("host") == socket.gethostname() and not _pid_alive(int(owner.get("pid", -1)))


def clean_abandoned(parent: str | Path, prefix: str = TMP_PREFIX) -> list[Path]:
    """Delete temporary build directories (`<parent>/<prefix>*`) left behind by killed builds.

    Returns:
        The directories removed.
    """
    root = Path(parent)
    if not root.is_dir():
        return []
    removed = []
    for tmp in root.glob(f"{prefix}*"):
        if tmp.is_dir() and _is_abandoned(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def atomic_directory(
    final: str | Path, fill: Callable[[Path], None], trusted: Callable[[Path], bool]
) -> Path:
    """Create directory `final` atomically: fill a temporary sibling, fsync, rename it into place.

    Args:
        final: the directory to create.
        fill: writes the content (fsyncing its files) into the directory it is given; it writes its
            completion marker last.
        trusted: whether an existing directory is complete (checks the marker); an existing directory that is
            not trusted is deleted and rebuilt, so callers must make sure it is theirs to delete.

    Returns:
        `final`, complete.
    """
    final = Path(final)
    if trusted(final):
        return final
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    prefix = f"{TMP_PREFIX}{final.name}-"
    clean_abandoned(parent, prefix)
    tmp = parent / f"{prefix}{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        atomic_write_json(tmp / OWNER_FILE, {"host": socket.gethostname(), "pid": os.getpid()})
        fill(tmp)
        (tmp / OWNER_FILE).unlink()
        _fsync_dir(tmp)
        if final.exists() and not trusted(final):
            shutil.rmtree(final)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process (e.g. a second node on a shared disk) finished the same directory first.
            if not trusted(final):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def build_entry(cache_root: str | Path, key: str, build: Callable[[Path], None]) -> Path:
    """Return the complete cache entry `<cache_root>/<key>`, building it atomically first if needed.

    Args:
        cache_root: directory holding the entries.
        key: entry key from `cache_key`.
        build: writes the entry's arrays and index into the directory it is given (fsyncing its files);
            the completion marker is written after it returns.

    Returns:
        Path of the complete entry.
    """

    def fill(tmp: Path) -> None:
        build(tmp)
        atomic_write_json(tmp / COMPLETE_MARKER, {"key": key, "version": CACHE_FORMAT_VERSION, "built": time.time()})

    def trusted(entry: Path) -> bool:
        return is_complete(entry)

    entry = Path(cache_root) / key
    if not trusted(entry):
        clean_abandoned(cache_root)  # leftovers of any key: the cache root holds nothing but entries
    return atomic_directory(entry, fill, trusted)
