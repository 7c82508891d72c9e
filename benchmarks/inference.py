"""Faster LSGS scoring on CPU: the plain decoder path beside exact and approximate runtimes, measured in one run.

Every variant scores the same batch the way the scoring stage does (encode -> one transformer pass -> code NLL ->
positions above the NLL threshold resampled n times with per-image seeded noise -> X_hat and the n restorations
decoded -> ``restoration_anomaly_map`` -> smoothing) and is compared with the plain path:

* ``plain``: the reference and what ``ScoringModule`` runs: the VQ-VAE's own decoder (torch fp32, channels_last
  VQ-VAE, ``decode_indices`` for X_hat and then for the B * n restorations, under ``inference_mode`` as Lightning's
  test loop).
* ``plain, resampling seed s`` (not timed): the plain path with other resampling noise, the yardstick for every
  deviation below: any variant that changes a single draw moves the map about as much as a new seed does.
* exact variants (results equal up to float rounding): ``exact`` = ``lsgs.nn.fast_decode`` (per-code table for the
  decoder's first convolution, in-place ReLUs, X_hat and restorations in one deduplicated decoder call) under
  ``inference_mode``; ``exact onnxruntime`` / ``exact openvino`` = the same with the transformer and the decoder
  after its first layer run by ONNX Runtime / OpenVINO in fp32 (legacy ``torch.onnx.export``).
* approximate variants: ``bf16 autocast`` (the plain path; slow where the CPU has no bf16 units), ``int8 torch`` (the
  transformer's ``nn.Linear`` layers dynamically quantised by ``torch.ao.quantization.quantize_dynamic``),
  ``int8 onnxruntime`` (``onnxruntime.quantization.quantize_dynamic`` of the exported transformer), each with the
  exact torch decoder, and ``int8 ort + openvino decoder``. Each calibrates its own NLL threshold (90th
  percentile of its own NLLs on a calibration batch), as a deployment would.

Columns: images/s (median of interleaved repeats: variant A, B, C, A, B, C, ... so machine noise hits all
alike), speed-up vs plain, model GFLOP per image (``FlopCounterMode`` on the torch path the variant computes;
int8 variants count their integer MACs alike), GFLOP/s and its share of the fp32 matmul peak measured in the
same run (best of 2048^3 ``torch.mm`` before and after), and the deviation from the plain path's fp32 results: codes
that differ, max |NLL| change, resampling decisions (NLL > threshold) that flip, drawn codes that differ, max
and mean |map| change relative to the map's maximum and mean. With ``--image-folder`` (an MVTec-layout folder)
the deviations run over its test images and pixel AUROC / AP (pooled over all pixels) are added per variant.

Also printed: the decoder's receptive field in code cells (from the architecture, and measured by perturbing one
code), the share of the decoder's work that an ideal sparse decode (only outputs that depend on a resampled
code) could skip for the resampling patterns of this run and for synthetic random / clustered ones, and the top
ops of the plain path from ``torch.profiler``.

Weights are random (seeded) unless checkpoints are given; timings do not depend on them, deviations do (a random
transformer's NLLs are all close to log K, which makes threshold decisions touchier than a trained one's).
On a shared machine, two threads per process can spend much of their time waiting for each other (each op ends
in a barrier): compare rows of one run only, and prefer ``--threads 1`` when the load average exceeds the cores.

    python benchmarks/inference.py                      # CPU config size and paper size (a few minutes)
    python benchmarks/inference.py --quick              # tiny sizes, seconds
    python benchmarks/inference.py --sizes paper --repeats 5 --threads 2
    python benchmarks/inference.py --sizes trained --vqvae-checkpoint V.ckpt --transformer-checkpoint T.ckpt \
        --image-folder data/mvtec --yardstick-seeds 3
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import shlex
import statistics
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch
from timing import interleaved_times, load_average, matmul_peak_gflops
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from lsgs.machine import cpu_name
from lsgs.metrics.quantile import score_quantile
from lsgs.nn.fast_decode import (
    decode_original_and_restored,
    decode_with_table,
    decoder_dirty_masks,
    decoder_receptive_field,
    first_layer_table,
    table_first_layer,
)
from lsgs.nn.restoration import (
    code_nll,
    per_image_uniforms,
    restoration_anomaly_map,
    restore_global,
    smooth_anomaly_map,
)
from lsgs.nn.transformer import CodeTransformer, CodeTransformerConfig
from lsgs.nn.vqvae import VQVAEConfig, VQVAENet

NLL_QUANTILE = 0.9  # the scoring stage's default nll_quantile


# ------------------------------------------------------------------------------------------------ models
@dataclass
class Models:
    """A VQ-VAE and transformer pair to score with, and the image size they take."""

    name: str
    vqvae: VQVAENet
    transformer: CodeTransformer
    image_size: int

    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.vqvae.config.downsample_factor
        return side, side


def random_models(name: str, vq_config: VQVAEConfig, tr_kwargs: dict, image_size: int) -> Models:
    """Seeded random weights. The codebook is then set to encodings of random images (as k-means
    initialisation would), so the code maps use all K codes as a trained model's do: with the default init a
    random encoder picks a handful of codes, and restorations would barely change the decoded image."""
    torch.manual_seed(0)
    vqvae = (
        VQVAENet(vq_config).eval().to(memory_format=torch.channels_last)
    )  # as the Lightning module sets it
    k = vq_config.codebook_size
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        count = -(-k // (image_size // vq_config.downsample_factor) ** 2) + 1  # images giving > K encodings
        images = torch.rand(count, vq_config.in_channels, image_size, image_size, generator=gen)
        z_e = vqvae.encode(images).permute(0, 2, 3, 1).reshape(-1, vq_config.code_dim)  # [N*h*w, D]
        vqvae.quantizer.replace_codebook(z_e[torch.randperm(z_e.shape[0], generator=gen)[:k]])
    side = image_size // vq_config.downsample_factor
    torch.manual_seed(1)
    config = CodeTransformerConfig(vocab_size=vq_config.codebook_size, seq_len=side * side, **tr_kwargs)
    return Models(name, vqvae, CodeTransformer(config).eval(), image_size)


def size_models(size: str) -> Models:
    if size == "tiny":
        return random_models(
            "tiny", VQVAEConfig.tiny(), {"d_model": 32, "n_layers": 2, "n_heads": 2}, image_size=32
        )
    if size == "cpu":  # experiments/mvtec3d_cpu.yaml
        vq = VQVAEConfig(
            channels=(32, 64, 64), num_res_blocks=2, res_channels=32, codebook_size=256, code_dim=32
        )
        return random_models("cpu", vq, {"d_model": 128, "n_layers": 3, "n_heads": 4}, image_size=128)
    if size == "paper":
        paper = CodeTransformerConfig.paper()
        tr = {"d_model": paper.d_model, "n_layers": paper.n_layers, "n_heads": paper.n_heads}
        return random_models("paper", VQVAEConfig.paper(), tr, image_size=128)
    raise ValueError(f"unknown size {size!r}")


def trained_models(vqvae_checkpoint: str, transformer_checkpoint: str) -> Models:
    from lsgs.modules.transformer import load_code_transformer  # Lightning only when checkpoints are given
    from lsgs.modules.vqvae import VQVAE

    vqvae = VQVAE.from_checkpoint(vqvae_checkpoint, "--vqvae-checkpoint").net.eval()
    transformer, _ = load_code_transformer(transformer_checkpoint, "--transformer-checkpoint")
    if transformer.config.attention != "global":
        raise SystemExit("--transformer-checkpoint must be a global (bidirectional) transformer")
    side = round(transformer.config.seq_len**0.5)
    return Models("trained", vqvae, transformer.eval(), side * vqvae.config.downsample_factor)


# ------------------------------------------------------------------------------------------------ runtimes
@dataclass
class Runtime:
    """How one variant computes the transformer logits and decodes code maps."""

    name: str
    exact: bool
    logits: Callable[[Tensor], Tensor]  # [B, L] -> [B, L, K]
    decode: Callable[[Tensor], Tensor]  # [N, h, w] -> [N, C, H, W]
    one_call: bool  # X_hat and the restorations in one deduplicated decoder call
    context: Callable[[], contextlib.AbstractContextManager] = torch.inference_mode
    flops_of: str = "plain"  # which torch path's FLOP count applies
    threshold: float = float("nan")
    note: str = ""
    seed: int = 0  # of the resampling noise, as ScoringModule's seed
    timed: bool = True


@dataclass
class ScoreResult:
    codes: Tensor  # [B, L]
    nll: Tensor  # [B, L]
    restored: Tensor  # [B, n, L]
    anomaly: Tensor  # [B, 1, H, W]


def score(runtime: Runtime, models: Models, images: Tensor, seeds: list[int], n: int) -> ScoreResult:
    """One batch through ``runtime``, in the scoring stage's order."""
    with runtime.context():
        codes = models.vqvae.encode_indices(images)  # [B, h, w]
        b, h, w = codes.shape
        flat = codes.flatten(1)  # [B, L]
        logits = runtime.logits(flat)  # [B, L, K]
        # ScoringModule's per-image seeds: seed * 1_000_003 + dataset index.
        noise = per_image_uniforms([runtime.seed * 1_000_003 + s for s in seeds], n, h * w)  # [B, n, L]
        restored = restore_global(logits, flat, runtime.threshold, n, uniforms=noise)  # [B, n, L]
        if runtime.one_call:
            x_hat, decoded = decode_original_and_restored(runtime.decode, flat, restored, (h, w))
        else:
            x_hat = runtime.decode(codes)  # [B, C, H, W]
            decoded = runtime.decode(restored.reshape(b * n, h, w))  # [B*n, C, H, W]
            decoded = decoded.reshape(b, n, *decoded.shape[1:])  # [B, n, C, H, W]
        anomaly = smooth_anomaly_map(restoration_anomaly_map(x_hat, decoded))  # [B, 1, H, W]
        return ScoreResult(flat, code_nll(logits, flat), restored, anomaly)


