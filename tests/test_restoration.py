"""Tests of the restoration and anomaly-map maths (src/lsgs/nn/restoration.py) against hand-built
distributions, hand-set models and brute-force loops."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lsgs.metrics.histogram import bin_of_threshold, threshold_of_bin
from lsgs.metrics.quantile import ScoreQuantile, score_quantile
from lsgs.nn.restoration import (
    code_nll,
    per_image_uniforms,
    reconstruction_error_map,
    restoration_anomaly_map,
    restoration_weights,
    restore_causal,
    restore_global,
    smooth_anomaly_map,
)
from lsgs.nn.transformer import CodeTransformer, CodeTransformerConfig

K, L = 8, 12


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ code_nll


def test_code_nll_matches_log_softmax():
    logits = torch.randn(3, L, K, generator=gen())
    codes = torch.randint(0, K, (3, L), generator=gen(1))
    nll = code_nll(logits, codes)
    assert nll.shape == (3, L) and nll.dtype == torch.float32
    expected = torch.stack(
        [torch.stack([-torch.log_softmax(logits[b, i], 0)[codes[b, i]] for i in range(L)]) for b in range(3)]
    )
    torch.testing.assert_close(nll, expected)
    assert code_nll(logits.bfloat16(), codes).dtype == torch.float32


def test_code_nll_errors():
    logits, codes = torch.randn(2, L, K), torch.zeros(2, L, dtype=torch.long)
    with pytest.raises(ValueError, match="expected logits"):
        code_nll(logits[0], codes)
    with pytest.raises(ValueError, match="expected logits"):
        code_nll(logits, codes[:, 1:])
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        code_nll(logits, codes + K)


# ------------------------------------------------------------------------------------ restore_global


def sharp_logits(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits peaked (p ~ 1 - 1e-8) on a random code per position, and those codes."""
    codes = torch.randint(0, K, (batch, L), generator=gen(seed))
    logits = torch.zeros(batch, L, K)
    logits.scatter_(2, codes.unsqueeze(2), 20.0)
    return logits, codes


def test_restore_global_resamples_only_the_implanted_code():
    logits, codes = sharp_logits()
    implanted = codes.clone()
    implanted[1, 5] = (codes[1, 5] + 3) % K  # probability ~ e^-20: NLL ~ 20
    restored = restore_global(logits, implanted, nll_threshold=5.0, num_restorations=15, generator=gen())
    assert restored.shape == (2, 15, L) and restored.dtype == torch.long
    expected = codes.unsqueeze(1).expand(2, 15, L)
    assert torch.equal(restored, expected)  # position (1, 5) restored to the likely code in every restoration
    untouched = torch.ones(2, L, dtype=torch.bool)
    untouched[1, 5] = False
    assert torch.equal(restored[:, :, untouched[1]][1], implanted[1, untouched[1]].expand(15, -1))


def test_restore_global_infinite_threshold_changes_nothing():
    logits = torch.randn(2, L, K, generator=gen())
    codes = torch.randint(0, K, (2, L), generator=gen(1))
    restored = restore_global(logits, codes, math.inf, 4, generator=gen())
    assert torch.equal(restored, codes.unsqueeze(1).expand(2, 4, L))


def test_restore_global_draws_independently_with_the_tempered_distribution():
    # One implausible position whose distribution puts 3/4 on code 1 and 1/4 on code 2.
    codes = torch.zeros(1, L, dtype=torch.long)
    logits = torch.full((1, L, K), -30.0)
    logits[0, :, 0] = 0.0
    logits[0, 4] = -30.0
    logits[0, 4, 1], logits[0, 4, 2] = math.log(3.0), 0.0
    n = 4000
    for temperature, p1 in ((1.0, 0.75), (2.0, math.sqrt(3) / (math.sqrt(3) + 1))):
        restored = restore_global(logits, codes, 5.0, n, generator=gen(), temperature=temperature)
        assert torch.equal(restored[0, :, :4], codes[0, :4].expand(n, 4))
        drawn = restored[0, :, 4]
        assert set(drawn.unique().tolist()) == {1, 2}
        assert (drawn == 1).float().mean().item() == pytest.approx(p1, abs=4 * math.sqrt(p1 * (1 - p1) / n))


