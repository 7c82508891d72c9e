"""Callbacks and the checkpoint writer the pipeline attaches to every training stage."""

from __future__ import annotations

import io
import os
import random
import signal
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins import TorchCheckpointIO
from typing_extensions import override

from lsgs.io import atomic_write_bytes


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` writing every checkpoint through a temporary file in the checkpoint's own
    folder, fsynced, then renamed (``lsgs.io.atomic_write_bytes``): a process killed while it saves leaves the
    previous ``last.ckpt`` whole, so a resumed run never loads half a checkpoint.

    Lightning's own writer puts its temporary file in the system's temp directory and moves it into place; where
    that is another file system (a node-local /tmp, runs on a shared disk) the move is a copy, and a kill during the
    copy leaves half a checkpoint under the final name. Loading is Lightning's.

    Attributes:
        interrupt: called once, halfway through the next write (``FaultInjection``'s ``CHECKPOINT`` mode).
    """

    def __init__(self) -> None:
        super().__init__()
        self.interrupt: Callable[[], None] | None = None

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        interrupt, self.interrupt = self.interrupt, None
        atomic_write_bytes(path, buffer.getbuffer(), interrupt=interrupt)


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
    """Stops this process at a given epoch and batch: used by the tests of interrupted runs.

    Args:
        epoch: epoch (0-based) in which to act.
        batch: training batch index (0-based) at whose start to act.
        mode: ``KILL`` (SIGKILL there: a crash), ``TERM`` (SIGTERM there: a scheduler's pre-emption, which
            Lightning handles) or ``CHECKPOINT`` (SIGKILL from inside the next checkpoint write, once half of its
            temporary file is written: a crash while saving; needs the trainer's ``AtomicCheckpointIO``).
    """

    MODES = ("KILL", "TERM", "CHECKPOINT")

    def __init__(self, epoch: int, batch: int, mode: str = "KILL") -> None:
        if mode not in self.MODES:
            raise ValueError(f"FaultInjection mode must be one of {list(self.MODES)}, got {mode!r}")
        self.epoch, self.batch, self.mode = epoch, batch, mode

    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.current_epoch != self.epoch or batch_idx != self.batch:
            return
        if self.mode != "CHECKPOINT":
            os.kill(os.getpid(), getattr(signal, f"SIG{self.mode}"))
            return
        writer = trainer.strategy.checkpoint_io
        if not isinstance(writer, AtomicCheckpointIO):
            raise RuntimeError(f"FaultInjection CHECKPOINT needs AtomicCheckpointIO, the trainer has {writer!r}")
        writer.interrupt = lambda: os.kill(os.getpid(), signal.SIGKILL)
