"""LightningDataModules for MVTec AD and BraTS slices, plus the embedded demo-data generator."""

import importlib
from typing import Any

# Exports resolve lazily (PEP 562) so `python -m data_modules.synthetic` does not pay for importing Lightning.
_EXPORTS = {
    "AnomalyDataModule": "data_modules.base",
    "BraTSDataModule": "data_modules.brats",
    "EvalDistributedSampler": "data_modules.samplers",
    "FolderDataModule": "data_modules.folder",
    "ImageFolderDataModule": "data_modules.image_folder",
    "MVTEC_CATEGORIES": "data_modules.mvtec",
    "MVTecDataModule": "data_modules.mvtec",
    "MVTec3DDataModule": "data_modules.mvtec3d",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'data_modules' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
