"""Read a metric's states as ``compute()`` sees them: reduced over DDP ranks."""

from torch import Tensor
from torchmetrics import Metric


def synced_states(metric: Metric) -> dict[str, Tensor | list[Tensor]]:
    """Copies of ``metric``'s states reduced over all DDP ranks (local states when not distributed).

    torchmetrics only syncs inside ``compute()``; extra query methods (``dice_at``, ``curves``, ``quantile``)
    call this so that they see the same global data. Like ``compute()`` it is a collective: under DDP every
    rank must call it, in the same order.

    Args:
        metric: any torchmetrics Metric.

    Returns:
        state name -> tensor (or list of tensors for ``cat`` states), detached copies that later updates do
        not alter.
    """
    with metric.sync_context(dist_sync_fn=metric.dist_sync_fn, should_sync=metric.sync_on_compute):
        return {
            name: [v.detach().clone() for v in value] if isinstance(value, list) else value.detach().clone()
            for name, value in metric.metric_state.items()
        }
