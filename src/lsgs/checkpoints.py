"""Reading stage checkpoints with checks that name the file and what is wrong.

Stages hand over through checkpoints only. Every checkpoint this project writes carries an ``lsgs`` entry saying
which kind of model it holds, so a transformer checkpoint given where a VQ-VAE is expected fails with a clear
message instead of a wall of missing-key errors.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from lsgs.errors import CheckpointError, ConfigError

CHECKPOINT_FORMAT = 1
VQVAE_KIND = "vqvae"
TRANSFORMER_KIND = "transformer"
METHOD_KIND = "method"  # the learned state of an evaluated method of ``lsgs.methods``


def require_checkpoint(path: str | None, argument: str) -> str:
    """``path``, or a ``ConfigError`` naming ``argument`` when an upstream checkpoint the pipeline fills in is
    missing (a stage run alone with ``lsgs fit|test -c`` without it)."""
    if path is None:
        raise ConfigError(f"{argument} is required (the pipeline fills it in)")
    return path


def checkpoint_metadata(kind: str, **extra: Any) -> dict[str, Any]:
    """The ``lsgs`` entry stored in every checkpoint of ``kind``."""
    return {"kind": kind, "format": CHECKPOINT_FORMAT, **extra}


def load_checkpoint(path: str | os.PathLike, expected_kind: str, argument: str) -> dict[str, Any]:
    """Load a checkpoint and check it holds a model of ``expected_kind``.

    Args:
        path: checkpoint file.
        expected_kind: ``VQVAE_KIND``, ``TRANSFORMER_KIND`` or ``METHOD_KIND``.
        argument: the configuration key the path came from, used in error messages.

    Raises:
        CheckpointError: the file is missing, unreadable, or of another kind.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{argument}: checkpoint '{path}' does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for truncated/corrupt files
        raise CheckpointError(
            f"{argument}: cannot read checkpoint '{path}' ({error}); is it truncated?"
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{argument}: '{path}' is not a Lightning checkpoint (no 'state_dict')")
    meta = checkpoint.get("lsgs")
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if kind != expected_kind:
        found = f"a '{kind}' checkpoint" if kind else "not an LSGS checkpoint"
        raise CheckpointError(f"{argument}: '{path}' is {found}; expected a '{expected_kind}' checkpoint")
    return checkpoint


def state_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """A short content hash of a state dict, used to tie a transformer to the exact VQ-VAE it was trained on."""
    digest = hashlib.sha1()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu()
        digest.update(key.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        # clone() in contiguous_format: channels_last weights hash like their NCHW copies.
        tensor = tensor.clone(memory_format=torch.contiguous_format).reshape(-1)
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]
