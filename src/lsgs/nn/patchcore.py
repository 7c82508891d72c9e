"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", CVPR 2022) as pure torch.

The method composes a frozen :class:`~lsgs.nn.backbone.FeatureExtractor` (two middle stages, e.g. strides 8 and
16) with :class:`PatchCoreNet`, which holds the memory bank and turns backbone features into anomaly maps:

1. :func:`locally_aware_features`: every map average-pooled over 3x3 neighbourhoods, the coarser ones resized
   (bilinear) to the first map's size, concatenated on channels. This is anomalib's form of the paper's
   neighbourhood aggregation (``AvgPool2d(3, 1, 1)``, zero padding counted, then ``F.interpolate(bilinear)``).
   No random projection of the embedding: the paper's code reduces wide-ResNet features (1536 dims) by
   adaptive average pooling, anomalib keeps them whole, and EfficientNet's middle stages are already small
   (Lite0/B0 strides 8 + 16: 40 + 112 = 152 dims; B4: 56 + 160 = 216).
2. :func:`greedy_coreset`: greedy k-center selection of the memory bank on a seeded Gaussian random projection.
3. Nearest-neighbour distance of each test patch to the bank: exact FAISS (:func:`nearest_neighbours_faiss`) or
   one matrix product + minimum in torch (:func:`nearest_neighbours_torch`, the exportable path).
