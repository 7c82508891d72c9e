"""Clean teardown of a ``torch.distributed`` process group at the end of a multi-process run.

Why this exists: Lightning destroys the default process group at interpreter exit only for NCCL. With gloo (CPU
DDP, the tests, torchrun on CPU) the group, its worker threads and rank 0's TCP store are left to interpreter
shutdown, where C++ destructors of still-running ``std::thread``s call ``std::terminate`` ("terminate called
without an active exception", exit status -6 / 134) after all results were written. A scheduler then reads
the finished run as failed. Every multi-process entry point therefore ends with :func:`teardown_process_group`,
usually through :func:`process_group_teardown`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and its default process group is initialised."""
    if "torch" not in sys.modules:  # nothing can be initialised; keeps `lsgs --help` from importing torch
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def teardown_process_group(barrier: bool = True) -> bool:
    """Wait for every rank (optional), then destroy the default process group. No-op when there is none.

    Tolerant of a group already destroyed (by Lightning, by an inner caller, or by this function earlier), so it
    is safe to nest and to call twice.

    Args:
        barrier: wait for every rank first, so rank 0 does not close the TCP store while another rank still
            talks to it. Pass ``False`` on an error path: the other ranks may never arrive.

    Returns:
        True if a process group was destroyed by this call.
    """
    if not is_distributed():
        return False
    import torch.distributed as dist

    try:
        if barrier:
            dist.barrier()
    finally:
        destroyed = _destroy()
    return destroyed


def _destroy() -> bool:
    import torch.distributed as dist

    if not dist.is_initialized():
        return False
    try:
        dist.destroy_process_group()
    except (RuntimeError, ValueError, AssertionError):
        # Destroyed between the check and here (e.g. by another handler): nothing left to do.
        return False
    return True


@contextmanager
def process_group_teardown() -> Iterator[None]:
    """Run the body; afterwards destroy the default process group if one is initialised (by the body or before).

    On normal exit all ranks meet at a barrier first; when the body raises there is no barrier (the other ranks
    may be gone or stuck) and the exception propagates unchanged. Outside a distributed run this does nothing.

    Example::

        with process_group_teardown():
            trainer.fit(model, datamodule=dm)   # Lightning may initialise gloo/NCCL here
    """
    try:
        yield
    except BaseException:
        teardown_process_group(barrier=False)
        raise
    teardown_process_group(barrier=True)


def spawn_teardown_callback() -> Any:
    """A Lightning callback that tears the process group down at the end of a ``ddp_spawn`` trainer call.

    Under ``strategy="ddp_spawn"`` the ranks are worker processes that Lightning starts for one ``fit`` /
    ``test`` / ``predict`` call and that exit right after it, so no code of ours runs at their end: the
    callback's ``teardown`` hook is the last place to meet at a barrier and destroy the group. Under every other
    launcher (torchrun, Lightning's ``ddp`` script launcher, one process) it does nothing, because the same
    process may run more trainer calls on the same group; there the entry point uses
    :func:`process_group_teardown`.
    """
    return __getattr__("SpawnedProcessGroupTeardown")()


def __getattr__(name: str) -> Any:
    # The callback class subclasses Lightning's Callback; it is built on first use so that importing this
    # module (which `lsgs --help` does) never imports Lightning. Pickling (ddp_spawn) finds it here by name.
    if name == "SpawnedProcessGroupTeardown":
        cls = _spawn_teardown_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _spawn_teardown_class() -> type:
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    class SpawnedProcessGroupTeardown(Callback):
        """See :func:`spawn_teardown_callback`."""

        @staticmethod
        def _spawned(trainer: Trainer) -> bool:
            return isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher)

        def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
            if self._spawned(trainer):
                teardown_process_group(barrier=True)

        def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
            if self._spawned(trainer):
                teardown_process_group(barrier=False)

    SpawnedProcessGroupTeardown.__qualname__ = "SpawnedProcessGroupTeardown"
    return SpawnedProcessGroupTeardown
