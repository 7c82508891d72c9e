"""What the feature methods cost on this machine: the frozen backbone, PatchCore's memory bank (coreset and
search) and HVQ-Trans training, with the fp32 matmul peak measured in the same run.

1. Backbone forward (frozen EfficientNet, ``lsgs.nn.backbone.FeatureExtractor``, no gradient) at 224 x 224,
   batch 8: Lite0 at PatchCore's strides 8 + 16 and at HVQ-Trans's 2/4/8/16, B4 at HVQ-Trans's (random weights:
   the cost does not depend on the values).
2. PatchCore's memory bank: the locally aware patch features of every image of ``--images`` (tire's 210
   training images: 210 x 28 x 28 = 164,640 patches of 152 dims with Lite0), the greedy coreset at
   ``--fraction`` (10 %: tire's bank of 16,464 entries) and the nearest-neighbour search of the patches of one
   batch of 8 images (6,272 queries) against that bank, by FAISS (``IndexFlatL2``, exact) and by the torch matrix
   product and minimum (``nearest_neighbours_torch``, the exportable path). Without ``--images``: seeded Gaussian
   features of ``--n`` rows instead (no cluster structure: the worst case of the coreset's pruning).
3. HVQ-Trans training throughput with the features cached (what an epoch costs once the feature cache exists):
   forward + loss + backward + gradient clipping 0.1 + AdamW step, batch 16, the official model (EfficientNet-B4
   features: 272 channels on the 14 x 14 grid, 15 classes, a batch spread over them) and the CPU configuration's
   (Lite0 features: 192 channels, one class). Model FLOPs per image from ``torch.utils.flop_counter`` over one
   step; % of the fp32 matmul peak (best 4096^3 product, measured before and after, the better kept).

    python benchmarks/feature_methods.py --images /data/mvtec_3d/tire/train/good/rgb
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch
from timing import load_average, matmul_peak_gflops, timed
from torch.utils.flop_counter import FlopCounterMode

from data_modules.image_io import IMAGE_SUFFIXES
from lsgs.inference.inputs import load_batch
from lsgs.machine import cpu_name
from lsgs.nn.backbone import FeatureExtractor
from lsgs.nn.hvq_trans import HVQTransConfig, HVQTransNet
from lsgs.nn.patchcore import (
    PatchCoreNet,
    build_faiss_index,
    greedy_coreset,
    nearest_neighbours_faiss,
    nearest_neighbours_torch,
)


def backbone_rows(batch: int, size: int, repeats: int) -> list[str]:
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    rows = []
    for name, strides, use in (
        ("lite0", (8, 16), "PatchCore"), ("lite0", (2, 4, 8, 16), "HVQ-Trans CPU"), ("b4", (2, 4, 8, 16), "HVQ-Trans"),
    ):  # fmt: skip
        torch.manual_seed(0)
        extractor = FeatureExtractor(name, strides)
        with torch.no_grad():
            seconds = statistics.median(timed(lambda e=extractor: e(images), repeats))
        rows.append(f"| backbone {name}, strides {'/'.join(map(str, strides))} ({use}), {size} px, batch {batch} "
                    f"| {batch / seconds:.1f} images/s |")  # fmt: skip
    return rows


def load_images(folder: Path, size: int) -> torch.Tensor:
    """``[n, 3, size, size]`` in [0, 1]: every image of ``folder``, sorted by name, prepared as the inferencer
    prepares files (``lsgs.inference.inputs.load_batch``: RGB, bilinear resize from the original)."""
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        sys.exit(f"--images {folder}: no image files")
    return load_batch(paths, size, 3)[0]


def patchcore_rows(images: Path | None, n: int, fraction: float, batch: int, repeats: int) -> list[str]:
    torch.manual_seed(0)
    extractor = FeatureExtractor("lite0", (8, 16), weights="lite0-package")
    head = PatchCoreNet()
    rows = []
    if images is not None:
        pictures = load_images(images, 224)
        start = time.perf_counter()
        with torch.no_grad():
            patches = torch.cat([head.embed(extractor(pictures[i : i + 16])) for i in range(0, len(pictures), 16)])
        rows.append(f"| patch features of {len(pictures)} images ({images.name if images.name != 'rgb' else images}) "
                    f"| {tuple(patches.shape)} in {time.perf_counter() - start:.1f} s |")  # fmt: skip
        queries = patches[: batch * 28 * 28]  # the patches of the first `batch` images: [batch * 784, 152]
    else:
        generator = torch.Generator().manual_seed(0)
        patches = torch.randn(n, 152, generator=generator)
        queries = torch.randn(batch * 28 * 28, 152, generator=generator)
        rows.append(f"| patch features: seeded Gaussian (no --images) | {tuple(patches.shape)} |")
    start = time.perf_counter()
    chosen = greedy_coreset(patches, fraction)
    seconds = time.perf_counter() - start
    bank = patches[chosen].contiguous()
    rows.append(f"| greedy coreset, fraction {fraction:g}, projection 128 | {len(chosen):,} picks in {seconds:.1f} s "
                f"({1e3 * seconds / len(chosen):.2f} ms/pick) |")  # fmt: skip
    rows.append(f"| memory bank | {bank.shape[0]:,} x {bank.shape[1]} float32 = {bank.numel() * 4 / 2**20:.1f} MiB |")
    start = time.perf_counter()
    index = build_faiss_index(bank)
    build = time.perf_counter() - start
    faiss_seconds = statistics.median(timed(lambda: nearest_neighbours_faiss(queries, index), repeats))
    torch_seconds = statistics.median(timed(lambda: nearest_neighbours_torch(queries, bank), repeats))
    found = nearest_neighbours_faiss(queries, index).indices, nearest_neighbours_torch(queries, bank).indices
    same = torch.equal(*found)
    label = f"{len(queries):,} queries ({batch} images) x {bank.shape[0]:,} bank"
    rows.append(f"| search, FAISS IndexFlatL2 (exact; index built in {1e3 * build:.0f} ms) | {label}: "
                f"{1e3 * faiss_seconds:.0f} ms ({batch / faiss_seconds:.1f} images/s) |")  # fmt: skip
    rows.append(f"| search, torch matrix product + minimum (chunks of 4,096) | {label}: {1e3 * torch_seconds:.0f} ms "
                f"({batch / torch_seconds:.1f} images/s); same neighbours as FAISS: {same} |")  # fmt: skip
    return rows


def hvq_row(label: str, channels: int, classes: int, batch: int, steps: int, peak: float) -> str:
    torch.manual_seed(0)
    config = HVQTransConfig(feature_channels=(channels,), image_size=(224, 224), token_stride=16, num_classes=classes)
    net = HVQTransNet(config).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(batch, channels, 14, 14, generator=generator)  # cached features, read from memory
    class_index = torch.arange(batch) % classes

    def step() -> None:
        loss = net.loss(net([features], class_index))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.1)
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        step()
    seconds = statistics.median(timed(step, steps, warmup=1))
    gflop = counter.get_total_flops() / batch / 1e9
    rate = gflop * batch / seconds
    return (f"| HVQ-Trans training, {label}, batch {batch}, features cached | {batch / seconds:.2f} images/s "
            f"({1e3 * seconds:.0f} ms/step; {gflop:.1f} GFLOP/image fwd+bwd; {rate:.0f} GFLOP/s = "
            f"{100 * rate / peak:.0f}% of the fp32 matmul peak) |")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, help="training images for PatchCore's bank (tire: train/good/rgb)")
    parser.add_argument("--n", type=int, default=20_000, help="Gaussian patch features without --images: rows")
    parser.add_argument("--fraction", type=float, default=0.1, help="PatchCore's coreset fraction")
    parser.add_argument("--batch", type=int, default=8, help="images per backbone / search batch")
    parser.add_argument("--hvq-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5, help="timed backbone batches and searches")
    parser.add_argument("--steps", type=int, default=5, help="timed HVQ-Trans steps (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = load_average()
    peak = matmul_peak_gflops(torch.float32)
    rows = backbone_rows(args.batch, 224, args.repeats)
    rows += patchcore_rows(args.images, args.n, args.fraction, args.batch, args.repeats)
    peak = max(peak, matmul_peak_gflops(torch.float32))  # machine noise: the better of two readings
    for label, channels, classes in (
        ("official: B4 features (272 ch), 15 classes", 272, 15),
        ("CPU config: Lite0 features (192 ch), 1 class", 192, 1),
    ):
        rows.append(hvq_row(label, channels, classes, args.hvq_batch, args.steps, peak))
    print(f"## Feature methods on {cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average before/after: {load_before}/{load_average()}\n")  # fmt: skip
    print(f"fp32 matmul peak (best 4096^3, before and after the backbone and PatchCore rows): {peak:.0f} GFLOP/s\n")
    print("| measurement | value |\n|---|---|")
    print("\n".join(rows))
    print(f"\ncommand: `python {shlex.join(['benchmarks/feature_methods.py', *(argv or sys.argv[1:])])}`")


if __name__ == "__main__":
    main()
