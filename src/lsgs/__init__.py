"""LSGS: local-sensitive VQ-VAE + aggregated codebook + global-sensitive transformer for anomaly detection.

``lsgs.Inferencer`` and ``lsgs.Prediction`` (``lsgs.inference``) resolve on first use, so ``import lsgs`` imports
nothing else.
"""

import importlib
from typing import Any

__version__ = "0.1.0"
_LAZY = {"Inferencer": "lsgs.inference.inferencer", "Prediction": "lsgs.inference.inferencer"}
__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lsgs' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
