"""A distributed sampler for evaluation that never pads or duplicates samples."""

from __future__ import annotations

from collections.abc import Iterator, Sized

from torch.utils.data import DistributedSampler

from lsgs.errors import ConfigError


class EvalDistributedSampler(DistributedSampler):
    """Rank `r` of `W` takes indices `r, r + W, r + 2W, ...` of the data set, in order.

    torch's `DistributedSampler` pads the index list so every rank gets the same count, which repeats
    samples and biases metrics synced across ranks. Here ranks may differ by one sample and every index is
    seen exactly once. It subclasses `DistributedSampler` so Lightning keeps it instead of injecting its own.

    Args:
        dataset: the data set to split (only its length is used).
        num_replicas: world size W (>= 1).
        rank: this process's rank, 0 <= rank < W.
    """

    def __init__(self, dataset: Sized, num_replicas: int, rank: int) -> None:
        if num_replicas < 1:
            raise ConfigError(f"EvalDistributedSampler: num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ConfigError(f"EvalDistributedSampler: rank must be in [0, {num_replicas}), got {rank}")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        # Override the padded sizes the parent computed.
        self.total_size = len(dataset)
        self.num_samples = len(range(rank, self.total_size, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples
