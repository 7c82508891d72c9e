"""Using a trained model: ``Inferencer`` (score images in memory or on disk, from a run or an export) and the
export writer behind ``lsgs export``.

``Inferencer.from_export`` runs an export with onnxruntime, OpenVINO or TorchScript and imports neither Lightning
nor the evaluation harness; ``Inferencer.from_run`` and the export writer rebuild the method from its run
(``lsgs.methods.registry.load_method``).
"""

import importlib
from typing import Any

# Exports resolve lazily (PEP 562): ``import lsgs.inference`` stays cheap, and a name pulls in its module only.
_EXPORTS = {
    "Inferencer": "lsgs.inference.inferencer",
    "Prediction": "lsgs.inference.inferencer",
    "export_method": "lsgs.inference.exporter",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lsgs.inference' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
