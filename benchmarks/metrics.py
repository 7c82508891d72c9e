"""Benchmark: pooled pixel metrics on 49M pixels, histogram metrics vs sklearn (exact) vs torchmetrics.

Data: 3,000 synthetic 128x128 anomaly maps with realistic structure (smooth lognormal background, exact zeros
outside an elliptic ROI, smooth blob-shaped anomalies covering ~2% of pixels, the method's MinPool 3x3 +
AvgPool 7x7 smoothing), fed in batches of 32 like a test loop. Reports wall time and peak extra resident
memory (VmHWM after resetting it through /proc/self/clear_refs, Linux) of update+compute, and the absolute
difference to sklearn's exact roc_auc_score / average_precision_score and to exact best Dice / AUPRO computed
by sorting. Every method runs in a fresh process on the same saved data, so allocator state never leaks from
one measurement into the next.

Timings are sensitive to other load on the machine: with 2 torch threads and a busy second core, OpenMP's
thread hand-offs can make the elementwise update passes ~20x slower (measured); ``--threads 1`` is the robust
choice on a shared machine, and the printed load average says how quiet the run was.

Run:  .venv/bin/python benchmarks/metrics.py  [--num-images 3000] [--threads N] [--skip-torchmetrics]
      [--skip-sweep] [--repeats 3]
"""

import argparse
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

SIZE = 128
BATCH = 32


