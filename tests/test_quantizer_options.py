"""Codebook-health options of the quantizer (EMA updates, dead-code restarts, k-means init, low-dimensional and
l2-normalised lookup), each against a direct computation on small tensors; then their path through VQVAENet,
the VQVAE LightningModule, the aggregator and stage-3 ``init_from``. DDP: tests/test_quantizer_ddp.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lsgs.errors import CheckpointError, ConfigError
from lsgs.kmeans import kmeans
from lsgs.nn.quantizer import (
    EMA_EPSILON,
    USAGE_DECAY,
    VectorQuantizer,
    ema_codebook_update,
    laplace_smoothed_sizes,
)
from lsgs.nn.vqvae import VQVAEConfig, VQVAENet


def as_map(vectors: torch.Tensor) -> torch.Tensor:
    """``[N, C]`` vectors -> a ``[1, C, 1, N]`` z_e map whose raster order is the row order."""
    return vectors.t().reshape(1, vectors.shape[1], 1, vectors.shape[0]).contiguous()


def flat_of(z_map: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` -> ``[B*h*w, C]`` in raster order (the quantizer's flattening)."""
    return z_map.permute(0, 2, 3, 1).reshape(-1, z_map.shape[1])


def quantizer(k: int = 3, d: int = 2, seed: int = 0, **options: Any) -> VectorQuantizer:
    """A quantizer whose initial codebook and restart/k-means seed are both ``seed``."""
    torch.manual_seed(seed)
    return VectorQuantizer(k, d, beta=0.25, seed=seed, **options)


# ----------------------------------------------------------------------------------------------- EMA
class TestEMA:
    CODES = ((0.0, 0.0), (10.0, 0.0), (0.0, 10.0))
    # Two vectors near code 0, three near code 1, none near code 2.
    VECTORS = ((1.0, 0.0), (0.0, 2.0), (9.0, 1.0), (11.0, -1.0), (10.0, 3.0))

    def test_laplace_smoothing_by_hand(self):
        sizes = torch.tensor([2.0, 0.0, 6.0])
        eps = 0.5
        total = 8.0
        expected = [(2.0 + eps) / (total + 3 * eps) * total, eps / (total + 3 * eps) * total,
                    (6.0 + eps) / (total + 3 * eps) * total]
        torch.testing.assert_close(laplace_smoothed_sizes(sizes, eps), torch.tensor(expected))
        assert float(laplace_smoothed_sizes(sizes, eps).sum()) == pytest.approx(total)

    def test_one_step_equals_the_formula_by_hand_on_three_codes(self):
        decay = 0.9
        q = quantizer(ema_decay=decay)
        q.replace_codebook(torch.tensor(self.CODES))
        assert not q.codebook.requires_grad
        # replace_codebook restarts the statistics: sizes 1, sums = codes.
        assert q.cluster_size.tolist() == [1.0, 1.0, 1.0]
        assert torch.equal(q.embed_sum, torch.tensor(self.CODES))
        q.train()
        out = q(as_map(torch.tensor(self.VECTORS)))
        assert out.indices.flatten().tolist() == [0, 0, 1, 1, 1]
        # The output uses the codes from before the update.
        assert torch.equal(flat_of(out.quantized), torch.tensor(self.CODES)[[0, 0, 1, 1, 1]])

        # By hand, in float64: n = g*1 + (1-g)*c, m = g*e + (1-g)*s, n~ = (n + eps)/(sum n + K eps) * sum n.
        counts = [2, 3, 0]
        sums = [[1.0, 2.0], [30.0, 3.0], [0.0, 0.0]]
        n = [decay * 1.0 + (1 - decay) * c for c in counts]
        m = [[decay * e + (1 - decay) * s for e, s in zip(code, total)] for code, total in zip(self.CODES, sums)]
        total_n = sum(n)
        smoothed = [(ni + EMA_EPSILON) / (total_n + 3 * EMA_EPSILON) * total_n for ni in n]
        expected = torch.tensor([[mij / smoothed[i] for mij in m[i]] for i in range(3)], dtype=torch.float64)
        torch.testing.assert_close(q.cluster_size.double(), torch.tensor(n, dtype=torch.float64))
        torch.testing.assert_close(q.embed_sum.double(), torch.tensor(m, dtype=torch.float64))
        torch.testing.assert_close(q.codebook.detach().double(), expected, rtol=1e-6, atol=1e-6)
        # The codes moved (the check above is not vacuous).
        assert not torch.allclose(q.codebook.detach(), torch.tensor(self.CODES))

    def test_pure_update_function_matches_the_module(self):
        sizes, sums = torch.ones(3), torch.tensor(self.CODES)
        codes = ema_codebook_update(sizes, sums, torch.tensor([2.0, 3.0, 0.0]),
                                    torch.tensor([[1.0, 2.0], [30.0, 3.0], [0.0, 0.0]]), 0.9)
        q = quantizer(ema_decay=0.9)
        q.replace_codebook(torch.tensor(self.CODES))
        q(as_map(torch.tensor(self.VECTORS)))
        torch.testing.assert_close(q.codebook.detach(), codes)
        torch.testing.assert_close(q.cluster_size, sizes)

    def test_eval_mode_does_not_update(self):
        q = quantizer(ema_decay=0.9)
        q.replace_codebook(torch.tensor(self.CODES))
        q.eval()
        q(as_map(torch.tensor(self.VECTORS)))
        assert torch.equal(q.codebook.detach(), torch.tensor(self.CODES))
        assert q.cluster_size.tolist() == [1.0, 1.0, 1.0]

    def test_loss_drops_the_codebook_term_and_the_codebook_gets_no_gradient(self):
        q = quantizer(ema_decay=0.9)
        z = (torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(0))).requires_grad_()
        out = q(z)
        assert q.loss(out).item() == pytest.approx(0.25 * out.commitment_loss.item())
        assert out.codebook_loss.item() == pytest.approx(out.commitment_loss.item())  # a diagnostic
        assert not out.codebook_loss.requires_grad
        q.loss(out).backward()
        assert q.codebook.grad is None and z.grad is not None

    def test_statistics_are_buffers_and_defaults_add_none(self):
        assert set(quantizer(ema_decay=0.99).state_dict()) == {"codebook", "cluster_size", "embed_sum"}
        assert set(quantizer(dead_code_threshold=1.0).state_dict()) == {"codebook", "cluster_size"}
        assert set(quantizer(kmeans_init=True).state_dict()) == {"codebook", "initialised"}
        assert set(quantizer().state_dict()) == {"codebook"}


