"""Vector quantiser of the VQ-VAE: nearest-code search, straight-through estimator and the VQ losses.

The codebook is a plain ``nn.Parameter`` trained by the paper's loss (eq. 4, van den Oord et al. 2017), not by
EMA updates: ``||sg[z_e] - e||^2`` moves the codes, ``beta * ||sg[e] - z_e||^2`` commits the encoder. Stage 2
(aggregated codebook) overwrites it with k-means centres through :meth:`VectorQuantizer.replace_codebook`.

The nearest-code search always runs in fp32 with autocast disabled: in bf16 the distances of nearby codes
collide and the argmin becomes arbitrary, which silently changes the code map the transformer is trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@torch.no_grad()
def nearest_codes(vectors: Tensor, codebook: Tensor, chunk_size: int = 8192) -> tuple[Tensor, Tensor]:
    """Nearest codebook entry (squared Euclidean distance) of every vector.

    Uses ``||z||^2 - 2 z.E^T + ||E||^2``: one matmul per chunk of ``chunk_size`` vectors, so the largest
    temporary is ``[chunk_size, K]``; an ``[N, K, D]`` difference tensor is never built. Runs in fp32 with
    autocast disabled whatever the input dtype. No gradient flows through the result.

    Args:
        vectors: ``[N, D]`` vectors to quantise (any float dtype, any device).
        codebook: ``[K, D]`` codebook, same device as ``vectors``.
        chunk_size: number of vectors per matmul; bounds peak memory at about ``4 * chunk_size * K`` bytes.

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
    _check_positive_int("chunk_size", chunk_size)
    n = vectors.shape[0]
    indices = torch.empty(n, dtype=torch.int64, device=vectors.device)
    distances = torch.empty(n, dtype=torch.float32, device=vectors.device)
    with torch.autocast(device_type=vectors.device.type, enabled=False):
        codes = codebook.float()
        code_sq = codes.pow(2).sum(dim=1)  # [K]
        for start in range(0, n, chunk_size):
            chunk = vectors[start : start + chunk_size].float()  # [n_c, D]
            # ||E||^2 - 2 z.E^T in one fused addmm; ||z||^2 is constant per row, so it is added only to the
            # minimum instead of to the whole [n_c, K] matrix.
            partial = torch.addmm(code_sq.unsqueeze(0), chunk, codes.t(), beta=1.0, alpha=-2.0)  # [n_c, K]
            # torch.min over a dim returns the first minimal index, which gives the documented tie rule.
            best, best_idx = partial.min(dim=1)
            indices[start : start + chunk_size] = best_idx
            distances[start : start + chunk_size] = (best + chunk.pow(2).sum(dim=1)).clamp_min_(0.0)
    return indices, distances


def code_counts(indices: Tensor, codebook_size: int) -> Tensor:
    """How often each code is used; summable over batches and DDP ranks before computing usage statistics.

    Args:
        indices: integer code indices of any shape, e.g. ``[B, h, w]``, values in ``[0, codebook_size)``.
        codebook_size: ``K``.

    Returns:
        ``[K]`` int64 counts on the device of ``indices``.
    """
    return torch.bincount(indices.reshape(-1), minlength=codebook_size)


def codebook_perplexity(counts: Tensor) -> Tensor:
    """Perplexity ``exp(H(p))`` of the code distribution ``p = counts / counts.sum()``.

    Equals the number of codes when all are used equally and 1 when a single code is used.

    Args:
        counts: ``[K]`` code counts (e.g. from :func:`code_counts`), not all zero.

    Returns:
        Scalar float32 tensor.
    """
    p = counts.float() / counts.sum().clamp_min(1).float()
    # xlogy gives 0 * log 0 = 0 for unused codes.
    return torch.exp(-torch.special.xlogy(p, p).sum())


