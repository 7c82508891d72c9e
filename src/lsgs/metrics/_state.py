"""Zero-initialised, summed metric states without torchmetrics' second full-size copy.

torchmetrics keeps a deep copy of every state's default (in ``Metric._defaults``) to restore it on
``reset()``. For a ``[2, 2**20]`` int64 histogram that copy is another 16 MiB per state, i.e. half of the
memory of ``AnomalyMetrics`` with 15 categories. A zero default carries no information, so it is stored as a
zero-stride view of one element: ``reset()`` clones it into a fresh contiguous zero tensor as before. If a
future torchmetrics stores defaults differently, the plain ``add_state`` path is taken and only the saving is
lost.
"""

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric


def add_zero_state(
    metric: Metric, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.int64
) -> None:
    """``metric.add_state(name, zeros(shape), dist_reduce_fx="sum")`` with a one-element default copy.

    The state is registered with a one-element default and then given its full zero tensor, so no full-size
    copy is ever made (a made-and-freed copy would still cost resident memory through heap fragmentation).
    """
    if not isinstance(getattr(metric, "_defaults", None), dict):  # unknown torchmetrics internals: plain path
        metric.add_state(name, default=torch.zeros(shape, dtype=dtype), dist_reduce_fx="sum")
        return
    metric.add_state(name, default=torch.zeros((), dtype=dtype), dist_reduce_fx="sum")
    setattr(metric, name, torch.zeros(shape, dtype=dtype))
    metric._defaults[name] = torch.zeros((), dtype=dtype).expand(shape)


def shrink_default(metric: Metric, name: str) -> None:
    """Replace the stored default of a zero state by an expanded one-element zero of the same shape/dtype."""
    defaults = getattr(metric, "_defaults", None)
    default = defaults.get(name) if isinstance(defaults, dict) else None
    if isinstance(default, Tensor) and default.numel() > 1:
        defaults[name] = torch.zeros((), dtype=default.dtype, device=default.device).expand(default.shape)


class ZeroStateMixin:
    """Keeps the defaults of the states named in ``_zero_states`` small across ``.to(device)`` and friends.

    torchmetrics' ``_apply`` maps every default through the device/dtype function, which materialises an
    expanded view; shrink it again afterwards. Put before ``Metric`` in the bases.
    """

    _zero_states: Sequence[str] = ()

    def _apply(self, fn: Callable, *args, **kwargs) -> nn.Module:
        this = super()._apply(fn, *args, **kwargs)
        for name in self._zero_states:
            shrink_default(this, name)
        return this
