"""lsgs.distributed: barrier + destroy_process_group at the end of multi-process runs, on every launcher we use
(plain torch.multiprocessing workers, Lightning ddp_spawn), tolerant of a group already gone."""

from __future__ import annotations

import pickle
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch import Callback, LightningModule, Trainer

from lsgs.distributed import (
    is_distributed,
    process_group_teardown,
    spawn_teardown_callback,
    teardown_process_group,
)


def test_no_group_is_a_noop() -> None:
    assert not is_distributed()
    assert teardown_process_group() is False
    with process_group_teardown():
        pass
    with pytest.raises(KeyError), process_group_teardown():  # the body's error passes through unchanged
        raise KeyError("x")


def _init(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )


def _worker(rank: int, world: int, tmp: str) -> None:
    _init(rank, world, f"{tmp}/init")
    with process_group_teardown():
        total = torch.tensor([rank + 1.0])
        dist.all_reduce(total)
    # Destroyed on every rank, and a second teardown (nested helper, atexit) is harmless.
    events = [float(total), dist.is_initialized(), teardown_process_group()]
    # Error path, in a group of this rank alone (so a barrier would not block and only the destroy is tested):
    # the body's error passes through and the group is gone.
    _init(0, 1, f"{tmp}/init-alone-{rank}")
    with pytest.raises(ValueError, match="stage failed"), process_group_teardown():
        raise ValueError("stage failed")
    events.append(dist.is_initialized())
    Path(tmp, f"rank{rank}.txt").write_text(repr(events))


def test_two_ranks_end_with_the_group_destroyed(tmp_path: Path) -> None:
    # join=True raises if any rank raises or exits non-zero (e.g. an abort at interpreter exit).
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["[3.0, False, False, False]"] * 2


class _Tiny(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        return (self.w * batch[0]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 1)), batch_size=1)


class _Record(Callback):
    """Runs after the teardown callback: records whether the rank still has a process group."""

    def __init__(self, out: str) -> None:
        self.out = out

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        Path(self.out, f"rank{trainer.global_rank}.txt").write_text(repr(dist.is_initialized()))


def test_callback_is_picklable_and_inert_without_spawn(tmp_path: Path) -> None:
    callback = pickle.loads(pickle.dumps(spawn_teardown_callback()))
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
        callbacks=[callback],
    )
    trainer.fit(_Tiny())
    assert trainer.global_step == 1 and not dist.is_initialized()


def test_ddp_spawn_workers_destroy_their_group(tmp_path: Path) -> None:
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        default_root_dir=tmp_path, callbacks=[spawn_teardown_callback(), _Record(str(tmp_path))],
    )
    trainer.fit(_Tiny())  # Lightning's join raises if a worker exits non-zero
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["False", "False"]
