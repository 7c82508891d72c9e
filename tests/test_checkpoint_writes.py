"""Checkpoint writes: ``AtomicCheckpointIO`` (what every training stage saves with) never leaves half a file under
the final name, a partial temporary file is removed, and the runner adds the writer unless a config names its own.
End to end (a SIGKILL inside a stage's checkpoint write, then the resumed run): tests/test_pipeline.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lsgs.callbacks import AtomicCheckpointIO, FaultInjection
from lsgs.io import atomic_write_bytes, remove_partial_writes
from lsgs.run.runner import _with_atomic_checkpoints


def test_at_the_kill_point_the_old_checkpoint_is_whole_and_the_new_one_half_written(tmp_path: Path) -> None:
    """What a process killed by ``interrupt`` (``FaultInjection`` ``CHECKPOINT``) leaves on disk, seen from inside
    the write: the previous checkpoint under the final name, half of the new one under a temporary name."""
    path = tmp_path / "checkpoints" / "last.ckpt"
    writer = AtomicCheckpointIO()
    writer.save_checkpoint({"weights": torch.zeros(100_000), "epoch": 0}, path)
    before = path.read_bytes()
    seen = {}

    def at_the_kill() -> None:
        (partial,) = [p for p in path.parent.iterdir() if p != path]
        seen.update(final=path.read_bytes(), partial=partial, size=partial.stat().st_size)
        seen["epoch"] = AtomicCheckpointIO().load_checkpoint(path)["epoch"]

    writer.interrupt = at_the_kill
    writer.save_checkpoint({"weights": torch.arange(100_000.0), "epoch": 1}, path)
    assert seen["final"] == before and seen["epoch"] == 0
    assert seen["partial"].name.startswith(".last.ckpt.") and seen["partial"].name.endswith(".tmp")
    assert seen["size"] == len(path.read_bytes()) // 2  # half of the new checkpoint
    assert writer.load_checkpoint(path)["epoch"] == 1 and sorted(path.parent.iterdir()) == [path]
    # A partial file that a killed process left is removed when its stage restarts.
    left = path.parent / ".last.ckpt.abc123.tmp"
    left.write_bytes(b"half")
    assert remove_partial_writes(path.parent) == [left] and sorted(path.parent.iterdir()) == [path]
    assert remove_partial_writes(tmp_path / "missing") == []


def test_the_interrupt_runs_halfway_and_only_once(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    seen = []
    atomic_write_bytes(path, b"0123456789", interrupt=lambda: seen.append(sorted(p.name for p in tmp_path.iterdir())))
    assert path.read_bytes() == b"0123456789" and len(seen) == 1 and seen[0][0].startswith(".a.bin.")
    writer = AtomicCheckpointIO()
    calls = []
    writer.interrupt = lambda: calls.append(1)
    writer.save_checkpoint({"x": 1}, tmp_path / "b.ckpt")
    writer.save_checkpoint({"x": 2}, tmp_path / "b.ckpt")
    assert calls == [1] and writer.load_checkpoint(tmp_path / "b.ckpt") == {"x": 2}
    # An interrupted write that raises (not a kill) deletes its temporary file and keeps the old content.
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(path, b"new", interrupt=lambda: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert path.read_bytes() == b"0123456789" and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.ckpt"]


def test_the_runner_adds_the_atomic_writer_unless_a_config_names_one() -> None:
    ours = {"class_path": "lsgs.callbacks.AtomicCheckpointIO"}
    assert _with_atomic_checkpoints(None) == [ours]
    assert _with_atomic_checkpoints("bf16-mixed") == ["bf16-mixed", ours]
    theirs = {"class_path": "lightning.pytorch.plugins.TorchCheckpointIO"}
    assert _with_atomic_checkpoints([theirs]) == [theirs]


def test_fault_injection_modes() -> None:
    assert FaultInjection(1, 2).mode == "KILL"
    with pytest.raises(ValueError, match=r"mode must be one of \['KILL', 'TERM', 'CHECKPOINT'\], got 'SAVE'"):
        FaultInjection(1, 2, "SAVE")