# ----------------------------------------------------------------------------------------------- dead codes
class TestDeadCodeRestarts:
    CODES = ((0.0, 0.0), (10.0, 0.0), (0.0, 10.0), (-10.0, 0.0))

    def batch(self, n: int = 6) -> torch.Tensor:
        g = torch.Generator().manual_seed(3)
        near = torch.tensor([[0.0, 0.0], [10.0, 0.0]])[torch.arange(n) % 2]
        return near + 0.1 * torch.randn(n, 2, generator=g)  # only codes 0 and 1 are used

    def expected_picks(self, n_vectors: int, n_dead: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        if n_vectors >= n_dead:
            return torch.randperm(n_vectors, generator=g)[:n_dead]
        return torch.randint(n_vectors, (n_dead,), generator=g)

    def test_restart_replaces_exactly_the_dead_codes_with_batch_vectors(self):
        threshold = 1.0
        q = quantizer(k=4, dead_code_threshold=threshold, seed=0)
        q.replace_codebook(torch.tensor(self.CODES))
        q.train()
        vectors = self.batch()
        out = q(as_map(vectors))
        # Usage by hand: u = 0.99 * 1 + 0.01 * c -> 1.02 for codes 0 and 1 (3 vectors each), 0.99 < 1 for 2, 3.
        assert out.indices.flatten().tolist() == [0, 1, 0, 1, 0, 1]
        picks = self.expected_picks(len(vectors), 2, seed=0)
        codebook = q.codebook.detach()
        assert torch.equal(codebook[:2], torch.tensor(self.CODES)[:2])  # live codes untouched
        assert torch.equal(codebook[2:], vectors[picks])  # dead codes = the seeded batch picks, in order
        assert len(set(picks.tolist())) == 2
        expected_usage = [USAGE_DECAY + (1 - USAGE_DECAY) * 3] * 2 + [threshold] * 2
        torch.testing.assert_close(q.cluster_size, torch.tensor(expected_usage))
        assert q.num_restarts == 2

    def test_same_seed_same_restarts_other_seed_other_restarts(self):
        def run(seed: int) -> torch.Tensor:
            q = quantizer(k=4, dead_code_threshold=1.0, seed=seed)
            q.replace_codebook(torch.tensor(self.CODES))
            q(as_map(self.batch(20)))
            return q.codebook.detach()

        assert torch.equal(run(5), run(5))
        assert not torch.equal(run(5), run(6))

    def test_fewer_vectors_than_dead_codes_draws_with_replacement(self):
        q = quantizer(k=4, dead_code_threshold=5.0, seed=2)  # every code is dead after one step
        q.replace_codebook(torch.tensor(self.CODES))
        vectors = self.batch(2)
        q(as_map(vectors))
        picks = self.expected_picks(2, 4, seed=2)
        assert torch.equal(q.codebook.detach(), vectors[picks])

    def test_with_ema_the_live_codes_follow_the_ema_and_the_sums_restart(self):
        threshold, decay = 1.0, 0.9
        q = quantizer(k=4, dead_code_threshold=threshold, ema_decay=decay, seed=0)
        q.replace_codebook(torch.tensor(self.CODES))
        vectors = self.batch()
        q(as_map(vectors))
        # EMA sizes: 0.9 + 0.1 * 3 = 1.2 for codes 0 and 1; 0.9 < 1 for codes 2 and 3 -> restarted.
        picks = self.expected_picks(len(vectors), 2, seed=0)
        assert torch.equal(q.codebook.detach()[2:], vectors[picks])
        torch.testing.assert_close(q.embed_sum[2:], vectors[picks] * threshold)
        torch.testing.assert_close(q.cluster_size, torch.tensor([1.2, 1.2, threshold, threshold]))
        sizes, sums = torch.ones(4), torch.tensor(self.CODES)
        counts = torch.tensor([3.0, 3.0, 0.0, 0.0])
        totals = torch.stack([vectors[0::2].sum(0), vectors[1::2].sum(0), torch.zeros(2), torch.zeros(2)])
        live = ema_codebook_update(sizes, sums, counts, totals, decay)[:2]
        torch.testing.assert_close(q.codebook.detach()[:2], live)

    def test_gradient_codebook_with_l2_still_backpropagates_after_a_restart(self):
        q = quantizer(k=16, d=2, dead_code_threshold=1.0, l2_normalize=True)
        z = torch.randn(1, 2, 2, 3, generator=torch.Generator().manual_seed(0)).requires_grad_()
        out = q(z)
        assert q.num_restarts > 0
        (q.loss(out) + out.quantized.sum()).backward()  # no "modified by an inplace operation" error
        assert q.codebook.grad is not None and z.grad is not None


# ----------------------------------------------------------------------------------------------- k-means init
@pytest.mark.filterwarnings("ignore:kmeans.*fewer than 39 per cluster")
class TestKMeansInit:
    def vectors(self, n: int, d: int = 3, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        centres = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 5.0, 5.0]])[:, :d]
        return centres[torch.arange(n) % 4] + torch.randn(n, d, generator=g)

    def test_codebook_equals_the_faiss_centroids_of_the_first_batch(self):
        q = quantizer(k=4, d=3, kmeans_init=True, seed=7)
        first = self.vectors(64)
        out = q(as_map(first))
        expected = kmeans(first, 4, seed=7).centroids
        assert torch.equal(q.codebook.detach(), expected)
        assert bool(q.initialised)
        # This batch was already quantised with the new codebook.
        d2 = torch.cdist(first.double(), expected.double())
        assert torch.equal(out.indices.flatten(), d2.argmin(1))
        q(as_map(self.vectors(64, seed=1)))  # a gradient codebook: later batches never re-initialise it
        assert torch.equal(q.codebook.detach(), expected)

    def test_first_n_batches_and_at_least_k_vectors(self):
        q = quantizer(k=4, d=3, kmeans_init=True, kmeans_init_batches=2, seed=0)
        before = q.codebook.detach().clone()
        first, second = self.vectors(2), self.vectors(2, seed=1)  # 2 batches, but only 4 vectors = K: enough
        q(as_map(first))
        assert torch.equal(q.codebook.detach(), before) and not bool(q.initialised)
        q(as_map(second))
        assert torch.equal(q.codebook.detach(), kmeans(torch.cat([first, second]), 4, seed=0).centroids)

        q = quantizer(k=4, d=3, kmeans_init=True, seed=0)  # 1 batch asked, but 3 < K vectors: keeps collecting
        small = [self.vectors(3, seed=s) for s in range(2)]
        q(as_map(small[0]))
        assert not bool(q.initialised)
        q(as_map(small[1]))
        assert torch.equal(q.codebook.detach(), kmeans(torch.cat(small), 4, seed=0).centroids)

    def test_eval_mode_does_not_initialise(self):
        q = quantizer(k=4, d=3, kmeans_init=True).eval()
        before = q.codebook.detach().clone()
        q(as_map(self.vectors(64)))
        assert torch.equal(q.codebook.detach(), before) and not bool(q.initialised)

    def test_with_lookup_dim_clusters_the_projected_vectors(self):
        q = quantizer(k=4, d=3, kmeans_init=True, lookup_dim=2)
        first = self.vectors(64)
        q(as_map(first))
        with torch.no_grad():
            projected = first @ q.project_in.weight.t() + q.project_in.bias
        torch.testing.assert_close(q.codebook.detach(), kmeans(projected, 4, seed=0).centroids)


