"""Shared test set-up: offline W&B, no network, small thread count."""

import os
import tempfile

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_DIR", tempfile.mkdtemp(prefix="lsgs-wandb-"))
os.environ.setdefault("WANDB_SILENT", "true")