def calibrate(runtime: Runtime, models: Models, calib: Tensor) -> None:
    """The variant's own NLL threshold: the 90th percentile of its NLLs on ``calib``, as the stage sets it."""
    with runtime.context():
        codes = models.vqvae.encode_indices(calib).flatten(1)  # [N, L]
        runtime.threshold = score_quantile(code_nll(runtime.logits(codes), codes), NLL_QUANTILE)


def torch_runtimes(models: Models, yardstick_seeds: int = 1) -> list[Runtime]:
    vq, tr = models.vqvae, models.transformer
    table = functools.partial(decode_with_table, vq, first_layer_table(vq))  # [N, h, w] -> [N, C, H, W]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        int8 = torch.ao.quantization.quantize_dynamic(tr, {nn.Linear}, dtype=torch.qint8)

    def bf16() -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        return stack

    def bf16_logits(codes: Tensor) -> Tensor:
        return tr(codes).float()

    def bf16_decode(indices: Tensor) -> Tensor:
        return vq.decode_indices(indices).float()

    return [
        # Lightning's test loop runs under inference_mode (Trainer(inference_mode=True), the default).
        Runtime("plain", True, tr, vq.decode_indices, one_call=False, context=torch.inference_mode),
        Runtime("exact", True, tr, table, one_call=True, context=torch.inference_mode, flops_of="exact"),
        *(
            Runtime(
                f"plain, resampling seed {seed}",
                False,
                tr,
                vq.decode_indices,
                one_call=False,
                seed=seed,
                timed=False,
                note="the plain path with other resampling noise: how far the maps move by sampling alone"
                if seed == 1
                else "",
            )
            for seed in range(1, yardstick_seeds + 1)
        ),
        Runtime("bf16 autocast", False, bf16_logits, bf16_decode, one_call=False, context=bf16),
        Runtime(
            "int8 torch",
            False,
            int8,
            table,
            one_call=True,
            context=torch.inference_mode,
            flops_of="exact",
            note="transformer nn.Linear: torch.ao quantize_dynamic (qint8, fbgemm)",
        ),
    ]


