"""Tests of the code transformer (src/lsgs/nn/transformer.py): shapes, attention structure, KV-cache decoding,
initialisation, tampering and the tampering loss."""

import dataclasses
import math

import pytest
import torch

from lsgs.errors import ConfigError
from lsgs.nn.transformer import (
    CodeTransformer,
    CodeTransformerConfig,
    check_code_range,
    next_code_loss,
    tamper_codes,
    tampering_loss,
)

K, L = 12, 10


def small_model(attention: str = "global", seed: int = 0, **overrides) -> CodeTransformer:
    torch.manual_seed(seed)
    config = CodeTransformerConfig(
        vocab_size=K, seq_len=L, d_model=16, n_layers=2, n_heads=4, attention=attention, **overrides
    )
    return CodeTransformer(config).eval()


def random_codes(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, K, (batch, L), generator=torch.Generator().manual_seed(seed))


def embedding_jacobian_support(model: CodeTransformer, codes: torch.Tensor) -> torch.Tensor:
    """[L_out, L_in] bool: is the gradient of logits[:, i] w.r.t. the input embedding at j non-zero?"""
    captured = {}

    def hook(module, inputs, output):
        captured["emb"] = output.detach().requires_grad_(True)
        return captured["emb"]

    handle = model.tok_emb.register_forward_hook(hook)
    try:
        logits = model(codes)
    finally:
        handle.remove()
    rows = []
    for i in range(codes.shape[1]):
        (grad,) = torch.autograd.grad(logits[:, i].sum(), captured["emb"], retain_graph=True)
        rows.append(grad.abs().sum(dim=(0, 2)) > 0)  # (L_in,)
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------- config


def test_paper_config_values():
    cfg = CodeTransformerConfig.paper()
    assert (cfg.vocab_size, cfg.seq_len, cfg.d_model, cfg.n_layers, cfg.n_heads) == (1024, 256, 768, 12, 12)
    assert cfg.attention == "global" and cfg.head_dim == 64 and cfg.mlp_hidden == 3072
    assert CodeTransformerConfig.paper(vocab_size=512, seq_len=64, attention="causal").attention == "causal"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("vocab_size", 0, "vocab_size"),
        ("vocab_size", 1, ">= 2"),
        ("vocab_size", 3.0, "positive int"),
        ("seq_len", 0, "seq_len"),
        ("d_model", -4, "d_model"),
        ("n_layers", 0, "n_layers"),
        ("n_heads", True, "n_heads"),
        ("attention", "local", "attention"),
        ("d_model", 18, "divisible by n_heads"),
        ("mlp_ratio", 0.0, "mlp_ratio"),
        ("dropout", 1.0, "dropout"),
        ("dropout", -0.1, "dropout"),
    ],
)
def test_config_rejects_bad_values(field, value, message):
    kwargs = {"vocab_size": K, "seq_len": L, "d_model": 16, "n_heads": 4, field: value}
    with pytest.raises(ConfigError, match=message):
        CodeTransformerConfig(**kwargs)
    assert issubclass(ConfigError, ValueError)


def test_config_round_trips_through_asdict():
    model = small_model("causal")
    rebuilt = CodeTransformer(CodeTransformerConfig(**dataclasses.asdict(model.config)))
    rebuilt.load_state_dict(model.state_dict())
    codes = random_codes()
    torch.testing.assert_close(rebuilt.eval()(codes), model(codes))


# ------------------------------------------------------------------------------------------- forward


@pytest.mark.parametrize("attention", ["global", "causal"])
def test_forward_shape_and_integer_dtypes(attention):
    model = small_model(attention)
    codes = random_codes(batch=5)
    logits = model(codes)
    assert logits.shape == (5, L, K) and logits.dtype == torch.float32
    torch.testing.assert_close(model(codes.int()), logits)
    n_rows = K + 1 if attention == "causal" else K
    assert model.tok_emb.weight.shape == (n_rows, 16)


@pytest.mark.parametrize("attention", ["global", "causal"])
def test_forward_rejects_bad_codes(attention):
    model = small_model(attention)
    with pytest.raises(ValueError, match="sequence length 9"):
        model(random_codes()[:, :9])
    with pytest.raises(ValueError, match=r"\[0, 12\)"):
        model(random_codes().clamp_max(K - 1) + 1)
    with pytest.raises(ValueError, match="got values in \\[-1"):
        model(random_codes() - 1)
    with pytest.raises(ValueError, match="integer tensor"):
        model(random_codes().float())
    with pytest.raises(ValueError, match="integer tensor"):
        model(random_codes()[0])


