"""Command-line arguments that add the feature methods to the tiny test pipeline (``test_pipeline.TINY``).

``TINY_HVQ`` adds HVQ-Trans at CPU-seconds size: 64 px images (a 4 x 4 token grid of the backbone's stride-16
map), random backbone weights (what is tested is the plumbing, not ImageNet features), widths of 16, one
encoder and one decoder layer, 8 codes, two epochs, and dropout 0 (its masks are drawn from each process's own
RNG: the one thing a 2-process run cannot reproduce from a 1-process run). PatchCore stays at its tiny size
from ``test_pipeline.TINY_METHODS``.

Under DDP, HVQ-Trans with several classes (the demo has three) needs DDP to look for unused parameters (a batch
without a class leaves that class's output projection unused), so a multi-process run replaces
``--trainer.strategy=ddp`` by ``TINY_HVQ_DDP_STRATEGY``.
"""

from __future__ import annotations

_HVQ = "--methods.hvq_trans"
TINY_HVQ = [
    f"{_HVQ}.model=lsgs.methods.hvq_trans.HVQTransMethod",
    f"{_HVQ}.model.init_args.weights=null",
    f"{_HVQ}.model.init_args.input_size=64",
    f"{_HVQ}.model.init_args.hidden_dim=16",
    f"{_HVQ}.model.init_args.nhead=2",
    f"{_HVQ}.model.init_args.num_encoder_layers=1",
    f"{_HVQ}.model.init_args.num_decoder_layers=1",
    f"{_HVQ}.model.init_args.dim_feedforward=32",
    f"{_HVQ}.model.init_args.codebook_size=8",
    f"{_HVQ}.model.init_args.dropout=0.0",
    f"{_HVQ}.model.init_args.image_score_pool=8",
    f"{_HVQ}.model.init_args.lr=0.001",
    f"{_HVQ}.trainer.max_epochs=2",
    f"{_HVQ}.trainer.gradient_clip_val=0.1",
]
TINY_HVQ_DDP_STRATEGY = "--trainer.strategy=ddp_find_unused_parameters_true"
