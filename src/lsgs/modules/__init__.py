"""LightningModules, one per stage: VQ-VAE (stages 1 and 3), aggregator (2), transformer (4), scoring (5)."""

from lsgs.modules.aggregator import CodebookAggregator
from lsgs.modules.baselines import AutoencoderBaseline, IntensityBaseline, PixelGaussianBaseline
from lsgs.modules.scoring import AnomalyMapModule, ScoringModule
from lsgs.modules.transformer import GlobalTransformer
from lsgs.modules.vqvae import VQVAE

__all__ = [
    "VQVAE",
    "AnomalyMapModule",
    "AutoencoderBaseline",
    "CodebookAggregator",
    "GlobalTransformer",
    "IntensityBaseline",
    "PixelGaussianBaseline",
    "ScoringModule",
]