def test_restore_global_is_seeded():
    logits = torch.randn(2, L, K, generator=gen())
    codes = torch.randint(0, K, (2, L), generator=gen(1))
    a = restore_global(logits, codes, 1.0, 6, generator=gen(3))
    assert torch.equal(a, restore_global(logits, codes, 1.0, 6, generator=gen(3)))
    assert not torch.equal(a, restore_global(logits, codes, 1.0, 6, generator=gen(4)))
    assert (a != codes.unsqueeze(1)).any()


def test_restore_global_with_a_real_model():
    torch.manual_seed(0)
    model = CodeTransformer(CodeTransformerConfig(vocab_size=K, seq_len=L, d_model=16, n_heads=2)).eval()
    codes = torch.randint(0, K, (3, L), generator=gen())
    with torch.no_grad():
        logits = model(codes)
    nll = code_nll(logits, codes)
    threshold = nll.median().item()
    restored = restore_global(logits, codes, threshold, 5, generator=gen())
    keep = (nll <= threshold).unsqueeze(1).expand_as(restored)
    assert torch.equal(restored[keep], codes.unsqueeze(1).expand_as(restored)[keep])


def test_per_image_thresholds_equal_one_call_per_image():
    """A [B] threshold tensor (per-category thresholds) acts like B calls with each image's own number."""
    torch.manual_seed(0)
    codes = torch.randint(0, K, (3, L), generator=gen())
    thresholds = torch.tensor([0.5, 2.0, math.inf])
    noise = per_image_uniforms([1, 2, 3], 4, L)
    for attention in ("global", "causal"):
        model = CodeTransformer(
            CodeTransformerConfig(vocab_size=K, seq_len=L, d_model=16, n_heads=2, attention=attention)
        ).eval()
        with torch.no_grad():
            logits = model(codes)

        def restore(rows, threshold, model=model, logits=logits, attention=attention):
            if attention == "causal":
                return restore_causal(model, codes[rows], threshold, 4, uniforms=noise[rows])
            return restore_global(logits[rows], codes[rows], threshold, 4, uniforms=noise[rows])

        together = restore([0, 1, 2], thresholds)
        for b in range(3):
            assert torch.equal(together[b], restore([b], float(thresholds[b]))[0])
        assert (together[0] != codes[0]).any() and torch.equal(together[2], codes[2].expand(4, L))
    with pytest.raises(ValueError, match="one per image"):
        restore_global(logits, codes, thresholds[:2], 4)
    with pytest.raises(ValueError, match="NaN"):
        restore_global(logits, codes, torch.tensor([1.0, math.nan, 1.0]), 4)


def test_restore_global_errors():
    logits, codes = torch.randn(2, L, K), torch.zeros(2, L, dtype=torch.long)
    with pytest.raises(ValueError, match="NaN"):
        restore_global(logits, codes, math.nan, 3)
    for n in (0, 2.0, True):
        with pytest.raises(ValueError, match="num_restorations"):
            restore_global(logits, codes, 1.0, n)
    for t in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            restore_global(logits, codes, 1.0, 3, temperature=t)
    with pytest.raises(ValueError, match="expected logits"):
        restore_global(logits, codes[:1], 1.0, 3)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        restore_global(logits, codes - 1, 1.0, 3)


# ------------------------------------------------------------------------------------ restore_causal