# ----------------------------------------------------------------------------------------------- lookups
def brute_force_cosine(vectors: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``[N, C]``, ``[K, C]`` -> ``[N]`` index of the highest cosine similarity, one pair at a time, float64."""
    out = []
    for v in vectors.double():
        sims = [float(v @ c / (v.norm() * c.norm())) for c in codes.double()]
        out.append(max(range(len(sims)), key=lambda i: (sims[i], -i)))
    return torch.tensor(out)


def brute_force_euclidean(vectors: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    diff = vectors.double()[:, None, :] - codes.double()[None, :, :]  # [N, K, C]
    return diff.pow(2).sum(-1).argmin(1)


class TestLookups:
    def z(self, d: int = 6, seed: int = 1) -> torch.Tensor:
        return torch.randn(2, d, 3, 4, generator=torch.Generator().manual_seed(seed))

    def test_l2_lookup_equals_argmax_cosine(self):
        q = quantizer(k=9, d=6, l2_normalize=True)
        q.replace_codebook(torch.randn(9, 6, generator=torch.Generator().manual_seed(2)) * 3)
        z = self.z()
        out = q(z)
        expected = brute_force_cosine(flat_of(z), q.codebook.detach())
        assert torch.equal(out.indices.flatten(), expected)
        assert len(set(expected.tolist())) > 2  # not a degenerate assignment
        unit = F.normalize(q.codebook.detach(), dim=1)
        torch.testing.assert_close(flat_of(out.quantized), unit[expected])
        assert torch.equal(q.lookup(out.indices), out.quantized)
        # Losses compare normalised vectors.
        manual = (F.normalize(flat_of(z), dim=1) - unit[expected]).pow(2).mean()
        torch.testing.assert_close(out.commitment_loss, manual)

    def test_low_dim_lookup_equals_brute_force_in_the_projected_space(self):
        q = quantizer(k=9, d=6, lookup_dim=2)
        assert q.codebook.shape == (9, 2)
        q.replace_codebook(torch.randn(9, 2, generator=torch.Generator().manual_seed(2)))
        z = self.z().requires_grad_()
        out = q(z)
        with torch.no_grad():
            w_in, b_in = q.project_in.weight, q.project_in.bias  # [2, 6], [2]
            w_out, b_out = q.project_out.weight, q.project_out.bias  # [6, 2], [6]
            projected = flat_of(z) @ w_in.t() + b_in  # [N, 2]
            expected = brute_force_euclidean(projected, q.codebook)
            assert torch.equal(out.indices.flatten(), expected)
            assert len(set(expected.tolist())) > 2
            back = q.codebook[expected] @ w_out.t() + b_out  # [N, 6]
            torch.testing.assert_close(flat_of(out.quantized), back)
            assert torch.equal(q.lookup(out.indices), out.quantized)  # bit for bit: decode_indices == decode
            torch.testing.assert_close(out.commitment_loss, (projected - q.codebook[expected]).pow(2).mean())
        (q.loss(out) + out.quantized.square().sum()).backward()
        for param in (z, q.codebook, q.project_in.weight, q.project_out.weight):
            assert param.grad is not None and param.grad.abs().sum() > 0

    def test_low_dim_and_l2_together(self):
        q = quantizer(k=9, d=6, lookup_dim=3, l2_normalize=True)
        q.replace_codebook(torch.randn(9, 3, generator=torch.Generator().manual_seed(2)))
        z = self.z()
        out = q(z)
        with torch.no_grad():
            projected = flat_of(z) @ q.project_in.weight.t() + q.project_in.bias
            expected = brute_force_cosine(projected, q.codebook)
            assert torch.equal(out.indices.flatten(), expected)
            unit = F.normalize(q.codebook, dim=1)
            torch.testing.assert_close(flat_of(out.quantized), q.project_out(unit[expected]))
        assert torch.equal(q.lookup(out.indices), out.quantized)

    def test_default_and_explicit_off_values_are_the_same_quantizer(self):
        off = {"ema_decay": None, "dead_code_threshold": 0.0, "kmeans_init": False, "lookup_dim": None,
               "l2_normalize": False}
        a, b = quantizer(k=9, d=6), quantizer(k=9, d=6, **off)
        assert repr(a) == repr(b) == "VectorQuantizer(codebook_size=9, code_dim=6, beta=0.25)"
        z = self.z()
        oa, ob = a(z), b(z)
        assert torch.equal(oa.quantized, ob.quantized) and torch.equal(oa.indices, ob.indices)
        assert "ema_decay=0.9" in repr(quantizer(ema_decay=0.9))


# ----------------------------------------------------------------------------------------------- replacing
class TestReplaceAndResize:
    def test_replace_codebook_restarts_every_statistic(self):
        q = quantizer(k=3, d=2, ema_decay=0.9, dead_code_threshold=0.5, kmeans_init=True)
        q.cluster_size.fill_(7.0)
        centres = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        q.replace_codebook(centres)
        assert q.cluster_size.tolist() == [1.0, 1.0, 1.0]
        assert torch.equal(q.embed_sum, centres) and bool(q.initialised)

    def test_with_codebook_keeps_options_and_projections_and_changes_k(self):
        q = quantizer(k=3, d=4, ema_decay=0.9, lookup_dim=2, l2_normalize=True, kmeans_init=True)
        rng = torch.get_rng_state()
        centres = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
        new = q.with_codebook(centres)
        assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched
        assert new.codebook_size == 5 and torch.equal(new.codebook.detach(), centres)
        assert new.options() == q.options()
        assert torch.equal(new.project_in.weight, q.project_in.weight)
        assert torch.equal(new.project_out.bias, q.project_out.bias)
        assert torch.equal(new.embed_sum, centres) and bool(new.initialised)
        with pytest.raises(ValueError, match=r"\[K, 2\]"):
            q.with_codebook(torch.zeros(5, 4))
        with pytest.raises(ValueError, match="lookup_dim"):
            q.replace_codebook(torch.zeros(3, 4))


# ----------------------------------------------------------------------------------------------- validation
BAD_OPTIONS = [
    ({"ema_decay": 1.0}, "ema_decay"),
    ({"ema_decay": 0.0}, "ema_decay"),
    ({"ema_decay": float("nan")}, "ema_decay"),
    ({"ema_decay": True}, "ema_decay"),
    ({"dead_code_threshold": -1.0}, "dead_code_threshold"),
    ({"dead_code_threshold": float("inf")}, "dead_code_threshold"),
    ({"kmeans_init": "yes"}, "kmeans_init"),
    ({"kmeans_init_batches": 0}, "kmeans_init_batches"),
    ({"lookup_dim": 0}, "lookup_dim"),
    ({"lookup_dim": 2.0}, "lookup_dim"),
    ({"l2_normalize": 1}, "l2_normalize"),
]


@pytest.mark.parametrize(("kwargs", "match"), [*BAD_OPTIONS, ({"seed": -1}, "seed")])
def test_the_quantizer_rejects_bad_options(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=f"^{match} must"):
        VectorQuantizer(4, 2, **kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [*BAD_OPTIONS, ({"codebook_seed": -1}, "codebook_seed")])
def test_the_config_and_the_module_name_the_setting(kwargs: dict[str, Any], match: str) -> None:
    from lsgs.modules import VQVAE

    with pytest.raises(ConfigError, match=rf"^VQVAEConfig\.{match} must"):
        VQVAEConfig(**kwargs)
    with pytest.raises(ConfigError, match=rf"^model\.{match} must"):
        VQVAE(**kwargs)


# ----------------------------------------------------------------------------------------------- VQVAENet
def test_vqvae_net_passes_every_option_to_its_quantizer() -> None:
    options = {"ema_decay": 0.95, "dead_code_threshold": 0.5, "kmeans_init": True, "kmeans_init_batches": 2,
               "lookup_dim": 4, "l2_normalize": True, "codebook_seed": 3}
    torch.manual_seed(0)
    net = VQVAENet(dataclasses.replace(VQVAEConfig.tiny(), **options))
    q = net.quantizer
    assert (q.ema_decay, q.dead_code_threshold, q.kmeans_init, q.kmeans_init_batches, q.lookup_dim,
            q.l2_normalize, q.seed) == (0.95, 0.5, True, 2, 4, True, 3)
    rebuilt = VQVAENet(VQVAEConfig(**dataclasses.asdict(net.config)))
    rebuilt.load_state_dict(net.state_dict())  # strict: same buffers and projections
    net.eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out = net(x)
    assert out.z_e.shape == (2, 8, 4, 4) and out.indices.shape == (2, 4, 4)
    assert torch.equal(net.decode_indices(out.indices), out.reconstruction)


# ----------------------------------------------------------------------------------------------- Lightning stages
# Stage 1 -> aggregator -> stage 3 with each option set, on the tiny demo configuration of test_module_vqvae.
OPTION_SETS = {
    "ema+dead": {"ema_decay": 0.9, "dead_code_threshold": 1.0},
    "l2+lookup": {"l2_normalize": True, "lookup_dim": 4},
    "kmeans": {"kmeans_init": True},
}


@pytest.fixture(scope="module")
def datamodule(demo_mvtec_root: Path, data_cache_dir: Path) -> Any:
    from test_module_vqvae import mvtec_datamodule

    return mvtec_datamodule(demo_mvtec_root, data_cache_dir)


@pytest.fixture(scope="module", params=list(OPTION_SETS))
def stage1(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, datamodule: Any) -> Any:
    """(option-set name, checkpoint path, fitted module, trainer) for 1 epoch of stage 1 with those options."""
    from lightning.pytorch import seed_everything
    from test_module_vqvae import TINY, make_trainer

    from lsgs.modules import VQVAE

    name = request.param
    path = tmp_path_factory.mktemp("vqvae-options") / "vqvae.ckpt"
    seed_everything(0, verbose=False)
    model = VQVAE(**TINY, **OPTION_SETS[name], num_logged_images=0)
    trainer = make_trainer(path.parent, max_epochs=1)
    with pytest.warns(UserWarning, match="fewer than 39") if name == "kmeans" else _no_op():
        trainer.fit(model, datamodule=datamodule)
    trainer.save_checkpoint(path, weights_only=True)
    return name, path, model, trainer


class _no_op:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *args: object) -> None:
        return None


def lookup_vectors(model: Any, images: torch.Tensor) -> torch.Tensor:
    """``[N, C]`` encodings in the lookup space, written out by hand from the module's weights."""
    q = model.net.quantizer
    vectors = flat_of(model.net.encode(images)).double()
    if q.lookup_dim is not None:
        vectors = vectors @ q.project_in.weight.double().t() + q.project_in.bias.double()
    return F.normalize(vectors, dim=1) if q.l2_normalize else vectors


def search_codes(model: Any, codes: torch.Tensor) -> torch.Tensor:
    return F.normalize(codes.double(), dim=1) if model.net.quantizer.l2_normalize else codes.double()


def test_stage1_trains_logs_and_rebuilds_with_each_option(stage1: Any, datamodule: Any) -> None:
    from test_module_vqvae import TINY, TRAIN_IMAGES

    from lsgs.modules import VQVAE

    name, path, model, trainer = stage1
    options = OPTION_SETS[name]
    hparams = torch.load(path, map_location="cpu", weights_only=False)["hyper_parameters"]
    for key, value in options.items():
        assert hparams[key] == value, key
    loaded = VQVAE.from_checkpoint(str(path))
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    q = loaded.net.quantizer
    if name == "ema+dead":
        trainable = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        assert id(model.net.quantizer.codebook) not in trainable  # moved by the EMA only
        # 42 images x 64 codes over 6 steps into 32 codes: restarts happen in the first steps.
        assert float(trainer.callback_metrics["train/codes_restarted"]) > 0
        assert model.net.quantizer.num_restarts == 0  # reset after logging
    if name == "l2+lookup":
        assert q.codebook.shape == (TINY["codebook_size"], 4)
    if name == "kmeans":
        assert bool(q.initialised)
    # The codebook report (effective size) equals a brute-force pass in the lookup space.
    counts = torch.zeros(TINY["codebook_size"], dtype=torch.int64)
    train = datamodule.dataset("train_eval")
    assert len(train) == TRAIN_IMAGES
    with torch.no_grad():
        codes = search_codes(loaded, q.codebook)
        for i in range(len(train)):
            vectors = lookup_vectors(loaded, train[i]["image"][None])
            counts += torch.bincount(torch.cdist(vectors, codes).argmin(1), minlength=codes.shape[0])
    assert model.codebook_report["effective_size"] == int((counts > 0).sum())
    for key in ("train/codes_used", "train/perplexity", "val/codes_used"):
        assert key in trainer.callback_metrics, key


@pytest.mark.filterwarnings("ignore:kmeans.*fewer than 39 per cluster")
def test_aggregation_then_stage3_with_each_option(stage1: Any, datamodule: Any, tmp_path: Path) -> None:
    from test_module_vqvae import make_trainer

    from lsgs.modules import VQVAE, CodebookAggregator

    name, path, _, _ = stage1
    aggregator = CodebookAggregator(str(path), num_clusters=16, niter=10, output_dir=str(tmp_path))
    make_trainer(tmp_path).predict(aggregator, datamodule=datamodule, return_predictions=False)
    aggregated = VQVAE.from_checkpoint(str(tmp_path / "aggregated.ckpt"))  # strict load
    source = VQVAE.from_checkpoint(str(path))
    q = aggregated.net.quantizer
    assert q.codebook_size == 16 and q.options() == source.net.quantizer.options()
    assert torch.equal(q.codebook.detach(), aggregator.centroids)
    if q.lookup_dim is not None:  # the centres live in the lookup space; the projections are kept
        assert q.codebook.shape == (16, q.lookup_dim)
        assert torch.equal(q.project_in.weight, source.net.quantizer.project_in.weight)
    if q.ema_decay is not None:  # EMA statistics restart from the new codebook
        assert q.cluster_size.tolist() == [1.0] * 16 and torch.equal(q.embed_sum, q.codebook.detach())
    if q.kmeans_init:
        assert bool(q.initialised)  # stage 3 must not re-initialise the aggregated codebook

    # The report measures what the written checkpoint does: usage of the centres in the lookup space, and the
    # validation L1 of the aggregated model's own forward pass.
    counts = torch.zeros(16, dtype=torch.int64)
    l1 = []
    with torch.no_grad():
        codes = search_codes(aggregated, q.codebook)
        for batch in datamodule.train_eval_dataloader():
            vectors = lookup_vectors(aggregated, batch["image"])
            counts += torch.bincount(torch.cdist(vectors, codes).argmin(1), minlength=16)
        for batch in datamodule.val_dataloader():
            l1.append((aggregated(batch["image"]) - batch["image"]).abs().flatten())
    assert aggregator.report["effective_size_after"] == int((counts > 0).sum())
    assert aggregator.report["val_l1_after"] == pytest.approx(float(torch.cat(l1).mean()), rel=1e-5)

    # Stage 3 from the aggregated checkpoint, with the training options switched (off <-> on): loads, and the
    # k-means initialisation never overwrites the loaded codebook.
    switched = {"kmeans_init": True, "ema_decay": 0.9} if name != "ema+dead" else {}
    finetune = VQVAE(init_from=str(tmp_path / "aggregated.ckpt"), lr=0.0, **switched)
    fq = finetune.net.quantizer
    assert fq.lookup_dim == q.lookup_dim and fq.l2_normalize == q.l2_normalize  # architecture inherited
    assert torch.equal(fq.codebook.detach(), q.codebook.detach())
    if switched:
        assert bool(fq.initialised) and torch.equal(fq.embed_sum, fq.codebook.detach())
    else:
        assert not hasattr(fq, "embed_sum")
    before = fq.codebook.detach().clone()
    # The encodings of the one training step, as the quantizer receives them.
    inputs: list[torch.Tensor] = []
    hook = fq.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()) if m.training else None)
    make_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=0).fit(
        finetune, datamodule=datamodule
    )
    hook.remove()
    if switched:  # one EMA step from the loaded codes, not a k-means re-initialisation
        assert bool(fq.initialised) and len(inputs) == 1
        # The step by hand, in float64: nearest loaded code of each vector (in the lookup space), then
        # n = g*1 + (1-g)*c, m = g*e + (1-g)*s from the restarted statistics (sizes 1, sums = codes), e' = m / n~.
        with torch.no_grad():
            vectors = flat_of(inputs[0])
            vectors = fq.to_lookup_space(vectors) if (fq.lookup_dim or fq.l2_normalize) else vectors
        vectors, codes = vectors.double(), before.double()
        search = torch.nn.functional.normalize(codes, dim=-1) if fq.l2_normalize else codes
        nearest = torch.cdist(vectors, search).argmin(dim=1)
        counts = torch.bincount(nearest, minlength=16).double()
        sums = torch.zeros_like(codes).index_add_(0, nearest, vectors)
        decay = switched["ema_decay"]
        sizes = decay * 1.0 + (1 - decay) * counts
        expected = (decay * codes + (1 - decay) * sums) / laplace_smoothed_sizes(sizes, EMA_EPSILON)[:, None]
        # Tight enough to tell one EMA step (codes move by up to ~0.1 of their distance to the batch means) from
        # no step or a k-means re-initialisation (codes at the batch's cluster centres).
        torch.testing.assert_close(fq.codebook.detach().double(), expected, atol=1e-5, rtol=1e-5)
        assert (expected - codes).abs().max() > 1e-3