def test_check_code_range_accepts_empty_and_valid():
    check_code_range(torch.zeros(0, L, dtype=torch.long), K)
    check_code_range(torch.tensor([[0, K - 1]]), K)
    with pytest.raises(ValueError, match="tokens"):
        check_code_range(torch.tensor([K]), K, "tokens")


def test_global_is_permutation_equivariant_without_position_embeddings():
    model = small_model("global")
    codes = random_codes()
    perm = torch.randperm(L, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.pos_emb.weight.normal_(0.0, 0.5)
        permuted_out = model(codes[:, perm])
        assert not torch.allclose(permuted_out, model(codes)[:, perm], atol=1e-3)
        model.pos_emb.weight.zero_()
        torch.testing.assert_close(model(codes[:, perm]), model(codes)[:, perm], atol=1e-5, rtol=1e-5)


def test_global_every_output_depends_on_every_input():
    support = embedding_jacobian_support(small_model("global"), random_codes())
    assert support.all()


def test_causal_output_depends_only_on_earlier_codes():
    model = small_model("causal")
    support = embedding_jacobian_support(model, random_codes())
    # Input position j carries s_{j-1} (the start token at j = 0): output i may see input positions 0..i only.
    expected = torch.tril(torch.ones(L, L, dtype=torch.bool))
    assert torch.equal(support, expected)
    # The same property read on codes: changing s_j moves logits[:, i] iff j < i.
    codes = random_codes(batch=1)
    base = model(codes)
    for j in (0, 4, L - 1):
        changed = codes.clone()
        changed[0, j] = (changed[0, j] + 1) % K
        moved = (model(changed) - base).abs().amax(dim=(0, 2)) > 0  # (L,)
        assert torch.equal(moved, torch.arange(L) > j)


def test_causal_input_is_shifted_behind_the_start_token():
    model = small_model("causal")
    codes = random_codes()
    seen = {}

    def hook(module, inputs, output):
        seen["tokens"] = inputs[0]

    handle = model.tok_emb.register_forward_hook(hook)
    try:
        logits = model(codes)
    finally:
        handle.remove()
    expected = torch.cat([torch.full((3, 1), K), codes[:, :-1]], dim=1)
    assert model.start_token == K
    assert torch.equal(seen["tokens"], expected)
    # Position 0 sees only the start token: the same distribution for every sequence.
    torch.testing.assert_close(logits[:, 0], logits[:1, 0].expand(3, K))


def test_dropout_is_active_only_in_training():
    model = small_model("global", dropout=0.3)
    codes = random_codes()
    torch.testing.assert_close(model(codes), model(codes))
    model.train()
    assert not torch.allclose(model(codes), model(codes))
    no_dropout = small_model("global").train()
    torch.testing.assert_close(no_dropout(codes), no_dropout(codes))


def test_same_seed_same_weights_and_numbers():
    a, b = small_model("global", seed=7), small_model("global", seed=7)
    codes = random_codes()
    assert torch.equal(a(codes), b(codes))
    assert not torch.equal(a(codes), small_model("global", seed=8)(codes))


def test_gpt2_initialisation():
    torch.manual_seed(0)
    cfg = CodeTransformerConfig(vocab_size=256, seq_len=64, d_model=128, n_layers=8, n_heads=4)
    model = CodeTransformer(cfg)
    resid_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    for name, p in model.named_parameters():
        if name.endswith("proj.weight"):
            assert p.std().item() == pytest.approx(resid_std, rel=0.05), name
        elif name.endswith("weight") and "ln" not in name:
            assert p.std().item() == pytest.approx(0.02, rel=0.05), name
        elif name.endswith("bias") and "ln" not in name:
            assert torch.all(p == 0), name
    assert torch.all(model.ln_f.weight == 1) and torch.all(model.ln_f.bias == 0)


def test_paper_size_forward_on_cpu():
    torch.manual_seed(0)
    model = CodeTransformer(CodeTransformerConfig.paper()).eval()
    assert 80e6 < sum(p.numel() for p in model.parameters()) < 95e6
    with torch.no_grad():
        logits = model(torch.randint(0, 1024, (1, 256)))
    assert logits.shape == (1, 256, 1024) and torch.isfinite(logits).all()


# ------------------------------------------------------------------------------------ KV-cache decoding


def test_decode_step_matches_forward():
    model = small_model("causal")
    codes = random_codes(batch=4)
    cache = model.new_kv_cache()
    tokens = torch.full((4,), model.start_token)
    steps = []
    with torch.no_grad():
        for i in range(L):
            steps.append(model.decode_step(tokens, cache))  # (R, K)
            tokens = codes[:, i]
        torch.testing.assert_close(torch.stack(steps, dim=1), model(codes), atol=1e-5, rtol=1e-5)
    assert cache.length == L and cache.keys[0].shape == (4, 4, L, 4)


def test_decode_step_under_bf16_autocast():
    """bf16 incremental decoding gives the fp32 forward's logits within bf16 rounding (measured: 0.5 % of the
    logit scale), far below what a wrong position or cache slot gives (the neighbouring position's logits differ
    by about the whole scale)."""
    model = small_model("causal")
    codes = random_codes(batch=2)
    cache = model.new_kv_cache()
    tokens = torch.full((2,), model.start_token)
    steps = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(L):
            steps.append(model.decode_step(tokens, cache))  # (R, K)
            tokens = codes[:, i]
    with torch.no_grad():
        reference = model(codes)  # fp32, (R, L, K)
    logits = torch.stack(steps, dim=1)
    assert logits.dtype == torch.bfloat16 and cache.keys[0].dtype == torch.bfloat16
    scale = float(reference.abs().max())
    error = float((logits.float() - reference).abs().max())
    assert error <= 0.02 * scale, (error, scale)
    # What the tolerance must exclude: the logits of the neighbouring position.
    assert float((reference[:, 1:] - reference[:, :-1]).abs().max()) > 0.5 * scale


def test_decode_step_errors():
    with pytest.raises(ValueError, match="causal"):
        small_model("global").new_kv_cache()
    global_model, model = small_model("global"), small_model("causal")
    cache = model.new_kv_cache()
    with pytest.raises(ValueError, match="causal"):
        global_model.decode_step(torch.zeros(2, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="start token"):
        model.decode_step(torch.zeros(2, dtype=torch.long), cache)
    with pytest.raises(ValueError, match=r"tokens must be \[R\]"):
        model.decode_step(torch.full((2, 1), K), cache)
    model.decode_step(torch.full((2,), K), cache)
    with pytest.raises(ValueError, match="tokens at position 1"):
        model.decode_step(torch.full((2,), K), cache)
    for _ in range(L - 1):
        model.decode_step(torch.zeros(2, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="cache is full"):
        model.decode_step(torch.zeros(2, dtype=torch.long), cache)


# ---------------------------------------------------------------------------------------- tampering


def test_tamper_codes_replaces_exactly_round_ratio_l_positions():
    codes = torch.randint(0, 1024, (6, 256), generator=torch.Generator().manual_seed(0))
    tampered, mask = tamper_codes(codes, 1024, ratio=0.1, generator=torch.Generator().manual_seed(1))
    assert (
        tampered.shape == mask.shape == (6, 256) and mask.dtype == torch.bool and tampered.dtype == torch.long
    )
    assert torch.equal(mask.sum(dim=1), torch.full((6,), round(0.1 * 256)))
    assert torch.equal(tampered != codes, mask)  # every tampered position really changed, nothing else did
    assert len({tuple(row.nonzero().flatten().tolist()) for row in mask}) == 6  # positions drawn per sample
    assert torch.equal(tamper_codes(codes, 1024, 0.25)[1].sum(1), torch.full((6,), 64))
    # Python's round: half to even (0.5 * 5 = 2.5 -> 2).
    assert tamper_codes(codes[:, :5], 1024, 0.5)[1].sum(1).tolist() == [2] * 6


def test_tamper_codes_is_seeded():
    codes = random_codes(batch=4)
    a = tamper_codes(codes, K, 0.3, generator=torch.Generator().manual_seed(5))
    b = tamper_codes(codes, K, 0.3, generator=torch.Generator().manual_seed(5))
    c = tamper_codes(codes, K, 0.3, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))


def test_tamper_codes_distributions_are_uniform():
    codes = torch.full((4000, L), 3)
    tampered, mask = tamper_codes(codes, K, 0.2, generator=torch.Generator().manual_seed(0))
    # Every position equally likely to be tampered (expected 800 per column, sd ~25).
    assert (mask.sum(0) - 800).abs().max() < 125
    # Replacements uniform over the K - 1 other codes, never the original.
    counts = torch.bincount(tampered[mask], minlength=K)
    assert counts[3] == 0
    expected = mask.sum() / (K - 1)
    assert ((counts[torch.arange(K) != 3] - expected).abs() < 5 * expected.sqrt()).all()


def test_tamper_codes_edge_ratios_and_errors():
    codes = random_codes()
    tampered, mask = tamper_codes(codes, K, 0.0)
    assert torch.equal(tampered, codes) and not mask.any()
    tampered, mask = tamper_codes(codes, K, 1.0)
    assert mask.all() and (tampered != codes).all()
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        tamper_codes(codes[0], K)
    with pytest.raises(ValueError, match="vocab_size"):
        tamper_codes(torch.zeros(2, L, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="ratio"):
        tamper_codes(codes, K, 1.5)
    with pytest.raises(ValueError, match="ratio"):
        tamper_codes(codes, K, -0.1)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        tamper_codes(codes, 5)


def hand_tampering_loss(logits, targets, mask, beta, reduction="mean"):
    """Eq. 6 by loops: ``sum``: per image (1-beta)·Σ_T CE + beta·Σ_U CE, averaged over images; ``mean``: the
    mean CE over all tampered / untampered positions of the batch."""
    tampered, clean, per_image = [], [], []
    for b in range(logits.shape[0]):
        image_t, image_u = 0.0, 0.0
        for i in range(logits.shape[1]):
            row = logits[b, i].double().tolist()
            log_z = math.log(sum(math.exp(v) for v in row))
            ce = log_z - row[targets[b, i]]
            (tampered if mask[b, i] else clean).append(ce)
            if mask[b, i]:
                image_t += ce
            else:
                image_u += ce
        per_image.append((1 - beta) * image_t + beta * image_u)
    if reduction == "sum":
        return sum(per_image) / len(per_image)
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return (1 - beta) * mean(tampered) + beta * mean(clean)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("beta", [0.01, 0.0, 0.5, 1.0])
def test_tampering_loss_equals_hand_computation(beta, reduction):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, L, K, generator=gen) * 2
    targets = torch.randint(0, K, (3, L), generator=gen)
    mask = torch.rand(3, L, generator=gen) < 0.3
    loss = tampering_loss(logits, targets, mask, beta=beta, reduction=reduction)
    assert loss.shape == () and loss.dtype == torch.float32
    expected = hand_tampering_loss(logits, targets, mask, beta, reduction)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    other = hand_tampering_loss(logits, targets, mask, beta, "sum" if reduction == "mean" else "mean")
    assert abs(expected - other) > 0.1 * abs(expected)  # the two reductions really differ


def test_next_code_loss_equals_hand_computation():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, L, K, generator=gen)
    targets = torch.randint(0, K, (3, L), generator=gen)
    ce = [
        [-torch.log_softmax(logits[b, i].double(), 0)[targets[b, i]].item() for i in range(L)]
        for b in range(3)
    ]
    assert next_code_loss(logits, targets, "sum").item() == pytest.approx(sum(map(sum, ce)) / 3, rel=1e-5)
    assert next_code_loss(logits, targets).item() == pytest.approx(sum(map(sum, ce)) / (3 * L), rel=1e-5)
    with pytest.raises(ValueError, match="loss_reduction must be one of"):
        next_code_loss(logits, targets, "max")


def test_tampering_loss_empty_sets_bf16_and_gradient():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, L, K, generator=gen, requires_grad=True)
    targets = torch.randint(0, K, (2, L), generator=gen)
    none = torch.zeros(2, L, dtype=torch.bool)
    expected = hand_tampering_loss(logits.detach(), targets, none, 0.01)
    assert tampering_loss(logits, targets, none).item() == pytest.approx(expected, rel=1e-5)
    assert tampering_loss(logits, targets, ~none).item() == pytest.approx(
        hand_tampering_loss(logits.detach(), targets, ~none, 0.01), rel=1e-5
    )
    tampering_loss(logits, targets, none | (torch.arange(L) == 2)).backward()
    assert logits.grad.abs().sum() > 0
    assert tampering_loss(logits.detach().bfloat16(), targets, none).dtype == torch.float32


def test_tampering_loss_errors():
    logits, targets = torch.randn(2, L, K), torch.zeros(2, L, dtype=torch.long)
    mask = torch.zeros(2, L, dtype=torch.bool)
    with pytest.raises(ValueError, match="expected logits"):
        tampering_loss(logits[0], targets, mask)
    with pytest.raises(ValueError, match="expected logits"):
        tampering_loss(logits, targets[:, :-1], mask)
    with pytest.raises(ValueError, match="expected logits"):
        tampering_loss(logits, targets, mask[:1])
    with pytest.raises(ValueError, match="bool"):
        tampering_loss(logits, targets, mask.long())
    with pytest.raises(ValueError, match="beta"):
        tampering_loss(logits, targets, mask, beta=1.5)
    with pytest.raises(ValueError, match=r"loss_reduction must be one of \('sum', 'mean'\), got 'none'"):
        tampering_loss(logits, targets, mask, reduction="none")
    with pytest.raises(ValueError, match="targets"):
        tampering_loss(logits, targets + K, mask)
