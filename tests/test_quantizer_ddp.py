"""Two CPU processes (gloo): the quantizer's codebook options keep every rank's codebook identical, and equal to
a single-process run on the union of the data wherever that is defined (EMA statistics, usage averages, k-means
initialisation). Dead-code restarts pick from rank 0's batch, not from the union, so after the first restart only
agreement between the ranks is checked."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from two_ranks import on_two_ranks

from lsgs.nn.quantizer import VectorQuantizer

STEPS = 3
SPLIT = 7  # of 12 vectors per step: rank 0 gets 7, rank 1 gets 5 (an uneven split)
SCENARIOS: dict[str, dict[str, Any]] = {
    "ema": {"ema_decay": 0.8},
    "dead": {"dead_code_threshold": 1.0},
    "ema+dead": {"ema_decay": 0.8, "dead_code_threshold": 1.0},
    "kmeans": {"kmeans_init": True},
    "ema+lookup+l2": {"ema_decay": 0.8, "lookup_dim": 2, "l2_normalize": True},
}


def step_vectors(step: int) -> torch.Tensor:
    """``[12, 3]`` vectors of a training step, drawn around 3 of the 6 initial codes (so some codes go unused)."""
    g = torch.Generator().manual_seed(100 + step)
    centres = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0]])
    return centres[torch.arange(12) % 3] + 0.3 * torch.randn(12, 3, generator=g)


def as_map(vectors: torch.Tensor) -> torch.Tensor:
    return vectors.t().reshape(1, vectors.shape[1], 1, vectors.shape[0]).contiguous()  # [1, C, 1, N]


def run(part: slice) -> dict[str, dict[str, Any]]:
    """Train a quantizer of each scenario for ``STEPS`` steps on ``part`` of every step's vectors."""
    results: dict[str, dict[str, Any]] = {}
    for name, options in SCENARIOS.items():
        torch.manual_seed(0)  # same initial codebook and projections on every rank
        q = VectorQuantizer(6, 3, **options).train()
        q.replace_codebook(torch.randn(6, q.lookup_space_dim, generator=torch.Generator().manual_seed(1)))
        if q.kmeans_init:
            q.initialised.fill_(False)  # replace_codebook marks it done; start uninitialised
        first_batch = step_vectors(0)[part]
        dead_masks: list[torch.Tensor] = []
        if q.dead_code_threshold > 0:  # record which codes each step restarts
            restart = q._restart_dead_codes

            def spy(
                flat: torch.Tensor, q: VectorQuantizer = q, restart: Any = restart, masks: list = dead_masks
            ) -> None:
                masks.append(q.cluster_size < q.dead_code_threshold)
                restart(flat)

            q._restart_dead_codes = spy
        for step in range(STEPS):
            q(as_map(step_vectors(step)[part]))
            if step == 0:
                after_first = {k: v.clone() for k, v in q.state_dict().items()}
        results[name] = {
            "state": {k: v.clone() for k, v in q.state_dict().items()},
            "after_first": after_first,
            "first_batch": first_batch,
            "dead_masks": dead_masks,
            "restarts": q.num_restarts,
        }
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, dict[str, Any]]]:
    return on_two_ranks(run, SPLIT, tmp_path_factory.mktemp("quantizer-ddp"))


@pytest.fixture(scope="module")
def single() -> dict[str, dict[str, Any]]:
    return run(slice(None))


@pytest.mark.filterwarnings("ignore:kmeans.*fewer than 39 per cluster")
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_rank_keeps_the_same_codebook(ranks: list[dict[str, Any]], name: str) -> None:
    zero, one = ranks[0][name]["state"], ranks[1][name]["state"]
    assert zero.keys() == one.keys()
    for key in zero:
        assert torch.equal(zero[key], one[key]), key
    assert ranks[0][name]["restarts"] == ranks[1][name]["restarts"]


@pytest.mark.filterwarnings("ignore:kmeans.*fewer than 39 per cluster")
@pytest.mark.parametrize("name", ["ema", "kmeans", "ema+lookup+l2"])
def test_synced_statistics_equal_a_single_process_run_on_the_union(
    ranks: list[dict[str, Any]], single: dict[str, Any], name: str
) -> None:
    synced, reference = ranks[0][name]["state"], single[name]["state"]
    for key, value in reference.items():
        if key == "cluster_size":  # sums of counts: exact
            assert torch.equal(synced[key], value), key
        else:  # float sums grouped by rank: equal up to rounding
            torch.testing.assert_close(synced[key], value, rtol=1e-5, atol=1e-6, msg=key)
    # The shard alone gives a different result: the comparison is not vacuous.
    alone = run(slice(0, SPLIT))[name]["state"]
    assert any(not torch.allclose(alone[k].float(), reference[k].float()) for k in reference)


@pytest.mark.parametrize("name", ["dead", "ema+dead"])
def test_restarts_take_rank_zero_vectors(
    ranks: list[dict[str, Any]], single: dict[str, Any], name: str
) -> None:
    """The first step restarts the same codes as a single process on the union (usage is all-reduced), with
    vectors of rank 0's first batch, on both ranks. (Later steps differ: the single process picks from the
    union.)"""
    first = ranks[0][name]["after_first"]
    assert torch.equal(first["cluster_size"], single[name]["after_first"]["cluster_size"])
    dead = ranks[0][name]["dead_masks"][0]
    assert torch.equal(dead, ranks[1][name]["dead_masks"][0])
    assert torch.equal(dead, single[name]["dead_masks"][0])
    restarted = dead.nonzero().flatten()
    assert len(restarted) > 0 and ranks[0][name]["restarts"] >= len(restarted)
    batch0 = ranks[0][name]["first_batch"]  # [7, 3]
    for code in first["codebook"][restarted]:
        assert (batch0 == code).all(dim=1).any()
    for rank in ranks:
        assert torch.equal(rank[name]["after_first"]["codebook"], first["codebook"])


def receive(rank: int, q: VectorQuantizer, out_dir: str) -> None:
    """Child of a spawn: save the state of the quantizer it received (and one more restart draw)."""
    q(as_map(step_vectors(1)))
    torch.save(q.state_dict(), Path(out_dir) / "received.pt")


def test_a_trained_quantizer_with_every_option_can_be_sent_to_spawned_processes(tmp_path: Path) -> None:
    """ddp_spawn and torch.multiprocessing pickle modules into the children; a torch.Generator attribute breaks
    that (regression: the aggregator's ddp_spawn run died with 'unable to resize file')."""
    torch.manual_seed(0)
    q = VectorQuantizer(6, 3, ema_decay=0.8, dead_code_threshold=1.0, lookup_dim=2, l2_normalize=True)
    q(as_map(step_vectors(0)))
    assert q.num_restarts > 0
    reference = copy.deepcopy(q)  # spawning moves q's tensors to shared memory: the child writes into them
    mp.spawn(receive, args=(q, str(tmp_path)), nprocs=1, join=True)
    reference(as_map(step_vectors(1)))  # the same step here: restart draws continue the same seeded sequence
    received = torch.load(tmp_path / "received.pt", weights_only=False)
    for key, value in reference.state_dict().items():
        assert torch.equal(received[key], value), key
