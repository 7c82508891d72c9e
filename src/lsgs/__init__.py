"""LSGS: local-sensitive VQ-VAE + aggregated codebook + global-sensitive transformer for anomaly detection."""

__version__ = "0.1.0"
