"""Pure statistics of the statistical baseline methods: moments from sums, and the two anomaly maps built on them."""

from __future__ import annotations

import torch
from torch import Tensor


def mean_and_variance(count: Tensor, total: Tensor, total_sq: Tensor) -> tuple[Tensor, Tensor]:
    """Population mean and variance (ddof 0) from a count, a sum and a sum of squares.

    One-pass sums rather than Welford's update because sums all-reduce by plain summation under DDP; in float64,
    on image values of order 1, the cancellation in ``E[x²] - E[x]²`` costs about 1e-16 x count relative, far
    below anything the maps can show.

    Args:
        count: ``[*]`` or scalar number of values summed (float64).
        total: ``[*]`` sum of the values (float64).
        total_sq: ``[*]`` sum of their squares (float64).

    Returns:
        ``mean`` and ``variance`` (clamped at 0), broadcast shape of the inputs.
    """
    mean = total / count
    return mean, (total_sq / count - mean.square()).clamp_min(0.0)


def standardised_intensity(images: Tensor, mean: Tensor, scale: Tensor) -> Tensor:
    """Intensity anomaly map: signed z-score for one channel, distance from the mean colour for several.

    Args:
        images: ``[B, C, H, W]``.
        mean: ``[C]`` (or ``[B, C]``, one row per image) mean intensity of the training ROI pixels.
        scale: scalar (or ``[B]``) ``sigma``: the standard deviation (C = 1) or the RMS distance to the mean
            colour (C > 1).

    Returns:
        ``[B, 1, H, W]``: ``(x - mu) / sigma`` if C = 1 (signed: hyperintense scores high), else
        ``||x - mu||_2 / sigma``.
    """
    mean = mean.to(images.device, torch.float32)
    centred = images.float() - mean.reshape(-1 if mean.dim() == 2 else 1, images.shape[1], 1, 1)
    scale = scale.to(images.device, torch.float32).reshape(-1, 1, 1, 1)
    if images.shape[1] == 1:
        return centred / scale
    return torch.linalg.vector_norm(centred, dim=1, keepdim=True) / scale


def pixel_gaussian_map(images: Tensor, mean: Tensor, std: Tensor, eps: Tensor | float) -> Tensor:
    """Per-pixel Gaussian anomaly map ``max_c |x - mu| / (sigma + eps)``.

    Args:
        images: ``[B, C, H, W]``.
        mean: ``[C, H, W]`` (or ``[B, C, H, W]``, one per image) per-pixel mean of the training images.
        std: same shape, per-pixel standard deviation.
        eps: scalar (or ``[B]``) added to ``std`` so pixels that never vary in training do not divide by ~0.

    Returns:
        ``[B, 1, H, W]``.
    """
    device = images.device
    mean, std = mean.to(device, torch.float32), std.to(device, torch.float32)
    eps = torch.as_tensor(eps, dtype=torch.float32, device=device).reshape(-1, 1, 1, 1)
    return ((images.float() - mean).abs() / (std + eps)).amax(dim=1, keepdim=True)
