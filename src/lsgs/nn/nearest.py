"""Nearest-code search: the one assignment rule shared by the quantiser, k-means and the aggregator.

Its own module (below both ``lsgs.nn.quantizer`` and ``lsgs.kmeans``) because the quantiser's k-means
initialisation calls ``lsgs.kmeans`` and k-means assigns points with this search: defined in either of them, it
would make the two import each other.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lsgs.nn.tracing import is_tracing


@torch.no_grad()
def nearest_codes(vectors: Tensor, codebook: Tensor, chunk_size: int = 8192) -> tuple[Tensor, Tensor]:
    """Nearest codebook entry (squared Euclidean distance) of every vector.

    Uses ``||z||^2 - 2 z.E^T + ||E||^2``: one matmul per chunk of ``chunk_size`` vectors, so the largest
    temporary is ``[chunk_size, K]``; an ``[N, K, D]`` difference tensor is never built. Runs in fp32 with
    autocast disabled whatever the input dtype. No gradient flows through the result.

    Args:
        vectors: ``[N, D]`` vectors to quantise (any float dtype, any device).
        codebook: ``[K, D]`` codebook, same device as ``vectors``.
        chunk_size: number of vectors per matmul; bounds peak memory at about ``4 * chunk_size * K`` bytes
            (while a graph is recorded, one matmul takes every vector).

    Returns:
        ``(indices, distances)``: ``[N]`` int64 index of the nearest code (ties go to the lowest index) and
        ``[N]`` float32 squared distance to it (clamped at 0: the expansion can round slightly below zero).

    Raises:
        ValueError: if the inputs are not 2-D, their last dimensions differ, or ``chunk_size`` is not
            positive.
    """
    if vectors.dim() != 2 or codebook.dim() != 2:
        raise ValueError(
            f"nearest_codes expects vectors [N, D] and codebook [K, D], got {tuple(vectors.shape)} "
            f"and {tuple(codebook.shape)}"
        )
    if vectors.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"vectors have dimension {vectors.shape[1]} but codebook entries have {codebook.shape[1]} "
            f"(shapes {tuple(vectors.shape)} and {tuple(codebook.shape)})"
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    with torch.autocast(device_type=vectors.device.type, enabled=False):
        codes = codebook.float()
        code_sq = codes.pow(2).sum(dim=1)  # [K]
        if is_tracing():
            # One block: a recorded graph would otherwise keep the example's chunk count and silently skip the
            # vectors of a larger batch. Each row's numbers are those of the chunked loop.
            return _nearest_block(vectors.float(), codes, code_sq)
        n = vectors.shape[0]
        indices = torch.empty(n, dtype=torch.int64, device=vectors.device)
        distances = torch.empty(n, dtype=torch.float32, device=vectors.device)
        for start in range(0, n, chunk_size):
            chunk = vectors[start : start + chunk_size].float()  # [n_c, D]
            indices[start : start + chunk_size], distances[start : start + chunk_size] = _nearest_block(
                chunk, codes, code_sq
            )
    return indices, distances


def _nearest_block(chunk: Tensor, codes: Tensor, code_sq: Tensor) -> tuple[Tensor, Tensor]:
    """Nearest code of each row of ``chunk`` ``[n_c, D]`` (fp32) among ``codes`` ``[K, D]`` (``code_sq`` their
    squared norms ``[K]``): ``([n_c]`` int64 indices, ``[n_c]`` float32 squared distances)."""
    # ||E||^2 - 2 z.E^T in one fused addmm; ||z||^2 is constant per row, so it is added only to the
    # minimum instead of to the whole [n_c, K] matrix.
    partial = torch.addmm(code_sq.unsqueeze(0), chunk, codes.t(), beta=1.0, alpha=-2.0)  # [n_c, K]
    # torch.min over a dim returns the first minimal index, which gives the documented tie rule.
    best, best_idx = partial.min(dim=1)
    return best_idx, (best + chunk.pow(2).sum(dim=1)).clamp_min(0.0)