4. :func:`anomaly_map`: patch distances resized (bilinear, as the paper's code; anomalib uses nearest) to the
   input size and blurred with a Gaussian of sigma 4 (:func:`gaussian_blur`).
5. Image score: :func:`reweighted_image_score` (the paper's Eq. 7, as anomalib's ``compute_anomaly_score``) or
   the plain maximum :func:`max_image_score`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

SEARCHES = ("torch", "faiss")


class Neighbours(NamedTuple):
    """Nearest memory-bank entries of query vectors.

    Attributes:
        distances: ``[N]`` (or ``[N, k]``) float32 Euclidean distances, ascending along ``k``.
        indices: ``[N]`` (or ``[N, k]``) int64 rows of the bank.
    """

    distances: Tensor
    indices: Tensor


# ------------------------------------------------------------------------------------------------ features


def locally_aware_features(features: Sequence[Tensor], patch_size: int = 3) -> Tensor:
    """PatchCore's locally aware patch features of several backbone maps.

    Each map is average-pooled over ``patch_size x patch_size`` neighbourhoods (stride 1, zero padding
    ``patch_size // 2`` counted in the average, as anomalib's ``AvgPool2d(3, 1, 1)``), the maps after the first
    are resized (bilinear, ``align_corners=False``) to the first map's size, and all are concatenated.

    Args:
        features: maps ``[B, C_i, h_i, w_i]``, finest first (e.g. strides 8 and 16).
        patch_size: odd neighbourhood size (the paper's p = 3).

    Returns:
        ``[B, sum(C_i), h_0, w_0]`` embedding, in the dtype of the inputs.

    Raises:
        ValueError: no maps, maps that are not 4-D or differ in batch size, or an even/non-positive
            ``patch_size``.
    """
    # Pairwise size checks, not a set of sizes: export tracers make sizes unhashable.
    if not features or any(f.dim() != 4 or f.shape[0] != features[0].shape[0] for f in features):
        raise ValueError(
            f"locally_aware_features expects maps [B, C_i, h_i, w_i] with one B, got "
            f"{[tuple(f.shape) for f in features]}"
        )
    if (
        isinstance(patch_size, bool)
        or not isinstance(patch_size, int)
        or patch_size < 1
        or patch_size % 2 == 0
    ):
        raise ValueError(f"patch_size must be a positive odd int, got {patch_size!r}")
    pooled = [F.avg_pool2d(f, patch_size, stride=1, padding=patch_size // 2) for f in features]
    size = pooled[0].shape[-2:]
    resized = [pooled[0]] + [
        F.interpolate(p, size=size, mode="bilinear", align_corners=False) for p in pooled[1:]
    ]
    return torch.cat(resized, dim=1)


def patch_rows(embedding: Tensor) -> Tensor:
    """``[B, D, h, w]`` embedding -> ``[B * h * w, D]`` patch vectors, row order (b, y, x)."""
    batch, dim, height, width = embedding.shape
    return embedding.permute(0, 2, 3, 1).reshape(batch * height * width, dim)  # [B*h*w, D]


# ------------------------------------------------------------------------------------------------- coreset


def gaussian_projection(in_dim: int, out_dim: int, seed: int = 0) -> Tensor:
    """The seeded Gaussian random projection of :func:`greedy_coreset`.

    Returns:
        ``[in_dim, out_dim]`` float32 CPU matrix with entries N(0, 1 / out_dim) (Johnson-Lindenstrauss scaling:
        squared norms are preserved in expectation), drawn from ``torch.Generator().manual_seed(seed)``.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(in_dim, out_dim, generator=generator) / math.sqrt(out_dim)


def coreset_start(num_points: int, seed: int = 0) -> int:
    """The first point of :func:`greedy_coreset`: ``torch.randint(num_points)`` from a generator seeded ``seed + 1``
    (another stream than the projection's, so the start does not depend on whether features are projected)."""
    generator = torch.Generator().manual_seed(seed + 1)
    return int(torch.randint(num_points, (1,), generator=generator).item())


@torch.no_grad()
def greedy_coreset(
    features: Tensor,
    fraction: float,
    projection_dim: int | None = 128,
    seed: int = 0,
    chunk_size: int = 65536,
) -> Tensor:
    """Greedy k-center coreset (the memory-bank subsampling of PatchCore).

    Features are first projected to ``projection_dim`` dimensions with :func:`gaussian_projection` (PatchCore
    projects to 128 for speed; anomalib uses a sparse random projection), unless ``projection_dim`` is None or
    not smaller than ``D``. Selection then starts from one seeded random point (:func:`coreset_start`), which is
    part of the coreset (the classical greedy 2-approximation; anomalib's ``KCenterGreedy`` uses its random
    point only as a first centre and does not keep it), and repeatedly adds the point farthest from the
    points selected so far (ties: lowest index). A step computes the distances to the new point of at most all
    ``N`` points (one ``[N, d] @ [d]`` product, usually far fewer: see :func:`_k_center_greedy`) and keeps an
    ``[N]`` vector of squared distances to the nearest selected point, so no ``N x N`` matrix is ever built.

    Args:
        features: ``[N, D]`` patch features (any float dtype, any device; computed in float32).
        fraction: share of points kept, in ``(0, 1]``; ``M = max(1, round(fraction * N))``.
        projection_dim: dimension of the random projection, or None for none.
        seed: seed of the projection and of the start point.
        chunk_size: rows projected per matrix product (bounds the temporary memory of the projection).

    Returns:
        ``[M]`` int64 indices into ``features``, in selection order, on the device of ``features``. Fewer than
        ``M`` only if every point already coincides with a selected one (duplicates, e.g. flat image regions):
        selection stops once the farthest point is within rounding distance of the coreset (squared distance
        at most ``1e-6 * max ||x||^2``, the float32 error of the expansion below), instead of adding copies.

    Raises:
        ValueError: ``features`` not 2-D or empty, ``fraction`` outside ``(0, 1]``, or a non-positive
            ``projection_dim`` / ``chunk_size``.
    """
    if features.dim() != 2 or features.shape[0] == 0:
        raise ValueError(f"greedy_coreset expects features [N, D] with N >= 1, got {tuple(features.shape)}")
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"coreset fraction must be in (0, 1], got {fraction!r}")
    if projection_dim is not None and (isinstance(projection_dim, bool) or projection_dim < 1):
        raise ValueError(f"projection_dim must be a positive int or None, got {projection_dim!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    num_points, dim = features.shape
    size = max(1, round(fraction * num_points))
    with torch.autocast(device_type=features.device.type, enabled=False):
        if projection_dim is not None and projection_dim < dim:
            projection = gaussian_projection(dim, projection_dim, seed).to(features.device)
            points = torch.cat(
                [features[s : s + chunk_size].float() @ projection for s in range(0, num_points, chunk_size)]
            )  # [N, d]
        else:
            points = features.float()
        if points.device.type != "cpu":
            return _k_center_greedy(points, size, coreset_start(num_points, seed))
        # On CPU the loop is thousands of small dependent steps; one thread avoids a thread-pool hand-off per
        # step, which costs more than it saves (tire features, 3,293 picks on 2 busy cores: 25 s with one
        # thread, 152 s with two).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return _k_center_greedy(points, size, coreset_start(num_points, seed))
        finally:
            torch.set_num_threads(threads)


# Slack on the pruning test below: float32 rounding of the squared distances must never prune a cluster whose
# points could move (a wider test only costs a few more distance computations).
_PRUNE_SLACK = 1.01


def _k_center_greedy(points: Tensor, size: int, start: int) -> Tensor:
    """Greedy k-center picks on ``points`` ``[N, d]`` from ``start``; see :func:`greedy_coreset`.

    The picks are those of the plain loop "distances of all N points to the new centre, element-wise minimum,
    argmax", but each step skips the points that cannot move, by the triangle inequality: a point ``x`` of the
    cluster of centre ``a`` (its nearest centre so far, at distance ``r_x <= R_a``, the cluster radius) has
    ``d(x, c) >= d(a, c) - r_x >= r_x`` whenever ``d(a, c) >= 2 R_a``, so only clusters with
    ``d(a, c) < 2 R_a`` are re-examined. Once the coreset has a few hundred centres most clusters are small and
    far from the new one: on the 164,640 Lite0 patch features of MVTec 3D-AD ``tire`` a late step touches ~3 %
    of the points, and 10 % (16,464 picks) takes 109 s instead of 428 s, with the same picks (one thread, busy
    2-core machine). Hand-written because no library offers exact greedy k-center with this pruning.
    """
    num_points, device = points.shape[0], points.device
    squared_norms = points.pow(2).sum(dim=1)  # [N]
    duplicate = 1e-6 * float(squared_norms.max())  # squared distances below this are rounding noise
    nearest = torch.full((num_points,), math.inf, device=device)  # [N] squared distance to the nearest centre
    owner = torch.zeros(num_points, dtype=torch.int64, device=device)  # [N] which centre that is
    centres = torch.empty(size, points.shape[1], device=device)  # [M, d]
    centre_norms = torch.empty(size, device=device)  # [M]
    radius = torch.zeros(size, device=device)  # [M] squared radius of each centre's cluster
    selected = torch.empty(size, dtype=torch.int64, device=device)
    index, count = start, 0
    while True:
        new = count
        selected[new], centres[new], centre_norms[new] = index, points[index], squared_norms[index]
        count += 1
        centre = points[index]
        if new > 0:
            to_centres = centre_norms[:new] - 2.0 * (centres[:new] @ centre) + squared_norms[index]  # [k]
            may_move = to_centres < 4.0 * _PRUNE_SLACK * radius[:new]  # d(a, c) < 2 R_a, squared  [k]
            rows = may_move[owner].nonzero().squeeze(1)  # points of those clusters
        if new == 0 or rows.numel() > num_points // 2:  # most points may move: one dense product is cheaper
            rows = torch.arange(num_points, device=device)
            distances = squared_norms - 2.0 * (points @ centre) + squared_norms[index]  # [N]
        else:
            distances = squared_norms[rows] - 2.0 * (points[rows] @ centre) + squared_norms[index]  # [n]
        closer = distances < nearest[rows]
        nearest[rows] = torch.where(closer, distances, nearest[rows])
        owner[rows] = torch.where(closer, new, owner[rows])
        nearest[index], owner[index] = 0.0, new  # exact zero: rounding never lets a centre be picked again
        # Radii of every cluster that was re-examined (all their points are in `rows`) and of the new one.
        if new > 0:
            radius[:new].masked_fill_(may_move, 0.0)
        radius.scatter_reduce_(0, owner[rows], nearest[rows], reduce="amax")
        if count == size:
            break
        index = int(torch.argmax(nearest).item())  # argmax returns the first maximum
        if nearest[index] <= duplicate:  # everything left duplicates a centre
            break
    return selected[:count]


# ---------------------------------------------------------------------------------------- nearest neighbour


def build_faiss_index(bank: Tensor) -> faiss.IndexFlatL2:
    """An exact FAISS L2 index over ``bank`` ``[M, D]`` (copied to CPU float32)."""
    if bank.dim() != 2 or bank.shape[0] == 0:
        raise ValueError(f"memory bank must be [M, D] with M >= 1, got {tuple(bank.shape)}")
    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(np.ascontiguousarray(bank.detach().float().cpu().numpy()))
    return index


def nearest_neighbours_faiss(queries: Tensor, bank: Tensor | faiss.IndexFlatL2, k: int = 1) -> Neighbours:
    """Exact nearest bank entries with FAISS (``IndexFlatL2``), the scoring path.

    Args:
        queries: ``[N, D]`` query vectors (any float dtype, any device).
        bank: ``[M, D]`` memory bank, or an index from :func:`build_faiss_index` (reused across calls).
        k: neighbours per query, ``1 <= k <= M``.

    Returns:
        :class:`Neighbours` with ``[N]`` tensors for ``k = 1``, else ``[N, k]`` (ascending distance), on the
        device of ``queries``; distances are Euclidean (FAISS's squared distances clamped at 0, square-rooted).

    Raises:
        ValueError: shapes that do not match or ``k`` out of range.
    """
    index = bank if isinstance(bank, faiss.Index) else build_faiss_index(bank)
    if queries.dim() != 2 or queries.shape[1] != index.d:
        raise ValueError(f"queries must be [N, {index.d}], got {tuple(queries.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= index.ntotal:
        raise ValueError(f"k must be in [1, {index.ntotal}] (the bank size), got {k!r}")
    squared, indices = index.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), k)
    distances = torch.from_numpy(squared).clamp_min_(0.0).sqrt_().to(queries.device)
    found = torch.from_numpy(indices).to(queries.device)
    return Neighbours(distances[:, 0], found[:, 0]) if k == 1 else Neighbours(distances, found)


def _nearest_block(queries: Tensor, bank: Tensor, bank_sq: Tensor) -> tuple[Tensor, Tensor]:
    # ||B||^2 - 2 q.B^T in one addmm; ||q||^2 is constant per row, so it is added to the minimum only.
    partial = torch.addmm(bank_sq.unsqueeze(0), queries, bank.t(), beta=1.0, alpha=-2.0)  # [n, M]
    best, best_index = partial.min(dim=1)  # the first minimum on ties
    return (best + queries.pow(2).sum(dim=1)).clamp_min(0.0).sqrt(), best_index


def nearest_neighbours_torch(queries: Tensor, bank: Tensor, chunk_size: int | None = 4096) -> Neighbours:
    """Nearest bank entry by one matrix product and a minimum, the exportable path.

    ``d = sqrt(max(0, ||q||^2 - 2 q.B^T + ||B||^2))`` in float32 with autocast off, ``chunk_size`` queries per
    product (the largest temporary is ``[chunk_size, M]``). With ``chunk_size=None`` there is one product and no
    Python loop, which is what ONNX export needs (a traced loop would freeze the number of chunks).

    Args:
        queries: ``[N, D]`` query vectors.
        bank: ``[M, D]`` memory bank, same device.
        chunk_size: queries per product, or None for all at once.

    Returns:
        :class:`Neighbours` of ``[N]`` float32 distances and ``[N]`` int64 bank rows (ties: lowest row).

    Raises:
        ValueError: shapes that do not match, an empty bank, or a non-positive ``chunk_size``.
    """
    if queries.dim() != 2 or bank.dim() != 2 or queries.shape[1] != bank.shape[1] or bank.shape[0] == 0:
        raise ValueError(
            f"expects queries [N, D] and a memory bank [M >= 1, D], got {tuple(queries.shape)} and "
            f"{tuple(bank.shape)}"
        )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    with torch.autocast(device_type=queries.device.type, enabled=False):
        queries, bank = queries.float(), bank.float()
        bank_sq = bank.pow(2).sum(dim=1)  # [M]
        if chunk_size is None or queries.shape[0] <= chunk_size:
            return Neighbours(*_nearest_block(queries, bank, bank_sq))
        parts = [
            _nearest_block(queries[s : s + chunk_size], bank, bank_sq)
            for s in range(0, queries.shape[0], chunk_size)
        ]
    return Neighbours(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))


# ---------------------------------------------------------------------------------------------- maps, scores


def gaussian_kernel_size(sigma: float) -> int:
    """``2 * int(4 * sigma + 0.5) + 1``: anomalib's size, and scipy's ``truncate=4`` radius (33 for sigma 4)."""
    return 2 * int(4.0 * sigma + 0.5) + 1


def gaussian_blur(maps: Tensor, sigma: float = 4.0) -> Tensor:
    """Gaussian blur per channel: separable 1-D convolutions with reflect padding.

    The kernel is ``exp(-x^2 / (2 sigma^2))`` over ``|x| <= radius = int(4 sigma + 0.5)``, normalised to sum 1,
    as anomalib's ``GaussianBlur2d`` and scipy's ``gaussian_filter``. Borders use torch's ``"reflect"`` padding
    (``d c b | a b c d``, the edge not repeated), as anomalib; this equals scipy's ``mode="mirror"``. scipy's
    default ``mode="reflect"`` (used by the paper's code) repeats the edge pixel, so it differs within
    ``radius`` pixels of the border. Written here (not kornia) because it is two ``conv2d`` calls and keeps the
    export free of extra dependencies.

    Args:
        maps: ``[B, C, H, W]`` with ``H, W > radius`` (reflect padding cannot be wider than the map).
        sigma: standard deviation in pixels, > 0.

    Returns:
        ``[B, C, H, W]`` blurred maps, same dtype.

    Raises:
        ValueError: ``maps`` not 4-D, ``sigma`` not positive, or a map too small for the kernel.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    radius = gaussian_kernel_size(sigma) // 2
    if maps.dim() != 4 or maps.shape[-2] <= radius or maps.shape[-1] <= radius:
        raise ValueError(
            f"gaussian_blur expects maps [B, C, H, W] with H, W > {radius} (sigma {sigma}), got {tuple(maps.shape)}"
        )
    batch, channels, height, width = maps.shape
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32, device=maps.device)
    kernel = torch.exp(-(offsets**2) / (2.0 * sigma**2))
    kernel = (kernel / kernel.sum()).to(maps.dtype)  # [K]
    x = maps.reshape(batch * channels, 1, height, width)  # every channel blurred alone
    x = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))  # along W
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))  # along H
    return x.reshape(batch, channels, height, width)


def anomaly_map(patch_distances: Tensor, image_size: Sequence[int], sigma: float | None = 4.0) -> Tensor:
    """Pixel map from patch distances: bilinear resize to the input size, then :func:`gaussian_blur`.

    Args:
        patch_distances: ``[B, h, w]`` nearest-neighbour distance of every patch.
        image_size: ``(H, W)`` of the input images.
        sigma: blur sigma in pixels (PatchCore: 4), or None for no blur.

    Returns:
        ``[B, 1, H, W]`` anomaly map.
    """
    maps = F.interpolate(
        patch_distances.unsqueeze(1), size=tuple(image_size), mode="bilinear", align_corners=False
    )  # [B, 1, H, W]
    return maps if sigma is None else gaussian_blur(maps, sigma)


def max_image_score(patch_distances: Tensor) -> Tensor:
    """The plain image score: the largest patch distance ``s*``, ``[B, ...]`` -> ``[B]``."""
    return patch_distances.flatten(1).amax(dim=1)


def reweighted_image_score(
    patch_features: Tensor,
    patch_distances: Tensor,
    nearest_indices: Tensor,
    bank: Tensor,
    num_neighbors: int = 9,
) -> Tensor:
    """The PatchCore image score (paper Eq. 7; anomalib ``compute_anomaly_score``).

    Per image: ``m_test`` is the patch with the largest nearest-neighbour distance ``s*``, ``m*`` its nearest
    bank entry, and ``N_b(m*)`` the ``b = num_neighbors`` bank entries nearest to ``m*``, ``m*`` itself
    included (first), as anomalib's top-``b`` search of the bank finds it. Then

        ``s = (1 - exp(||m_test - m*||) / sum_{m in N_b(m*)} exp(||m_test - m||)) * s*``,

    i.e. ``s*`` weighted by one minus the softmax weight of ``m*`` among its neighbourhood: a test patch whose
    nearest normal patch sits in a sparse region of the bank gets a higher score. ``b`` is capped at the bank
    size; with ``b = 1`` (the softmax is then 1) the score is ``s*``, as anomalib's ``num_neighbors=1`` branch.

    Args:
        patch_features: ``[B, P, D]`` patch vectors of each image.
        patch_distances: ``[B, P]`` their distances to the bank.
        nearest_indices: ``[B, P]`` int64 bank row of each patch's nearest entry.
        bank: ``[M, D]`` memory bank.
        num_neighbors: ``b`` (anomalib's default 9).

    Returns:
        ``[B]`` float32 image scores.
    """
    if isinstance(num_neighbors, bool) or not isinstance(num_neighbors, int) or num_neighbors < 1:
        raise ValueError(f"num_neighbors must be a positive int, got {num_neighbors!r}")
    batch = torch.arange(patch_distances.shape[0], device=patch_distances.device)
    star = patch_distances.argmax(dim=1)  # [B] the patch m_test of each image
    s_star = patch_distances[batch, star].float()  # [B]
    neighbours = min(num_neighbors, bank.shape[0])
    if neighbours == 1:
        return s_star
    with torch.autocast(device_type=bank.device.type, enabled=False):
        bank32 = bank.float()
        m_test = patch_features[batch, star].float()  # [B, D]
        m_star_index = nearest_indices[batch, star]  # [B]
        m_star = bank32[m_star_index]  # [B, D]
        # Squared distances m* -> bank by the expansion (only their order matters; torch.cdist does not export
        # to ONNX/OpenVINO reliably). [B, M]: one row per image.
        to_bank = bank32.pow(2).sum(dim=1).unsqueeze(0) - 2.0 * m_star @ bank32.t()
        # m* is its own first neighbour; -inf so rounding or duplicates never push it out of N_b(m*).
        to_bank = to_bank.scatter(1, m_star_index.unsqueeze(1), float("-inf"))
        support = to_bank.topk(neighbours, dim=1, largest=False).indices  # [B, b], m* first
        distances = (m_test.unsqueeze(1) - bank32[support]).norm(dim=2)  # [B, b] ||m_test - m||
        weight = 1.0 - torch.softmax(distances, dim=1)[:, 0]  # [B]
    return weight * s_star


# ------------------------------------------------------------------------------------------------- the net


@dataclass
class PatchCoreOutput:
    """Result of :meth:`PatchCoreNet.forward`.

    Attributes:
        anomaly_map: ``[B, 1, H, W]`` blurred pixel map at the input size.
        image_score: ``[B]`` the re-weighted score (Eq. 7), or the plain maximum if ``num_neighbors`` is 1.
        patch_distances: ``[B, h, w]`` distance of every patch to its nearest bank entry (before resizing).
    """

    anomaly_map: Tensor
    image_score: Tensor
    patch_distances: Tensor


class PatchCoreNet(nn.Module):
    """PatchCore's scoring head: backbone features -> anomaly maps and image scores, with the memory bank.

    It does not own the backbone: the method composes ``FeatureExtractor`` (frozen, shared with other methods
    and feature caches) and this module. The Gaussian blur is inside, because it is part of PatchCore's map
    (the paper's and anomalib's maps are blurred), so an export of this module gives the final map.

    The bank is a persistent buffer ``[M, D]``, empty until :meth:`set_memory_bank`; loading a state dict
    resizes it to the stored bank (its size is only known after fitting).

    Args:
        patch_size: neighbourhood of :func:`locally_aware_features` (3).
        num_neighbors: ``b`` of :func:`reweighted_image_score` (9); 1 gives the plain maximum.
        sigma: blur sigma in pixels (4), or None for the unblurred map.
        search: ``"torch"`` (matrix product, exportable) or ``"faiss"`` (exact ``IndexFlatL2``, rebuilt per
            call) for the patch nearest-neighbour search.
        chunk_size: queries per product of the torch search; None for one product (needed for ONNX export).
    """

    def __init__(
        self,
        patch_size: int = 3,
        num_neighbors: int = 9,
        sigma: float | None = 4.0,
        search: str = "torch",
        chunk_size: int | None = 4096,
    ) -> None:
        super().__init__()
        if search not in SEARCHES:
            raise ValueError(f"search={search!r} is not one of {SEARCHES}")
        self.patch_size = patch_size
        self.num_neighbors = num_neighbors
        self.sigma = sigma
        self.search = search
        self.chunk_size = chunk_size
        self.register_buffer("memory_bank", torch.empty(0, 0))

    def embed(self, features: Sequence[Tensor]) -> Tensor:
        """Patch vectors of backbone maps, as collected for the bank.

        Args:
            features: backbone maps ``[B, C_i, h_i, w_i]`` (finest first).

        Returns:
            ``[B * h * w, D]`` locally aware patch features, row order (b, y, x).
        """
        return patch_rows(locally_aware_features(features, self.patch_size))

    def set_memory_bank(self, bank: Tensor) -> None:
        """Store ``bank`` ``[M, D]`` (e.g. ``embeddings[greedy_coreset(embeddings, fraction)]``) as float32."""
        if bank.dim() != 2 or bank.shape[0] == 0:
            raise ValueError(f"memory bank must be [M, D] with M >= 1, got {tuple(bank.shape)}")
        self.memory_bank = bank.detach().float().to(self.memory_bank.device).contiguous()

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        stored = state_dict.get(prefix + "memory_bank")
        if isinstance(stored, Tensor):
            # Resize the (empty) buffer to the stored bank, so a fresh net loads a fitted one.
            self.memory_bank = torch.empty_like(stored, device=self.memory_bank.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, features: Sequence[Tensor], image_size: Sequence[int]) -> PatchCoreOutput:
        """Score images from their backbone features.

        Args:
            features: backbone maps ``[B, C_i, h_i, w_i]`` (finest first), ``sum(C_i) = D`` of the bank.
            image_size: ``(H, W)`` of the input images (the map is returned at that size).

        Returns:
            :class:`PatchCoreOutput`: ``anomaly_map`` ``[B, 1, H, W]``, ``image_score`` ``[B]``,
            ``patch_distances`` ``[B, h, w]``.

        Raises:
            RuntimeError: if no memory bank is set.
        """
        if self.memory_bank.numel() == 0:
            raise RuntimeError("PatchCoreNet has no memory bank: call set_memory_bank (fit) first")
        embedding = locally_aware_features(features, self.patch_size)  # [B, D, h, w]
        batch, dim, height, width = embedding.shape
        queries = patch_rows(embedding)  # [B*h*w, D]
        if self.search == "faiss":
            found = nearest_neighbours_faiss(queries, self.memory_bank)
        else:
            found = nearest_neighbours_torch(queries, self.memory_bank, self.chunk_size)
        patch_distances = found.distances.reshape(batch, height, width)  # [B, h, w]
        score = reweighted_image_score(
            queries.reshape(batch, height * width, dim),  # [B, P, D]
            found.distances.reshape(batch, height * width),  # [B, P]
            found.indices.reshape(batch, height * width),  # [B, P]
            self.memory_bank,
            self.num_neighbors,
        )
        return PatchCoreOutput(anomaly_map(patch_distances, image_size, self.sigma), score, patch_distances)
