"""Tests of lsgs.nn.quantizer: nearest-code search against brute force, losses, gradients, errors."""

import math

import numpy as np
import pytest
import torch

from lsgs.nn.nearest import nearest_codes
from lsgs.nn.quantizer import (
    QuantizerOutput,
    VectorQuantizer,
    code_counts,
    codebook_perplexity,
)


def brute_force_nearest(vectors: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: float64 distances one vector at a time, first minimum wins."""
    idx, dist = [], []
    cb = codebook.double()
    for v in vectors.double():
        d = torch.cdist(v[None], cb)[0] ** 2  # [K]
        best = min(range(len(d)), key=lambda k: (float(d[k]), k))
        idx.append(best)
        dist.append(float(d[best]))
    return torch.tensor(idx, dtype=torch.int64), torch.tensor(dist, dtype=torch.float64)


def random_problem(n=300, k=37, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)


class TestNearestCodes:
    def test_matches_brute_force(self):
        vectors, codebook = random_problem()
        idx, dist = nearest_codes(vectors, codebook)
        ref_idx, ref_dist = brute_force_nearest(vectors, codebook)
        assert idx.dtype == torch.int64 and idx.shape == (300,)
        assert dist.dtype == torch.float32 and dist.shape == (300,)
        assert torch.equal(idx, ref_idx)
        torch.testing.assert_close(dist.double(), ref_dist, rtol=1e-5, atol=1e-5)

    def test_ties_go_to_lowest_index(self):
        # Values chosen so every distance is exact in fp32: the tie is a true tie after the expansion too.
        codebook = torch.tensor([[5.0, 5.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
        vectors = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0], [0.5, 0.0], [5.0, 5.0]])
        idx, dist = nearest_codes(vectors, codebook, chunk_size=2)
        ref_idx, ref_dist = brute_force_nearest(vectors, codebook)
        # [0.5, 0.5]: codes 1, 2, 3 at 0.5 -> 1; [1, 0]: codes 1, 3 at 0 -> 1; [0.5, 0]: 1, 3, 4 at 0.25 -> 1.
        assert idx.tolist() == [1, 1, 2, 1, 0]
        assert torch.equal(idx, ref_idx)
        assert dist.tolist() == [0.5, 0.0, 0.0, 0.25, 0.0]
        torch.testing.assert_close(dist.double(), ref_dist)

    def test_duplicate_codes_pick_first(self):
        g = torch.Generator().manual_seed(1)
        base = torch.randn(5, 8, generator=g)
        codebook = torch.cat([base, base])  # codes i and i + 5 identical
        vectors = base + 0.01 * torch.randn(5, 8, generator=g)
        idx, _ = nearest_codes(vectors, codebook)
        assert idx.tolist() == [0, 1, 2, 3, 4]

    @pytest.mark.parametrize("chunk_size", [1, 7, 299, 300, 10_000])
    def test_chunked_equals_unchunked(self, chunk_size):
        vectors, codebook = random_problem(seed=2)
        idx_full, dist_full = nearest_codes(vectors, codebook, chunk_size=10**9)
        idx, dist = nearest_codes(vectors, codebook, chunk_size=chunk_size)
        assert torch.equal(idx, idx_full)
        torch.testing.assert_close(dist, dist_full, rtol=1e-6, atol=1e-6)

    def test_default_chunk_size_multi_chunk(self):
        # More vectors than the default chunk: the loop boundary is exercised at its real size.
        vectors, codebook = random_problem(n=8192 * 2 + 5, k=16, d=4, seed=3)
        idx, dist = nearest_codes(vectors, codebook)
        idx_ref, dist_ref = nearest_codes(vectors, codebook, chunk_size=len(vectors))
        assert torch.equal(idx, idx_ref)
        torch.testing.assert_close(dist, dist_ref)

    def test_distances_are_never_negative(self):
        # Large norms and a vector equal to a code: the expansion cancels catastrophically.
        codebook = torch.randn(10, 16, generator=torch.Generator().manual_seed(4)) * 1e3
        idx, dist = nearest_codes(codebook.clone(), codebook)
        assert torch.equal(idx, torch.arange(10))
        assert (dist >= 0).all()

    def test_fp32_under_bf16_autocast(self):
        vectors, codebook = random_problem(seed=5)
        vb, cb = vectors.bfloat16(), codebook.bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            idx, dist = nearest_codes(vb, cb)
        assert dist.dtype == torch.float32
        # Same answer as an fp32 search on the (bf16-valued) inputs, not a bf16 matmul.
        ref_idx, ref_dist = brute_force_nearest(vb.float(), cb.float())
        assert torch.equal(idx, ref_idx)
        torch.testing.assert_close(dist.double(), ref_dist, rtol=1e-5, atol=1e-5)

    def test_no_gradient(self):
        vectors, codebook = random_problem(n=4, k=3, d=2)
        vectors.requires_grad_(True)
        _, dist = nearest_codes(vectors, codebook)
        assert not dist.requires_grad

    def test_empty_input(self):
        idx, dist = nearest_codes(torch.empty(0, 4), torch.randn(3, 4))
        assert idx.shape == (0,) and dist.shape == (0,)

    @pytest.mark.parametrize(
        ("vectors", "codebook", "chunk", "match"),
        [
            (torch.zeros(4), torch.zeros(3, 4), 8, r"vectors \[N, D\]"),
            (torch.zeros(2, 4), torch.zeros(3, 4, 1), 8, r"codebook \[K, D\]"),
            (torch.zeros(2, 4), torch.zeros(3, 5), 8, "dimension 4 .* 5"),
            (torch.zeros(2, 4), torch.zeros(3, 4), 0, "chunk_size"),
        ],
    )
    def test_bad_inputs(self, vectors, codebook, chunk, match):
        with pytest.raises(ValueError, match=match):
            nearest_codes(vectors, codebook, chunk_size=chunk)


class TestUsage:
    def test_counts_and_perplexity(self):
        indices = torch.tensor([[[0, 1], [1, 3]]])
        counts = code_counts(indices, 5)
        assert counts.tolist() == [1, 2, 0, 1, 0]
        p = np.array([1, 2, 1]) / 4
        assert float(codebook_perplexity(counts)) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-6)

    def test_perplexity_extremes(self):
        assert float(codebook_perplexity(torch.tensor([0, 7, 0]))) == pytest.approx(1.0)
        assert float(codebook_perplexity(torch.full((16,), 3))) == pytest.approx(16.0, rel=1e-5)


def make_quantizer(k=12, d=4, beta=0.25, seed=0):
    torch.manual_seed(seed)
    return VectorQuantizer(k, d, beta=beta)


class TestVectorQuantizer:
    def test_init(self):
        q = make_quantizer(k=64, d=5)
        assert q.codebook.shape == (64, 5)
        assert isinstance(q.codebook, torch.nn.Parameter)
        assert q.codebook.abs().max() <= 1 / 64
        assert q.codebook.std() > 0
        assert "codebook_size=64" in repr(q)

    def test_init_is_seeded(self):
        assert torch.equal(make_quantizer(seed=3).codebook, make_quantizer(seed=3).codebook)

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"codebook_size": 0, "code_dim": 4}, "codebook_size"),
            ({"codebook_size": 4, "code_dim": 0}, "code_dim"),
            ({"codebook_size": 4, "code_dim": 4, "beta": -1.0}, "beta"),
            ({"codebook_size": 4, "code_dim": 4, "beta": float("nan")}, "beta"),
            ({"codebook_size": 4, "code_dim": 4, "chunk_size": 0}, "chunk_size"),
            ({"codebook_size": 4.0, "code_dim": 4}, "codebook_size"),
        ],
    )
    def test_bad_constructor_args(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            VectorQuantizer(**kwargs)

    def test_forward_shapes_values_and_losses(self):
        q = make_quantizer()
        z_e = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(1)) * 0.1
        out = q(z_e)
        assert isinstance(out, QuantizerOutput)
        assert out.quantized.shape == (2, 4, 3, 5) and out.quantized.dtype == torch.float32
        assert out.indices.shape == (2, 3, 5) and out.indices.dtype == torch.int64
        assert out.codebook_loss.shape == () and out.commitment_loss.shape == ()
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, 4)
        ref_idx, _ = brute_force_nearest(flat, q.codebook.detach())
        assert torch.equal(out.indices.reshape(-1), ref_idx)
        e = q.codebook.detach()[out.indices].permute(0, 3, 1, 2)  # [B, D, h, w]
        assert torch.equal(out.quantized, e)  # exactly the codes in value
        mse = ((e - z_e) ** 2).mean()
        torch.testing.assert_close(out.codebook_loss, mse)
        torch.testing.assert_close(out.commitment_loss, mse)
        torch.testing.assert_close(q.loss(out), mse * 1.25)

    def test_channels_last_input(self):
        q = make_quantizer()
        z_e = torch.randn(2, 4, 3, 5)
        out = q(z_e)
        out_cl = q(z_e.contiguous(memory_format=torch.channels_last))
        assert torch.equal(out.indices, out_cl.indices)
        assert torch.equal(out.quantized, out_cl.quantized)

    def test_straight_through_gradient(self):
        q = make_quantizer()
        z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
        out = q(z_e)
        weights = torch.randn_like(z_e)
        (out.quantized * weights).sum().backward()
        assert torch.equal(z_e.grad, weights)  # identity to z_e
        assert q.codebook.grad is None  # reconstruction path never reaches the codebook

    def test_codebook_gets_gradient_only_from_codebook_loss(self):
        q = make_quantizer()
        z_e = torch.randn(2, 4, 3, 3, requires_grad=True)
        q(z_e).commitment_loss.backward()
        assert q.codebook.grad is None
        assert z_e.grad is not None and z_e.grad.abs().sum() > 0

        q.zero_grad()
        z_e.grad = None
        out = q(z_e)
        out.codebook_loss.backward()
        assert z_e.grad is None
        # d/dE mean((E[idx] - z)^2) = 2 (E[idx] - z) / numel, summed over the vectors assigned to each code.
        flat = z_e.detach().permute(0, 2, 3, 1).reshape(-1, 4)
        idx = out.indices.reshape(-1)
        per_vector = 2 * (q.codebook.detach()[idx] - flat) / z_e.numel()  # [N, D]
        expected = torch.zeros_like(q.codebook).index_add_(0, idx, per_vector)
        torch.testing.assert_close(q.codebook.grad, expected)

    def test_bf16_autocast(self):
        q = make_quantizer(k=32, d=8)
        z_e = torch.randn(2, 8, 4, 4, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z_b = z_e.to(torch.bfloat16)  # what a conv encoder would hand over under autocast
            out = q(z_b)
            loss = q.loss(out) + out.quantized.float().sum()
        loss.backward()
        assert out.quantized.dtype == torch.bfloat16
        assert out.codebook_loss.dtype == torch.float32 and out.commitment_loss.dtype == torch.float32
        flat = z_b.detach().float().permute(0, 2, 3, 1).reshape(-1, 8)
        ref_idx, _ = nearest_codes(flat, q.codebook.detach())
        assert torch.equal(out.indices.reshape(-1), ref_idx)
        assert torch.isfinite(z_e.grad).all() and torch.isfinite(q.codebook.grad).all()

    @pytest.mark.parametrize("shape", [(2, 4, 3), (2, 5, 3, 3), (4,)])
    def test_forward_bad_shape(self, shape):
        with pytest.raises(ValueError, match=r"z_e must be \[B, 4, h, w\]"):
            make_quantizer()(torch.zeros(shape))

    def test_lookup(self):
        q = make_quantizer()
        indices = torch.tensor([[[0, 11], [3, 3]]])
        codes = q.lookup(indices)
        assert codes.shape == (1, 4, 2, 2)
        assert torch.equal(codes[0, :, 0, 1], q.codebook.detach()[11])
        assert torch.equal(q.lookup(indices.int()), codes)  # any integer dtype

    def test_lookup_round_trip(self):
        q = make_quantizer()
        out = q(torch.randn(3, 4, 2, 5))
        assert torch.equal(q.lookup(out.indices), out.quantized)

    @pytest.mark.parametrize(
        ("indices", "match"),
        [
            (torch.zeros(2, 3, dtype=torch.int64), "integer tensor"),
            (torch.zeros(1, 2, 3), "integer tensor"),
            (torch.zeros(1, 2, 3, dtype=torch.bool), "integer tensor"),
            (torch.tensor([[[0, 12]]]), r"\[0, 12\).*\[0, 12\]"),
            (torch.tensor([[[-1, 2]]]), r"\[-1, 2\]"),
        ],
    )
    def test_lookup_bad_indices(self, indices, match):
        with pytest.raises(ValueError, match=match):
            make_quantizer().lookup(indices)

    def test_replace_codebook(self):
        q = make_quantizer()
        param = q.codebook
        centres = torch.randn(12, 4, dtype=torch.float64)
        q.replace_codebook(centres)
        assert q.codebook is param  # optimisers and references stay valid
        assert q.codebook.dtype == torch.float32
        torch.testing.assert_close(q.codebook.detach(), centres.float())
        z = centres.float()[[3, 7]].reshape(2, 4, 1, 1)  # codes themselves quantise to themselves
        assert q(z).indices.flatten().tolist() == [3, 7]

    def test_replace_codebook_shape_mismatch(self):
        with pytest.raises(ValueError, match=r"\(10, 4\).*\(12, 4\)"):
            make_quantizer().replace_codebook(torch.zeros(10, 4))

    def test_replace_codebook_non_finite(self):
        centres = torch.zeros(12, 4)
        centres[2, 1] = float("nan")
        with pytest.raises(ValueError, match="NaN"):
            make_quantizer().replace_codebook(centres)

    def test_loss_beta(self):
        q = make_quantizer(beta=0.0)
        out = q(torch.randn(1, 4, 2, 2))
        assert q.loss(out).item() == pytest.approx(out.codebook_loss.item())
