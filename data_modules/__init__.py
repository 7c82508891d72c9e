"""LightningDataModules for MVTec AD and BraTS slices, plus the embedded demo-data generator."""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
