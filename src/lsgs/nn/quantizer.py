"""Vector quantiser of the VQ-VAE: nearest-code search, straight-through estimator and the VQ losses.

By default (the paper's form) the codebook is a plain ``nn.Parameter`` trained by the paper's loss (eq. 4, van den
Oord et al. 2017): ``||sg[z_e] - e||^2`` moves the codes, ``beta * ||sg[e] - z_e||^2`` commits the encoder. Stage 2
(aggregated codebook) overwrites it with k-means centres through :meth:`VectorQuantizer.replace_codebook`.

Codebook-health options, all off by default (a default-constructed quantizer computes exactly what it did before
they existed, with the same state-dict keys):

- ``ema_decay``: codebook updated by exponential moving averages of the assigned encodings (VQ-VAE-2, Sonnet's
  ``VectorQuantizerEMA``) instead of by gradients; the codebook loss term is then dropped from :meth:`loss`.
- ``dead_code_threshold``: codes whose moving-average usage falls below the threshold are restarted on random
  encodings of the current batch (Jukebox; lucidrains' ``threshold_ema_dead_code``).
- ``kmeans_init``: the codebook starts as the k-means centres of the first batch(es) of encodings (SoundStream;
  lucidrains' ``kmeans_init``), clustered with the project's FAISS wrapper :func:`lsgs.kmeans.kmeans`.
- ``lookup_dim``: factorised codes (ViT-VQGAN, "Vector-quantized image modeling with improved VQGAN"): ``z_e`` is
  projected to a small dimension for the search, the codebook lives there, and the chosen code is projected back.
- ``l2_normalize``: inputs and codes are l2-normalised for the search (cosine similarity, also ViT-VQGAN).

Under DDP (``torch.distributed`` initialised) the EMA statistics and usage counts are all-reduced, restarts are
drawn on rank 0 and broadcast, and the k-means initialisation runs on rank 0 on the encodings of every rank, so
every rank keeps the same codebook.

The nearest-code search always runs in fp32 with autocast disabled: in bf16 the distances of nearby codes
collide and the argmin becomes arbitrary, which silently changes the code map the transformer is trained on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from lsgs.nn.nearest import nearest_codes
from lsgs.nn.tracing import is_tracing

# Decay of the usage average that drives dead-code restarts when the codebook is not EMA-trained
# (with ema_decay set, the EMA cluster sizes themselves are the usage average). 0.99 is the common EMA decay
# (VQ-VAE-2, Sonnet): a code unused for ~100 steps counts as dead.
USAGE_DECAY = 0.99
# Laplace-smoothing epsilon of the EMA cluster sizes (Sonnet's and VQ-VAE-2's default).
EMA_EPSILON = 1e-5


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


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


def validate_codebook_options(
    *,
    ema_decay: float | None = None,
    dead_code_threshold: float = 0.0,
    kmeans_init: bool = False,
    kmeans_init_batches: int = 1,
    lookup_dim: int | None = None,
    l2_normalize: bool = False,
    seed: int = 0,
    prefix: str = "",
    seed_name: str = "seed",
) -> None:
    """Check the codebook-health options of :class:`VectorQuantizer` (shared by the quantizer, ``VQVAEConfig``
    and the LightningModule, so each names the setting the way its user wrote it).

    Raises:
        ConfigError: naming ``prefix + <argument>`` (``seed`` is called ``seed_name``) and the value received.
    """
    from lsgs.errors import ConfigError  # local: the errors module is tiny, but keep nn importable on its own

    def number(value: object) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if ema_decay is not None and not (number(ema_decay) and 0.0 < ema_decay < 1.0):
        raise ConfigError(f"{prefix}ema_decay must be None (off) or a number in (0, 1), got {ema_decay!r}")
    if not (number(dead_code_threshold) and dead_code_threshold >= 0.0):
        raise ConfigError(
            f"{prefix}dead_code_threshold must be a number >= 0 (0 = off), got {dead_code_threshold!r}"
        )
    for name, flag in (("kmeans_init", kmeans_init), ("l2_normalize", l2_normalize)):
        if not isinstance(flag, bool):
            raise ConfigError(f"{prefix}{name} must be true or false, got {flag!r}")
    if isinstance(kmeans_init_batches, bool) or not isinstance(kmeans_init_batches, int) or kmeans_init_batches < 1:
        raise ConfigError(f"{prefix}kmeans_init_batches must be a positive int, got {kmeans_init_batches!r}")
    if lookup_dim is not None and (isinstance(lookup_dim, bool) or not isinstance(lookup_dim, int) or lookup_dim < 1):
        raise ConfigError(f"{prefix}lookup_dim must be None (off) or a positive int, got {lookup_dim!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"{prefix}{seed_name} must be an int >= 0, got {seed!r}")


def laplace_smoothed_sizes(cluster_size: Tensor, epsilon: float = EMA_EPSILON) -> Tensor:
    """Laplace-smoothed cluster sizes ``n~_i = (n_i + eps) / (n + K * eps) * n`` with ``n = sum_i n_i``.

    No code gets size 0 (so ``m_i / n~_i`` is defined for unused codes) and the total stays ``n``.

    Args:
        cluster_size: ``[K]`` non-negative EMA cluster sizes with a positive sum.
        epsilon: smoothing constant.

    Returns:
        ``[K]`` smoothed sizes, same dtype.
    """
    total = cluster_size.sum()
    return (cluster_size + epsilon) / (total + cluster_size.numel() * epsilon) * total


@torch.no_grad()
def ema_codebook_update(
    cluster_size: Tensor,
    embed_sum: Tensor,
    counts: Tensor,
    sums: Tensor,
    decay: float,
    epsilon: float = EMA_EPSILON,
) -> Tensor:
    """One EMA codebook step (van den Oord et al. 2017, appendix; VQ-VAE-2), updating the statistics in place.

    ``n_i <- decay * n_i + (1 - decay) * c_i``, ``m_i <- decay * m_i + (1 - decay) * s_i``, and the new code is
    ``e_i = m_i / n~_i`` with the Laplace-smoothed size ``n~_i`` of :func:`laplace_smoothed_sizes`.

    Args:
        cluster_size: ``[K]`` EMA of the number of vectors assigned to each code (updated in place).
        embed_sum: ``[K, C]`` EMA of the sum of the vectors assigned to each code (updated in place).
        counts: ``[K]`` vectors assigned to each code in this step (summed over DDP ranks).
        sums: ``[K, C]`` sum of the vectors assigned to each code in this step (summed over DDP ranks).
        decay: EMA decay in (0, 1).
        epsilon: Laplace-smoothing constant.

    Returns:
        ``[K, C]`` new codebook.
    """
    cluster_size.mul_(decay).add_(counts, alpha=1.0 - decay)
    embed_sum.mul_(decay).add_(sums, alpha=1.0 - decay)
    return embed_sum / laplace_smoothed_sizes(cluster_size, epsilon).unsqueeze(1)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over DDP ranks in place (a no-op without an initialised process group)."""
    if _world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