def export_runtimes(models: Models, threads: int, folder: str) -> tuple[list[Runtime], list[str]]:
    """ONNX Runtime and OpenVINO variants; a missing package skips its variants, with a note."""
    notes: list[str] = []
    tr = models.transformer
    vq = models.vqvae
    first_layer = functools.partial(table_first_layer, vq, first_layer_table(vq))  # [N, h, w] -> [N, C, h, w]
    table = functools.partial(decode_with_table, vq, first_layer_table(vq))
    rest = nn.Sequential(*list(vq.decoder)[1:]).eval()  # the decoder after its first convolution
    h, w = models.grid
    codes = torch.zeros(2, h * w, dtype=torch.long)
    first = first_layer(codes.view(2, h, w)).contiguous()
    tr_path, dec_path, int8_path = (os.path.join(folder, f) for f in ("tr.onnx", "dec.onnx", "tr_int8.onnx"))
    try:
        import onnx  # noqa: F401  (torch.onnx.export needs it)
    except ImportError:
        return [], ["onnx not installed: no onnxruntime / openvino variants"]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings of the eager code-range check
        # The legacy exporter: the dynamo one stops at check_code_range's data-dependent int(codes.min()).
        torch.onnx.export(
            tr,
            (codes,),
            tr_path,
            input_names=["codes"],
            output_names=["logits"],
            dynamic_axes={"codes": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
        torch.onnx.export(
            rest,
            (first,),
            dec_path,
            input_names=["h"],
            output_names=["image"],
            dynamic_axes={"h": {0: "batch"}, "image": {0: "batch"}},
            dynamo=False,
        )

    def table_then(run: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        def decode(indices: Tensor) -> Tensor:
            return run(first_layer(indices).contiguous())  # [N, C, h, w] -> [N, C_img, H, W]

        return decode

    runtimes: list[Runtime] = []
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1

        def ort_run(path: str, name: str) -> Callable[[Tensor], Tensor]:
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])

        level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)  # quantize_dynamic's pre-processing hint
        try:
            quantize_dynamic(tr_path, int8_path, weight_type=QuantType.QInt8)
        finally:
            logging.getLogger().setLevel(level)
        ort_tr, ort_dec, ort_int8 = (
            ort_run(tr_path, "codes"),
            ort_run(dec_path, "h"),
            ort_run(int8_path, "codes"),
        )
        runtimes += [
            Runtime(
                "exact onnxruntime",
                True,
                ort_tr,
                table_then(ort_dec),
                True,
                torch.inference_mode,
                "exact",
                note=f"onnxruntime {ort.__version__} fp32: transformer + decoder after the table layer",
            ),
            Runtime(
                "int8 onnxruntime",
                False,
                ort_int8,
                table,
                True,
                torch.inference_mode,
                "exact",
                note="transformer: onnxruntime quantize_dynamic (QInt8 weights, MatMulInteger); torch decoder",
            ),
        ]
    except ImportError:
        notes.append("onnxruntime not installed: its variants skipped")
        ort_int8 = None
    try:
        import openvino as ov

        core = ov.Core()
        config = {
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",
        }

        def ov_run(path: str) -> Callable[[Tensor], Tensor]:
            compiled = core.compile_model(path, "CPU", config)
            return lambda x: torch.from_numpy(compiled(x.numpy())[0])

        ov_tr, ov_dec = ov_run(tr_path), ov_run(dec_path)
        runtimes.append(
            Runtime(
                "exact openvino",
                True,
                ov_tr,
                table_then(ov_dec),
                True,
                torch.inference_mode,
                "exact",
                note=f"openvino {ov.__version__} fp32: transformer + decoder after the table layer",
            )
        )
        if ort_int8 is not None:
            runtimes.append(
                Runtime(
                    "int8 ort + openvino decoder",
                    False,
                    ort_int8,
                    table_then(ov_dec),
                    True,
                    torch.inference_mode,
                    "exact",
                    note="int8 onnxruntime transformer, openvino fp32 decoder",
                )
            )
    except ImportError:
        notes.append("openvino not installed: its variants skipped")
    return runtimes, notes


