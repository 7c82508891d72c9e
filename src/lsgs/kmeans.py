"""Seeded k-means for the aggregated codebook (stage 2): FAISS on GPU when available, FAISS on CPU otherwise.

:func:`kmeans` is the production path. :func:`torch_kmeans` is plain Lloyd's in torch, kept only as a test
reference and as the comparison in ``benchmarks/kmeans.py``.

Sub-sampling follows FAISS's rule (more than ``max_points_per_centroid * K`` vectors -> a random subset of
that many) but is done here, seeded, before FAISS sees the data, so the k-means++ seeding, the FAISS
iterations and the reported inertia all use the same training points.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import faiss
import numpy as np
import torch
from torch import Tensor

from lsgs.errors import ConfigError
from lsgs.nn.nearest import nearest_codes

# FAISS warns (on stderr, from C++) below this many points per centroid; we warn in Python instead.
_MIN_POINTS_PER_CENTROID = 39


@dataclass
class KMeansResult:
    """Outcome of :func:`kmeans` / :func:`torch_kmeans`.

    Attributes:
        centroids: ``[K, D]`` float32 CPU tensor.
        inertia: mean squared distance of the training points (after sub-sampling) to their nearest centroid,
            computed with the final centroids.
        iterations: Lloyd iterations run.
        backend: ``"faiss-gpu"``, ``"faiss-cpu"`` or ``"torch"``.
        seconds: wall time of the whole call (sub-sampling, seeding, iterations, final inertia).
    """

    centroids: Tensor
    inertia: float
    iterations: int
    backend: str
    seconds: float


def faiss_gpu_available() -> bool:
    """Whether the installed FAISS was built with GPU support and sees at least one GPU."""
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return get_num_gpus is not None and get_num_gpus() > 0


def _resolve_use_gpu(use_gpu: bool | None) -> bool:
    """``None`` -> GPU if available; ``True`` without a GPU is an error (the user asked for it explicitly)."""
    if use_gpu is None:
        return faiss_gpu_available()
    if use_gpu and not faiss_gpu_available():
        raise ConfigError(
            "kmeans: use_gpu=True but FAISS has no GPU (faiss-cpu installed or no CUDA device visible); "
            "pass use_gpu=None to fall back to the CPU automatically, or install faiss-gpu"
        )
    return bool(use_gpu)


def _as_2d_tensor(vectors: Tensor | np.ndarray, name: str = "vectors") -> Tensor:
    """``[N, D]`` array or tensor -> detached tensor of the same dtype and device (no copy)."""
    if isinstance(vectors, np.ndarray):
        vectors = torch.from_numpy(vectors)
    if not isinstance(vectors, Tensor):
        raise ConfigError(
            f"kmeans: {name} must be a torch.Tensor or numpy.ndarray, got {type(vectors).__name__}"
        )
    if vectors.dim() != 2:
        raise ValueError(f"kmeans: {name} must be 2-D [N, D], got shape {tuple(vectors.shape)}")
    return vectors.detach()


def _check_args(vectors: Tensor, num_clusters: int, niter: int) -> None:
    for name, value in (("num_clusters", num_clusters), ("niter", niter)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"kmeans: {name} must be a positive int, got {value!r}")
    n, d = vectors.shape
    if d < 1:
        raise ValueError(f"kmeans: vectors have dimension 0 (shape {tuple(vectors.shape)})")
    if n < num_clusters:
        raise ConfigError(
            f"kmeans: got {n} vectors for {num_clusters} clusters; need at least as many vectors as clusters "
            f"(use more training images or a smaller codebook_size)"
        )
    if not torch.isfinite(vectors).all():
        bad = int((~torch.isfinite(vectors)).any(dim=1).sum())
        raise ValueError(f"kmeans: {bad} of {n} vectors contain NaN or infinite values")


def kmeans_plusplus(points: Tensor, num_clusters: int, *, seed: int = 0, chunk_size: int = 65536) -> Tensor:
    """Seeded k-means++ seeding (Arthur & Vassilvitskii, 2007).

    Hand-written because FAISS only gained k-means++ seeding in recent releases and the project supports
    ``faiss>=1.8``; this version is also seeded by torch and identical on every backend. Cost: ``K`` passes
    over the points (memory-bound, about ``K * N * D * 4`` bytes read: ~25 s for 262,144 x 512 into 1,024 on
    2 CPU cores, about as long as the 20 FAISS iterations themselves).

    Args:
        points: ``[N, D]`` float32 points, ``N >= num_clusters``.
        num_clusters: ``K``.
        seed: seed of the torch generator used for the first pick and the D^2 sampling.
        chunk_size: points per distance update (bounds the temporary to ``[chunk_size]``).

    Returns:
        ``[K, D]`` initial centres, each one of the points.
    """
    n = points.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    chosen = torch.empty(num_clusters, dtype=torch.int64)
    chosen[0] = torch.randint(n, (1,), generator=gen).item()
    # Chunked so no [N, D] temporary is allocated.
    sq_norms = torch.cat([part.pow(2).sum(dim=1) for part in points.split(chunk_size)])  # [N]
    min_d2 = torch.full((n,), float("inf"))
    for k in range(1, num_clusters + 1):
        centre = points[chosen[k - 1]]  # [D]
        centre_sq = centre.dot(centre)
        for start in range(0, n, chunk_size):
            # ||x||^2 - 2 x.c + ||c||^2 for one chunk; [chunk]
            d2 = torch.addmv(sq_norms[start : start + chunk_size], points[start : start + chunk_size], centre,
                             alpha=-2.0).add_(centre_sq).clamp_min_(0.0)
            view = min_d2[start : start + chunk_size]
            torch.minimum(view, d2, out=view)
        min_d2[chosen[k - 1]] = 0.0  # exact zero: rounding must not let a chosen point be drawn again
        if k == num_clusters:
            break
        # Inverse-CDF draw from D^2 (10x faster than torch.multinomial on 10^5+ weights). Points with weight 0
        # (already chosen) are never drawn: searchsorted(right=True) skips flat steps of the CDF.
        cdf = torch.cumsum(min_d2, dim=0, dtype=torch.float64)  # [N]
        total = float(cdf[-1])
        if total > 0.0:
            r = torch.rand((1,), generator=gen, dtype=torch.float64) * total
            chosen[k] = int(torch.searchsorted(cdf, r, right=True).clamp_max_(n - 1))
        else:  # fewer distinct points than clusters: any point is as good as another
            chosen[k] = int(torch.randint(n, (1,), generator=gen))
    return points[chosen].clone()


def _initial_centroids(
    points: Tensor, num_clusters: int, init: str | Tensor, seed: int
) -> Tensor | None:
    """``[K, D]`` initial centres, or ``None`` for FAISS's own random init."""
    if isinstance(init, Tensor):
        d = points.shape[1]
        if tuple(init.shape) != (num_clusters, d):
            raise ValueError(
                f"kmeans: init tensor has shape {tuple(init.shape)}, expected [num_clusters, D] = "
                f"{(num_clusters, d)}"
            )
        init = init.detach().to(device="cpu", dtype=torch.float32).contiguous()
        if not torch.isfinite(init).all():
            raise ValueError("kmeans: init tensor contains NaN or infinite values")
        return init
    if init == "random":
        return None
    if init == "kmeans++":
        return kmeans_plusplus(points, num_clusters, seed=seed)
    raise ConfigError(f"kmeans: init must be 'random', 'kmeans++' or a [K, D] tensor, got {init!r}")