def copy_previous_model(scale: float = 10.0) -> CodeTransformer:
    """A causal model whose weights are set by hand: p(s_i | s_<i) ~ 1 on s_{i-1}, uniform at i = 0.

    Blocks are zeroed to identities, token embeddings are one-hot (the start token too), positions are zero;
    the head reads the one-hot back. Position i's input is s_{i-1}, so the model copies the previous code with
    logit gap ~ 4.1 * scale, and sees only the start token at i = 0 (all codes tie).
    """
    cfg = CodeTransformerConfig(
        vocab_size=K, seq_len=L, d_model=16, n_layers=1, n_heads=2, attention="causal"
    )
    model = CodeTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.tok_emb.weight[:, : K + 1] = torch.eye(K + 1)
        for ln in (model.blocks[0].ln_1, model.blocks[0].ln_2, model.ln_f):
            ln.weight.fill_(1.0)
        model.head.weight[:, :K] = scale * torch.eye(K)
    return model


def test_copy_previous_model_is_confident():
    model = copy_previous_model()
    codes = torch.tensor([[2] * L, [5] * L])
    nll = code_nll(model(codes), codes)
    assert nll[:, 0].tolist() == pytest.approx([math.log(K)] * 2)
    assert (nll[:, 1:] < 1e-8).all()


def test_restore_causal_resamples_the_implanted_code_under_the_restored_prefix():
    model = copy_previous_model()
    codes = torch.tensor([[2] * L, [5] * L])
    implanted = codes.clone()
    implanted[0, 6] = 7
    # Under the ORIGINAL prefix position 7 (after the 7) would be implausible too; under the restored one it
    # is not, so only position 6 changes.
    assert code_nll(model(implanted), implanted)[0, 7] > 5.0
    restored = restore_causal(model, implanted, nll_threshold=5.0, num_restorations=4, generator=gen())
    assert restored.shape == (2, 4, L) and restored.dtype == torch.long
    assert torch.equal(restored, codes.unsqueeze(1).expand(2, 4, L))
    unchanged = restore_causal(model, implanted, nll_threshold=math.inf, num_restorations=3, generator=gen())
    assert torch.equal(unchanged, implanted.unsqueeze(1).expand(2, 3, L))


def naive_restore_causal(model, codes, nll_threshold, n, generator, temperature=1.0):
    """Reference: a full forward pass at every position (the reference implementation's algorithm)."""
    seqs = codes.repeat_interleave(n, dim=0)
    with torch.no_grad():
        for i in range(codes.shape[1]):
            logits = model(seqs)[:, i].float()
            nll = F.cross_entropy(logits, seqs[:, i], reduction="none")
            rows = (nll > nll_threshold).nonzero().squeeze(1)
            if rows.numel():
                probs = F.softmax(logits[rows] / temperature, dim=-1)
                seqs[rows, i] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return seqs.view(codes.shape[0], n, -1)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_restore_causal_kv_cache_equals_naive_full_recompute(temperature):
    torch.manual_seed(0)
    cfg = CodeTransformerConfig(
        vocab_size=K, seq_len=L, d_model=32, n_layers=2, n_heads=4, attention="causal"
    )
    model = CodeTransformer(cfg).eval()
    with torch.no_grad():  # sharper, input-dependent distributions than the 0.02 init gives
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    codes = torch.randint(0, K, (3, L), generator=gen(1))
    threshold = code_nll(model(codes), codes).median().item()
    fast = restore_causal(model, codes, threshold, 4, generator=gen(2), temperature=temperature)
    slow = naive_restore_causal(model, codes, threshold, 4, gen(2), temperature)
    assert torch.equal(fast, slow)
    changed = (fast != codes.unsqueeze(1)).float().mean().item()
    assert 0.05 < changed < 0.95  # a meaningful comparison: many positions were resampled
    assert not torch.equal(fast, restore_causal(model, codes, threshold, 4, generator=gen(3)))


def test_restore_causal_under_bf16_autocast():
    model = copy_previous_model()
    implanted = torch.full((1, L), 4)
    implanted[0, 3] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        restored = restore_causal(model, implanted, 5.0, 2, generator=gen())
    assert torch.equal(restored, torch.full((1, 2, L), 4))


