"""Per-class ("switched") EMA vector quantiser and prototype-transport score of HVQ-Trans (Lu et al., NeurIPS 2023).

One codebook per class: sample ``b`` of class ``c_b`` is quantised with codebook ``c_b`` only, and only the
codebooks of the classes present in a training batch move. The codebooks are moved by exponential moving
averages (VQ-VAE-2), not by gradients; the official code's ``Quantize`` computes exactly the project's
:func:`~lsgs.nn.quantizer.ema_codebook_update` (decay 0.99, Laplace smoothing with epsilon 1e-5), so that
function is reused per class, and :func:`~lsgs.nn.quantizer._all_reduce_sum_` sums the statistics over DDP
ranks. :class:`~lsgs.nn.quantizer.VectorQuantizer` itself does not fit: it holds one codebook, while here every
sample of a batch picks its own.

The "optimal transport" score of the official code (``models/HVQ_TR_switch_OT.py``, ``OT``) is not a Sinkhorn
or EMD solve: it is the cost of the one-sided conditional transport plan from each feature to the prototypes,
``sum_k p(k | x) (1 - cos(x, e_k))`` with ``p(k | x) = softmax_k(x . e_k / K)``; see
:func:`prototype_transport_score`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lsgs.nn.quantizer import EMA_EPSILON, _all_reduce_sum_, ema_codebook_update


def nearest_codes_per_sample(vectors: Tensor, codebooks: Tensor) -> Tensor:
    """Nearest code (squared Euclidean distance) of every vector in its own sample's codebook.

    ``||z||^2`` is constant per vector, so the search ranks ``||E||^2 - 2 z.E^T`` (one batched matmul). Runs
    in fp32 with autocast disabled: in bf16 nearby codes collide and the argmin becomes arbitrary.
    :func:`lsgs.nn.nearest.nearest_codes` is not used because it searches a single codebook.

    Args:
        vectors: ``[B, L, D]`` vectors.
        codebooks: ``[B, K, D]`` the codebook of each sample.

    Returns:
        ``[B, L]`` int64 indices (ties go to the lowest index).
    """
    with torch.autocast(device_type=vectors.device.type, enabled=False):
        codes = codebooks.float()
        code_sq = codes.pow(2).sum(dim=2)  # [B, K]
        partial = torch.baddbmm(
            code_sq.unsqueeze(1), vectors.float(), codes.transpose(1, 2), beta=1.0, alpha=-2.0
        )  # [B, L, K]
        return partial.argmin(dim=2)


def prototype_transport_score(vectors: Tensor, codebooks: Tensor) -> Tensor:
    """Prototype-oriented transport score of each vector against its sample's codebook (official ``OT``).

    ``score(x) = sum_k p(k | x) * (1 - cos(x, e_k))`` with ``p(k | x) = exp(x . e_k / K) / sum_j exp(x . e_j /
    K)``: the expected cosine dissimilarity when ``x`` is transported to the prototypes by the conditional plan
    ``p(. | x)``. The scale ``1 / K`` (``K`` = number of codes) is the official ``conditional_distribution``'s.
    The official code exponentiates without subtracting the maximum, which overflows to NaN for large dot
    products; ``softmax`` gives the same values where that one is finite. A zero vector or code has cosine 0
    (sklearn's ``cosine_similarity`` convention, which the official code calls).

    Args:
        vectors: ``[B, L, D]`` features (the official code scores the inputs of the lowest level's quantiser).
        codebooks: ``[B, K, D]`` the prototypes of each sample's class.

    Returns:
        ``[B, L]`` scores in ``[0, 2]``, fp32, without gradient.
    """
    with torch.no_grad(), torch.autocast(device_type=vectors.device.type, enabled=False):
        x, codes = vectors.float(), codebooks.float()
        cosine = torch.bmm(F.normalize(x, dim=2), F.normalize(codes, dim=2).transpose(1, 2))  # [B, L, K]
        plan = torch.softmax(torch.bmm(x, codes.transpose(1, 2)) / codes.shape[1], dim=2)  # [B, L, K]
        return (plan * (1.0 - cosine)).sum(dim=2)


@dataclass
class SwitchedQuantizerOutput:
    """Result of :meth:`SwitchedEMAQuantizer.forward`.

    Attributes:
        quantized: ``[B, L, D]`` the chosen codes in value, with the straight-through gradient to the input.
        indices: ``[B, L]`` int64 code indices in each sample's class codebook.
        commitment_loss: fp32 scalar ``mean ||sg[e] - z||^2`` over all samples, positions and channels (the
            official ``diff``); its gradient reaches the input only (the codes are buffers).
        codebooks: ``[B, K, D]`` the codebook each sample was quantised with (before this step's EMA update),
            detached; the transport score reads it.
    """

    quantized: Tensor
    indices: Tensor
    commitment_loss: Tensor
    codebooks: Tensor


class SwitchedEMAQuantizer(nn.Module):
    """``num_classes`` EMA-trained codebooks of ``K`` codes of dimension ``D``; each sample uses its class's.

    Initialisation as the official ``Quantize``: codes ``~ N(0, 1)``, EMA cluster sizes 0 and EMA sums equal to
    the codes. (With this start a code unused by a class's first batch ends with a tiny smoothed size and a
    huge norm, i.e. it is dead from then on; that is the official behaviour and is kept.)

    In training mode every forward makes one EMA step per class present in the batch of all ranks:
    ``ema_codebook_update`` with the counts and sums of that class's vectors, all-reduced under DDP, so every
    rank keeps the same codebooks and the result equals a single process on the union of the batches. The
    official code instead loops over the samples and makes one step per sample; the two coincide when each
    class appears at most once in a batch (see the module docstring of :mod:`lsgs.nn.hvq_trans`).

    Args:
        num_classes: number of codebooks ``N``.
        codebook_size: codes per codebook ``K``.
        dim: code dimension ``D``.
        decay: EMA decay in (0, 1).
        epsilon: Laplace-smoothing constant of the cluster sizes.

    Attributes:
        codebook: ``[N, K, D]`` buffer, the codes.
        cluster_size: ``[N, K]`` buffer, EMA of the number of vectors assigned to each code.
        embed_sum: ``[N, K, D]`` buffer, EMA of the sum of the vectors assigned to each code.
    """

    def __init__(
        self, num_classes: int, codebook_size: int, dim: int, decay: float = 0.99, epsilon: float = EMA_EPSILON
    ) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("codebook_size", codebook_size), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay!r}")
        if not epsilon > 0.0:
            raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
        self.num_classes = num_classes
        self.codebook_size = codebook_size
        self.dim = dim
        self.decay = float(decay)
        self.epsilon = float(epsilon)
        codebook = torch.randn(num_classes, codebook_size, dim)
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.zeros(num_classes, codebook_size))
        self.register_buffer("embed_sum", codebook.clone())

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, codebook_size={self.codebook_size}, dim={self.dim}, "
            f"decay={self.decay}, epsilon={self.epsilon}"
        )

    def forward(self, vectors: Tensor, class_index: Tensor) -> SwitchedQuantizerOutput:
        """Quantise every sample with its class's codebook; in training mode, then update those codebooks.

        Args:
            vectors: ``[B, L, D]`` vectors.
            class_index: ``[B]`` int64 class of each sample, in ``[0, N)`` (checked by the caller).

        Returns:
            :class:`SwitchedQuantizerOutput`.
        """
        codebooks = self.codebook[class_index]  # [B, K, D]
        indices = nearest_codes_per_sample(vectors, codebooks)  # [B, L]
        chosen = torch.gather(codebooks, 1, indices.unsqueeze(2).expand(-1, -1, self.dim))  # [B, L, D]
        commitment_loss = (chosen.float() - vectors.float()).pow(2).mean()  # fp32 also under autocast
        chosen = chosen.to(vectors.dtype)
        if self.training:
            self._update(vectors, indices, class_index)
        quantized = vectors + (chosen - vectors).detach()  # straight-through estimator
        return SwitchedQuantizerOutput(quantized, indices, commitment_loss, codebooks.detach())

    @torch.no_grad()
    def _update(self, vectors: Tensor, indices: Tensor, class_index: Tensor) -> None:
        """One EMA step for every class with vectors on any rank (all-reduced statistics)."""
        n, k, d = self.num_classes, self.codebook_size, self.dim
        slot = (class_index.unsqueeze(1) * k + indices).reshape(-1)  # [B * L] index into (class, code)
        flat = vectors.detach().float().reshape(-1, d)  # [B * L, D]
        # Counts and sums packed in one tensor, so one all-reduce carries both.
        stats = torch.zeros(n * k, d + 1, device=vectors.device)
        stats[:, :d].index_add_(0, slot, flat)
        stats[:, d].index_add_(0, slot, torch.ones_like(slot, dtype=stats.dtype))
        _all_reduce_sum_(stats)
        stats = stats.view(n, k, d + 1)  # [N, K, D + 1]
        present = (stats[:, :, d].sum(dim=1) > 0).nonzero().flatten().tolist()
        for c in present:  # every rank sees the same reduced counts, hence the same classes
            self.codebook[c] = ema_codebook_update(
                self.cluster_size[c], self.embed_sum[c], stats[c, :, d], stats[c, :, :d], self.decay, self.epsilon
            ).to(self.codebook.dtype)
