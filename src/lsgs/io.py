"""Atomic file writes: a killed process leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Temporary files of atomic writes: ``.<final name>.<random>.tmp`` beside the final file.
_TMP_PREFIX, _TMP_SUFFIX = ".", ".tmp"


def atomic_write_bytes(
    path: str | os.PathLike, data: bytes | memoryview, interrupt: Callable[[], None] | None = None
) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same directory, fsync, then rename.

    ``interrupt`` (fault-injection tests only) is called once half of ``data`` is in the temporary file: a process
    killed there leaves ``path`` as it was, and a partial temporary file that nothing reads
    (``remove_partial_writes`` deletes it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{_TMP_PREFIX}{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            view = memoryview(data).cast("B")
            half = len(view) // 2 if interrupt is not None else len(view)
            handle.write(view[:half])
            if interrupt is not None:
                handle.flush()
                interrupt()
            handle.write(view[half:])
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path


def remove_partial_writes(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that interrupted atomic writes left in ``folder`` (nothing reads them, and a
    checkpoint's may be large); returns them. Call it only when no write into ``folder`` is under way."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    partial = sorted(folder.glob(f"{_TMP_PREFIX}*{_TMP_SUFFIX}"))
    for tmp in partial:
        tmp.unlink(missing_ok=True)
    return partial


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_json(path: str | os.PathLike, argument: str) -> Any:
    """Read a JSON file the user pointed at with ``argument``; errors name both."""
    from lsgs.errors import ConfigError

    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as error:
        raise ConfigError(f"{argument}: file '{path}' does not exist") from error
    except json.JSONDecodeError as error:
        raise ConfigError(f"{argument}: '{path}' is not valid JSON ({error})") from error


def read_json_or_none(path: str | os.PathLike) -> Any:
    """A JSON file that may legitimately be absent or unfinished (a marker such as ``done.json``): ``None`` then."""
    from lsgs.errors import ConfigError

    try:
        return read_json(path, "file")
    except ConfigError:
        return None
