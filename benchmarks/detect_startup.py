"""Start-up of a scoring call: the time from process start to the first scored image of ``lsgs detect``, and where
it goes.

For each method a fresh interpreter runs the steps of ``lsgs detect`` one at a time and times each:

    python start    interpreter start-up, until this script's first line runs
    import torch
    import lightning
    import lsgs     the project modules detect loads (lsgs.detect, the method registry, the LSGS stages, methods)
    load model      ``RunScorer``: ``load_method`` (stage config, checkpoints, calibration), model to the device
    first image     read one image and score it
    write           its heatmap panel
    rest            the other images (reported as images/s)

and, in the same interpreter, what the ``Trainer`` path that ``lsgs detect`` used before costs on top of a loaded
model: a ``Trainer`` plus an ``ImageFolderDataModule`` (decoding the folder into the array cache) and
``trainer.predict`` over one image; then the wall time of the whole ``lsgs detect`` command. The wall times of
``lsgs --help`` and ``lsgs detect --help`` (fresh interpreters) come first. Medians over ``--repeats`` runs; the
machine's load average is printed before and after.

    python benchmarks/detect_startup.py --run_dir runs/demo-mvtec --images data/demo/mvtec/nut/test/hole --category nut
    python benchmarks/detect_startup.py --run_dir RUN --images FOLDER --methods lsgs pixel_gaussian --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

STARTED = time.time()  # the first line this interpreter runs (after its own start-up and the imports above)

PHASES = ("python start", "import torch", "import lightning", "import lsgs", "load model", "first image", "write")


def child(args: argparse.Namespace) -> None:
    """One ``lsgs detect`` call, step by step; prints the phase times (s) as JSON on the last line."""
    times = {"python start": STARTED - args.spawned}
    mark = time.time()

    def lap(name: str) -> None:
        nonlocal mark
        now = time.time()
        times[name] = now - mark
        mark = now

    import torch

    lap("import torch")
    import lightning  # noqa: F401

    lap("import lightning")
    from pathlib import Path

    from data_modules.image_io import list_images, read_original
    from lsgs.detect import DetectWriter, RunScorer, Thresholds
    from lsgs.methods import registry  # noqa: F401
    from lsgs.modules import ScoringModule  # noqa: F401

    lap("import lsgs")
    scorer = RunScorer(args.run_dir, args.method, "cpu")
    lap("load model")
    paths = list_images(Path(args.images))
    category = args.category or Path(args.images).resolve().name
    first = read_original(paths[0], scorer.channels)
    (anomaly, score), = scorer.score([first], [0], category)
    lap("first image")
    with tempfile.TemporaryDirectory() as out:
        writer = DetectWriter(out, Thresholds(scorer.image_threshold, scorer.pixel_threshold))
        writer.image(paths[0].name, first, anomaly, score)
        lap("write")
        for index, path in enumerate(paths[1:], start=1):
            image = read_original(path, scorer.channels)
            writer.image(path.name, image, *scorer.score([image], [index], category)[0])
        lap("rest")
    times["rest images"] = len(paths) - 1
    # The Trainer path on top of the loaded model: Trainer, data module (cache build), predict of one image.
    from lightning.pytorch import Trainer

    from data_modules import ImageFolderDataModule

    with tempfile.TemporaryDirectory() as work:
        folder = Path(work) / category  # ImageFolderDataModule names the category after the folder
        folder.mkdir()
        (folder / paths[0].name).write_bytes(paths[0].read_bytes())
        mark = time.time()
        trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        lap("trainer: Trainer()")
        datamodule = ImageFolderDataModule(str(folder), channels=scorer.channels, image_size=scorer.evaluation_size,
                                           batch_size=1, cache_dir=str(Path(work) / "cache"))  # fmt: skip
        trainer.predict(scorer.model.cpu(), datamodule=datamodule, return_predictions=False)
        lap("trainer: predict 1 image")
    print(json.dumps({**times, "threads": torch.get_num_threads()}))


def fresh(command: list[str]) -> tuple[float, str]:
    """Wall time (s) and stdout of a command in a fresh process."""
    started = time.time()
    proc = subprocess.run(command, capture_output=True, text=True, check=True)
    return time.time() - started, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run_dir", required=True)
    parser.add_argument("--images", required=True, help="a folder of images (only its top level is read)")
    parser.add_argument("--methods", nargs="+", default=["lsgs", "pixel_gaussian"])
    parser.add_argument("--category", default=None, help="the images' category (default: the folder's name)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--spawned", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    from lsgs.machine import cpu_name

    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; load average before: {os.getloadavg()[0]:.2f}")
    for command in (["--help"], ["detect", "--help"]):
        seconds = statistics.median(fresh([sys.executable, "-m", "lsgs", *command])[0] for _ in range(args.repeats))
        print(f"lsgs {' '.join(command)}: {seconds:.2f} s (median of {args.repeats})")
    for method in args.methods:
        runs = []
        for _ in range(args.repeats):
            command = [sys.executable, __file__, "--child", "--run_dir", args.run_dir, "--images", args.images,
                       "--method", method, *(["--category", args.category] if args.category else []),
                       "--spawned", str(time.time())]  # fmt: skip
            runs.append(json.loads(fresh(command)[1].strip().splitlines()[-1]))
        median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        first = sum(median[phase] for phase in PHASES[:-1])
        print(f"\n{method}: {first:.2f} s from process start to the first scored image (median of {args.repeats}, "
              f"{int(median['threads'])} torch threads)")  # fmt: skip
        for phase in PHASES:
            print(f"  {phase:<28} {median[phase]:6.2f} s")
        rest = int(median["rest images"])
        if rest:
            print(f"  {'rest':<28} {median['rest']:6.2f} s ({rest / median['rest']:.1f} images/s incl. heatmaps)")
        print("  the Trainer path used before, on top of the loaded model:")
        for phase in ("trainer: Trainer()", "trainer: predict 1 image"):
            print(f"  {phase:<28} {median[phase]:6.2f} s")
        with tempfile.TemporaryDirectory() as out:
            command = [sys.executable, "-m", "lsgs", "detect", f"--run_dir={args.run_dir}", f"--images={args.images}",
                       f"--method={method}", f"--output={out}", "--accelerator=cpu",
                       *([f"--category={args.category}"] if args.category else [])]  # fmt: skip
            seconds = statistics.median(fresh(command)[0] for _ in range(args.repeats))
        print(f"  whole command, {rest + 1} images: {seconds:.2f} s")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
