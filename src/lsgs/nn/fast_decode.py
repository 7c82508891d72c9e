"""Exact, faster inference paths for restoration scoring: a code-table decoder and one batched decode.

Scoring decodes ``n + 1`` code maps per image (``X_hat`` and ``n`` restorations). This module computes the
same images as ``VQVAENet.decode_indices`` (up to float rounding) with less work (``decode_with_table``):

* The decoder's first layer is a 3x3 convolution applied to the codebook vectors, and each code cell holds one of
  only K vectors. So ``conv(lookup(s))`` at a cell is ``bias + sum over the 9 taps of W_tap @ e[s(neighbour)]``,
  and the products ``W_tap @ e_k`` are precomputed once for every code and tap: a table ``[9 * (K + 1), C]`` (one
  zero row per tap stands for the zero padding outside the grid). The layer becomes one ``F.embedding_bag``
  (a gather-and-sum of 9 rows per cell) instead of ``2 * 9 * D * C`` FLOPs per cell: at the paper size 0.60 of
  the 2.6 GFLOP of a decode.
* ReLUs whose input is a fresh intermediate run in place (no extra allocation or pass over memory).
* ``decode_original_and_restored`` decodes ``X_hat`` and the ``n`` restorations of a batch in one call, each distinct
  code map once: a restoration whose draws all equal the original codes (or an image with nothing above the
  threshold) is ``X_hat`` itself.

What does not pay, measured (``benchmarks/inference.py``): decoding only around the resampled codes. One code
cell reaches a 70 x 70 pixel window of the 128 x 128 output at the paper size (``decoder_receptive_field``), so
with ~10% of the codes resampled at random, 98-99% of the outputs of every layer after the table layer depend on
a changed code (``decoder_dirty_masks``): even an ideal per-position sparse decode would skip ~1% of the work
(half of it for a single compact cluster of resampled codes, which normal images do not produce). Nor does
rewriting the stride-2 transposed convolutions as sub-pixel convolutions: oneDNN's channels_last transposed
convolution is already as fast.

The table is a snapshot of the weights: build it (``first_layer_table``) after loading them, and again if they
change. Keep it out of checkpoints (a non-persistent buffer or a plain attribute): it is derived data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lsgs.nn.vqvae import ResidualBlock, VQVAEConfig, VQVAENet


def first_layer_table(net: VQVAENet) -> Tensor:
    """The decoder's first convolution applied to every code, per kernel tap: ``[9 * (K + 1), C]``.

    Row ``t * (K + 1) + k`` holds ``W[:, :, dy, dx] @ e_k`` for tap ``t = 3 * dy + dx``; row ``t * (K + 1) + K`` is
    zero and stands for the zero padding outside the code grid. The bias is not included (``decode_with_table``
    adds the layer's own). Built from ``net.quantizer.lookup`` of every code, so projected (``lookup_dim``) and
    normalised (``l2_normalize``) lookups are covered. A snapshot of the weights: rebuild it if they change.

    Args:
        net: the VQ-VAE; its decoder must start with a 3x3 convolution of padding 1 (``Decoder`` does).

    Returns:
        ``[9 * (K + 1), C]`` in the dtype and on the device of the first convolution's weight, ``C`` its output
        channels.
    """
    first = net.decoder[0]
    assert isinstance(first, nn.Conv2d) and first.kernel_size == (3, 3) and first.padding == (1, 1)
    k = net.config.codebook_size
    with torch.no_grad():
        all_codes = torch.arange(k, device=first.weight.device).view(1, 1, k)
        vectors = net.quantizer.lookup(all_codes)[0, :, 0].t()  # [1, D, 1, K] -> [K, D]
        # In float64 so every entry is the correctly rounded product; the 9-term sum then rounds like the
        # convolution's own accumulation.
        table = torch.einsum("ocyx,kc->yxko", first.weight.double(), vectors.double())  # [3, 3, K, C]
        table = F.pad(table, (0, 0, 0, 1))  # [3, 3, K + 1, C]: row K is the zero padding
        return table.reshape(9 * (k + 1), first.out_channels).to(first.weight.dtype)  # [9 (K+1), C]


def table_first_layer(net: VQVAENet, table: Tensor, indices: Tensor) -> Tensor:
    """The decoder's first convolution of ``lookup(indices)``, read from ``table`` (``first_layer_table``).

    Each cell sums 9 table rows (its own code and its 8 neighbours', the zero row outside the grid) in one
    ``F.embedding_bag`` and adds the bias.

    Args:
        net: the VQ-VAE the table was built from.
        table: ``[9 * (K + 1), C]`` from ``first_layer_table(net)``.
        indices: ``[B, h, w]`` integer codes in ``[0, K)``.

    Returns:
        ``[B, C, h, w]`` in channels_last memory layout.

    Raises:
        ValueError: if ``indices`` is not a 3-D integer tensor or holds a value outside ``[0, K)``.
    """
    k = net.config.codebook_size
    if indices.dim() != 3 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(
            f"indices must be an integer tensor [B, h, w], got shape {tuple(indices.shape)} dtype {indices.dtype}"
        )
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= k):
        raise ValueError(
            f"indices must lie in [0, {k}), got values in [{int(indices.min())}, {int(indices.max())}]"
        )
    if table.shape[0] != 9 * (k + 1):
        raise ValueError(f"table must be [9 * (K + 1), C] = [{9 * (k + 1)}, C], got {tuple(table.shape)}")
    b, h, w = indices.shape
    padded = F.pad(indices.long(), (1, 1, 1, 1), value=k)  # [B, h + 2, w + 2]; K = the zero row
    taps = torch.stack([padded[:, dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)], dim=-1)
    offsets = torch.arange(9, device=indices.device) * (k + 1)  # [9]: tap t's rows start at t * (K + 1)
    rows = (taps + offsets).view(b * h * w, 9)  # [B, h, w, 9] -> [B*h*w, 9] table rows to sum per cell
    out = F.embedding_bag(rows, table, mode="sum").add_(net.decoder[0].bias)  # [B*h*w, C]
    return out.view(b, h, w, table.shape[1]).permute(0, 3, 1, 2)  # [B, h, w, C] -> [B, C, h, w]


def decode_with_table(net: VQVAENet, table: Tensor, indices: Tensor) -> Tensor:
    """``net.decode_indices(indices)`` with the first convolution read from ``table``, up to float rounding.

    The layers after the first are the net's own, so its memory format (channels_last on CPU, as the Lightning
    module sets it) carries over; their ReLUs run in place on the fresh intermediates. For inference: no gradient
    reaches the first convolution or the codebook through the table.

    Args:
        net: the VQ-VAE.
        table: ``[9 * (K + 1), C]`` from ``first_layer_table(net)``.
        indices: ``[B, h, w]`` integer codes in ``[0, K)``.

    Returns:
        ``[B, C_img, h*f, w*f]``.

    Raises:
        ValueError: as ``table_first_layer``.
    """
    x = table_first_layer(net, table, indices)
    for layer in list(net.decoder)[1:]:
        # Every x here is an intermediate of this call, so a ReLU may overwrite it.
        if isinstance(layer, nn.ReLU):
            x = x.relu_()
        elif isinstance(layer, ResidualBlock):
            x = _residual_block(layer, x)
        else:
            x = layer(x)
    return x


def _residual_block(block: ResidualBlock, x: Tensor) -> Tensor:
    """``ResidualBlock.forward`` with its inner ReLU in place: ``x + conv1x1(relu(conv3x3(relu(x))))``."""
    _, conv3, _, conv1 = block.block
    hidden = conv3(F.relu(x)).relu_()  # the first ReLU must not touch x: x is the skip path
    return conv1(hidden).add_(x)


def decode_original_and_restored(
    decode: nn.Module, codes: Tensor, restored: Tensor, grid: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """Decode ``X_hat`` and the restorations of a batch in one decoder call, each distinct code map once.

    Args:
        decode: maps ``[N, h, w]`` indices to ``[N, C, H, W]`` images (``net.decode_indices`` or
            ``functools.partial(decode_with_table, net, table)``).
        codes: ``[B, L]`` the images' codes, ``L = h * w``.
        restored: ``[B, n, L]`` restored codes (``restore_global`` / ``restore_causal``).
        grid: ``(h, w)`` of the code map.

    Returns:
        ``X_hat`` ``[B, C, H, W]`` and the restorations ``[B, n, C, H, W]``; equal to decoding each map on its own
        up to float rounding.
    """
    b, n, length = restored.shape
    if codes.shape != (b, length) or grid[0] * grid[1] != length:
        raise ValueError(
            f"expected codes [B, L] and restored [B, n, L] with L = h * w = {grid[0] * grid[1]}, got "
            f"{tuple(codes.shape)} and {tuple(restored.shape)}"
        )
    maps = torch.cat([codes.long().unsqueeze(1), restored.long()], dim=1).view(
        b * (n + 1), length
    )  # [B(n+1), L]
    unique, inverse = torch.unique(maps, dim=0, return_inverse=True)  # [U, L], [B(n+1)]
    images = decode(unique.view(-1, *grid))  # [U, C, H, W]
    images = images[inverse]  # [B(n+1), C, H, W]
    images = images.view(b, n + 1, *images.shape[1:])  # [B, n + 1, C, H, W]
    return images[:, 0], images[:, 1:]


def decoder_receptive_field(config: VQVAEConfig) -> int:
    """Width, in output pixels, of the window one code cell can change (its projective field, per axis).

    Every 3x3 convolution at code resolution (the first layer and one per residual block) widens the set of
    dependent cells by one on each side; each stride-2 4x4 transposed convolution maps input cells
    ``[a, b]`` to output cells ``[2a - 1, 2b + 2]``.
    """
    radius = 1 + config.num_res_blocks  # code cells either side, after the code-resolution layers
    low, high = -radius, radius  # dependent cells of code cell 0, inclusive
    for _ in config.channels:
        low, high = 2 * low - 1, 2 * high + 2
    return high - low + 1


@torch.no_grad()
def decoder_dirty_masks(config: VQVAEConfig, changed: Tensor) -> list[Tensor]:
    """Where each decoder layer's output can differ from ``X_hat``'s when the codes in ``changed`` change.

    The dependency of every layer is propagated exactly: a 3x3 convolution (the first layer, each residual
    block) dilates the mask by one cell, a stride-2 4x4 transposed convolution marks the output cells that read
    a marked input cell, a ReLU keeps the mask.

    Args:
        config: the VQ-VAE architecture.
        changed: ``[B, h, w]`` bool, True where a restoration's code differs from the original.

    Returns:
        One ``[B, h_l, w_l]`` bool mask per decoder stage: after the code-resolution stack (``h``), then after
        each transposed convolution (``2 h``, ``4 h``, ... up to the image size).
    """
    if changed.dim() != 3 or changed.dtype != torch.bool:
        raise ValueError(
            f"changed must be a bool tensor [B, h, w], got {changed.dtype} {tuple(changed.shape)}"
        )
    mask = changed.float().unsqueeze(1)  # [B, 1, h, w]
    for _ in range(1 + config.num_res_blocks):
        mask = F.max_pool2d(mask, 3, stride=1, padding=1)  # [B, 1, h, w]
    masks = [mask]
    ones = mask.new_ones(1, 1, 4, 4)
    for _ in config.channels:
        mask = (F.conv_transpose2d(mask, ones, stride=2, padding=1) > 0).float()  # [B, 1, 2h', 2w']
        masks.append(mask)
    return [m[:, 0] > 0 for m in masks]
