"""Throughput of restoration-based scoring on CPU at the paper's configuration.

Full scoring of a batch of B images (what the scoring stage does per test batch): encode_indices -> one
transformer pass -> decode of the original codes (X_hat, B code maps) -> code_nll + restore_global
(n restorations) -> one batched decoder call on all n restorations (B * n code maps) -> restoration weights
and anomaly map -> MinPool/AvgPool smoothing -> image scores. (X_hat is decoded apart from the restorations, as
ScoringModule does, so that ``lsgs study scoring`` can cache it.)

Reference cost measured in the same run: encoder pass + one transformer pass + the same batched decoder call
(B * (n + 1) decodes). The ratio full / reference shows the overhead of everything that is not a network pass
(sampling, weights, maps, smoothing); the target is <= 1.3. Both are timed alternately (A, B, A, B, ...) so
machine noise hits both alike; medians are reported.

The causal variant (Naval Marimont & Tarroni's raster-order restoration, the paper's ablation) is timed on
a smaller transformer for information: ``restore_causal`` decodes the B * n sequences position by position
with a KV cache, compared with one full forward pass over the same B * n sequences (its FLOP-equivalent) and
with the naive algorithm's cost (a full forward pass at each of the L positions), estimated from that pass.

Weights are random (seeded): the cost of a forward pass does not depend on them. The threshold is the 90th
percentile of code NLLs on a separate calibration batch, as the scoring stage sets it from validation normals.

    python benchmarks/scoring_throughput.py
    python benchmarks/scoring_throughput.py --batch-size 8 --repeats 7 --no-causal
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time

import torch
from timing import interleaved_times

from lsgs.machine import cpu_name
from lsgs.metrics.quantile import score_quantile
from lsgs.nn.image_score import reduce_image_scores
from lsgs.nn.restoration import (
    code_nll,
    restoration_anomaly_map,
    restore_causal,
    restore_global,
    smooth_anomaly_map,
)
from lsgs.nn.transformer import CodeTransformer, CodeTransformerConfig
from lsgs.nn.vqvae import VQVAEConfig, VQVAENet

STAGES = ("encode", "transformer", "restore", "decode", "map+smooth+score")


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def full_scoring(
    vqvae: VQVAENet,
    transformer: CodeTransformer,
    images: torch.Tensor,
    threshold: float,
    n: int,
    generator: torch.Generator,
) -> tuple[dict[str, float], torch.Tensor, float]:
    """Score a batch; returns (seconds per stage, image scores [B], fraction of positions resampled)."""
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    codes = vqvae.encode_indices(images)  # (B, h, w)
    B, h, w = codes.shape
    t1 = time.perf_counter()
    logits = transformer(codes.view(B, h * w))  # (B, L, K)
    t2 = time.perf_counter()
    restored = restore_global(logits, codes.view(B, h * w), threshold, n, generator=generator)  # (B, n, L)
    t3 = time.perf_counter()
    x_hat = vqvae.decode_indices(codes)  # (B, C, H, W)
    decoded = vqvae.decode_indices(restored.reshape(B * n, h, w))  # (B*n, C, H, W): Y_1..Y_n in one call
    decoded = decoded.contiguous().view(B, n, *decoded.shape[1:])  # (B, n, C, H, W)
    t4 = time.perf_counter()
    amap = restoration_anomaly_map(x_hat, decoded)  # (B, 1, H, W)
    scores = reduce_image_scores(smooth_anomaly_map(amap), "max")  # (B,)
    t5 = time.perf_counter()
    for name, (a, b) in zip(STAGES, ((t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5))):
        times[name] = b - a
    resampled = (restored != codes.view(B, 1, h * w)).float().mean().item()
    return times, scores, resampled


@torch.no_grad()
def reference_passes(vqvae: VQVAENet, transformer: CodeTransformer, images: torch.Tensor, n: int) -> None:
    """Encoder pass + one transformer pass + one decoder call on B * (n + 1) code maps."""
    codes = vqvae.encode_indices(images)
    B, h, w = codes.shape
    transformer(codes.view(B, h * w))
    vqvae.decode_indices(codes.repeat_interleave(n + 1, dim=0))


def build_vqvae(channels_last: bool) -> VQVAENet:
    torch.manual_seed(0)
    vqvae = VQVAENet(VQVAEConfig.paper()).eval()
    return vqvae.to(memory_format=torch.channels_last) if channels_last else vqvae


def calibration_threshold(
    vqvae: VQVAENet, transformer: CodeTransformer, images: torch.Tensor, quantile: float = 0.9
) -> float:
    """The scoring stage's NLL threshold (``ScoreQuantile`` via ``score_quantile``, its default 20 bits)."""
    with torch.no_grad():
        codes = vqvae.encode_indices(images).flatten(1)
        return score_quantile(code_nll(transformer(codes), codes), quantile)


