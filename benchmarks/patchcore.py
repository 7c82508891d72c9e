"""PatchCore's two CPU costs on this machine: backbone forward (EfficientNet-Lite0, package weights) and the greedy
coreset (``lsgs.nn.patchcore.greedy_coreset``).

1. Lite0 forward at 224x224, batch 8, strides 8 and 16 (PatchCore's feature maps), as images/s.
2. Greedy coreset on seeded Gaussian features ``[N, D]`` (no cluster structure: the worst case of the pruning).
3. With ``--images DIR``: the patch features of every image in DIR (resized to 224, Lite0 strides 8 + 16,
   3x3 pooled: ``[n * 28 * 28, 152]``), then the coreset of them at each ``--fractions`` (the realistic case;
   MVTec 3D-AD ``tire`` has 210 training images -> 164,640 patches).

    python benchmarks/patchcore.py
    python benchmarks/patchcore.py --images /data/mvtec_3d/tire/train/good/rgb --fractions 0.01 0.1
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import torch
from PIL import Image
from timing import load_average

from lsgs.machine import cpu_name
from lsgs.nn.backbone import FeatureExtractor
from lsgs.nn.patchcore import PatchCoreNet, greedy_coreset

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def load_images(folder: Path, size: int) -> torch.Tensor:
    """``[n, 3, size, size]`` in [0, 1]: every image of ``folder``, sorted by name, resized (bilinear)."""
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        sys.exit(f"--images {folder}: no image files")
    arrays = [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.BILINEAR)) for p in paths]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255)


def time_coreset(features: torch.Tensor, fraction: float, label: str) -> None:
    start = time.perf_counter()
    picks = greedy_coreset(features, fraction)
    seconds = time.perf_counter() - start
    print(
        f"  coreset {label} {tuple(features.shape)}, fraction {fraction}: {picks.numel():,} picks in {seconds:.1f} s "
        f"({1e3 * seconds / picks.numel():.2f} ms/pick)"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5, help="timed forward batches (after one warm-up)")
    parser.add_argument("--n", type=int, default=20_000, help="Gaussian features: rows")
    parser.add_argument("--d", type=int, default=1_000, help="Gaussian features: dimension")
    parser.add_argument("--gaussian-fraction", type=float, default=0.1)
    parser.add_argument("--images", type=Path, help="a folder of training images for the realistic coreset")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1])
    args = parser.parse_args(argv)

    print(f"$ python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}, load {load_average()}"
    )
    backbone = FeatureExtractor("lite0", output_strides=(8, 16), weights="lite0-package")
    batch = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    backbone(batch)  # warm-up
    start = time.perf_counter()
    for _ in range(args.repeats):
        backbone(batch)
    seconds = (time.perf_counter() - start) / args.repeats
    print(
        f"  Lite0 forward {args.size}x{args.size}, batch {args.batch}, strides 8+16: {args.batch / seconds:.1f} "
        f"images/s (load {load_average()})"
    )

    gaussian = torch.randn(args.n, args.d, generator=torch.Generator().manual_seed(0))
    time_coreset(gaussian, args.gaussian_fraction, "Gaussian")

    if args.images is not None:
        images = load_images(args.images, args.size)
        net = PatchCoreNet()
        start = time.perf_counter()
        batches = [images[i : i + args.batch] for i in range(0, len(images), args.batch)]
        features = torch.cat([net.embed(backbone(b)) for b in batches])  # [n * h * w, D]
        print(
            f"  {len(images)} images -> patch features {tuple(features.shape)} in "
            f"{time.perf_counter() - start:.1f} s"
        )
        for fraction in args.fractions:
            time_coreset(features, fraction, args.images.name)
    print(f"load average after: {load_average()}")


if __name__ == "__main__":
    main()
