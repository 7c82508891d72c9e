"""Stage 2 end to end (``CodebookAggregator`` through ``trainer.predict``) against its two essential parts:
encoding the training set and k-means. Issue: "the stage should cost little more than encoding + k-means".

Set-up (nothing downloaded): the paper's VQ-VAE (``VQVAEConfig.paper()``: 128 px -> 16x16 codes, K = 1024,
D = 512) with seeded random weights, saved as a VQ-VAE checkpoint; a synthetic MVTec-layout training set
(``data_modules.synthetic.write_mvtec_demo``; default 3 categories x 400 train/good images at 128 px, 10% held
back for validation -> 1,080 training images = 276,480 encodings, so the stage sub-samples to about
256 x 1,024 = 262,144 vectors, as FAISS would).

Timed, in this order, all in this process with the same threads:
    (a) the stage: ``trainer.predict(CodebookAggregator(...), datamodule=...)`` including loading the checkpoint
        and writing ``aggregated.ckpt`` / ``aggregation.json``; its parts are timed from inside by wrapping the
        module's methods (wall time, no extra synchronisation);
    (b) encoding alone: the encoder over the same ``train_eval`` loader, in inference mode;
    (c) k-means alone: ``lsgs.kmeans.kmeans`` on the same sub-sample (rebuilt with the stage's documented rule:
        a Bernoulli mask per image seeded by (seed, dataset index)); its centres are checked equal to the stage's;
    (d) the rest: (a) - (b) - (c).

    python benchmarks/aggregation.py                    # the default size above (~1.5 minutes on 2 cores)
    python benchmarks/aggregation.py --n-train 16        # a quick smoke run (k-means on fewer points)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("WANDB_MODE", "offline")

import faiss
import lightning
import torch
from lightning.pytorch import Trainer

import lsgs.modules.aggregator as aggregator_module
from data_modules import MVTecDataModule
from data_modules.synthetic import write_mvtec_demo
from lsgs.kmeans import kmeans
from lsgs.modules import VQVAE, CodebookAggregator
from lsgs.nn.vqvae import VQVAEConfig


class Stopwatch:
    """Accumulated wall time per name; ``nested=True`` files the time under the enclosing timed call too."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._active: list[str] = []

    def wrap(self, name: str, function: Callable, nested: bool = False) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            key = f"{name} in {self._active[-1] if self._active else 'loop'}" if nested else name
            self._active.append(name)
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start
                self._active.pop()

        return timed


def write_random_vqvae(path: Path, image_size: int, seed: int) -> VQVAE:
    """The paper's architecture with seeded random weights, saved as the stage-1 fit would save it."""
    torch.manual_seed(seed)
    config = dataclasses.asdict(VQVAEConfig.paper())
    config.pop("beta")
    model = VQVAE(**config, input_size=image_size)
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": lightning.__version__,
        "epoch": 0,
        "global_step": 0,
    }
    model.on_save_checkpoint(checkpoint)  # the module's own `lsgs` metadata
    torch.save(checkpoint, path)
    return model


def run_stage(checkpoint: Path, datamodule: MVTecDataModule, out: Path, niter: int, seed: int):
    """(a): the whole stage, with its parts timed from inside."""
    watch = Stopwatch()
    start = time.perf_counter()
    module = CodebookAggregator(str(checkpoint), niter=niter, seed=seed, output_dir=str(out))
    watch.seconds["load checkpoint (constructor)"] = time.perf_counter() - start
    for name in (
        "predict_step",
        "_gather_samples",
        "_assignment_statistics",
        "_validation_l1",
        "save_outputs",
    ):
        setattr(module, name, watch.wrap(name, getattr(module, name)))
    net = module.vqvae.net
    net.encode = watch.wrap("encode", net.encode, nested=True)
    original_kmeans = aggregator_module.kmeans
    aggregator_module.kmeans = watch.wrap("kmeans", original_kmeans)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(out),
    )
    try:
        predict_start = time.perf_counter()
        trainer.predict(module, datamodule=datamodule, return_predictions=False)
        watch.seconds["trainer.predict"] = time.perf_counter() - predict_start
    finally:
        aggregator_module.kmeans = original_kmeans
    total = time.perf_counter() - start
    return module, watch, total


def encode_all(model: VQVAE, datamodule: MVTecDataModule) -> tuple[list[torch.Tensor], list[int], float]:
    """(b): encodings ``[h*w, D]`` per training image, their dataset indices, and the wall time."""
    vectors: list[torch.Tensor] = []
    indices: list[int] = []
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in datamodule.train_eval_dataloader():
            z_e = model.net.encode(batch["image"]).float()  # [B, D, h, w]
            flat = z_e.permute(0, 2, 3, 1).reshape(z_e.shape[0], -1, z_e.shape[1])  # [B, h*w, D]
            vectors.extend(flat)
            indices.extend(int(i) for i in batch["index"])
    return vectors, indices, time.perf_counter() - start


