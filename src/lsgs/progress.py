"""Progress bars for the loops Lightning's own bars do not cover (calibration, reports over whole splits)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def progress(iterable: Iterable[Any], description: str, enabled: bool = True) -> Iterable[Any]:
    """``iterable`` wrapped in a transient tqdm bar when ``enabled`` (pass ``trainer.is_global_zero``)."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=description, leave=False, dynamic_ncols=True)