def test_restore_causal_errors():
    model = copy_previous_model()
    codes = torch.zeros(2, L, dtype=torch.long)
    global_model = CodeTransformer(CodeTransformerConfig(vocab_size=K, seq_len=L, d_model=16, n_heads=2))
    with pytest.raises(ValueError, match="causal"):
        restore_causal(global_model, codes, 1.0, 2)
    with pytest.raises(ValueError, match="NaN"):
        restore_causal(model, codes, math.nan, 2)
    with pytest.raises(ValueError, match="num_restorations"):
        restore_causal(model, codes, 1.0, 0)
    with pytest.raises(ValueError, match="temperature"):
        restore_causal(model, codes, 1.0, 2, temperature=0.0)
    with pytest.raises(ValueError, match=r"\[B, 12\]"):
        restore_causal(model, codes[:, :5], 1.0, 2)
    with pytest.raises(ValueError, match=r"\[B, 12\]"):
        restore_causal(model, codes[0], 1.0, 2)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        restore_causal(model, codes + K, 1.0, 2)


# ----------------------------------------------------------------------------- weights and anomaly maps


def brute_force_weights(reconstruction, restorations, k):
    B, n = restorations.shape[:2]
    weights = torch.zeros(B, n, dtype=torch.float64)
    for b in range(B):
        scores = [k / (restorations[b, i] - reconstruction[b]).abs().double().mean().item() for i in range(n)]
        top = max(scores)
        exps = [math.exp(s - top) for s in scores]
        weights[b] = torch.tensor([e / sum(exps) for e in exps])
    return weights


@pytest.mark.parametrize("k", [3.0, 0.05])
def test_restoration_weights_match_brute_force(k):
    x_hat = torch.rand(2, 3, 8, 8, generator=gen())
    ys = torch.rand(2, 5, 3, 8, 8, generator=gen(1))
    w = restoration_weights(x_hat, ys, k=k)
    assert w.shape == (2, 5) and w.dtype == torch.float32
    torch.testing.assert_close(w.double(), brute_force_weights(x_hat, ys, k), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(2))


def test_restoration_weights_with_restorations_equal_to_the_reconstruction():
    x_hat = torch.rand(3, 1, 6, 6, generator=gen())
    ys = x_hat.unsqueeze(1) + torch.rand(3, 4, 1, 6, 6, generator=gen(1))
    ys[0, 2] = x_hat[0]  # one identical restoration: it takes all the weight (the limit of k / d)
    ys[1, 0], ys[1, 3] = x_hat[1], x_hat[1]  # two: they share it
    w = restoration_weights(x_hat, ys)
    assert torch.isfinite(w).all()
    torch.testing.assert_close(w[0], torch.tensor([0.0, 0.0, 1.0, 0.0]))
    torch.testing.assert_close(w[1], torch.tensor([0.5, 0.0, 0.0, 0.5]))
    torch.testing.assert_close(
        w[2].double(), brute_force_weights(x_hat[2:], ys[2:], 3.0)[0], atol=1e-6, rtol=0
    )
    same = restoration_weights(x_hat, x_hat.unsqueeze(1).expand(3, 4, 1, 6, 6))
    torch.testing.assert_close(same, torch.full((3, 4), 0.25))
    amap = restoration_anomaly_map(x_hat, x_hat.unsqueeze(1).expand(3, 4, 1, 6, 6))
    assert torch.equal(amap, torch.zeros(3, 1, 6, 6))


def test_restoration_anomaly_map_matches_brute_force():
    x_hat = torch.rand(2, 3, 7, 5, generator=gen())
    ys = torch.rand(2, 4, 3, 7, 5, generator=gen(1))
    amap = restoration_anomaly_map(x_hat, ys, k=0.5)
    assert amap.shape == (2, 1, 7, 5) and amap.dtype == torch.float32
    w = brute_force_weights(x_hat, ys, 0.5)
    expected = torch.zeros(2, 1, 7, 5, dtype=torch.float64)
    for b in range(2):
        for i in range(4):
            for y in range(7):
                for x in range(5):
                    diff = sum(abs(float(x_hat[b, c, y, x]) - float(ys[b, i, c, y, x])) for c in range(3)) / 3
                    expected[b, 0, y, x] += float(w[b, i]) * diff
    torch.testing.assert_close(amap.double(), expected, atol=1e-6, rtol=1e-5)


