"""Timing helpers shared by the benchmark scripts (imported as a sibling module: run the scripts from any folder
as ``python benchmarks/<script>.py``)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import torch


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, n: int = 4096, repeats: int = 5) -> float:
    """Best-of-``repeats`` throughput of an ``n x n`` by ``n x n`` matmul, in GFLOP/s."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    torch.mm(a, b)  # warm-up (allocations, oneDNN/MKL kernel selection)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 0) -> dict[str, list[float]]:
    """Seconds of each function over ``repeats`` rounds of A, B, C, ... (so slow drifts of the machine hit all
    alike), after ``warmup`` untimed rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def timed(function: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``function`` after ``warmup`` untimed ones."""
    return interleaved_times({"": function}, repeats, warmup)[""]


def load_average() -> str:
    """The 1, 5 and 15-minute load averages: other jobs on a shared machine distort every figure measured."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