def _subsample(vectors: Tensor, max_points: int, seed: int) -> Tensor:
    """At most ``max_points`` rows of ``vectors`` drawn without replacement (seeded), as FAISS does."""
    n = vectors.shape[0]
    if n <= max_points:
        return vectors
    gen = torch.Generator(device="cpu").manual_seed(seed)
    keep = torch.randperm(n, generator=gen)[:max_points].sort().values  # sorted: sequential memory access
    return vectors[keep.to(vectors.device)]


def kmeans(
    vectors: Tensor | np.ndarray,
    num_clusters: int,
    *,
    niter: int = 20,
    seed: int = 0,
    max_points_per_centroid: int = 256,
    init: str | Tensor = "random",
    use_gpu: bool | None = None,
    verbose: bool = False,
) -> KMeansResult:
    """Seeded k-means with FAISS (``faiss.Kmeans``), on GPU when FAISS has one, else on CPU.

    Args:
        vectors: ``[N, D]`` training vectors (tensor on any device, or a numpy array); copied to float32 CPU.
        num_clusters: number of centres ``K``.
        niter: Lloyd iterations (FAISS default is 25; 20 is a common choice for codebooks).
        seed: seeds the sub-sampling, the k-means++ seeding and FAISS (random init, empty-cluster splits).
        max_points_per_centroid: at most this many points per centre are used (seeded random subset), as in
            FAISS; larger data sets gain little from more points.
        init: ``"random"`` (FAISS default: ``K`` random training points), ``"kmeans++"`` (seeded k-means++
            computed in torch on the sub-sampled points), or a ``[K, D]`` tensor such as the current learned
            codebook.
        use_gpu: ``None`` = GPU if ``faiss_gpu_available()``; ``True`` = GPU or :class:`ConfigError`;
            ``False`` = CPU.
        verbose: let FAISS print its per-iteration log.

    Returns:
        :class:`KMeansResult` with ``centroids`` ``[K, D]`` float32 on the CPU.

    Raises:
        ConfigError: fewer vectors than clusters, non-positive ``num_clusters``/``niter``/
            ``max_points_per_centroid``, an unknown ``init`` string, or ``use_gpu=True`` without a GPU.
        ValueError: non-2-D or non-finite ``vectors``, or an ``init`` tensor of the wrong shape or non-finite.
    """
    start_time = time.perf_counter()
    if isinstance(max_points_per_centroid, bool) or not isinstance(max_points_per_centroid, int) or (
        max_points_per_centroid < 1
    ):
        raise ConfigError(
            f"kmeans: max_points_per_centroid must be a positive int, got {max_points_per_centroid!r}"
        )
    gpu = _resolve_use_gpu(use_gpu)
    x = _as_2d_tensor(vectors)
    _check_args(x, num_clusters, niter)
    n, d = x.shape
    # Sub-sample before converting, so a large (or GPU, or float64) input is copied only once, in part.
    x = _subsample(x, max_points_per_centroid * num_clusters, seed).to(device="cpu", dtype=torch.float32)
    x = x.contiguous()
    if verbose and x.shape[0] < n:
        print(f"kmeans: sub-sampled {x.shape[0]} of {n} vectors ({max_points_per_centroid} per centroid)")
    if x.shape[0] < _MIN_POINTS_PER_CENTROID * num_clusters:
        warnings.warn(
            f"kmeans: {x.shape[0]} vectors for {num_clusters} clusters is fewer than "
            f"{_MIN_POINTS_PER_CENTROID} per cluster; centres will be noisy",
            stacklevel=2,
        )
    init_centroids = _initial_centroids(x, num_clusters, init, seed)
    km = faiss.Kmeans(
        d,
        num_clusters,
        niter=niter,
        seed=seed,
        verbose=verbose,
        gpu=gpu,
        max_points_per_centroid=max_points_per_centroid,
        min_points_per_centroid=1,  # the warning above replaces FAISS's stderr one
    )
    points = x.numpy()
    km.train(points, init_centroids=None if init_centroids is None else init_centroids.numpy())
    # FAISS's objective is taken before the last centroid update; recompute with the final centres.
    # km.index holds exactly the final centroids after train().
    dist, _ = km.index.search(points, 1)
    return KMeansResult(
        centroids=torch.from_numpy(np.ascontiguousarray(km.centroids, dtype=np.float32)).clone(),
        inertia=float(dist.astype(np.float64).mean()),
        iterations=len(km.obj),
        backend="faiss-gpu" if gpu else "faiss-cpu",
        seconds=time.perf_counter() - start_time,
    )


