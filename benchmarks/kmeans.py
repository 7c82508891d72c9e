"""FAISS k-means (``lsgs.kmeans.kmeans``) against plain torch Lloyd's (``torch_kmeans``) on the same vectors.

Default size is the paper's aggregation problem: 262,144 x 512 float32 vectors (1,024 images x 256 codes) into
1,024 centres, 20 iterations. The data is a seeded Gaussian mixture with unequal component sizes and spreads,
closer to encoder outputs than isotropic noise. ``max_points_per_centroid`` is 256, so FAISS sees all 262,144
vectors and both runs solve the same problem; both report the mean squared distance to the final centres.

    python benchmarks/kmeans.py
    python benchmarks/kmeans.py --kmeanspp          # also time the k-means++ seeding
    python benchmarks/kmeans.py --n 65536 --k 256   # smaller run
"""

from __future__ import annotations

import argparse
import shlex
import sys

import faiss
import torch

from lsgs.kmeans import KMeansResult, kmeans, torch_kmeans


def gaussian_mixture(n: int, d: int, components: int, seed: int) -> torch.Tensor:
    """``[n, d]`` float32 samples of a mixture with Dirichlet-like weights and per-component scales."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(components, d, generator=gen) * 2.0
    weights = torch.rand(components, generator=gen).pow(2) + 0.05  # unequal cluster sizes
    scales = 0.3 + 0.7 * torch.rand(components, generator=gen)  # unequal spreads
    labels = torch.multinomial(weights, n, replacement=True, generator=gen)
    x = torch.randn(n, d, generator=gen)
    x.mul_(scales[labels].unsqueeze(1)).add_(means[labels])
    return x


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=262_144)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--k", type=int, default=1024)
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--components", type=int, default=4096, help="mixture components of the data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kmeanspp", action="store_true", help="also run FAISS with torch k-means++ seeding")
    args = parser.parse_args(argv)

    x = gaussian_mixture(args.n, args.d, args.components, args.seed)
    rows: list[tuple[str, KMeansResult]] = []
    rows.append(("FAISS (lsgs.kmeans.kmeans, init=random)",
                 kmeans(x, args.k, niter=args.niter, seed=args.seed, max_points_per_centroid=256)))
    rows.append(("torch Lloyd's (lsgs.kmeans.torch_kmeans, init=random)",
                 torch_kmeans(x, args.k, niter=args.niter, seed=args.seed)))
    if args.kmeanspp:
        rows.append(("FAISS, init=kmeans++ (seeding included)",
                     kmeans(x, args.k, niter=args.niter, seed=args.seed, init="kmeans++")))

    faiss_s, torch_s = rows[0][1].seconds, rows[1][1].seconds
    print(f"## k-means: {args.n:,} x {args.d} float32 -> {args.k:,} centres, {args.niter} iterations\n")
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), faiss {faiss.__version__} "
          f"({faiss.omp_get_max_threads()} threads); data: {args.components}-component Gaussian mixture, "
          f"seed {args.seed}\n")
    print("| implementation | backend | seconds | iterations | inertia (mean sq. distance) |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r.backend} | {r.seconds:.2f} | {r.iterations} | {r.inertia:.4f} |")
    print(f"\ntorch / FAISS time ratio: {torch_s / faiss_s:.2f}x")
    print(f"\ncommand: `python {shlex.join(['benchmarks/kmeans.py', *(argv or sys.argv[1:])])}`")


if __name__ == "__main__":
    main()
