"""Run a function of a share of the data on two CPU processes (gloo) and gather what each rank returns: the
harness of the DDP equality tests (a rank's result against a single-process run on the union)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lsgs.distributed import process_group_teardown


def on_two_ranks(run: Callable[[slice], Any], split: int, out_dir: Path) -> list[Any]:
    """``run(slice(0, split))`` on rank 0 and ``run(slice(split, None))`` on rank 1, in one gloo process group.

    Args:
        run: a module-level function (the spawned processes import it by name), called inside the group.
        split: where rank 0's share of the samples ends and rank 1's begins.
        out_dir: an empty folder for the group's init file and the ranks' results.

    Returns:
        ``[rank 0's result, rank 1's result]``.
    """
    mp.spawn(_worker, args=(run, split, str(out_dir)), nprocs=2, join=True)
    assert not dist.is_initialized()
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


def _worker(rank: int, run: Callable[[slice], Any], split: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/init", rank=rank, world_size=2, timeout=timedelta(seconds=120)
    )
    with process_group_teardown():  # barrier + destroy_process_group (no barrier if this rank fails)
        part = slice(0, split) if rank == 0 else slice(split, None)
        torch.save(run(part), Path(out_dir) / f"rank{rank}.pt")