def _split_empty_clusters(centroids: Tensor, counts: Tensor, gen: torch.Generator) -> int:
    """Re-seed empty clusters in place the way FAISS does: copy a big cluster's centre, perturb both copies.

    A cluster is chosen with probability proportional to ``size - 1``; its centre ``c`` becomes
    ``c * (1 + eps * sign)`` and ``c * (1 - eps * sign)``, ``eps = 1 / 1024``, and the sizes are halved.

    Returns:
        Number of clusters split.
    """
    eps = 1.0 / 1024
    counts = counts.clone().double()
    empty = torch.nonzero(counts == 0).flatten().tolist()
    splits = 0
    for ci in empty:
        weights = (counts - 1).clamp_min(0)
        if weights.sum() <= 0:  # nothing to split (every cluster has <= 1 point)
            break
        splits += 1
        cj = int(torch.multinomial(weights, 1, generator=gen))
        sign = torch.where(torch.arange(centroids.shape[1]) % 2 == 0, 1.0, -1.0).to(centroids)
        centroids[ci] = centroids[cj] * (1 + eps * sign)
        centroids[cj] = centroids[cj] * (1 - eps * sign)
        counts[ci] = counts[cj] / 2
        counts[cj] -= counts[ci]
    return splits


def torch_kmeans(
    vectors: Tensor | np.ndarray,
    num_clusters: int,
    *,
    niter: int = 20,
    seed: int = 0,
    init: str | Tensor = "random",
) -> KMeansResult:
    """Plain Lloyd's k-means in torch (no sub-sampling); only a reference for tests and the benchmark.

    Assignment uses the chunked fp32 :func:`~lsgs.nn.nearest.nearest_codes`; centres are means of their
    points; empty clusters are split as FAISS does. Runs on the device of ``vectors``.

    Args:
        vectors: ``[N, D]`` tensor or numpy array.
        num_clusters: ``K``.
        niter: Lloyd iterations.
        seed: seeds the random init, k-means++ and empty-cluster splits.
        init: ``"random"`` (``K`` distinct random points), ``"kmeans++"`` or a ``[K, D]`` tensor.

    Returns:
        :class:`KMeansResult` with ``backend="torch"`` and ``centroids`` ``[K, D]`` float32 on the CPU.

    Raises:
        ConfigError / ValueError: as :func:`kmeans`.
    """
    start_time = time.perf_counter()
    x = _as_2d_tensor(vectors).float().contiguous()
    _check_args(x, num_clusters, niter)
    n = x.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if isinstance(init, str) and init == "random":
        centroids = x[torch.randperm(n, generator=gen)[:num_clusters].to(x.device)].clone()
    else:
        init_c = _initial_centroids(x.cpu(), num_clusters, init, seed)
        assert init_c is not None
        centroids = init_c.to(x.device)
    iterations, previous = 0, None
    for _ in range(niter):
        assign, _ = nearest_codes(x, centroids)
        if previous is not None and torch.equal(assign, previous):
            break  # converged: FAISS stops here too (objective unchanged)
        previous = assign
        iterations += 1
        counts = torch.bincount(assign, minlength=num_clusters)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)  # [K, D]
        nonempty = counts > 0
        centroids[nonempty] = sums[nonempty] / counts[nonempty].unsqueeze(1).to(x.dtype)
        if not bool(nonempty.all()):
            cpu_c = centroids.cpu()
            _split_empty_clusters(cpu_c, counts.cpu(), gen)
            centroids = cpu_c.to(x.device)
    _, dist = nearest_codes(x, centroids)
    return KMeansResult(
        centroids=centroids.cpu().contiguous(),
        inertia=float(dist.double().mean()),
        iterations=iterations,
        backend="torch",
        seconds=time.perf_counter() - start_time,
    )