@dataclass
class QuantizerOutput:
    """Result of :meth:`VectorQuantizer.forward`.

    Attributes:
        quantized: ``[B, D, h, w]`` nearest codes in value, with the straight-through gradient to ``z_e``.
        indices: ``[B, h, w]`` int64 code indices.
        codebook_loss: scalar ``mean ||sg[z_e] - e||^2`` (gradient reaches the codebook only).
        commitment_loss: scalar ``mean ||sg[e] - z_e||^2`` (gradient reaches the encoder only); ``beta`` is
            applied by :meth:`VectorQuantizer.loss`.
    """

    quantized: Tensor
    indices: Tensor
    codebook_loss: Tensor
    commitment_loss: Tensor


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantiser with a learned codebook (van den Oord et al., 2017).

    Args:
        codebook_size: number of codes ``K``.
        code_dim: code dimension ``D`` (channels of ``z_e``).
        beta: commitment weight in :meth:`loss` (the paper uses 1).
        chunk_size: vectors per matmul in the nearest-code search (memory bound, see :func:`nearest_codes`).

    Attributes:
        codebook: ``[K, D]`` parameter, initialised ``U(-1/K, 1/K)`` as in van den Oord et al.
    """

    def __init__(self, codebook_size: int, code_dim: int, beta: float = 1.0, chunk_size: int = 8192) -> None:
        super().__init__()
        _check_positive_int("codebook_size", codebook_size)
        _check_positive_int("code_dim", code_dim)
        _check_positive_int("chunk_size", chunk_size)
        if not beta >= 0.0:  # also rejects NaN
            raise ValueError(f"beta must be >= 0, got {beta!r}")
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.beta = float(beta)
        self.chunk_size = chunk_size
        self.codebook = nn.Parameter(torch.empty(codebook_size, code_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw the codebook from ``U(-1/K, 1/K)`` (uses the global torch RNG)."""
        bound = 1.0 / self.codebook_size
        nn.init.uniform_(self.codebook, -bound, bound)

    def extra_repr(self) -> str:
        return f"codebook_size={self.codebook_size}, code_dim={self.code_dim}, beta={self.beta}"

    def forward(self, z_e: Tensor) -> QuantizerOutput:
        """Quantise encoder outputs.

        Args:
            z_e: ``[B, D, h, w]`` encoder output (any float dtype; channels_last is fine).

        Returns:
            :class:`QuantizerOutput` with ``quantized`` ``[B, D, h, w]`` in the dtype of ``z_e`` and
            ``indices`` ``[B, h, w]``; both losses are fp32 scalars.

        Raises:
            ValueError: if ``z_e`` is not 4-D with ``D`` channels.
        """
        if z_e.dim() != 4 or z_e.shape[1] != self.code_dim:
            raise ValueError(f"z_e must be [B, {self.code_dim}, h, w], got {tuple(z_e.shape)}")
        b, d, h, w = z_e.shape
        flat = z_e.detach().permute(0, 2, 3, 1).reshape(-1, d)  # [B*h*w, D]
        indices, _ = nearest_codes(flat, self.codebook.detach(), self.chunk_size)
        indices = indices.view(b, h, w)
        # [B, D, h, w] in the codebook dtype, differentiable w.r.t. the codebook; no range check needed here.
        e = F.embedding(indices, self.codebook).permute(0, 3, 1, 2)
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            z = z_e.float()
            codebook_loss = F.mse_loss(e.float(), z.detach())
            commitment_loss = F.mse_loss(z, e.detach().float())
        # Straight-through written as e + (z_e - sg[z_e]) rather than z_e + sg[e - z_e]: same gradient
        # (identity to z_e, none to the codebook) but the value is exactly e, so decode(quantized) equals
        # decode_indices(indices) bit for bit.
        quantized = e.detach().to(z_e.dtype) + (z_e - z_e.detach())
        return QuantizerOutput(quantized, indices, codebook_loss, commitment_loss)

    def lookup(self, indices: Tensor) -> Tensor:
        """Codes of an index map.

        Args:
            indices: ``[B, h, w]`` integer indices in ``[0, K)``.

        Returns:
            ``[B, D, h, w]`` codes, in the codebook dtype.

        Raises:
            ValueError: if ``indices`` is not a 3-D integer tensor or holds a value outside ``[0, K)``.
        """
        if indices.dim() != 3 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise ValueError(
                f"indices must be an integer tensor [B, h, w], got shape {tuple(indices.shape)} "
                f"dtype {indices.dtype}"
            )
        if indices.numel() > 0:
            lo, hi = int(indices.min()), int(indices.max())
            # Checked here because an out-of-range index is a device-side assert on GPU (unrecoverable).
            if lo < 0 or hi >= self.codebook_size:
                raise ValueError(
                    f"indices must lie in [0, {self.codebook_size}), got values in [{lo}, {hi}]"
                )
        return F.embedding(indices.long(), self.codebook).permute(0, 3, 1, 2)  # [B, h, w, D] -> [B, D, h, w]

    @torch.no_grad()
    def replace_codebook(self, centres: Tensor) -> None:
        """Overwrite the codebook in place (stage 2: aggregated codebook from k-means).

        The parameter object is kept, so modules and checkpoints that refer to it stay valid; optimiser state
        (e.g. Adam moments) for the old codes is not touched, so build a fresh optimiser afterwards.

        Args:
            centres: ``[K, D]`` new codes (copied, cast to the codebook's dtype and device).

        Raises:
            ValueError: on a shape mismatch (names both shapes) or non-finite values.
        """
        if tuple(centres.shape) != tuple(self.codebook.shape):
            raise ValueError(
                f"replace_codebook: centres have shape {tuple(centres.shape)} but the codebook has shape "
                f"{tuple(self.codebook.shape)} [codebook_size, code_dim]"
            )
        if not torch.isfinite(centres).all():
            raise ValueError("replace_codebook: centres contain NaN or infinite values")
        self.codebook.copy_(centres)

    def loss(self, out: QuantizerOutput) -> Tensor:
        """VQ loss of eq. 4: ``codebook_loss + beta * commitment_loss``.

        Args:
            out: output of :meth:`forward`.

        Returns:
            Scalar fp32 tensor.
        """
        return out.codebook_loss + self.beta * out.commitment_loss