def run_global(args: argparse.Namespace, images: torch.Tensor, calib: torch.Tensor) -> list[str]:
    vqvae = build_vqvae(args.channels_last)
    torch.manual_seed(1)
    transformer = CodeTransformer(CodeTransformerConfig.paper(vocab_size=vqvae.config.codebook_size)).eval()
    threshold = calibration_threshold(vqvae, transformer, calib)
    n = args.restorations
    stage_times: dict[str, list[float]] = {s: [] for s in STAGES}
    resampled: list[float] = []

    def full() -> None:
        times, _, frac = full_scoring(vqvae, transformer, images, threshold, n, gen)
        for s in STAGES:
            stage_times[s].append(times[s])
        resampled.append(frac)

    def reference() -> None:
        reference_passes(vqvae, transformer, images, n)

    gen = torch.Generator().manual_seed(2)
    for _ in range(args.warmup):  # oneDNN primitive creation, allocator growth
        full()
        reference()
    for s in STAGES:
        stage_times[s].clear()
    times = interleaved_times({"full": full, "reference": reference}, args.repeats)
    t_full, t_ref = statistics.median(times["full"]), statistics.median(times["reference"])
    B = images.shape[0]
    lines = [
        f"### Global (the method): paper VQ-VAE + paper transformer (12 x 768, K = "
        f"{transformer.config.vocab_size}, L = {transformer.config.seq_len}), batch {B}, n = {n}\n",
        f"threshold {threshold:.3f} (90th percentile of calibration NLLs); positions resampled per "
        f"restoration: {100 * statistics.mean(resampled):.1f}%\n",
        "| measurement | s / batch (median) | images/s |",
        "|---|---|---|",
        f"| full restoration scoring | {t_full:.3f} | {B / t_full:.2f} |",
        f"| reference: encoder + 1 transformer pass + {n + 1} decodes per image | {t_ref:.3f} | "
        f"{B / t_ref:.2f} |",
        f"| **ratio full / reference** (target <= 1.3) | **{t_full / t_ref:.3f}** | |",
        "",
        "| stage of the full scoring | s / batch (median) | share |",
        "|---|---|---|",
    ]
    total = sum(statistics.median(v) for v in stage_times.values())
    for s in STAGES:
        med = statistics.median(stage_times[s])
        lines.append(f"| {s} | {med:.4f} | {100 * med / total:.1f}% |")
    return lines


def run_causal(args: argparse.Namespace, images: torch.Tensor, calib: torch.Tensor) -> list[str]:
    vqvae = build_vqvae(args.channels_last)
    torch.manual_seed(1)
    cfg = CodeTransformerConfig(
        vocab_size=vqvae.config.codebook_size,
        seq_len=256,
        d_model=args.causal_d_model,
        n_layers=args.causal_layers,
        n_heads=args.causal_heads,
        attention="causal",
    )
    transformer = CodeTransformer(cfg).eval()
    threshold = calibration_threshold(vqvae, transformer, calib)
    n, B = args.restorations, images.shape[0]
    with torch.no_grad():
        codes = vqvae.encode_indices(images).flatten(1)  # (B, L)
    rows = codes.repeat_interleave(n, dim=0)  # (B*n, L)
    gen = torch.Generator().manual_seed(2)
    resampled: list[float] = []

    def restore() -> None:
        restored = restore_causal(transformer, codes, threshold, n, generator=gen)
        resampled.append((restored != codes.unsqueeze(1)).float().mean().item())

    def one_pass() -> None:
        with torch.no_grad():
            transformer(rows)

    restore()
    one_pass()
    resampled.clear()
    times = interleaved_times({"restore": restore, "pass": one_pass}, args.causal_repeats)
    t_restore, t_pass = statistics.median(times["restore"]), statistics.median(times["pass"])
    L = cfg.seq_len
    return [
        f"### Causal (ablation, for information): transformer {cfg.n_layers} x {cfg.d_model} ({cfg.n_heads} "
        f"heads), K = {cfg.vocab_size}, L = {L}, batch {B}, n = {n} -> {B * n} sequences\n",
        f"threshold {threshold:.3f}; positions resampled per restoration: "
        f"{100 * statistics.mean(resampled):.1f}%\n",
        "| measurement | s / batch (median) |",
        "|---|---|",
        f"| restore_causal (KV cache, {L} steps) | {t_restore:.3f} |",
        f"| one full forward pass over the {B * n} sequences | {t_pass:.3f} |",
        f"| ratio restore_causal / one pass | {t_restore / t_pass:.2f} |",
        f"| naive full recompute at every position (estimate: {L} x one pass) | {L * t_pass:.1f} |",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--restorations", type=int, default=15, help="n restorations per image")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per measurement (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--no-channels-last", dest="channels_last", action="store_false", help="keep the VQ-VAE in NCHW"
    )
    parser.add_argument("--no-causal", dest="causal", action="store_false", help="skip the causal variant")
    parser.add_argument("--causal-d-model", type=int, default=256)
    parser.add_argument("--causal-layers", type=int, default=4)
    parser.add_argument("--causal-heads", type=int, default=8)
    parser.add_argument("--causal-repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    images = torch.rand(args.batch_size, 3, 128, 128, generator=torch.Generator().manual_seed(10))
    calib = torch.rand(8, 3, 128, 128, generator=torch.Generator().manual_seed(11))
    images = to_memory_format(images, args.channels_last)
    calib = to_memory_format(calib, args.channels_last)

    print("## Restoration-based scoring throughput (CPU)\n")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}; VQ-VAE paper config "
        f"{'channels_last' if args.channels_last else 'NCHW'}, fp32, no_grad; load average at start "
        f"{load:.2f}; median of {args.repeats} batches after {args.warmup} warm-up\n"
    )
    for line in run_global(args, images, calib):
        print(line)
    if args.causal:
        print()
        for line in run_causal(args, images, calib):
            print(line)
    print(f"\ncommand: `python {shlex.join(['benchmarks/scoring_throughput.py', *(argv or sys.argv[1:])])}`")


if __name__ == "__main__":
    main()
