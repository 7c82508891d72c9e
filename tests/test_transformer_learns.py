"""The global-sensitive transformer learns: after a short tamper training on code maps with structure, it restores
tampered positions far above chance (1/K) and far above the same network untrained.

Synthetic code maps stand in for VQ-VAE codes so the test takes seconds: a 4 x 4 map whose every row is one of
a few row patterns of that row (drawn once, K = 32 codes). A tampered code can only be restored by reading the
other codes of its row, i.e. by attending to context; a per-position prior alone cannot tell which pattern a
row uses. Training uses the stage's own tampering (``tamper_codes``) and loss (``tampering_loss``).
"""

from __future__ import annotations

import torch

from lsgs.nn.transformer import CodeTransformer, CodeTransformerConfig, tamper_codes, tampering_loss

K = 32  # codebook size: chance of guessing a tampered code is 1/K
ROWS, COLS, PATTERNS = 4, 4, 4
RATIO = 0.125  # 2 of 16 positions, about the paper's 10%


def row_patterns(seed: int = 0) -> torch.Tensor:
    """``[ROWS, PATTERNS, COLS]`` codes: the patterns each row of a code map may take."""
    return torch.randint(0, K, (ROWS, PATTERNS, COLS), generator=torch.Generator().manual_seed(seed))


def code_maps(patterns: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``[n, ROWS * COLS]`` code maps in raster order; each row picks one of its patterns at random."""
    choice = torch.randint(0, PATTERNS, (n, ROWS), generator=generator)  # (n, ROWS)
    rows = patterns[torch.arange(ROWS), choice]  # (n, ROWS, COLS)
    return rows.reshape(n, ROWS * COLS)


@torch.no_grad()
def tampered_accuracy(net: CodeTransformer, codes: torch.Tensor, seed: int) -> float:
    """Fraction of tampered positions whose original code is the model's argmax."""
    net.eval()
    tampered, mask = tamper_codes(codes, K, RATIO, torch.Generator().manual_seed(seed))
    correct = net(tampered).argmax(-1) == codes
    return float(correct[mask].float().mean())


def test_tamper_training_restores_codes_far_above_chance() -> None:
    torch.manual_seed(0)  # weight initialisation
    config = CodeTransformerConfig(vocab_size=K, seq_len=ROWS * COLS, d_model=64, n_layers=2, n_heads=4)
    net = CodeTransformer(config)
    patterns = row_patterns()
    held_out = code_maps(patterns, 512, torch.Generator().manual_seed(1))  # not seen in training (by draw)
    untrained = tampered_accuracy(net, held_out, seed=2)

    data = torch.Generator().manual_seed(3)
    optimiser = torch.optim.AdamW(net.parameters(), lr=3e-3, betas=(0.9, 0.95))
    for _ in range(100):
        net.train()
        codes = code_maps(patterns, 64, data)
        tampered, mask = tamper_codes(codes, K, RATIO, data)
        loss = tampering_loss(net(tampered), codes, mask, beta=0.01)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    trained = tampered_accuracy(net, held_out, seed=2)

    # Reference points: chance is 1/K; a model that knows only which codes a row can hold (not which pattern
    # is used) restores a tampered code with probability about 1/PATTERNS = 0.25.
    assert untrained < 3 / K, untrained
    assert trained > 0.8, (untrained, trained)
    assert trained > untrained + 0.7