# ------------------------------------------------------------------------------------------------ measures
def flops_per_image(runtime: Runtime, models: Models, images: Tensor, seeds: list[int], n: int) -> float:
    with FlopCounterMode(display=False) as counter:
        score(runtime, models, images, seeds, n)
    return counter.get_total_flops() / images.shape[0]


@dataclass
class Deviation:
    codes_differ: tuple[int, int]  # (count, total) of image codes that differ
    nll_max: float  # max |NLL change| over the codes that are equal
    flips: tuple[int, int]  # positions (with equal codes) whose resampling decision differs
    draws: tuple[int, int]  # restored codes that differ
    map_rel: float  # max |map - map_ref| / max |map_ref|
    map_mean_rel: float  # mean |map - map_ref| / mean |map_ref|

    def cells(self) -> list[str]:
        def count(pair: tuple[int, int]) -> str:
            return f"{pair[0]} ({100 * pair[0] / max(pair[1], 1):.2g}%)"

        return [
            count(self.codes_differ),
            f"{self.nll_max:.1e}",
            count(self.flips),
            count(self.draws),
            f"{self.map_rel:.1e}",
            f"{self.map_mean_rel:.1e}",
        ]


def deviation(result: ScoreResult, ref: ScoreResult, threshold: float, ref_threshold: float) -> Deviation:
    same = result.codes == ref.codes  # [B, L]
    nll = (result.nll - ref.nll).abs()[same].max().item() if same.any() else float("nan")
    flips = (((result.nll > threshold) != (ref.nll > ref_threshold)) & same).sum().item()
    draws = (result.restored != ref.restored).sum().item()
    change = (result.anomaly - ref.anomaly).abs()  # [B, 1, H, W]
    peak, mean = ref.anomaly.abs().max().clamp_min(1e-30), ref.anomaly.abs().mean().clamp_min(1e-30)
    return Deviation(
        (int((~same).sum()), same.numel()),
        nll,
        (int(flips), same.numel()),
        (int(draws), ref.restored.numel()),
        (change.max() / peak).item(),
        (change.mean() / mean).item(),
    )