def stage_subsample(
    vectors: list[torch.Tensor], indices: list[int], num_clusters: int, seed: int
) -> torch.Tensor:
    """The stage's k-means input: per image, keep each vector with probability cap / N, seeded by (seed, index)."""
    total = sum(v.shape[0] for v in vectors)
    keep_probability = min(1.0, 256 * num_clusters / total)
    parts = []
    for v, index in zip(vectors, indices):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        parts.append(v[torch.rand(v.shape[0], generator=generator) < keep_probability])
    return torch.cat(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lsgs-bench-aggregation"))
    parser.add_argument(
        "--n-train", type=int, default=400, help="train/good images per category (3 categories)"
    )
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    setup_start = time.perf_counter()
    root = write_mvtec_demo(
        args.workdir / "mvtec", seed=0, n_train=args.n_train, n_test_good=1, n_test_per_defect=1, size=128
    )
    datamodule = MVTecDataModule(
        str(root),
        image_size=args.image_size,
        batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        cache_dir=str(args.workdir / "cache"),
    )
    datamodule.prepare_data()
    datamodule.setup()
    checkpoint = args.workdir / "vqvae.ckpt"
    model = write_random_vqvae(checkpoint, args.image_size, args.seed).eval()
    with torch.inference_mode():  # warm-up: oneDNN primitive creation is not what is measured
        model.net.encode(next(iter(datamodule.train_eval_dataloader()))["image"])
    setup_seconds = time.perf_counter() - setup_start
    n_train, n_val = len(datamodule.dataset("train_eval")), len(datamodule.dataset("val"))

    # (a) the stage
    module, watch, stage_seconds = run_stage(
        checkpoint, datamodule, args.workdir / "out", args.niter, args.seed
    )
    report = module.report
    stage_centroids = module.centroids.cpu()
    del module

    # (b) encoding alone, (c) k-means alone on the stage's sub-sample
    vectors, indices, encode_seconds = encode_all(model, datamodule)
    samples = stage_subsample(vectors, indices, report["num_clusters"], args.seed)
    del vectors
    result = kmeans(
        samples, report["num_clusters"], niter=args.niter, seed=args.seed, max_points_per_centroid=256
    )
    same = torch.equal(result.centroids, stage_centroids)
    kmeans_seconds = result.seconds
    rest = stage_seconds - encode_seconds - kmeans_seconds

    s = watch.seconds
    in_predict = s["predict_step"] - s["encode in predict_step"]
    accounted = sum(
        s[k]
        for k in (
            "predict_step",
            "_gather_samples",
            "kmeans",
            "_assignment_statistics",
            "_validation_l1",
            "save_outputs",
        )
    )
    loop_other = s["trainer.predict"] - accounted

    print(
        f"## Codebook aggregation (stage 2) vs encoding + k-means: {n_train:,} training images at "
        f"{args.image_size} px, paper VQ-VAE, K = {report['num_clusters']:,}\n"
    )
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), faiss {faiss.__version__} "
        f"({faiss.omp_get_max_threads()} threads), lightning {lightning.__version__}; "
        f"{report['train_vectors']:,} encodings of D = {samples.shape[1]}, k-means on "
        f"{report['kmeans']['num_points']:,} of them, {args.niter} iterations; {n_val} validation images; "
        f"batch {args.batch_size}; set-up (data, cache, checkpoint) {setup_seconds:.1f} s, not counted\n"
    )
    print("| part | seconds | share of (a) |")
    print("|---|---|---|")
    rows = [
        ("(a) whole stage: constructor + `trainer.predict` (incl. writing outputs)", stage_seconds),
        ("(b) encoding alone (encoder over the same loader, incl. data loading)", encode_seconds),
        ("(c) k-means alone (`lsgs.kmeans.kmeans` on the same sub-sample)", kmeans_seconds),
        ("(d) rest = (a) - (b) - (c)", rest),
        ("&nbsp;&nbsp;inside (a): encoder over the training set", s["encode in predict_step"]),
        ("&nbsp;&nbsp;inside (a): k-means call", s["kmeans"]),
        ("&nbsp;&nbsp;inside (a): predict_step bookkeeping (copies, sub-sample masks)", in_predict),
        ("&nbsp;&nbsp;inside (a): gather + order the sub-sample", s["_gather_samples"]),
        (
            "&nbsp;&nbsp;inside (a): re-assign all vectors, learned and new codebook",
            s["_assignment_statistics"],
        ),
        ("&nbsp;&nbsp;inside (a): validation L1 before/after (encode + 2 decodes)", s["_validation_l1"]),
        ("&nbsp;&nbsp;inside (a): write aggregated.ckpt + aggregation.json", s["save_outputs"]),
        (
            "&nbsp;&nbsp;inside (a): load the stage-1 checkpoint (constructor)",
            s["load checkpoint (constructor)"],
        ),
        ("&nbsp;&nbsp;inside (a): data loading + Lightning loop", loop_other),
    ]
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {100 * seconds / stage_seconds:.0f}% |")
    print(
        f"\n(a) / ((b) + (c)) = **{stage_seconds / (encode_seconds + kmeans_seconds):.2f}**; stage centres equal "
        f"to the stand-alone k-means centres: {same}; effective codebook size {report['effective_size_before']} "
        f"-> {report['effective_size_after']} (random weights)"
    )
    print(f"\ncommand: `python {shlex.join(['benchmarks/aggregation.py', *(argv or sys.argv[1:])])}`")


if __name__ == "__main__":
    main()