def test_init_from_architecture_and_conflicts(stage1: Any, tmp_path: Path) -> None:
    from lsgs.modules import VQVAE

    name, path, _, _ = stage1
    if name != "l2+lookup":
        pytest.skip("architecture options only")
    inherited = VQVAE(init_from=str(path))
    assert inherited.hparams.lookup_dim == 4 and inherited.hparams.l2_normalize is True
    with pytest.raises(CheckpointError, match=r"lookup_dim=2 \(checkpoint has 4\)"):
        VQVAE(init_from=str(path), lookup_dim=2)
    with pytest.raises(CheckpointError, match=r"l2_normalize=False \(checkpoint has True\)"):
        VQVAE(init_from=str(path), l2_normalize=False)
    # A checkpoint written before these options existed has no such keys: they were off.
    old = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("ema_decay", "dead_code_threshold", "kmeans_init", "kmeans_init_batches", "lookup_dim",
                "l2_normalize", "codebook_seed"):
        old["hyper_parameters"].pop(key)
    old["state_dict"] = {k: v for k, v in old["state_dict"].items() if "project_" not in k}
    old["state_dict"]["net.quantizer.codebook"] = torch.zeros(32, 8)
    torch.save(old, tmp_path / "old.ckpt")
    legacy = VQVAE(init_from=str(tmp_path / "old.ckpt"))
    assert legacy.hparams.lookup_dim is None and legacy.hparams.l2_normalize is False
    assert VQVAE.from_checkpoint(str(tmp_path / "old.ckpt")).net.quantizer.lookup_dim is None


def test_freeze_codebook_contradicts_options_that_move_it() -> None:
    from lsgs.modules import VQVAE

    for options in ({"ema_decay": 0.99}, {"dead_code_threshold": 1.0}, {"kmeans_init": True}):
        key = next(iter(options))
        with pytest.raises(ConfigError, match=rf"^model.freeze_codebook=True contradicts model.{key}="):
            VQVAE(freeze_codebook=True, **options)