def test_weights_and_map_errors():
    x_hat, ys = torch.rand(2, 3, 4, 4), torch.rand(2, 5, 3, 4, 4)
    for fn in (restoration_weights, restoration_anomaly_map):
        with pytest.raises(ValueError, match="expected reference"):
            fn(x_hat[0], ys)
        with pytest.raises(ValueError, match="expected reference"):
            fn(x_hat, ys[:, 0])
        with pytest.raises(ValueError, match="expected reference"):
            fn(x_hat, ys[:, :, :1])
        with pytest.raises(ValueError, match="expected reference"):
            fn(x_hat[:1], ys)
        for k in (0.0, -1.0, math.inf, math.nan):
            with pytest.raises(ValueError, match="k must be"):
                fn(x_hat, ys, k=k)


def test_reconstruction_error_map():
    image = torch.zeros(2, 3, 4, 5)
    rec = torch.zeros(2, 3, 4, 5)
    rec[1, 0, 2, 3], rec[1, 2, 2, 3] = 0.3, -0.6
    emap = reconstruction_error_map(image, rec)
    expected = torch.zeros(2, 1, 4, 5)
    expected[1, 0, 2, 3] = 0.3
    torch.testing.assert_close(emap, expected)
    with pytest.raises(ValueError, match="same shape"):
        reconstruction_error_map(image, rec[:, :1])
    with pytest.raises(ValueError, match="same shape"):
        reconstruction_error_map(image[0], rec[0])


# ---------------------------------------------------------------------------------- smoothing, scores


def brute_force_smooth(amap, min_kernel, avg_kernel, count_include_pad):
    B, C, H, W = amap.shape
    a, m = min_kernel // 2, avg_kernel // 2
    mins = torch.zeros(B, C, H, W, dtype=torch.float64)
    out = torch.zeros(B, C, H, W, dtype=torch.float64)
    for b in range(B):
        for c in range(C):
            for y in range(H):
                for x in range(W):
                    window = [
                        float(amap[b, c, yy, xx])
                        for yy in range(y - a, y + a + 1)
                        for xx in range(x - a, x + a + 1)
                        if 0 <= yy < H and 0 <= xx < W
                    ]
                    mins[b, c, y, x] = min(window)
            for y in range(H):
                for x in range(W):
                    window = [
                        float(mins[b, c, yy, xx])
                        for yy in range(y - m, y + m + 1)
                        for xx in range(x - m, x + m + 1)
                        if 0 <= yy < H and 0 <= xx < W
                    ]
                    out[b, c, y, x] = sum(window) / (avg_kernel**2 if count_include_pad else len(window))
    return out


@pytest.mark.parametrize(
    ("min_kernel", "avg_kernel", "count_include_pad"),
    [(3, 7, False), (3, 7, True), (5, 3, False), (1, 1, False)],
)
def test_smoothing_matches_brute_force(min_kernel, avg_kernel, count_include_pad):
    amap = torch.rand(2, 1, 9, 11, generator=gen())
    smoothed = smooth_anomaly_map(amap, min_kernel, avg_kernel, count_include_pad=count_include_pad)
    assert smoothed.shape == amap.shape
    expected = brute_force_smooth(amap, min_kernel, avg_kernel, count_include_pad)
    torch.testing.assert_close(smoothed.double(), expected, atol=1e-6, rtol=1e-6)
    if (min_kernel, avg_kernel) == (1, 1):
        assert torch.equal(smoothed, amap)


def test_smoothing_defaults_and_errors():
    amap = torch.rand(1, 1, 8, 8, generator=gen())
    torch.testing.assert_close(smooth_anomaly_map(amap).double(), brute_force_smooth(amap, 3, 7, False))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        smooth_anomaly_map(amap[0])
    for kwargs in ({"min_kernel": 2}, {"avg_kernel": 0}, {"avg_kernel": True}, {"min_kernel": 3.0}):
        with pytest.raises(ValueError, match="odd positive int"):
            smooth_anomaly_map(amap, **kwargs)


