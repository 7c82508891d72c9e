"""``run.json``, the record that says which lsgs layout a run folder follows, and the check every reader makes.

A run folder written by an lsgs with another layout version (``lsgs.layout.LAYOUT_VERSION``: folder names, stage
hashes and stored paths mean something else there) is refused with one line before anything reads or writes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lsgs.errors import ConfigError
from lsgs.io import read_json_or_none
from lsgs.layout import LAYOUT_VERSION, RunLayout


def read_run_record(layout: RunLayout) -> dict[str, Any] | None:
    """``run.json`` of a run folder, or None when there is none (a new run, or a folder of no run)."""
    info = read_json_or_none(layout.run_record)
    return info if isinstance(info, dict) else None


def layout_mismatch(layout: RunLayout) -> str | None:
    """Why a run folder with stages cannot be used by this lsgs (its record names another layout version), or
    None. A folder without stage folders or without ``run.json`` is not refused (a new run)."""
    info = read_run_record(layout)
    if info is None or info.get("layout_version") == LAYOUT_VERSION or not layout.stage_dirs():
        return None
    version = info.get("layout_version")
    found = f"layout version {version}" if version is not None else "no layout version"
    return (
        f"run folder '{layout.root}' was made by another lsgs version ({found} in {layout.run_record.name}, this "
        f"lsgs uses {LAYOUT_VERSION}): start a new run (another --run_dir or --name)"
    )


def check_run_folder(run_dir: str | Path) -> RunLayout:
    """The layout of ``run_dir``; a ``ConfigError`` line when it was made by an lsgs with another layout."""
    layout = RunLayout.of(run_dir)
    problem = layout_mismatch(layout)
    if problem:
        raise ConfigError(problem)
    return layout