def profile_plain(
    runtime: Runtime, models: Models, images: Tensor, seeds: list[int], n: int, top: int
) -> list[str]:
    """Self CPU time of the plain path by op (torch.profiler), with the input shape of the largest calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        score(runtime, models, images, seeds, n)
    rows = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows)
    lines = ["| op | input shapes | calls | self CPU ms | share |", "|---|---|---|---|---|"]
    for e in rows[:top]:
        shapes = ", ".join(str(list(s)) for s in e.input_shapes[:2] if s)
        lines.append(
            f"| {e.key} | {shapes} | {e.count} | {e.self_cpu_time_total / 1e3:.1f} | "
            f"{100 * e.self_cpu_time_total / total:.1f}% |"
        )
    return lines


# ------------------------------------------------------------------------------------------------ sparsity
def receptive_field_lines(models: Models) -> list[str]:
    """The projective field of one code: from the architecture and measured by changing the centre code."""
    vq, (h, w) = models.vqvae, models.grid
    f = vq.config.downsample_factor
    codes = torch.randint(0, vq.config.codebook_size, (1, h, w), generator=torch.Generator().manual_seed(3))
    changed = codes.clone()
    changed[0, h // 2, w // 2] = (codes[0, h // 2, w // 2] + 1) % vq.config.codebook_size
    with torch.inference_mode():
        diff = (vq.decode_indices(codes) - vq.decode_indices(changed)).abs().amax(dim=(0, 1))  # [H, W]
    rows, cols = (diff > 0).nonzero(as_tuple=True)
    measured = (int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1)
    width = decoder_receptive_field(vq.config)
    return [
        f"one code cell ({f} x {f} pixels) can change a {width} x {width} pixel window ({width / f:.2f} code "
        f"cells per axis, from the architecture); measured by changing the centre code: {measured[0]} x "
        f"{measured[1]} pixels changed.",
    ]


def stage_flops(models: Models) -> list[float]:
    """FLOPs of one decode per stage of ``decoder_dirty_masks``: the code-resolution layers, then each
    transposed convolution (with its ReLU)."""
    layers = list(models.vqvae.decoder)
    h, w = models.grid
    x = torch.zeros(1, models.vqvae.config.code_dim, h, w)
    stages, current = [], 0.0
    with torch.no_grad():
        for layer in layers:
            with FlopCounterMode(display=False) as counter:
                y = layer(x)
            if isinstance(layer, nn.ConvTranspose2d):
                stages.append(current)
                current = 0.0
            current += counter.get_total_flops()
            x = y
    stages.append(current)
    return stages


def dirty_lines(models: Models, result: ScoreResult) -> list[str]:
    """Share of an ideal sparse decode's savings for this run's resampling pattern and synthetic ones."""
    cfg, (h, w) = models.vqvae.config, models.grid
    per_stage = stage_flops(models)
    gen = torch.Generator().manual_seed(4)
    n_maps = 256

    def blobs(count: int, side: int) -> Tensor:
        mask = torch.zeros(n_maps, h, w, dtype=torch.bool)
        for i in range(n_maps):
            for _ in range(count):
                y, x = torch.randint(0, h - side + 1, (2,), generator=gen).tolist()
                mask[i, y : y + side, x : x + side] = True
        return mask

    side10 = max(1, round((0.1 * h * w) ** 0.5))
    patterns = {
        "this run's restorations": (result.restored != result.codes.unsqueeze(1)).view(-1, h, w),
        "random 2%": torch.rand(n_maps, h, w, generator=gen) < 0.02,
        "random 10%": torch.rand(n_maps, h, w, generator=gen) < 0.10,
        f"one {side10}x{side10} blob": blobs(1, side10),
        "three 3x3 blobs": blobs(3, min(3, h)),
    }
    lines = [
        "| resampling pattern | codes changed | dirty share per stage (code res., then each upsampling) | "
        "decoder FLOPs an ideal sparse decode still needs |",
        "|---|---|---|---|",
    ]
    for name, changed in patterns.items():
        masks = decoder_dirty_masks(cfg, changed)
        shares = [m.float().mean().item() for m in masks]
        # The first stage's layers are charged at the stage's final (widest) mask: an upper bound for them.
        needed = sum(s * f for s, f in zip(shares, per_stage)) / sum(per_stage)
        lines.append(
            f"| {name} | {100 * changed.float().mean().item():.1f}% | "
            f"{' / '.join(f'{100 * s:.0f}%' for s in shares)} | {100 * needed:.0f}% |"
        )
    return lines


# ------------------------------------------------------------------------------------------------ main
@dataclass
class LabelledImages:
    """Images of an MVTec-layout folder: calibration normals, test images and their masks."""

    calib: Tensor  # [N, C, H, W]
    test: Tensor  # [M, C, H, W]
    masks: Tensor  # [M, H, W] bool


def load_mvtec_folder(root: str, size: int, channels: int, max_images: int) -> LabelledImages:
    """``<root>/[<category>/]{train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png}``, resized to
    ``size`` (bilinear; masks nearest, binarised with > 0), scaled to [0, 1] as the data modules do. Every
    ``k``-th test image is kept so that at most ``max_images`` cover all categories and defects."""
    import glob

    import numpy as np
    from PIL import Image

    def load(path: str, mask: bool = False) -> Tensor:
        image = Image.open(path).convert("L" if mask or channels == 1 else "RGB")
        image = image.resize((size, size), Image.NEAREST if mask else Image.BILINEAR)
        array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
        return array if array.dim() == 2 else array.permute(2, 0, 1)  # [H, W] or [C, H, W]

    def stack(images: list[Tensor]) -> Tensor:
        batch = torch.stack([i if i.dim() == 3 else i.unsqueeze(0) for i in images])  # [N, C, H, W]
        return batch.contiguous(memory_format=torch.channels_last)

    normals = sorted(glob.glob(os.path.join(root, "**", "train", "good", "*.png"), recursive=True))
    tests = sorted(glob.glob(os.path.join(root, "**", "test", "*", "*.png"), recursive=True))
    if not normals or not tests:
        raise SystemExit(f"--image-folder {root}: no train/good or test/<defect> PNG images found")
    tests = tests[:: max(1, -(-len(tests) // max_images))]
    masks = []
    for path in tests:
        defect_dir = os.path.dirname(path)
        defect, category_root = os.path.basename(defect_dir), os.path.dirname(os.path.dirname(defect_dir))
        stem = os.path.splitext(os.path.basename(path))[0]
        mask_path = os.path.join(category_root, "ground_truth", defect, f"{stem}_mask.png")
        masks.append(
            load(mask_path, mask=True) > 0 if defect != "good" else torch.zeros(size, size, dtype=torch.bool)
        )
    return LabelledImages(
        stack([load(p) for p in normals[:32]]), stack([load(p) for p in tests]), torch.stack(masks)
    )


def score_all(runtime: Runtime, models: Models, images: Tensor, n: int, batch: int) -> ScoreResult:
    """``score`` over many images in batches (seeds = image positions), results concatenated."""
    parts = [
        score(runtime, models, images[i : i + batch], list(range(i, min(i + batch, len(images)))), n)
        for i in range(0, len(images), batch)
    ]
    return ScoreResult(
        *(torch.cat([getattr(p, f) for p in parts]) for f in ("codes", "nll", "restored", "anomaly"))
    )


def pixel_metrics(anomaly: Tensor, masks: Tensor) -> tuple[float, float]:
    """Pixel AUROC and AP (in points) pooled over every pixel of the images."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    scores, labels = anomaly[:, 0].flatten().double().numpy(), masks.flatten().numpy()
    return 100 * roc_auc_score(labels, scores), 100 * average_precision_score(labels, scores)