def test_nll_threshold_is_the_streamed_score_quantile():
    """The one NLL-threshold implementation: numpy's lower quantile at its histogram bin edge, the same whether
    the NLLs come at once (benchmarks, tests) or batch by batch (the scoring stage's ScoreQuantile)."""
    nll = torch.rand(50, L, generator=gen()) * 6
    for q in (0.0, 0.5, 0.9, 0.999, 1.0):
        lower = float(np.quantile(nll.numpy(), q, method="lower"))
        expected = threshold_of_bin(bin_of_threshold(lower, 16), 16)
        assert score_quantile(nll, q, num_bits=16) == expected
        streamed = ScoreQuantile(num_bits=16)
        for chunk in nll.split(7):
            streamed.update(chunk)
        assert streamed.quantile(q) == expected
    assert score_quantile(torch.tensor([3.0]), 0.9) == 3.0
    assert math.isnan(score_quantile(torch.zeros(0), 0.9))
    with pytest.raises(ValueError, match="quantile"):
        score_quantile(nll, 1.01)
    with pytest.raises(ValueError, match="finite"):
        score_quantile(torch.tensor([1.0, math.inf]), 0.9)


# ------------------------------------------------------------------------------- per-image uniforms


def test_per_image_uniforms_are_seeded_per_image():
    a = per_image_uniforms([3, 7], 4, L)
    assert a.shape == (2, 4, L) and a.dtype == torch.float32 and a.min() >= 0 and a.max() < 1
    assert torch.equal(a[1], per_image_uniforms([7], 4, L)[0])
    assert not torch.equal(a[0], a[1])


def test_uniform_draws_follow_the_distribution():
    codes = torch.zeros(1, L, dtype=torch.long)
    logits = torch.full((1, L, K), -30.0)
    logits[0, :, 0] = 0.0
    logits[0, 4] = -30.0
    logits[0, 4, 1], logits[0, 4, 2] = math.log(3.0), 0.0
    n = 4000
    restored = restore_global(logits, codes, 5.0, n, uniforms=per_image_uniforms([0], n, L))
    assert torch.equal(restored[0, :, :4], codes[0, :4].expand(n, 4))
    drawn = restored[0, :, 4]
    assert set(drawn.unique().tolist()) == {1, 2}
    assert (drawn == 1).float().mean().item() == pytest.approx(0.75, abs=4 * math.sqrt(0.75 * 0.25 / n))


def test_restorations_with_uniforms_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    for attention in ("global", "causal"):
        model = CodeTransformer(
            CodeTransformerConfig(vocab_size=K, seq_len=L, d_model=16, n_heads=2, attention=attention)
        ).eval()
        codes = torch.randint(0, K, (3, L), generator=gen())
        seeds = [11, 12, 13]

        def restore(rows: list[int], model=model, attention=attention, codes=codes, seeds=seeds) -> torch.Tensor:
            sub = codes[rows]
            noise = per_image_uniforms([seeds[r] for r in rows], 5, L)
            if attention == "causal":
                return restore_causal(model, sub, 1.0, 5, uniforms=noise)
            with torch.no_grad():
                return restore_global(model(sub), sub, 1.0, 5, uniforms=noise)

        together = restore([0, 1, 2])
        assert (together != codes.unsqueeze(1)).any()
        for r in range(3):
            assert torch.equal(restore([r])[0], together[r])
        assert torch.equal(restore([2, 0])[0], together[2])


def test_uniforms_shape_is_checked():
    logits, codes = torch.randn(2, L, K), torch.zeros(2, L, dtype=torch.long)
    with pytest.raises(ValueError, match="uniforms"):
        restore_global(logits, codes, 1.0, 3, uniforms=torch.rand(2, 2, L))
