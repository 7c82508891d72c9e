"""Two CPU processes (gloo): HVQ-Trans's per-class EMA codebook statistics are all-reduced, so both ranks keep
identical codebooks, equal to a single-process run on the union of the batches, even when a class is present
on one rank only."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from two_ranks import on_two_ranks

from lsgs.nn.hvq_quantizer import SwitchedEMAQuantizer
from lsgs.nn.hvq_trans import HVQTransConfig, HVQTransNet

STEPS = 3
# Per step 5 samples; rank 0 takes the first 3 (classes 0, 1, 1), rank 1 the last 2 (classes 2, 0): class 1 is
# on rank 0 only, class 2 on rank 1 only, class 0 on both.
CLASSES = torch.tensor([0, 1, 1, 2, 0])
SPLIT = 3


def step_vectors(step: int) -> torch.Tensor:
    """``[5, 6, 4]`` quantiser inputs of a training step."""
    return torch.randn(5, 6, 4, generator=torch.Generator().manual_seed(100 + step))


def step_maps(step: int) -> list[torch.Tensor]:
    """The tiny net's backbone maps of a training step (5 samples)."""
    g = torch.Generator().manual_seed(200 + step)
    return [torch.randn(5, 8, 8, 8, generator=g), torch.randn(5, 8, 4, 4, generator=g)]


def run(part: slice) -> dict[str, dict[str, torch.Tensor]]:
    """Train a quantiser and (forward only: no gradient sync here) the tiny net on ``part`` of every batch."""
    torch.manual_seed(0)  # same initial codebooks and weights on every rank
    quantizer = SwitchedEMAQuantizer(3, 5, 4, decay=0.8).train()
    for step in range(STEPS):
        quantizer(step_vectors(step)[part], CLASSES[part])
    torch.manual_seed(0)
    net = HVQTransNet(dataclasses.replace(HVQTransConfig.tiny(), num_classes=3)).train()
    with torch.no_grad():
        for step in range(2):
            net([m[part] for m in step_maps(step)], CLASSES[part])
    return {
        "quantizer": {k: v.clone() for k, v in quantizer.state_dict().items()},
        "net": {k: v.clone() for k, v in net.state_dict().items() if k.startswith("quantizers.")},
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, torch.Tensor]]]:
    return on_two_ranks(run, SPLIT, tmp_path_factory.mktemp("hvq-ddp"))


@pytest.mark.parametrize("model", ["quantizer", "net"])
def test_both_ranks_keep_identical_codebooks_equal_to_the_union(ranks, model):
    zero, one = ranks[0][model], ranks[1][model]
    assert zero.keys() == one.keys() and len(zero) > 0
    for key in zero:
        assert torch.equal(zero[key], one[key]), key
    union = run(slice(None))[model]
    for key, value in union.items():
        torch.testing.assert_close(zero[key], value, rtol=1e-5, atol=1e-5, msg=key)
    # A rank's shard alone gives different codebooks: the comparison is not vacuous.
    alone = run(slice(0, SPLIT))[model]
    assert any(not torch.allclose(alone[k], union[k]) for k in union)
