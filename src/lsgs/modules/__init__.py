"""LightningModules of the LSGS stages: VQ-VAE (stages 1 and 3), aggregator (2), transformer (4), scoring (5).

The evaluation harness is ``lsgs.evaluation``; the other evaluated methods (baseline kind, contenders) are in
``lsgs.methods``.
"""

from lsgs.modules.aggregator import CodebookAggregator
from lsgs.modules.scoring import ScoringModule
from lsgs.modules.transformer import CausalTransformer, CodeTransformerModule, GlobalTransformer
from lsgs.modules.vqvae import VQVAE

__all__ = [
    "VQVAE",
    "CausalTransformer",
    "CodeTransformerModule",
    "CodebookAggregator",
    "GlobalTransformer",
    "ScoringModule",
]
