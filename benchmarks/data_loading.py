"""Data-layer benchmark on demo data: generation, first cache build, BraTS time per volume, cached loading.

    .venv/bin/python benchmarks/data_loading.py [--demo-dir data/demo] [--image-size 128] [--seconds 3]

Prints a markdown table of measured figures and the command that produced them. Targets: cached loading
>= 2,000 images/s on one core (0 workers, 1 torch thread); < 1 s to preprocess one 240x240x155 volume.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch

from data_modules import BraTSDataModule, MVTecDataModule
from data_modules.base import AnomalyDataModule
from data_modules.brats import preprocess_case, scan_cases
from data_modules.synthetic import write_brats_demo, write_mvtec_demo


def loader_rate(dm: AnomalyDataModule, workers: int, seconds: float, train: bool = False) -> float:
    """Images/s through a DataLoader in steady state (one warm-up pass, then whole passes for >= seconds)."""
    dm.num_workers = workers
    loader = dm.train_dataloader() if train else dm.train_eval_dataloader()
    for _ in loader:  # warm-up: page cache, worker start-up
        pass
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for batch in loader:
            images += batch["image"].shape[0]
    return images / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-dir", default=None, help="existing demo data (default: a temp dir)")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=3.0, help="measuring time per loader figure")
    args = parser.parse_args(argv)
    rows: list[tuple[str, str, str]] = []

    with tempfile.TemporaryDirectory(prefix="lsgs-bench-") as tmp:
        demo = Path(args.demo_dir) if args.demo_dir else Path(tmp) / "demo"
        start = time.perf_counter()
        mvtec_root = write_mvtec_demo(demo / "mvtec")
        brats_root = write_brats_demo(demo / "brats")
        if not args.demo_dir:
            elapsed = f"{time.perf_counter() - start:.1f}"
            rows.append(("demo generation (MVTec 3x130 PNG + BraTS 15 volumes)", elapsed, "s"))

        cache = Path(tmp) / "cache"
        size = args.image_size
        mvtec = MVTecDataModule(str(mvtec_root), image_size=size, batch_size=16, cache_dir=str(cache))
        start = time.perf_counter()
        mvtec.prepare_data()
        n_mvtec = sum(1 for _ in mvtec_root.rglob("*.png"))
        rows.append((f"MVTec demo first cache build ({n_mvtec} PNG files, 256 px -> {size})",
                     f"{time.perf_counter() - start:.2f}", "s"))  # fmt: skip
        brats = BraTSDataModule(str(brats_root), image_size=size, batch_size=16, cache_dir=str(cache))
        start = time.perf_counter()
        brats.prepare_data()
        cases = scan_cases(brats_root, ["HGG", "LGG"], "*_flair.nii.gz", "*_seg.nii.gz")
        rows.append((f"BraTS demo first cache build ({len(cases)} volumes 240x240x155, threaded)",
                     f"{time.perf_counter() - start:.2f}", "s"))  # fmt: skip

        # One volume at a time on the calling thread: read FLAIR + seg, normalise, slice, resize.
        per_volume = []
        for case in cases:
            start = time.perf_counter()
            preprocess_case(case, size, "percentile")
            per_volume.append(time.perf_counter() - start)
        rows.append(("BraTS preprocessing per 240x240x155 volume (mean / max)",
                     f"{sum(per_volume) / len(per_volume):.3f} / {max(per_volume):.3f}", "s"))  # fmt: skip

        mvtec.setup()
        brats.setup()
        torch.set_num_threads(1)  # "one core" for the main-process figures
        for name, dm in (("MVTec", mvtec), ("BraTS", brats)):
            rows.append((f"{name} cached loading, 0 workers, 1 thread, batch 16 ({dm.train_size} images)",
                         f"{loader_rate(dm, 0, args.seconds):,.0f}", "images/s"))  # fmt: skip
            rows.append((f"{name} cached loading, 2 workers, batch 16 (steady state)",
                         f"{loader_rate(dm, 2, args.seconds):,.0f}", "images/s"))  # fmt: skip
        flip = [{"name": "HorizontalFlip", "p": 0.5}, {"name": "Rotate", "limit": 10, "p": 0.5}]
        aug = MVTecDataModule(str(mvtec_root), image_size=size, batch_size=16, cache_dir=str(cache),
                              train_transforms=flip)  # fmt: skip
        rows.append(("MVTec train loader with flip+rotate augmentation, 0 workers, 1 thread",
                     f"{loader_rate(aug, 0, args.seconds, train=True):,.0f}", "images/s"))  # fmt: skip

    print(f"Data loading benchmark, image_size {size} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__})\n")  # fmt: skip
    print("| measurement | value | unit |")
    print("|---|---:|---|")
    for what, value, unit in rows:
        print(f"| {what} | {value} | {unit} |")
    print(f"\nCommand: `{shlex.join([Path(sys.executable).name, *sys.argv])}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