@dataclass
class QuantizerOutput:
    """Result of :meth:`VectorQuantizer.forward`.

    Attributes:
        quantized: ``[B, D, h, w]`` nearest codes in value (projected back to ``D`` with ``lookup_dim``), with the
            straight-through gradient to ``z_e``.
        indices: ``[B, h, w]`` int64 code indices.
        codebook_loss: scalar ``mean ||sg[z] - e||^2`` (gradient reaches the codebook only). ``z`` is ``z_e``, or
            its projection / l2-normalisation with ``lookup_dim`` / ``l2_normalize``. With ``ema_decay`` it has
            no gradient and is not part of :meth:`VectorQuantizer.loss` (logged as a diagnostic only).
        commitment_loss: scalar ``mean ||sg[e] - z||^2`` (gradient reaches the encoder, and the input projection
            with ``lookup_dim``); ``beta`` is applied by :meth:`VectorQuantizer.loss`.
    """

    quantized: Tensor
    indices: Tensor
    codebook_loss: Tensor
    commitment_loss: Tensor


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantiser with a learned codebook (van den Oord et al., 2017).

    With every option at its default this is the paper's quantiser: gradient-trained codebook, Euclidean search
    in ``D`` dimensions. The options change how the codebook is kept healthy; see the module docstring.

    Args:
        codebook_size: number of codes ``K``.
        code_dim: code dimension ``D`` (channels of ``z_e``).
        beta: commitment weight in :meth:`loss` (the paper uses 1).
        chunk_size: vectors per matmul in the nearest-code search (memory bound, see :func:`nearest_codes`).
        ema_decay: None (off) or the decay ``gamma`` in (0, 1) of EMA codebook updates (0.99 is usual): in training
            mode every forward updates the cluster-size and embedding-sum EMAs of the assigned vectors and sets
            the codes to their Laplace-smoothed ratio (:func:`ema_codebook_update`). The codebook then gets no
            gradient (``requires_grad=False``) and :meth:`loss` is ``beta * commitment_loss`` only.
        dead_code_threshold: 0 (off) or a usage threshold: after each training forward, codes whose moving-average
            usage (vectors per step, over all ranks; the EMA cluster size with ``ema_decay``, otherwise an average
            with decay :data:`USAGE_DECAY`) is below it are replaced by randomly chosen vectors of the current
            batch (in the lookup space), and their usage is reset to the threshold.
        kmeans_init: start the codebook from k-means (FAISS, :func:`lsgs.kmeans.kmeans`, 20 iterations) of the
            first ``kmeans_init_batches`` training batches' vectors (more batches if they hold fewer than ``K``
            vectors). Until then the random initial codebook is used.
        kmeans_init_batches: how many training batches k-means initialisation collects.
        lookup_dim: None (off) or the dimension ``d`` of a factorised lookup: ``z_e`` goes through a learned
            linear ``D -> d`` projection, the codebook is ``[K, d]``, and the chosen code goes through a learned
            ``d -> D`` projection; the VQ losses are measured in the ``d``-dimensional space.
        l2_normalize: l2-normalise the (projected) vectors and the codes before the search, i.e. pick the code
            of highest cosine similarity; the losses compare normalised vectors and the decoder receives the
            normalised code (projected back with ``lookup_dim``).
        seed: seed of the generator that picks restart vectors and of the k-means initialisation.

    Attributes:
        codebook: ``[K, C]`` parameter, ``C = lookup_dim or D``, initialised ``U(-1/K, 1/K)`` as in van den Oord
            et al. These are the raw codes; the search uses :meth:`effective_codebook` (normalised with
            ``l2_normalize``).
        project_in, project_out: the ``D -> d`` and ``d -> D`` linear layers with ``lookup_dim``, else None.
        cluster_size: ``[K]`` buffer of EMA usage counts (only with ``ema_decay`` or ``dead_code_threshold``).
        embed_sum: ``[K, C]`` buffer of EMA embedding sums (only with ``ema_decay``).
        initialised: bool buffer, whether k-means initialisation has run (only with ``kmeans_init``).
        num_restarts: codes restarted since this counter was last reset (a plain int, for logging).
    """

    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        beta: float = 1.0,
        chunk_size: int = 8192,
        *,
        ema_decay: float | None = None,
        dead_code_threshold: float = 0.0,
        kmeans_init: bool = False,
        kmeans_init_batches: int = 1,
        lookup_dim: int | None = None,
        l2_normalize: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_positive_int("codebook_size", codebook_size)
        _check_positive_int("code_dim", code_dim)
        _check_positive_int("chunk_size", chunk_size)
        if not beta >= 0.0:  # also rejects NaN
            raise ValueError(f"beta must be >= 0, got {beta!r}")
        validate_codebook_options(
            ema_decay=ema_decay,
            dead_code_threshold=dead_code_threshold,
            kmeans_init=kmeans_init,
            kmeans_init_batches=kmeans_init_batches,
            lookup_dim=lookup_dim,
            l2_normalize=l2_normalize,
            seed=seed,
        )
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.beta = float(beta)
        self.chunk_size = chunk_size
        self.ema_decay = None if ema_decay is None else float(ema_decay)
        self.dead_code_threshold = float(dead_code_threshold)
        self.kmeans_init = kmeans_init
        self.kmeans_init_batches = kmeans_init_batches
        self.lookup_dim = lookup_dim
        self.l2_normalize = l2_normalize
        self.seed = seed
        self.lookup_space_dim = lookup_dim if lookup_dim is not None else code_dim  # C
        self.codebook = nn.Parameter(torch.empty(codebook_size, self.lookup_space_dim))
        # Buffers exist only when their option is on, so the default state dict (and old checkpoints) keep
        # exactly the keys they had.
        if self.ema_decay is not None or self.dead_code_threshold > 0:
            self.register_buffer("cluster_size", torch.ones(codebook_size))
        if self.ema_decay is not None:
            self.register_buffer("embed_sum", torch.zeros(codebook_size, self.lookup_space_dim))
            self.codebook.requires_grad_(False)  # moved by the EMA, not by the optimiser
        if kmeans_init:
            self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))
        self.reset_parameters()
        self.project_in: nn.Linear | None = None
        self.project_out: nn.Linear | None = None
        if lookup_dim is not None:
            self.project_in = nn.Linear(code_dim, lookup_dim)
            self.project_out = nn.Linear(lookup_dim, code_dim)
        # Restart picks: seeded here, not checkpointed (a resumed run re-seeds it). Kept as the generator's state
        # tensor, not as a torch.Generator: a Generator attribute breaks pickling into spawned processes
        # (ddp_spawn, torch.multiprocessing).
        self._rng_state = torch.Generator().manual_seed(seed).get_state()
        self._kmeans_vectors: list[Tensor] = []
        self.num_restarts = 0

    # ------------------------------------------------------------------------------------------ state
    def reset_parameters(self) -> None:
        """Re-draw the codebook from ``U(-1/K, 1/K)`` (uses the global torch RNG); resets the EMA statistics to
        match it and marks k-means initialisation as not done."""
        bound = 1.0 / self.codebook_size
        nn.init.uniform_(self.codebook, -bound, bound)
        self._reset_statistics()
        if self.kmeans_init:
            self.initialised.fill_(False)

    @torch.no_grad()
    def _reset_statistics(self) -> None:
        # Sizes 1 and sums = codes: the smoothed sizes are then exactly 1 (eq. of laplace_smoothed_sizes with
        # all n_i equal), so codebook == embed_sum / n~ and the first EMA step starts from the current codes.
        if hasattr(self, "cluster_size"):
            self.cluster_size.fill_(1.0)
        if hasattr(self, "embed_sum"):
            self.embed_sum.copy_(self.codebook.detach().float())

    @torch.no_grad()
    def reset_codebook_statistics(self) -> None:
        """Call after setting the codebook by other means (aggregation, a loaded checkpoint): the EMA statistics
        restart from the current codes (sizes 1, sums = codes), usage averages restart at 1, and k-means
        initialisation is marked done so it never overwrites these codes."""
        self._reset_statistics()
        if self.kmeans_init:
            self.initialised.fill_(True)

    def options(self) -> dict[str, object]:
        """Constructor arguments other than ``codebook_size`` and ``code_dim`` (to build a sibling quantizer)."""
        return {
            "beta": self.beta,
            "chunk_size": self.chunk_size,
            "ema_decay": self.ema_decay,
            "dead_code_threshold": self.dead_code_threshold,
            "kmeans_init": self.kmeans_init,
            "kmeans_init_batches": self.kmeans_init_batches,
            "lookup_dim": self.lookup_dim,
            "l2_normalize": self.l2_normalize,
            "seed": self.seed,
        }

    def extra_repr(self) -> str:
        text = f"codebook_size={self.codebook_size}, code_dim={self.code_dim}, beta={self.beta}"
        defaults = {"ema_decay": None, "dead_code_threshold": 0.0, "kmeans_init": False, "lookup_dim": None,
                    "l2_normalize": False}
        changed = [f"{k}={getattr(self, k)}" for k, v in defaults.items() if getattr(self, k) != v]
        return ", ".join([text, *changed])

    # ------------------------------------------------------------------------------------------ spaces
    @property
    def _transforms_input(self) -> bool:
        return self.lookup_dim is not None or self.l2_normalize

    def to_lookup_space(self, vectors: Tensor) -> Tensor:
        """Map encodings to the space the search runs in: ``[..., D] -> [..., C]`` (projected with
        ``lookup_dim``, then l2-normalised with ``l2_normalize``; the identity by default)."""
        if self.project_in is not None:
            vectors = self.project_in(vectors)
        if self.l2_normalize:
            vectors = F.normalize(vectors, dim=-1)
        return vectors

    def effective_codebook(self, codes: Tensor | None = None) -> Tensor:
        """Codes as the search sees them: ``[K, C]`` (l2-normalised with ``l2_normalize``).

        Args:
            codes: a ``[K', C]`` raw codebook such as k-means centres; None uses :attr:`codebook`.
        """
        codes = self.codebook if codes is None else codes
        return F.normalize(codes, dim=-1) if self.l2_normalize else codes

    def from_lookup_space(self, codes: Tensor) -> Tensor:
        """``[..., C] -> [..., D]``: the output projection with ``lookup_dim``, else the identity."""
        return self.project_out(codes) if self.project_out is not None else codes

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, z_e: Tensor) -> QuantizerOutput:
        """Quantise encoder outputs; in training mode also update the codebook when an option asks for it.

        Args:
            z_e: ``[B, D, h, w]`` encoder output (any float dtype; channels_last is fine).

        Returns:
            :class:`QuantizerOutput` with ``quantized`` ``[B, D, h, w]`` in the dtype of ``z_e`` (of the output
            projection with ``lookup_dim``) and ``indices`` ``[B, h, w]``; both losses are fp32 scalars. The
            output uses the codebook as it was before this call's EMA update / restarts.

        Raises:
            ValueError: if ``z_e`` is not 4-D with ``D`` channels.
        """
        if z_e.dim() != 4 or z_e.shape[1] != self.code_dim:
            raise ValueError(f"z_e must be [B, {self.code_dim}, h, w], got {tuple(z_e.shape)}")
        b, _, h, w = z_e.shape
        # z: the vectors in the lookup space, [B, C, h, w]; z_e itself by default.
        z = self.to_lookup_space(z_e.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) if self._transforms_input else z_e
        c = z.shape[1]
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, c)  # [B*h*w, C]
        if self.training and self.kmeans_init and not bool(self.initialised):
            self._collect_for_kmeans(flat)  # may set the codebook before this batch is quantised
        codes = self.effective_codebook()  # [K, C]
        indices, _ = nearest_codes(flat, codes.detach(), self.chunk_size)
        indices = indices.view(b, h, w)
        # [B, C, h, w] in the codebook dtype, differentiable w.r.t. the codebook; no range check needed here.
        e = F.embedding(indices, codes).permute(0, 3, 1, 2)
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            zf = z.float()
            codebook_loss = F.mse_loss(e.float(), zf.detach())
            commitment_loss = F.mse_loss(zf, e.detach().float())
        # Straight-through written as e + (z - sg[z]) rather than z + sg[e - z]: same gradient (identity to z,
        # none to the codebook) but the value is exactly e, so decode(quantized) equals decode_indices(indices)
        # bit for bit.
        quantized = e.detach().to(z.dtype) + (z - z.detach())
        if self.project_out is not None:
            quantized = self.from_lookup_space(quantized.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if self.training:
            self._update_codebook(flat, indices.reshape(-1))
        return QuantizerOutput(quantized, indices, codebook_loss, commitment_loss)

    @torch.no_grad()
    def _update_codebook(self, flat: Tensor, indices: Tensor) -> None:
        """EMA step and dead-code restarts after a training forward. ``flat`` ``[N, C]``, ``indices`` ``[N]``."""
        if self.ema_decay is None and self.dead_code_threshold <= 0:
            return
        k = self.codebook_size
        counts = torch.bincount(indices, minlength=k).float()  # [K]
        if self.ema_decay is not None:
            sums = torch.zeros(k, flat.shape[1], device=flat.device).index_add_(0, indices, flat.float())  # [K, C]
            # One collective for both statistics: [K, 1 + C].
            stats = _all_reduce_sum_(torch.cat([counts.unsqueeze(1), sums], dim=1))
            new_codes = ema_codebook_update(
                self.cluster_size, self.embed_sum, stats[:, 0], stats[:, 1:], self.ema_decay, EMA_EPSILON
            )
            self.codebook.copy_(new_codes)
        else:
            _all_reduce_sum_(counts)
            self.cluster_size.mul_(USAGE_DECAY).add_(counts, alpha=1.0 - USAGE_DECAY)
        if self.dead_code_threshold > 0:
            self._restart_dead_codes(flat)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: Tensor) -> None:
        """Replace codes with usage below the threshold by random vectors of ``flat`` ``[N, C]`` (rank 0's batch
        under DDP, broadcast, so every rank makes the same replacement)."""
        dead = self.cluster_size < self.dead_code_threshold  # [K], identical on every rank (all-reduced usage)
        num_dead = int(dead.sum())
        if num_dead == 0:
            return
        available = flat.shape[0]
        generator = torch.Generator()
        generator.set_state(self._rng_state)
        if available >= num_dead:
            picks = torch.randperm(available, generator=generator)[:num_dead]
        else:  # fewer vectors than dead codes: draw with replacement
            picks = torch.randint(available, (num_dead,), generator=generator)
        self._rng_state = generator.get_state()
        vectors = flat[picks.to(flat.device)].float().contiguous()  # [num_dead, C]
        if _world_size() > 1:
            dist.broadcast(vectors, src=0)
        # Written through .data: autograd may hold the codebook for this step's backward (l2 normalisation saves
        # it). That step's gradient, computed before the restart, still reaches the restarted rows, as in
        # lucidrains' implementation; the rows are dead, so it is small.
        self.codebook.data[dead] = vectors.to(self.codebook.dtype)
        self.cluster_size[dead] = self.dead_code_threshold
        if self.ema_decay is not None:
            self.embed_sum[dead] = vectors * self.dead_code_threshold
        self.num_restarts += num_dead

    @torch.no_grad()
    def _collect_for_kmeans(self, flat: Tensor) -> None:
        """Keep ``flat`` ``[N, C]``; once enough batches (and at least ``K`` vectors over all ranks) are kept,
        set the codebook to their k-means centres (clustered once on rank 0, broadcast)."""
        self._kmeans_vectors.append(flat.float().cpu())
        local = sum(v.shape[0] for v in self._kmeans_vectors)
        total = int(_all_reduce_sum_(torch.tensor([local], dtype=torch.int64, device=flat.device)).item())
        if len(self._kmeans_vectors) < self.kmeans_init_batches or total < self.codebook_size:
            return
        vectors = torch.cat(self._kmeans_vectors)  # [n_local, C]
        self._kmeans_vectors = []
        world = _world_size()
        if world > 1:
            gathered: list[Tensor | None] = [None] * world
            dist.all_gather_object(gathered, vectors)  # rank order: deterministic
            vectors = torch.cat([g for g in gathered if g is not None])
        centres = torch.empty(self.codebook_size, flat.shape[1], device=flat.device)
        if world == 1 or dist.get_rank() == 0:
            from lsgs.kmeans import kmeans  # local import: lsgs.kmeans imports this module

            centres.copy_(kmeans(vectors, self.codebook_size, seed=self.seed).centroids)
        if world > 1:
            dist.broadcast(centres, src=0)
        self.codebook.copy_(centres)
        self.reset_codebook_statistics()

    # ------------------------------------------------------------------------------------------ codes
    def lookup(self, indices: Tensor) -> Tensor:
        """Codes of an index map (projected back to ``D`` with ``lookup_dim``).

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
        if indices.numel() > 0 and not is_tracing():  # a value check has no place in a recorded graph
            lo, hi = int(indices.min()), int(indices.max())
            # Checked here because an out-of-range index is a device-side assert on GPU (unrecoverable).
            if lo < 0 or hi >= self.codebook_size:
                raise ValueError(
                    f"indices must lie in [0, {self.codebook_size}), got values in [{lo}, {hi}]"
                )
        codes = F.embedding(indices.long(), self.effective_codebook())  # [B, h, w, C]
        if self.project_out is not None:
            codes = self.from_lookup_space(codes)  # [B, h, w, D]
        return codes.permute(0, 3, 1, 2)  # [B, h, w, D] -> [B, D, h, w]

    @torch.no_grad()
    def replace_codebook(self, centres: Tensor) -> None:
        """Overwrite the codebook in place (stage 2: aggregated codebook from k-means).

        The parameter object is kept, so modules and checkpoints that refer to it stay valid; optimiser state
        (e.g. Adam moments) for the old codes is not touched, so build a fresh optimiser afterwards. The EMA
        statistics restart from the new codes and k-means initialisation is marked done
        (:meth:`reset_codebook_statistics`).

        Args:
            centres: ``[K, C]`` new raw codes, in the lookup space (``C = lookup_dim or D``; normalised at use
                with ``l2_normalize``); copied, cast to the codebook's dtype and device.

        Raises:
            ValueError: on a shape mismatch (names both shapes) or non-finite values.
        """
        if tuple(centres.shape) != tuple(self.codebook.shape):
            dim_name = "lookup_dim" if self.lookup_dim is not None else "code_dim"
            raise ValueError(
                f"replace_codebook: centres have shape {tuple(centres.shape)} but the codebook has shape "
                f"{tuple(self.codebook.shape)} [codebook_size, {dim_name}]"
            )
        if not torch.isfinite(centres).all():
            raise ValueError("replace_codebook: centres contain NaN or infinite values")
        self.codebook.copy_(centres)
        self.reset_codebook_statistics()

    def with_codebook(self, centres: Tensor) -> VectorQuantizer:
        """A new quantizer with the same options and projections whose codebook is ``centres`` ``[K', C]``
        (``K'`` may differ from ``K``); statistics reset as in :meth:`replace_codebook`. The global RNG is left
        untouched."""
        if centres.dim() != 2 or centres.shape[1] != self.lookup_space_dim:
            raise ValueError(
                f"with_codebook: centres must be [K, {self.lookup_space_dim}], got {tuple(centres.shape)}"
            )
        with torch.random.fork_rng(devices=[]):
            new = VectorQuantizer(int(centres.shape[0]), self.code_dim, **self.options())  # type: ignore[arg-type]
        new.to(device=self.codebook.device, dtype=self.codebook.dtype)
        if self.project_in is not None and self.project_out is not None:
            assert new.project_in is not None and new.project_out is not None
            new.project_in.load_state_dict(self.project_in.state_dict())
            new.project_out.load_state_dict(self.project_out.state_dict())
        new.replace_codebook(centres)
        return new

    def loss(self, out: QuantizerOutput) -> Tensor:
        """VQ loss of eq. 4: ``codebook_loss + beta * commitment_loss``; with ``ema_decay`` the codebook term is
        dropped (the EMA moves the codes) and only ``beta * commitment_loss`` remains.

        Args:
            out: output of :meth:`forward`, or any object with ``codebook_loss`` and ``commitment_loss``
                (e.g. :class:`~lsgs.nn.vqvae.VQVAEOutput`).

        Returns:
            Scalar fp32 tensor.
        """
        if self.ema_decay is not None:
            return self.beta * out.commitment_loss
        return out.codebook_loss + self.beta * out.commitment_loss
