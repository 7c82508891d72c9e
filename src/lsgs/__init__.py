"""LSGS: local-sensitive VQ-VAE + aggregated codebook + global-sensitive transformer for anomaly detection."""

import os

# albumentations checks PyPI for updates on import unless this is set; this project never calls the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