def make_maps(num_images: int, seed: int = 0, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded synthetic anomaly maps with the structure of real restoration-error maps.

    Returns:
        maps ``[N, 1, size, size]`` float32 (>= 0, exact zeros outside the ROI) and masks ``[N, 1, size,
        size]`` bool.
    """
    gen = torch.Generator().manual_seed(seed)
    axis = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    maps, masks = [], []
    for start in range(0, num_images, 250):
        n = min(250, num_images - start)

        def uniform(lo: float, hi: float, shape: tuple[int, ...] = (n, 1, 1)) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(shape, generator=gen)

        roi = ((xx - uniform(-0.1, 0.1)) / uniform(0.75, 0.95)) ** 2 + (
            (yy - uniform(-0.1, 0.1)) / uniform(0.75, 0.95)
        ) ** 2 <= 1
        # Smooth, skewed (lognormal) background: restoration errors are mostly small with a long tail.
        field = F.avg_pool2d(torch.randn(n, 1, size, size, generator=gen), 9, 1, 4)
        field = field / field.std(dim=(2, 3), keepdim=True)
        background = torch.exp(-3.0 + 0.6 * field[:, 0] + 0.25 * torch.randn(n, size, size, generator=gen))
        bump = torch.zeros(n, size, size)
        mask = torch.zeros(n, size, size, dtype=torch.bool)
        for _ in range(3):
            present = torch.rand(n, 1, 1, generator=gen) < 0.35
            cx, cy = uniform(-0.55, 0.55), uniform(-0.55, 0.55)
            rx, ry = uniform(0.06, 0.26), uniform(0.06, 0.26)
            dist2 = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
            mask |= present & (dist2 <= 1) & roi
            # The error extends a little beyond the true region and varies in strength: realistic overlap.
            bump = torch.maximum(bump, present * uniform(0.02, 0.4) * torch.exp(-0.7 * dist2))
        score = (background + bump).unsqueeze(1)
        score = -F.max_pool2d(-score, 3, 1, 1)  # MinPool 3x3
        score = F.avg_pool2d(score, 7, 1, 3) * roi.unsqueeze(1)
        maps.append(score.contiguous())
        masks.append(mask.unsqueeze(1))
    return torch.cat(maps), torch.cat(masks)


def rss_peak_reset() -> int | None:
    """Reset the peak-RSS counter and return the current RSS in bytes (None when /proc is unavailable)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmRSS") * 1024
    except OSError:
        return None


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure(fn: Callable[[], object]) -> tuple[object, float, float | None]:
    """Run ``fn``; return its result, wall seconds and peak extra RSS in MiB (None without /proc)."""
    gc.collect()
    base = rss_peak_reset()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    peak = None if base is None else (_status_kib("VmHWM") * 1024 - base) / 2**20
    return result, seconds, peak


def batches(maps: torch.Tensor, masks: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(maps), BATCH):
        yield maps[i : i + BATCH], masks[i : i + BATCH]


# ------------------------------------------------------------------ exact references (sorting all pixels)


def exact_best_dice(scores: np.ndarray, labels: np.ndarray) -> float:
    """Best Dice of score >= t over every unique score t, by sorting."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    del order
    tp = np.cumsum(sorted_labels, dtype=np.int64)
    fp = np.arange(1, len(tp) + 1, dtype=np.int64) - tp
    last = np.append(sorted_scores[1:] != sorted_scores[:-1], True)  # last index of each tie group
    return float(np.max(2.0 * tp[last] / (tp[last] + fp[last] + tp[-1])))


def exact_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """MVTec AUPRO by sorting all pixels (float64 weights, one point per unique score)."""
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connectivity within each image
    labels, n = ndimage.label(masks[:, 0], structure=structure)
    sizes = np.bincount(labels.ravel())
    weight = np.where(labels > 0, 1.0 / sizes[labels], 0.0).ravel()
    normal = (labels == 0).ravel()
    del labels
    scores = maps.ravel()
    order = np.argsort(-scores, kind="stable")
    last = np.append(scores[order][1:] != scores[order][:-1], True)
    fpr = np.cumsum(normal[order])[last] / normal.sum()
    pro = np.cumsum(weight[order])[last] / n
    del order
    x, y = np.concatenate([[0.0], fpr]), np.concatenate([[0.0], pro])
    end = np.searchsorted(x, limit, side="right")
    y_cut = y[end - 1] + (y[end] - y[end - 1]) * (limit - x[end - 1]) / (x[end] - x[end - 1])
    return float(np.trapezoid(np.append(y[:end], y_cut), np.append(x[:end], limit))) / limit


# ------------------------------------------------------------------------------------------ runs


def run_pixel_metrics(maps: torch.Tensor, masks: torch.Tensor, num_bits: int) -> dict[str, float]:
    from lsgs.metrics import PixelMetrics

    metric = PixelMetrics(num_bits=num_bits)
    start = time.perf_counter()
    for batch_maps, batch_masks in batches(maps, masks):
        metric.update(batch_maps, batch_masks)
    update_s = time.perf_counter() - start
    result = metric.compute()
    result["update_s"] = update_s
    return result


def run_aupro(maps: torch.Tensor, masks: torch.Tensor, num_bits: int) -> float:
    from lsgs.metrics import AUPRO

    metric = AUPRO(num_bits=num_bits)
    for batch_maps, batch_masks in batches(maps, masks):
        metric.update(batch_maps, batch_masks)
    return metric.compute()


def run_anomaly_metrics(maps: torch.Tensor, masks: torch.Tensor, num_bits: int, num_categories: int) -> dict:
    from lsgs.metrics import AnomalyMetrics

    categories = [f"category_{i:02d}" for i in range(num_categories)]
    per_category = -(-len(maps) // num_categories)
    metric = AnomalyMetrics(categories, num_bits=num_bits, val_threshold=0.1)
    for i, (batch_maps, batch_masks) in enumerate(batches(maps, masks)):
        names = [
            categories[min((i * BATCH + j) // per_category, num_categories - 1)]
            for j in range(len(batch_maps))
        ]
        labels = batch_masks.flatten(1).any(1)
        metric.update(batch_maps, batch_masks, labels, names)
    return metric.compute()


def run_torchmetrics_auroc(maps: torch.Tensor, masks: torch.Tensor) -> float:
    from torchmetrics.classification import BinaryAUROC

    metric = BinaryAUROC(thresholds=None)  # exact: keeps every score
    for batch_maps, batch_masks in batches(maps, masks):
        metric.update(batch_maps.reshape(-1), batch_masks.reshape(-1).long())
    return float(metric.compute())


def worker(method: str, data_dir: Path, num_bits: int, repeats: int) -> dict:
    """Run one method on the saved data in this (fresh) process; return its value(s), times and peak RSS."""
    maps = torch.from_numpy(np.load(data_dir / "maps.npy"))
    masks = torch.from_numpy(np.load(data_dir / "masks.npy"))
    scores, labels = maps.numpy().ravel(), masks.numpy().ravel()
    # Imports happen before the measurements, which then see only the method's own time and memory.
    import torchmetrics.classification  # noqa: F401
    from sklearn.metrics import average_precision_score, roc_auc_score

    import lsgs.metrics  # noqa: F401

    runs: dict[str, Callable[[], object]] = {
        "sklearn_auroc": lambda: roc_auc_score(labels, scores),
        "sklearn_ap": lambda: average_precision_score(labels, scores),
        "exact_dice": lambda: exact_best_dice(scores, labels),
        "exact_aupro": lambda: exact_aupro(maps.numpy(), masks.numpy()),
        "torchmetrics_auroc": lambda: run_torchmetrics_auroc(maps, masks),
        "pixel": lambda: run_pixel_metrics(maps, masks, num_bits),
        "aupro": lambda: run_aupro(maps, masks, num_bits),
        "anomaly": lambda: run_anomaly_metrics(maps, masks, num_bits, 15),
    }
    result, times, peaks = None, [], []
    for _ in range(repeats):
        result, seconds, peak = measure(runs[method])
        times.append(seconds)
        peaks.append(peak)
    return {"result": result, "times": times, "peak_mib": None if peaks[0] is None else max(peaks)}


def run_in_subprocess(method: str, data_dir: Path, num_bits: int, repeats: int = 1) -> dict:
    """``worker`` in a fresh interpreter: no allocator state or cached memory carried over between methods."""
    out = data_dir / f"{method}-{num_bits}.pt"
    threads = ["--threads", str(torch.get_num_threads())]
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--worker",
            method,
            "--data-dir",
            str(data_dir),
            "--num-bits",
            str(num_bits),
            "--repeats",
            str(repeats),
            "--out",
            str(out),
            *threads,
        ],
        check=True,
    )
    return torch.load(out, weights_only=False)


def fmt_mem(mib: float | None) -> str:
    return "n/a" if mib is None else f"{mib:,.0f} MiB"


def fmt_time(times: list[float]) -> str:
    if len(times) == 1:
        return f"{times[0]:.2f} s"
    return f"{min(times):.2f} s (median {statistics.median(times):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-images", type=int, default=3000)
    parser.add_argument("--num-bits", type=int, default=None, help="default: lsgs.metrics.DEFAULT_NUM_BITS")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of the histogram metrics")
    parser.add_argument("--skip-torchmetrics", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true", help="skip the num_bits sweep")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from lsgs.metrics import DEFAULT_NUM_BITS

    num_bits = args.num_bits or DEFAULT_NUM_BITS
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        torch.save(worker(args.worker, args.data_dir, num_bits, args.repeats), args.out)
        return

    command = "python benchmarks/metrics.py " + " ".join(sys.argv[1:])
    start = time.perf_counter()
    maps, masks = make_maps(args.num_images)
    gen_s = time.perf_counter() - start
    positives, zeros = float(masks.float().mean()), float((maps == 0).float().mean())
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with tempfile.TemporaryDirectory(prefix="lsgs-bench-") as tmp:
        data_dir = Path(tmp)
        np.save(data_dir / "maps.npy", maps.numpy())
        np.save(data_dir / "masks.npy", masks.numpy())
        del maps, masks
        print(
            f"data: {args.num_images * SIZE * SIZE:,} pixels ({args.num_images} maps {SIZE}x{SIZE}), "
            f"positives {positives:.2%}, exact zeros {zeros:.1%}, generated in {gen_s:.1f} s; "
            f"torch threads {torch.get_num_threads()}",
            flush=True,
        )
        exact = {
            m: run_in_subprocess(m, data_dir, num_bits)
            for m in ("sklearn_auroc", "sklearn_ap", "exact_dice", "exact_aupro")
        }
        sk_auroc, sk_ap = exact["sklearn_auroc"]["result"], exact["sklearn_ap"]["result"]
        ref_dice, ref_aupro = exact["exact_dice"]["result"], exact["exact_aupro"]["result"]
        rows = [
            (
                name,
                fmt_time(exact[m]["times"]),
                fmt_mem(exact[m]["peak_mib"]),
                f"{exact[m]['result']:.6f}",
                "0",
            )
            for name, m in (
                ("sklearn roc_auc_score (exact)", "sklearn_auroc"),
                ("sklearn average_precision_score (exact)", "sklearn_ap"),
                ("exact best Dice (numpy sort)", "exact_dice"),
                ("exact AUPRO@0.3 (numpy sort)", "exact_aupro"),
            )
        ]
        if not args.skip_torchmetrics:
            tm = run_in_subprocess("torchmetrics_auroc", data_dir, num_bits)
            rows.append(
                (
                    "torchmetrics BinaryAUROC(thresholds=None)",
                    fmt_time(tm["times"]),
                    fmt_mem(tm["peak_mib"]),
                    f"{tm['result']:.6f}",
                    f"{abs(tm['result'] - sk_auroc):.1e}",
                )
            )
        pixel = run_in_subprocess("pixel", data_dir, num_bits, args.repeats)
        aupro = run_in_subprocess("aupro", data_dir, num_bits, args.repeats)
        anomaly = run_in_subprocess("anomaly", data_dir, num_bits)
        ours, pooled = pixel["result"], anomaly["result"]["pooled"]
        rows += [
            (
                f"**PixelMetrics** ({num_bits} bits) update+compute: AUROC",
                fmt_time(pixel["times"]),
                fmt_mem(pixel["peak_mib"]),
                f"{ours['pixel_auroc']:.6f}",
                f"{abs(ours['pixel_auroc'] - sk_auroc):.1e}",
            ),
            ("  same run: AP", "", "", f"{ours['pixel_ap']:.6f}", f"{abs(ours['pixel_ap'] - sk_ap):.1e}"),
            (
                "  same run: best Dice",
                "",
                "",
                f"{ours['dice_best']:.6f}",
                f"{abs(ours['dice_best'] - ref_dice):.1e}",
            ),
            (
                f"  same run: update only ({-(-args.num_images // BATCH)} batches of {BATCH})",
                f"{ours['update_s']:.2f} s",
                "",
                "",
                "",
            ),
            (
                f"**AUPRO** ({num_bits} bits) update+compute",
                fmt_time(aupro["times"]),
                fmt_mem(aupro["peak_mib"]),
                f"{aupro['result']:.6f}",
                f"{abs(aupro['result'] - ref_aupro):.1e}",
            ),
            (
                f"**AnomalyMetrics** (15 categories, {num_bits} bits, AUPRO + image AUROC), "
                "construct+update+compute:"
                " pooled AUROC",
                fmt_time(anomaly["times"]),
                fmt_mem(anomaly["peak_mib"]),
                f"{pooled['pixel_auroc']:.6f}",
                f"{abs(pooled['pixel_auroc'] - sk_auroc):.1e}",
            ),
            (
                "  same run: pooled AP / best Dice / AUPRO",
                "",
                "",
                f"{pooled['pixel_ap']:.6f} / {pooled['dice_best']:.6f} / {pooled['aupro']:.6f}",
                f"{abs(pooled['pixel_ap'] - sk_ap):.1e} / {abs(pooled['dice_best'] - ref_dice):.1e} / "
                f"{abs(pooled['aupro'] - ref_aupro):.1e}",
            ),
        ]
        load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(
            f"\n`{command}`  (each method in a fresh process; 1-min load average {load_start:.2f} at start, "
            f"{load_end:.2f} at end)\n"
        )
        print("| method | wall time | peak extra RSS | value | abs. diff. to exact |")
        print("|---|---|---|---|---|")
        for row in rows:
            print("| " + " | ".join(row) + " |")

        if not args.skip_sweep:
            print(
                "\nnum_bits sweep (PixelMetrics update+compute, one run each in a fresh process; state = one "
                "[2, 2**num_bits] int64 histogram):\n"
            )
            print(
                "| num_bits | state | wall time | peak extra RSS | abs. diff. AUROC | abs. diff. AP | "
                "abs. diff. best Dice |"
            )
            print("|---|---|---|---|---|---|---|")
            for bits in (14, 16, 18, 20, 22, 24):
                run = run_in_subprocess("pixel", data_dir, bits)
                result = run["result"]
                print(
                    f"| {bits} | {2 * 8 * 2**bits / 2**20:g} MiB | {run['times'][0]:.2f} s | "
                    f"{fmt_mem(run['peak_mib'])} | {abs(result['pixel_auroc'] - sk_auroc):.1e} | "
                    f"{abs(result['pixel_ap'] - sk_ap):.1e} | {abs(result['dice_best'] - ref_dice):.1e} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
