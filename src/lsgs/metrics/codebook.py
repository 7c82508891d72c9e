"""Codebook usage statistics: how many codes a VQ-VAE actually uses, and its perplexity."""

from __future__ import annotations

import torch
from torchmetrics import Metric


def usage_statistics(counts: torch.Tensor) -> dict[str, float]:
    """Summarise code hit counts.

    Args:
        counts: ``[K]`` number of times each code was chosen.

    Returns:
        ``codes_used`` (codes chosen at least once) and ``perplexity`` (exp of the entropy of the code
        distribution; equals K for uniform use and 1 when one code takes everything).
    """
    total = counts.sum()
    if total <= 0:
        return {"codes_used": 0.0, "perplexity": float("nan")}
    probs = counts.double() / total
    nonzero = probs[probs > 0]
    entropy = -(nonzero * nonzero.log()).sum()
    return {"codes_used": float((counts > 0).sum()), "perplexity": float(entropy.exp())}


class CodebookUsage(Metric):
    """Counts code hits over an epoch; the counts add up across DDP ranks."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, codebook_size: int) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.add_state("counts", default=torch.zeros(codebook_size, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, indices: torch.Tensor) -> None:
        """Args: indices: code indices of any shape, values in ``[0, K)``."""
        self.counts += torch.bincount(indices.reshape(-1), minlength=self.codebook_size)

    def compute(self) -> dict[str, float]:
        return usage_statistics(self.counts)
