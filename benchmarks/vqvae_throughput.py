"""Training throughput of the paper-size VQ-VAE on this machine, as images/s and as a fraction of matmul peak.

One training step = forward + loss (L1 reconstruction + VQ loss) + backward + Adam step, batch 16 of 128x128
images by default. Model FLOPs per image come from ``torch.utils.flop_counter.FlopCounterMode`` over one step
(convolutions and matmuls, forward and backward, including the nearest-code matmul); the peak is the best of
several 4096x4096 matmuls measured in the same run (before and after the model runs, best kept).

    python benchmarks/vqvae_throughput.py                  # fp32 NCHW, fp32 channels_last, bf16 autocast
    python benchmarks/vqvae_throughput.py --compile        # also torch.compile variants
    python benchmarks/vqvae_throughput.py --profile        # top ops of the fp32 channels_last step
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timing import load_average, matmul_peak_gflops, timed
from torch.utils.flop_counter import FlopCounterMode

from lsgs.machine import cpu_name
from lsgs.nn.vqvae import VQVAEConfig, VQVAENet


@dataclass
class Variant:
    name: str
    channels_last: bool
    bf16: bool
    compile: bool = False


@dataclass
class Measurement:
    variant: Variant
    step_seconds: list[float]
    flops_per_step: int
    batch_size: int

    @property
    def median_step(self) -> float:
        return statistics.median(self.step_seconds)

    @property
    def best_step(self) -> float:
        return min(self.step_seconds)

    def images_per_second(self, seconds: float) -> float:
        return self.batch_size / seconds

    def gflops_per_second(self, seconds: float) -> float:
        return self.flops_per_step / seconds / 1e9


def make_step(
    net: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, bf16: bool, compiled: bool
) -> Callable[[], None]:
    """One optimisation step on a fixed batch."""
    forward = torch.compile(net) if compiled else net

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = forward(x)
            # L1 in fp32: the reconstruction is bf16 under autocast.
            loss = F.l1_loss(out.reconstruction.float(), x) + net.quantizer.loss(out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def measure(variant: Variant, config: VQVAEConfig, batch_size: int, size: int, warmup: int, steps: int
            ) -> Measurement:
    torch.manual_seed(0)
    net = VQVAENet(config)
    x = torch.rand(batch_size, config.in_channels, size, size, generator=torch.Generator().manual_seed(1))
    if variant.channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    # FLOPs are counted on the eager model (the same maths as the compiled one).
    with FlopCounterMode(display=False) as counter:
        make_step(net, opt, x, variant.bf16, compiled=False)()
    step = make_step(net, opt, x, variant.bf16, compiled=variant.compile)
    # Warm-up excluded: oneDNN primitive creation, allocator, compilation.
    times = timed(step, steps, warmup)
    return Measurement(variant, times, counter.get_total_flops(), batch_size)


def profile_top_ops(config: VQVAEConfig, batch_size: int, size: int, rows: int = 12) -> str:
    """Self-CPU-time table of the top ops of two fp32 channels_last steps."""
    torch.manual_seed(0)
    net = VQVAENet(config).to(memory_format=torch.channels_last)
    x = torch.rand(batch_size, config.in_channels, size, size).contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    step = make_step(net, opt, x, bf16=False, compiled=False)
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=128, help="image height and width")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (inductor) variants")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast variant")
    parser.add_argument("--profile", action="store_true", help="top ops of a fp32 channels_last step")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    config = VQVAEConfig.paper()
    variants = [Variant("fp32 NCHW", False, False), Variant("fp32 channels_last", True, False)]
    if args.compile:
        variants.append(Variant("fp32 channels_last + compile", True, False, compile=True))
    if not args.no_bf16:
        variants.append(Variant("bf16 autocast channels_last", True, True))
        if args.compile:
            variants.append(Variant("bf16 autocast channels_last + compile", True, True, compile=True))

    load_before = load_average()
    peak = matmul_peak_gflops(torch.float32)
    results = []
    for v in variants:
        try:
            results.append(measure(v, config, args.batch_size, args.size, args.warmup, args.steps))
        except Exception as err:  # torch.compile needs a working C++ toolchain; report and go on
            first_line = str(err).splitlines()[0][:200] if str(err) else ""
            print(f"{v.name}: failed ({type(err).__name__}: {first_line})", file=sys.stderr)
    peak = max(peak, matmul_peak_gflops(torch.float32))  # machine noise: keep the better of two readings
    bf16_peak = matmul_peak_gflops(torch.bfloat16) if not args.no_bf16 else float("nan")

    load_after = load_average()
    params = sum(p.numel() for p in VQVAENet(config).parameters())
    print(f"## VQ-VAE training throughput (paper config: channels={config.channels}, "
          f"res_channels={config.res_channels}, K={config.codebook_size}, D={config.code_dim}, "
          f"{params / 1e6:.2f} M params)\n")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}, "
          f"batch {args.batch_size} x {config.in_channels} x {args.size} x {args.size}, "
          f"{args.steps} timed steps after {args.warmup} warm-up; load average before/after: "
          f"{load_before}/{load_after}\n")
    print(f"fp32 matmul peak (best 4096^3): {peak:.0f} GFLOP/s; bf16 matmul peak: {bf16_peak:.0f} GFLOP/s\n")
    print("| variant | images/s (median step) | images/s (best step) | ms/step median [min, max] "
          "| model GFLOP/image (fwd+bwd) | GFLOP/s (median) | % of fp32 peak (median) "
          "| % of fp32 peak (best) |")
    print("|---|---|---|---|---|---|---|---|")
    for m in results:
        med, best = m.median_step, m.best_step
        print(f"| {m.variant.name} | {m.images_per_second(med):.2f} | {m.images_per_second(best):.2f} | "
              f"{1e3 * med:.0f} [{1e3 * best:.0f}, {1e3 * max(m.step_seconds):.0f}] | "
              f"{m.flops_per_step / m.batch_size / 1e9:.2f} | {m.gflops_per_second(med):.0f} | "
              f"{100 * m.gflops_per_second(med) / peak:.0f}% | "
              f"{100 * m.gflops_per_second(best) / peak:.0f}% |")
    if any(max(m.step_seconds) > 1.3 * m.best_step for m in results):
        print("\nStep times vary by more than 30%: the machine was probably shared; rerun when it is idle.")
    print(f"\ncommand: `python {shlex.join(['benchmarks/vqvae_throughput.py', *(argv or sys.argv[1:])])}`")
    if args.profile:
        print("\n### top ops, fp32 channels_last (two steps)\n")
        print("```\n" + profile_top_ops(config, args.batch_size, args.size) + "\n```")


if __name__ == "__main__":
    main()
