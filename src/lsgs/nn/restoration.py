"""Latent restoration and anomaly-map maths (pure torch functions).

Scoring follows Naval Marimont & Tarroni (ISBI 2021), which the LSGS paper cites for it (paper §2.3):

1. ``code_nll``: negative log-likelihood of every code of a test image under the transformer prior.
2. ``restore_global`` / ``restore_causal``: codes whose NLL exceeds a threshold are resampled from the
   prior, n times independently, giving n restored code maps (decoded by the caller into ``Y_1..Y_n``).
3. ``restoration_anomaly_map``: ``AS = sum_i w_i |R - Y_i|``, ``w = softmax_i(k / mean|R - Y_i|)``, where the
   reference ``R`` is ``X_hat`` (decoded original codes, paper Eq. 7) or the input ``X`` (Naval Marimont &
   Tarroni's code).
   ``restoration_score_map`` adds the options of ``ScoringModule`` (reference, reconstruction weight); the
   noise of step 2 is drawn per image from ``image_noise_seeds`` (``per_image_uniforms``).
4. ``smooth_anomaly_map``: MinPool 3x3 then AvgPool 7x7 (the image score of the map: ``lsgs.nn.image_score``).

``reconstruction_error_map`` is the no-transformer ablation (VQ-VAE reconstruction error alone).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from lsgs.nn.transformer import CodeTransformer, check_code_range

# What the restoration error of the map is measured against (``restoration_score_map``): ``X_hat`` or ``X``.
MAP_REFERENCES = ("reconstruction", "input")


def code_nll(logits: Tensor, codes: Tensor) -> Tensor:
    """Negative log-likelihood of each code under the model's per-position categorical distribution.

    Args:
        logits: [B, L, K] transformer output.
        codes: [B, L] codes in ``[0, K)``.

    Returns:
        [B, L] float32 ``-log softmax(logits)[codes]`` (computed in fp32 even for bf16 logits).
    """
    if logits.dim() != 3 or codes.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits [B, L, K] and codes [B, L], got {tuple(logits.shape)} and {tuple(codes.shape)}"
        )
    check_code_range(codes, logits.shape[-1])
    return F.cross_entropy(logits.float().transpose(1, 2), codes.long(), reduction="none")  # (B, L)


def _per_image_thresholds(nll_threshold: float | Tensor, batch: int, device: torch.device) -> Tensor:
    """A scalar threshold or one per image -> [B, 1] float32 (broadcasts over the L positions)."""
    thresholds = torch.as_tensor(nll_threshold, dtype=torch.float32, device=device)
    if thresholds.dim() == 0:
        thresholds = thresholds.expand(batch)
    if thresholds.shape != (batch,):
        raise ValueError(
            f"nll_threshold must be a number or one per image [{batch}], got {tuple(thresholds.shape)}"
        )
    if bool(thresholds.isnan().any()):
        raise ValueError("nll_threshold is NaN; use +inf to resample nothing")
    return thresholds[:, None]


def _check_sampling(num_restorations: int, temperature: float) -> None:
    if isinstance(num_restorations, bool) or not isinstance(num_restorations, int) or num_restorations < 1:
        raise ValueError(f"num_restorations must be a positive int, got {num_restorations!r}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")


@torch.no_grad()
def restore_global(
    logits: Tensor,
    codes: Tensor,
    nll_threshold: float | Tensor,
    num_restorations: int,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    uniforms: Tensor | None = None,
) -> Tensor:
    """Resample the implausible codes from the global transformer's distribution, n times independently.

    Every position whose ``code_nll`` exceeds ``nll_threshold`` gets n independent draws from
    ``softmax(logits / temperature)`` (one per restoration); every other position keeps its code. All
    positions and restorations are drawn in one ``torch.multinomial`` call: with full attention the
    distribution of every position is read off the single forward pass on the original codes.

    Args:
        logits: [B, L, K] output of a global ``CodeTransformer`` on ``codes``.
        codes: [B, L] the image's codes.
        nll_threshold: resample where ``-log p(code) > nll_threshold``; ``inf`` resamples nothing. A number, or
            a [B] tensor with one threshold per image (e.g. per category).
        num_restorations: n >= 1.
        generator: for reproducible draws; on the device of ``logits``.
        temperature: > 0; divides the logits of the resampling distribution (not of the NLL test).
        uniforms: optional [B, n, L] noise in [0, 1) (see ``per_image_uniforms``); when given, draws use it by
            inverse-CDF sampling instead of ``generator``, so an image's restorations do not depend on which
            other images share its batch (DDP sharding, batch size).

    Returns:
        [B, n, L] int64 restored codes.
    """
    _check_sampling(num_restorations, temperature)
    _check_uniforms(uniforms, (codes.shape[0], num_restorations, codes.shape[1]))
    nll = code_nll(logits, codes)  # (B, L)
    thresholds = _per_image_thresholds(nll_threshold, codes.shape[0], nll.device)  # (B, 1)
    restored = codes.long().unsqueeze(1).repeat(1, num_restorations, 1)  # (B, n, L)
    b, pos = (nll > thresholds).nonzero(as_tuple=True)  # (M,), (M,)
    if b.numel():
        probs = F.softmax(logits[b, pos].float() / temperature, dim=-1)  # (M, K)
        noise = uniforms[b, :, pos] if uniforms is not None else None  # (M, n)
        restored[b, :, pos] = _draw(probs, num_restorations, generator, noise)  # (M, n)
    return restored


@torch.no_grad()
def restore_causal(
    model: CodeTransformer,
    codes: Tensor,
    nll_threshold: float | Tensor,
    num_restorations: int,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    uniforms: Tensor | None = None,
) -> Tensor:
    """Raster-order restoration with a causal transformer (Naval Marimont & Tarroni; the paper's ablation).

    For i = 0..L-1: if ``-log p(s_i | s_<i)`` under the current, partially restored prefix exceeds the
    threshold, ``s_i`` is redrawn from ``softmax(logits / temperature)``. The n restorations of all B images
    run as one batch of ``B * n`` sequences. Each position is decoded once with a KV cache
    (``CodeTransformer.decode_step``), so the whole restoration costs one forward pass over ``B * n``
    sequences, in L small steps; recomputing the full forward at every position, as the reference
    implementation does, costs L of them. Call ``model.eval()`` first: dropout makes the likelihoods random.

    Args:
        model: a causal ``CodeTransformer``.
        codes: [B, L] the image's codes, ``L == model.config.seq_len``.
        nll_threshold: resample where ``-log p(s_i | s_<i) > nll_threshold``; ``inf`` resamples nothing. A
            number or a [B] tensor, as in ``restore_global``.
        num_restorations: n >= 1.
        generator: for reproducible draws; on the model's device.
        temperature: > 0; divides the logits of the resampling distribution (not of the NLL test).
        uniforms: optional [B, n, L] noise in [0, 1), as in ``restore_global``.

    Returns:
        [B, n, L] int64 restored codes.
    """
    if model.config.attention != "causal":
        raise ValueError(
            f"restore_causal needs a causal CodeTransformer, got attention={model.config.attention!r}"
        )
    _check_sampling(num_restorations, temperature)
    if codes.dim() != 2 or codes.shape[1] != model.config.seq_len:
        raise ValueError(f"codes must be [B, {model.config.seq_len}] for this model, got {codes.shape}")
    check_code_range(codes, model.config.vocab_size)
    B, L = codes.shape
    _check_uniforms(uniforms, (B, num_restorations, L))
    noise = uniforms.reshape(B * num_restorations, L) if uniforms is not None else None  # rows as seqs
    seqs = codes.long().repeat_interleave(num_restorations, dim=0)  # (B*n, L); rows b*n..b*n+n-1 are image b
    row_thresholds = _per_image_thresholds(nll_threshold, B, codes.device)[:, 0]  # (B,)
    row_thresholds = row_thresholds.repeat_interleave(num_restorations)  # (B*n,)
    cache = model.new_kv_cache()
    tokens = torch.full((seqs.shape[0],), model.start_token, dtype=torch.long, device=codes.device)
    for i in range(L):
        logits = model.decode_step(tokens, cache).float()  # (B*n, K) = p(s_i | current s_<i)
        nll = F.cross_entropy(logits, seqs[:, i], reduction="none")  # (B*n,)
        rows = (nll > row_thresholds).nonzero().squeeze(1)
        if rows.numel():
            probs = F.softmax(logits[rows] / temperature, dim=-1)  # (M, K)
            row_noise = noise[rows, i : i + 1] if noise is not None else None  # (M, 1)
            seqs[rows, i] = _draw(probs, 1, generator, row_noise).squeeze(1)
        tokens = seqs[:, i]
    return seqs.view(B, num_restorations, L)


# The seed of an image's restoration noise is ``seed * NOISE_SEED_STRIDE + index``: ``seed`` the scoring seed,
# ``index`` the image's position in its split (the test set) or, for ``lsgs detect``, in its sorted folder. A
# prime stride keeps the seeds of two scoring seeds apart for any index below it.
NOISE_SEED_STRIDE = 1_000_003


def image_noise_seeds(seed: int, indices: Iterable[int]) -> list[int]:
    """Per-image noise seeds ``seed * NOISE_SEED_STRIDE + index`` (see ``per_image_uniforms``)."""
    return [int(seed) * NOISE_SEED_STRIDE + int(index) for index in indices]


def per_image_uniforms(
    seeds: list[int], num_restorations: int, seq_len: int, device: torch.device | str = "cpu"
) -> Tensor:
    """Uniform noise for ``restore_global`` / ``restore_causal``, drawn from one generator per image.

    Seeding by image (e.g. by its dataset index) makes every image's restorations identical however the test
    set is split into batches or over DDP ranks. Only the noise is drawn per image (B small ``torch.rand``
    calls); the sampling itself stays one vectorised inverse-CDF lookup.

    Returns:
        [B, n, L] float32 in [0, 1).
    """
    noise = [
        torch.rand(num_restorations, seq_len, generator=torch.Generator().manual_seed(int(seed)))
        for seed in seeds
    ]
    return torch.stack(noise).to(device)


def _check_uniforms(uniforms: Tensor | None, shape: tuple[int, int, int]) -> None:
    if uniforms is not None and tuple(uniforms.shape) != shape:
        raise ValueError(f"uniforms must be [B, n, L] = {list(shape)}, got {tuple(uniforms.shape)}")


def _draw(probs: Tensor, n: int, generator: torch.Generator | None, noise: Tensor | None) -> Tensor:
    """``n`` categorical draws per row of ``probs`` [M, K] -> [M, n]: inverse CDF on ``noise`` [M, n] if given."""
    if noise is None:
        return torch.multinomial(probs, n, replacement=True, generator=generator)
    cdf = probs.cumsum(dim=-1)  # (M, K)
    draws = torch.searchsorted(cdf, noise.to(cdf.dtype).contiguous(), right=True)  # (M, n)
    return draws.clamp_max(probs.shape[-1] - 1)


def _check_restorations(reference: Tensor, restorations: Tensor, k: float) -> None:
    if (
        reference.dim() != 4
        or restorations.dim() != 5
        or (restorations.shape[:1] + restorations.shape[2:] != reference.shape)
    ):
        raise ValueError(
            "expected reference [B, C, H, W] and restorations [B, n, C, H, W], got "
            f"{tuple(reference.shape)} and {tuple(restorations.shape)}"
        )
    if not (k > 0 and math.isfinite(k)):
        raise ValueError(f"k must be a positive finite number, got {k}")


def _inverse_distance_softmax(distances: Tensor, k: float) -> Tensor:
    """[B, n] distances >= 0 -> [B, n] ``softmax(k / d)``, with its limit where some ``d == 0``."""
    zero = distances == 0
    weights = (k / distances.masked_fill(zero, 1.0)).softmax(dim=1)
    # As d_i -> 0, k / d_i -> inf: all the weight goes to the restorations equal to the reference, evenly split.
    zero_weights = zero.to(distances.dtype) / zero.sum(dim=1, keepdim=True).clamp_min(1)
    return torch.where(zero.any(dim=1, keepdim=True), zero_weights, weights)


def restoration_weights(reference: Tensor, restorations: Tensor, k: float = 3.0) -> Tensor:
    """Weights of the restorations: ``w = softmax_i(k / mean|R - Y_i|)``, mean over C, H, W.

    The mean (not the L1 sum) follows Naval Marimont & Tarroni's code, for which k = 3 was chosen.
    Restorations identical to ``R`` give the limit of the formula: they share all the weight (no NaN).

    Args:
        reference: [B, C, H, W] ``R``: ``X_hat`` (the decoded original codes, paper Eq. 7) or the input ``X``.
        restorations: [B, n, C, H, W] ``Y_1..Y_n``, the decoded restored codes.
        k: > 0 sharpness; larger k puts more weight on the restorations closest to ``R``.

    Returns:
        [B, n] float32 weights, each row summing to 1.
    """
    _check_restorations(reference, restorations, k)
    distances = (restorations.float() - reference.float().unsqueeze(1)).abs().mean(dim=(2, 3, 4))
    return _inverse_distance_softmax(distances, k)  # (B, n)


def restoration_anomaly_map(reference: Tensor, restorations: Tensor, k: float = 3.0) -> Tensor:
    """Pixel anomaly score ``AS = sum_i w_i |R - Y_i|``, averaged over channels, ``w`` from ``restoration_weights``.

    With ``R = X_hat`` this is the paper's Eq. 7. With ``R = X`` (the input image) it is what Naval Marimont &
    Tarroni's code scores (github.com/snavalm/lsr_mood_challenge_2020, ``docker/scripts/pred.py``: both the
    per-pixel difference and the softmax weights use ``|x - x_tilde|``); the weights then favour the
    restorations closest to the input.

    Args:
        reference: [B, C, H, W] ``R`` (``X_hat`` or ``X``).
        restorations: [B, n, C, H, W] ``Y_1..Y_n``.
        k: weight sharpness, see ``restoration_weights``.

    Returns:
        [B, 1, H, W] float32 anomaly map.
    """
    _check_restorations(reference, restorations, k)
    diff = (restorations.float() - reference.float().unsqueeze(1)).abs()  # (B, n, C, H, W)
    weights = _inverse_distance_softmax(diff.mean(dim=(2, 3, 4)), k)  # (B, n)
    return torch.einsum("bn,bnchw->bhw", weights, diff).unsqueeze(1) / diff.shape[2]  # (B, 1, H, W)


def restoration_score_map(
    images: Tensor,
    reconstruction: Tensor,
    restorations: Tensor,
    map_reference: str = "reconstruction",
    k: float = 3.0,
    reconstruction_weight: float = 0.0,
) -> Tensor:
    """LSGS's raw anomaly map: ``restoration_anomaly_map(R, Y, k) + λ |X - X_hat|``.

    Args:
        images: [B, C, H, W] the input ``X``.
        reconstruction: [B, C, H, W] ``X_hat``, the decoded original codes.
        restorations: [B, n, C, H, W] ``Y_1..Y_n``.
        map_reference: ``reconstruction`` (``R = X_hat``, paper Eq. 7) or ``input`` (``R = X``).
        k: weight sharpness of ``restoration_weights``.
        reconstruction_weight: λ >= 0 (0: the paper's map).

    Returns:
        [B, 1, H, W] float32.
    """
    if map_reference not in MAP_REFERENCES:
        raise ValueError(f"map_reference must be one of {list(MAP_REFERENCES)}, got {map_reference!r}")
    reference = reconstruction if map_reference == "reconstruction" else images
    anomaly = restoration_anomaly_map(reference, restorations, k)  # [B, 1, H, W]
    if reconstruction_weight:
        anomaly = anomaly + reconstruction_weight * reconstruction_error_map(images.float(), reconstruction.float())
    return anomaly


def reconstruction_error_map(image: Tensor, reconstruction: Tensor) -> Tensor:
    """``|x - x_hat|`` averaged over channels: the anomaly map of the no-transformer ablation.

    Args:
        image: [B, C, H, W].
        reconstruction: [B, C, H, W].

    Returns:
        [B, 1, H, W].
    """
    if image.dim() != 4 or image.shape != reconstruction.shape:
        raise ValueError(
            f"expected image and reconstruction of the same shape [B, C, H, W], got {tuple(image.shape)} and "
            f"{tuple(reconstruction.shape)}"
        )
    return (image - reconstruction).abs().mean(dim=1, keepdim=True)


def smooth_anomaly_map(
    anomaly_map: Tensor, min_kernel: int = 3, avg_kernel: int = 7, count_include_pad: bool = False
) -> Tensor:
    """MinPool then AvgPool, stride 1, 'same' padding (kernel // 2), as Naval Marimont & Tarroni.

    Borders: the min-pool (``-max_pool2d(-x)``, which pads with -inf) takes the minimum over the in-image
    pixels only. The average pool by default also averages over in-image pixels only
    (``count_include_pad=False``), so a border pixel is not pulled towards 0 and anomalies touching the image
    edge (common in MVTec) keep their scale. ``count_include_pad=True`` counts the zero padding, as
    ``nn.AvgPool`` does by default and as Naval Marimont & Tarroni's code does: it shrinks scores within
    ``avg_kernel // 2`` pixels of the border, down to 16/49 at a corner for 7x7.

    Args:
        anomaly_map: [B, C, H, W] (C = 1 for the anomaly maps here).
        min_kernel: odd size of the min-pool window; 1 skips it.
        avg_kernel: odd size of the average-pool window; 1 skips it.
        count_include_pad: whether the average pool counts the zero padding at the border.

    Returns:
        [B, C, H, W] smoothed map.
    """
    if anomaly_map.dim() != 4:
        raise ValueError(f"anomaly_map must be [B, C, H, W], got {tuple(anomaly_map.shape)}")
    for name, kernel in (("min_kernel", min_kernel), ("avg_kernel", avg_kernel)):
        if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"{name} must be an odd positive int (the map keeps its size), got {kernel!r}")
    x = -F.max_pool2d(-anomaly_map, min_kernel, stride=1, padding=min_kernel // 2)
    return F.avg_pool2d(x, avg_kernel, stride=1, padding=avg_kernel // 2, count_include_pad=count_include_pad)
