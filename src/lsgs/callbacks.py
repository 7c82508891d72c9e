"""Callbacks the pipeline attaches to every training stage."""

from __future__ import annotations

import os
import random
import signal
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override


class RNGStateCheckpoint(Callback):
    """Stores the Python, NumPy and torch RNG states in every checkpoint and restores them on resume.

    Lightning checkpoints do not carry the global RNG states, so a run resumed from ``last.ckpt`` would shuffle
    its next epoch and draw its tampering positions differently from an uninterrupted run. With this callback a
    run resumed from an epoch-end checkpoint continues with exactly the random numbers it would have drawn.
    """

    # Only tensors, ints, floats and tuples: checkpoints stay loadable with torch.load(weights_only=True).
    @override
    def state_dict(self) -> dict[str, Any]:
        name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        return {
            "python": random.getstate(),
            "numpy": {
                "name": name,
                "keys": torch.from_numpy(keys.astype(np.int64)),
                "position": int(position),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached_gaussian),
            },
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        random.setstate(state_dict["python"])
        numpy_state = state_dict["numpy"]
        np.random.set_state(
            (
                numpy_state["name"],
                numpy_state["keys"].numpy().astype(np.uint32),
                numpy_state["position"],
                numpy_state["has_gauss"],
                numpy_state["cached_gaussian"],
            )
        )
        torch.set_rng_state(state_dict["torch"])
        if state_dict.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class FaultInjection(Callback):
    """Sends this process a signal (SIGKILL by default) at a given epoch and batch: used by the tests of
    interrupted runs (SIGKILL: a crash; SIGTERM: a scheduler's pre-emption, which Lightning handles).

    Args:
        epoch: epoch (0-based) in which to die.
        batch: training batch index (0-based) at whose start to die.
        signal_name: ``KILL`` or ``TERM``.
    """

    def __init__(self, epoch: int, batch: int, signal_name: str = "KILL") -> None:
        self.epoch, self.batch = epoch, batch
        self.signal = getattr(signal, f"SIG{signal_name}")

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), self.signal)
