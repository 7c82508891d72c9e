"""Images/s of every method of a finished run, per runtime: what ``lsgs.Inferencer`` gives a user.

For each evaluated method of ``--run_dir`` (LSGS, the other methods, the baselines): the method in torch eager
mode (``Inferencer.from_run``) and its ``lsgs export`` in onnxruntime and OpenVINO (``Inferencer.from_export``, ONNX
from the legacy exporter; OpenVINO only where installed), each scoring the same images at the method's own input
size through ``Inferencer.score`` (graphs + the runtime side: LSGS's resampling and weighting, resize to the
evaluation size, smoothing, image score), ``--batch-size`` images per call. Reading and resizing the files is
done once beforehand and not timed. Columns: images/s (median of interleaved rounds: eager, onnxruntime, OpenVINO,
eager, ... so machine noise hits all alike), speed-up against eager, and the largest map difference against eager
relative to the eager maps' range (a check that the runtimes compute the same thing). The fp32 matmul peak of
the same run is printed for scale.

    python benchmarks/inference_methods.py --run_dir runs/tire --images /data/mvtec_3d/tire/test/good/rgb
    python benchmarks/inference_methods.py --run_dir runs/demo-mvtec --methods lsgs patchcore --count 8
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np
import torch
from timing import interleaved_times, load_average, matmul_peak_gflops

from data_modules.image_io import IMAGE_SUFFIXES
from lsgs.errors import ConfigError
from lsgs.inference import Inferencer, export_method
from lsgs.inference.inputs import load_batch
from lsgs.machine import cpu_name
from lsgs.methods.registry import evaluated_methods

RUNTIMES = ("eager", "onnxruntime", "openvino")


def method_inferencers(run_dir: Path, method: str, runtimes: list[str], folder: Path) -> dict[str, Inferencer]:
    """The method under each runtime asked for and available (OpenVINO is an optional extra)."""
    inferencers = {"eager": Inferencer.from_run(run_dir, method)}
    exported = [r for r in runtimes if r != "eager" and (r != "openvino" or importlib.util.find_spec("openvino"))]
    if exported:
        export = export_method(run_dir, method, "onnx", folder / method, onnx_exporter="legacy")
        for runtime in exported:
            inferencers[runtime] = Inferencer.from_export(export, backend=runtime)
    return inferencers


def score_all(inferencer: Inferencer, images: torch.Tensor, category: str | None, batch: int) -> torch.Tensor:
    """Final maps ``[N, 1, S, S]`` of prepared images ``[N, C, s, s]``, ``batch`` per call (seeds as lsgs detect)."""
    maps = []
    for start in range(0, images.shape[0], batch):
        part = images[start : start + batch]
        seeds = inferencer.noise_seeds(range(start, start + part.shape[0]))
        maps.append(inferencer.score(part, [category] * part.shape[0], seeds)[0])
    return torch.cat(maps)


def method_rows(run_dir: Path, method: str, pictures: list, args: argparse.Namespace) -> list[str]:
    with tempfile.TemporaryDirectory() as folder:
        inferencers = method_inferencers(run_dir, method, args.runtimes, Path(folder))
        eager = inferencers["eager"]
        category = (eager.categories or [None])[0] if args.category is None else args.category
        images = load_batch(pictures, eager.input_size, eager.channels)[0]
        with torch.inference_mode():
            rounds = {name: lambda inf=inf: score_all(inf, images, category, args.batch_size)
                      for name, inf in inferencers.items()}  # fmt: skip
            maps = {name: run() for name, run in rounds.items()}  # also the untimed warm-up round
            seconds = {name: statistics.median(t) for name, t in interleaved_times(rounds, args.repeats).items()}
    scale = float(maps["eager"].max() - maps["eager"].min()) or 1.0
    rows = []
    for name in inferencers:
        rate = images.shape[0] / seconds[name]
        difference = float((maps[name] - maps["eager"]).abs().max()) / scale
        rows.append(f"| {method} | {name} | {eager.input_size} | {rate:.2f} | "
                    f"{seconds['eager'] / seconds[name]:.2f}x | {difference:.1e} |")  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", type=Path, required=True, help="a finished run folder")
    parser.add_argument("--methods", nargs="*", help="methods to time (default: every evaluated method of the run)")
    parser.add_argument("--images", type=Path, help="a folder of images (default: seeded random 256 px images)")
    parser.add_argument("--count", type=int, default=32, help="images scored per round")
    parser.add_argument("--category", help="category for per-class methods (default: the method's first class)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (onnxruntime and OpenVINO: their own)")
    args = parser.parse_args(argv)
    available = [m.name for m in evaluated_methods(args.run_dir) if m.kind != "ablation"]
    methods = args.methods or available
    unknown = sorted(set(methods) - set(available))
    if unknown:
        sys.exit(f"--methods {unknown}: not evaluated in {args.run_dir} (it has {available})")
    if args.images is None:
        generator = np.random.default_rng(0)
        pictures = [generator.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(args.count)]
        source = f"{args.count} seeded random 256 px RGB images"
    else:
        pictures = sorted(p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[: args.count]
        if not pictures:
            sys.exit(f"--images {args.images}: no image files")
        source = f"{len(pictures)} images of {args.images}"
    torch.set_num_threads(args.threads)

    peak = matmul_peak_gflops(torch.float32, 2048)
    print("## Inference per method and runtime (lsgs.Inferencer)\n")
    print(f"torch {torch.__version__}, {args.threads} threads, {cpu_name()}; load average {load_average()}; "
          f"fp32 matmul peak {peak:.0f} GFLOP/s; {source}, batch {args.batch_size}; median of {args.repeats} "
          "interleaved rounds after one warm-up\n")  # fmt: skip
    print("| method | runtime | input px | images/s | vs eager | max map diff / range |")
    print("|---|---|---:|---:|---:|---:|")
    for method in methods:
        try:
            rows = method_rows(args.run_dir, method, pictures, args)
        except ConfigError as error:  # e.g. a stage scored before image_score_std was recorded
            rows = [f"| {method} | skipped: {error} | | | | |"]
        for row in rows:
            print(row, flush=True)
    print(f"\nload average at the end {load_average()}; command: `python benchmarks/inference_methods.py "
          f"{shlex.join(argv if argv is not None else sys.argv[1:])}`")  # fmt: skip


if __name__ == "__main__":
    main()