def run_size(models: Models, args: argparse.Namespace, peak: Callable[[], float]) -> list[str]:
    n, b = args.restorations, args.batch_size
    size, channels = models.image_size, models.vqvae.config.in_channels
    labelled = None
    if args.image_folder:
        labelled = load_mvtec_folder(args.image_folder, size, channels, args.max_images)
        images, calib = labelled.test[:b], labelled.calib
    else:
        images = torch.rand(b, channels, size, size, generator=torch.Generator().manual_seed(10))
        calib = torch.rand(max(8, b), channels, size, size, generator=torch.Generator().manual_seed(11))
        images = images.contiguous(memory_format=torch.channels_last)
        calib = calib.contiguous(memory_format=torch.channels_last)
    seeds = list(range(b))  # dataset indices

    runtimes = torch_runtimes(models, args.yardstick_seeds)
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as folder:
        if args.exports:
            extra, notes = export_runtimes(models, torch.get_num_threads(), folder)
            runtimes += extra
        runtimes = [r for r in runtimes if not args.variants or r.name in args.variants or r.name == "plain"]
        for runtime in runtimes:
            calibrate(runtime, models, calib)
        by_name = {r.name: r for r in runtimes}
        if labelled is not None:
            results = {r.name: score_all(r, models, labelled.test, n, b) for r in runtimes}
            metrics = {
                name: pixel_metrics(result.anomaly, labelled.masks) for name, result in results.items()
            }
        else:
            results = {r.name: score(r, models, images, seeds, n) for r in runtimes}
            metrics = {}
        flops = {
            "plain": flops_per_image(by_name["plain"], models, images, seeds, n),
            "exact": flops_per_image(
                Runtime(
                    "exact",
                    True,
                    models.transformer,
                    functools.partial(decode_with_table, models.vqvae, first_layer_table(models.vqvae)),
                    True,
                    torch.inference_mode,
                    threshold=by_name["plain"].threshold,
                ),
                models,
                images,
                seeds,
                n,
            ),
        }
        times = interleaved_times(
            {r.name: (lambda r=r: score(r, models, images, seeds, n)) for r in runtimes if r.timed},
            args.repeats,
            warmup=1,
        )
        seconds = {name: statistics.median(t) for name, t in times.items()}
    peak_gflops = peak()
    ref, ref_threshold = results["plain"], by_name["plain"].threshold
    resampled = (ref.restored != ref.codes.unsqueeze(1)).float().mean().item()
    tr_cfg, vq_cfg = models.transformer.config, models.vqvae.config
    lines = [
        f"### {models.name}: VQ-VAE channels {list(vq_cfg.channels)}, K {vq_cfg.codebook_size}, D "
        f"{vq_cfg.code_dim}; transformer {tr_cfg.n_layers} x {tr_cfg.d_model} ({tr_cfg.n_heads} heads), "
        f"L {tr_cfg.seq_len}; {size} px, batch {b}, n = {n}\n",
        f"NLL threshold (plain) {ref_threshold:.4f}; codes resampled per restoration {100 * resampled:.1f}%; "
        f"fp32 matmul peak {peak_gflops:.0f} GFLOP/s; load average after: {load_average()}\n",
    ]
    if labelled is not None:
        lines.append(
            f"Deviations and pixel metrics over {len(labelled.test)} test images of {args.image_folder} "
            f"({int(labelled.masks.flatten(1).any(1).sum())} with a defect); thresholds from "
            f"{len(labelled.calib)} train/good images; timing on the first {b}.\n"
        )
    metric_head = " pixel AUROC | pixel AP |" if metrics else ""
    lines += [
        "| variant | exact | images/s | speed-up | GFLOP/img | GFLOP/s | % of peak | codes differing | max abs NLL "
        f"change | decisions flipped | draws differing | map max rel. change | map mean rel. change |{metric_head}",
        "|---" * (13 + 2 * bool(metrics)) + "|",
    ]
    for runtime in runtimes:
        gflop = flops[runtime.flops_of] / 1e9
        dev = deviation(results[runtime.name], ref, runtime.threshold, ref_threshold)
        if runtime.timed:
            rate = b / seconds[runtime.name]
            speed = (
                f"{rate:.2f} | {seconds['plain'] / seconds[runtime.name]:.2f}x | {gflop:.3g} | "
                f"{gflop * rate:.3g} | {100 * gflop * rate / peak_gflops:.0f}%"
            )
        else:
            speed = "(as plain) | | | |"
        lines.append(
            f"| {runtime.name} | {'yes' if runtime.exact else 'no'} | {speed} | {' | '.join(dev.cells())} |"
            + "".join(
                f" {value:.2f} ({value - plain:+.2f}) |"
                for value, plain in zip(metrics.get(runtime.name, ()), metrics.get("plain", ()))
            )
        )
    lines.append("")
    lines += [f"- {r.name}: {r.note}" for r in runtimes if r.note]
    lines += [f"- {note}" for note in notes]
    lines += ["", "Receptive field of the decoder:", "", *receptive_field_lines(models), ""]
    lines += dirty_lines(models, ref)
    if args.profile_top:
        lines += ["", f"Top ops of the plain path (torch.profiler, one batch of {b}):", ""]
        lines += profile_plain(by_name["plain"], models, images, seeds, n, args.profile_top)
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes in seconds (overrides --sizes)")
    parser.add_argument(
        "--sizes", nargs="+", default=["cpu", "paper"], choices=["tiny", "cpu", "paper", "trained"]
    )
    parser.add_argument("--vqvae-checkpoint", help="for --sizes trained")
    parser.add_argument("--transformer-checkpoint", help="for --sizes trained (global attention)")
    parser.add_argument(
        "--image-folder",
        help="MVTec-layout folder: deviations and pixel AUROC / AP over its test images (calibration on train/good)",
    )
    parser.add_argument("--max-images", type=int, default=96, help="test images of --image-folder used")
    parser.add_argument(
        "--yardstick-seeds", type=int, default=1, help="rows of the plain path with resampling seeds 1..N"
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--restorations", type=int, default=15, help="n restorations per image")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds (median)")
    parser.add_argument("--threads", type=int, default=2, help="torch, onnxruntime and openvino threads")
    parser.add_argument(
        "--no-exports", dest="exports", action="store_false", help="skip onnxruntime / openvino"
    )
    parser.add_argument("--variants", nargs="*", help="only these variants (plain is always run)")
    parser.add_argument("--profile-top", type=int, default=12, help="top ops of the plain path (0: no profile)")
    parser.add_argument("--peak-size", type=int, default=2048, help="n of the n x n fp32 matmul peak")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.batch_size, args.restorations, args.repeats = ["tiny"], 2, 3, 1
        args.profile_top, args.peak_size = 0, 256
    torch.set_num_threads(args.threads)

    first_peak = matmul_peak_gflops(torch.float32, args.peak_size)

    def peak() -> (
        float
    ):  # best of the start and now: load from other jobs lowers, never raises, a measurement
        return max(first_peak, matmul_peak_gflops(torch.float32, args.peak_size))

    print("## LSGS scoring on CPU: the plain path vs exact and approximate runtimes\n")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}; load average at start "
        f"{load_average()}; median of {args.repeats} interleaved rounds after one warm-up\n"
    )
    for size in args.sizes:
        if size == "trained":
            if not (args.vqvae_checkpoint and args.transformer_checkpoint):
                raise SystemExit("--sizes trained needs --vqvae-checkpoint and --transformer-checkpoint")
            models = trained_models(args.vqvae_checkpoint, args.transformer_checkpoint)
        else:
            models = size_models(size)
        for line in run_size(models, args, peak):
            print(line)
        print()
    print(
        f"command: `python {shlex.join(['benchmarks/inference.py', *(argv if argv is not None else sys.argv[1:])])}`"
    )


if __name__ == "__main__":
    main()
