"""Export graphs of the feature methods (PatchCore, HVQ-Trans): backbone and head in one graph (``lsgs.nn.export``).

Both take ``images`` at the method's input size and, with several classes, ``class_index``; both return the raw map
at the input size and the method's own image score, computed exactly as the eager methods compute them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lsgs.nn.backbone import FeatureExtractor
from lsgs.nn.hvq_trans import HVQTransNet, align_features, hvq_image_score
from lsgs.nn.patchcore import PatchCoreNet, anomaly_map, locally_aware_features

# Coordinate of the rows that pad a smaller memory bank to the largest one's size: far from any real feature, so
# a padding row is never a nearest neighbour nor among the neighbours of one (real features are O(1)-O(10)).
BANK_PADDING = 1.0e4


def _three_channels(images: Tensor) -> Tensor:
    """ImageNet backbones take RGB: ``[B, 1, H, W]`` is repeated to ``[B, 3, H, W]``."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class PatchCoreMapGraph(nn.Module):
    """``images`` ``[B, C, H, W]`` (+ ``class_index`` ``[B]``) -> ``map`` ``[B, 1, H, W]``, ``image_score`` ``[B]``.

    The nearest-neighbour search is one batched matrix product and a minimum over each image's class bank (banks of
    other sizes are padded with far rows, ``BANK_PADDING``); the map and the image score (Eq. 7) are those of
    :class:`lsgs.nn.patchcore.PatchCoreNet`, batched over the images' banks.
    """

    def __init__(self, backbone: FeatureExtractor, nets: Sequence[PatchCoreNet]) -> None:
        super().__init__()
        self.backbone = backbone
        first = nets[0]
        self.patch_size, self.num_neighbors, self.sigma = first.patch_size, first.num_neighbors, first.sigma
        size = max(net.memory_bank.shape[0] for net in nets)
        banks = [
            torch.cat([net.memory_bank.float(), net.memory_bank.new_full(
                (size - net.memory_bank.shape[0], net.memory_bank.shape[1]), BANK_PADDING)])
            for net in nets
        ]  # fmt: skip
        self.register_buffer("banks", torch.stack(banks))  # [K, M, D]
        # The neighbourhood of Eq. 7 stays inside the real rows of the smallest bank.
        self.neighbours = min(first.num_neighbors, min(net.memory_bank.shape[0] for net in nets))

    def forward(self, images: Tensor, class_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        features = self.backbone(_three_channels(images))
        embedding = locally_aware_features(features, self.patch_size)  # [B, D, h, w]
        batch, _, height, width = embedding.shape
        queries = embedding.flatten(2).transpose(1, 2).float()  # [B, D, h, w] -> [B, P, D]
        if class_index is None:
            class_index = torch.zeros(batch, dtype=torch.long, device=images.device)
        bank = self.banks[class_index]  # [B, M, D]
        bank_sq = bank.pow(2).sum(dim=2)  # [B, M]
        squared = queries.pow(2).sum(dim=2, keepdim=True) - 2.0 * queries @ bank.transpose(1, 2) + bank_sq[:, None]
        nearest_sq, nearest = squared.min(dim=2)  # [B, P]
        distances = nearest_sq.clamp_min(0.0).sqrt()  # [B, P]
        score = self._image_score(queries, distances, nearest, bank, bank_sq)
        maps = anomaly_map(distances.reshape(batch, height, width), tuple(images.shape[-2:]), self.sigma)
        return maps, score

    def _image_score(
        self, queries: Tensor, distances: Tensor, nearest: Tensor, bank: Tensor, bank_sq: Tensor
    ) -> Tensor:
        """Eq. 7 per image against its own bank (``lsgs.nn.patchcore.reweighted_image_score``, batched banks)."""
        rows = torch.arange(distances.shape[0], device=distances.device)
        star = distances.argmax(dim=1)  # [B]
        s_star = distances[rows, star]  # [B]
        if self.neighbours == 1:
            return s_star
        m_test = queries[rows, star]  # [B, D]
        m_star_index = nearest[rows, star]  # [B]
        m_star = bank[rows, m_star_index]  # [B, D]
        to_bank = bank_sq - 2.0 * (bank @ m_star.unsqueeze(2)).squeeze(2)  # [B, M]
        to_bank = to_bank.scatter(1, m_star_index.unsqueeze(1), float("-inf"))  # m* is its own first neighbour
        support = to_bank.topk(self.neighbours, dim=1, largest=False).indices  # [B, b]
        chosen = torch.gather(bank, 1, support.unsqueeze(2).expand(-1, -1, bank.shape[2]))  # [B, b, D]
        weights = 1.0 - torch.softmax((m_test.unsqueeze(1) - chosen).norm(dim=2), dim=1)[:, 0]  # [B]
        return weights * s_star


class HVQTransMapGraph(nn.Module):
    """``images`` ``[B, C, S, S]`` (+ ``class_index`` ``[B]``) -> ``map`` ``[B, 1, S, S]``, ``image_score`` ``[B]``:
    the backbone, the neck and :class:`lsgs.nn.hvq_trans.HVQTransNet` in eval mode, the map of ``anomaly_map`` and
    the pooled-maximum image score."""

    def __init__(self, backbone: FeatureExtractor, net: HVQTransNet, grid: tuple[int, int], pool: int) -> None:
        super().__init__()
        self.backbone, self.net, self.grid, self.pool = backbone, net, tuple(grid), int(pool)

    def forward(self, images: Tensor, class_index: Tensor | None = None) -> tuple[Tensor, Tensor]:
        features = align_features(self.backbone(_three_channels(images)), self.grid)
        if class_index is None:
            class_index = torch.zeros(images.shape[0], dtype=torch.long, device=images.device)
        maps = self.net.anomaly_map(self.net([features], class_index))  # [B, 1, S, S]
        return maps, hvq_image_score(maps, (self.pool, self.pool))
