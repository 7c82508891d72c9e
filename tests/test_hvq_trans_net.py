"""Tests of lsgs.nn.hvq_trans and lsgs.nn.hvq_quantizer (HVQ-Trans), each against a direct computation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from lsgs.errors import ConfigError, DataError
from lsgs.nn.hvq_quantizer import (
    SwitchedEMAQuantizer,
    nearest_codes_per_sample,
    prototype_transport_score,
)
from lsgs.nn.hvq_trans import (
    DecoderLayer,
    EncoderLayer,
    HVQTransConfig,
    HVQTransNet,
    HVQTransOutput,
    LearnedPositionEmbedding,
    add_feature_jitter,
    align_features,
    hvq_anomaly_map,
    hvq_image_score,
    hvq_trans_loss,
    neighbor_attention_mask,
)


def tiny_net(seed: int = 0, **overrides) -> HVQTransNet:
    torch.manual_seed(seed)
    return HVQTransNet(dataclasses.replace(HVQTransConfig.tiny(), **overrides))


def feature_maps(batch: int = 3, seed: int = 1) -> list[torch.Tensor]:
    """The tiny config's backbone maps: ``[B, 8, 8, 8]`` (stride 2) and ``[B, 8, 4, 4]`` (stride 4)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 8, 8, 8, generator=g), torch.randn(batch, 8, 4, 4, generator=g)]


def brute_nearest(vector: torch.Tensor, codebook: torch.Tensor) -> int:
    """Index of the nearest code by a loop over the codes (first one on ties)."""
    best, best_k = math.inf, -1
    for k in range(codebook.shape[0]):
        d = float(((vector.detach().double() - codebook[k].double()) ** 2).sum())
        if d < best:
            best, best_k = d, k
    return best_k


def brute_transport(vector: torch.Tensor, codebook: torch.Tensor) -> float:
    """``sum_k p(k | x) (1 - cos(x, e_k))``, ``p`` = normalised ``exp(x . e_k / K)``, by explicit loops."""
    x = vector.detach().double().tolist()
    codes = codebook.double().tolist()
    dots = [sum(a * b for a, b in zip(x, e, strict=True)) for e in codes]
    weights = [math.exp(d / len(codes)) for d in dots]
    norm_x = math.sqrt(sum(a * a for a in x))
    total = 0.0
    for dot, weight, e in zip(dots, weights, codes, strict=True):
        norm_e = math.sqrt(sum(a * a for a in e))
        cosine = 0.0 if norm_x == 0 or norm_e == 0 else dot / (norm_x * norm_e)
        total += weight / sum(weights) * (1.0 - cosine)
    return total


def mha(attn: nn.MultiheadAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    """Multi-head attention written out: ``[B, L, D]`` inputs, per-head softmax(QK^T / sqrt(d)) V, output proj."""
    d, heads = attn.embed_dim, attn.num_heads
    wq, wk, wv = attn.in_proj_weight.split(d)
    bq, bk, bv = attn.in_proj_bias.split(d)
    out = torch.zeros_like(q)
    hd = d // heads
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        qh = q @ wq[sl].T + bq[sl]
        kh = k @ wk[sl].T + bk[sl]
        vh = v @ wv[sl].T + bv[sl]
        logits = qh @ kh.transpose(1, 2) / math.sqrt(hd)
        if mask is not None:
            logits = logits.masked_fill(mask, -math.inf)
        out[..., sl] = torch.softmax(logits, dim=-1) @ vh
    return attn.out_proj(out)


# ---------------------------------------------------------------------------------------------------- config
class TestConfig:
    def test_defaults_are_the_official_model(self):
        cfg = HVQTransConfig()
        assert (cfg.hidden_dim, cfg.nhead, cfg.num_encoder_layers, cfg.num_decoder_layers) == (256, 8, 4, 4)
        assert (cfg.dim_feedforward, cfg.dropout, cfg.codebook_size, cfg.num_classes) == (1024, 0.1, 512, 15)
        assert (cfg.ema_decay, cfg.ema_epsilon, cfg.commitment_weight, cfg.ot_weight) == (0.99, 1e-5, 0.25, 80.0)
        assert cfg.feature_dim == 272 and cfg.token_grid == (14, 14)
        assert cfg.feature_jitter_scale == 0.0 and cfg.neighbor_mask == (False, False, False)
        assert HVQTransConfig(image_size=(256, 320)).token_grid == (16, 20)

    def test_asdict_rebuilds_the_net(self):
        cfg = dataclasses.replace(HVQTransConfig.tiny(), neighbor_mask=[True, False, True])
        assert cfg.neighbor_mask == (True, False, True)
        as_yaml = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
        again = HVQTransConfig(**as_yaml)
        assert again == cfg
        a, b = HVQTransNet(cfg).state_dict(), HVQTransNet(again).state_dict()
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)

    def test_official_size_has_one_codebook_set_and_projection_per_class(self):
        net = HVQTransNet(HVQTransConfig())
        assert [tuple(q.codebook.shape) for q in net.quantizers] == [(15, 512, 256)] + [(15, 512, 512)] * 4
        assert len(net.output_projections) == 15
        assert tuple(net.output_projections[0].weight.shape) == (272, 512)
        assert 17e6 < sum(p.numel() for p in net.parameters()) < 19e6

    @pytest.mark.parametrize(
        ("overrides", "needle"),
        [
            ({"hidden_dim": 18, "nhead": 4}, "nhead"),
            ({"hidden_dim": 15, "nhead": 1}, "even"),
            ({"num_decoder_layers": 3}, "num_decoder_layers"),
            ({"image_size": (18, 16)}, "token_stride"),
            ({"image_size": (16,)}, "image_size"),
            ({"feature_channels": ()}, "feature_channels"),
            ({"codebook_size": 0}, "codebook_size"),
            ({"dropout": 1.0}, "dropout"),
            ({"ema_decay": 1.0}, "ema_decay"),
            ({"ot_weight": -1.0}, "ot_weight"),
            ({"feature_jitter_prob": 1.5}, "feature_jitter_prob"),
            ({"neighbor_mask": (True, False)}, "neighbor_mask"),
            ({"neighbor_mask": (True, False, False), "neighbor_size": (7, 7)}, "neighbor_size"),
        ],
    )
    def test_invalid_values_raise_one_line_config_errors(self, overrides, needle):
        with pytest.raises(ConfigError, match=needle) as info:
            dataclasses.replace(HVQTransConfig.tiny(), **overrides)
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------- neck
class TestNeck:
    def test_equals_the_official_scale_factor_upsampling(self):
        """EfficientNet maps of a 224 input (strides 2/4/8/16) resized like ``extract_feature`` does."""
        g = torch.Generator().manual_seed(0)
        maps = [torch.randn(2, c, 224 // s, 224 // s, generator=g) for c, s in ((3, 2), (4, 4), (5, 8), (6, 16))]
        official = torch.cat(
            [nn.UpsamplingBilinear2d(scale_factor=s / 16)(m) for m, s in zip(maps, (2, 4, 8, 16), strict=True)], 1
        )
        ours = align_features(maps, (14, 14))
        assert ours.shape == (2, 18, 14, 14)
        torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-5)

    def test_bilinear_with_aligned_corners_by_hand(self):
        x = torch.randn(1, 1, 8, 6, generator=torch.Generator().manual_seed(1))
        out = align_features([x], (4, 3))[0, 0]
        for i in range(4):
            for j in range(3):
                # align_corners=True: output i samples input position i * (in - 1) / (out - 1).
                y, z = i * 7 / 3, j * 5 / 2
                y0, z0 = min(int(y), 6), min(int(z), 4)
                fy, fz = y - y0, z - z0
                v = x[0, 0]
                expected = ((1 - fy) * (1 - fz) * v[y0, z0] + (1 - fy) * fz * v[y0, z0 + 1]
                            + fy * (1 - fz) * v[y0 + 1, z0] + fy * fz * v[y0 + 1, z0 + 1])
                assert abs(float(out[i, j] - expected)) < 1e-5


# ---------------------------------------------------------------------------------------------------- layers
class TestPositionAndMask:
    def test_position_embedding_is_column_then_row_in_raster_order(self):
        torch.manual_seed(0)
        pos = LearnedPositionEmbedding((3, 4), 6)
        table = pos().detach()
        assert table.shape == (12, 6)
        assert float(table.min()) >= 0.0 and float(table.max()) <= 1.0  # U(0, 1) initialisation
        for i in range(3):
            for j in range(4):
                assert torch.equal(table[i * 4 + j], torch.cat([pos.col_embed.weight[j], pos.row_embed.weight[i]]))

    def test_neighbor_mask_equals_uniad_loop(self):
        h, w, (nh, nw) = 5, 4, (3, 3)
        expected = torch.zeros(h, w, h, w, dtype=torch.bool)
        for i in range(h):
            for j in range(w):
                expected[i, j, max(i - nh // 2, 0): min(i + nh // 2 + 1, h),
                         max(j - nw // 2, 0): min(j + nw // 2 + 1, w)] = True
        assert torch.equal(neighbor_attention_mask((h, w), (nh, nw)), expected.view(h * w, h * w))

    def test_masked_encoder_layer_ignores_the_neighbourhood(self):
        torch.manual_seed(0)
        layer = EncoderLayer(8, 2, 16, 0.0).eval()
        mask = neighbor_attention_mask((4, 4), (3, 3))
        x, pos = torch.randn(1, 16, 8), torch.randn(16, 8)
        moved = x.clone()
        moved[0, 6] += 1.0  # token (1, 2): a neighbour of token (2, 2) = 10, far from token (3, 0) = 12
        for m, same_10 in ((mask, True), (None, False)):
            a, b = layer(x, pos, m), layer(moved, pos, m)
            assert torch.allclose(a[0, 10], b[0, 10], atol=1e-6) == same_10
            assert not torch.allclose(a[0, 12], b[0, 12], atol=1e-6)

    @pytest.mark.parametrize("site", [0, 1, 2])
    def test_each_mask_flag_masks_its_attention_site(self, site):
        maps, ci = feature_maps(2), torch.tensor([0, 1])
        flags = tuple(i == site for i in range(3))
        masked = tiny_net(neighbor_mask=flags).eval()
        plain = tiny_net().eval()
        assert [masked._mask(i) is not None for i in range(3)] == list(flags)
        assert all(plain._mask(i) is None for i in range(3))
        plain.load_state_dict(masked.state_dict())
        assert not torch.allclose(masked(maps, ci).reconstruction, plain(maps, ci).reconstruction)

    def test_encoder_layer_direct(self):
        torch.manual_seed(0)
        layer = EncoderLayer(8, 2, 16, 0.0).eval()
        x, pos = torch.randn(2, 5, 8), torch.randn(5, 8)
        mask = torch.rand(5, 5) < 0.3
        mask.fill_diagonal_(False)
        y = layer.norm1(x + mha(layer.self_attn, x + pos, x + pos, x, mask))  # pos on queries and keys only
        y = layer.norm2(y + layer.linear2(torch.relu(layer.linear1(y))))
        torch.testing.assert_close(layer(x, pos, mask), y, rtol=1e-5, atol=1e-5)

    def test_decoder_layer_direct(self):
        torch.manual_seed(0)
        layer = DecoderLayer(8, 2, 16, 0.0).eval()
        x, memory, pos = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(5, 8)
        y = layer.norm1(x + mha(layer.self_attn, x + pos, x + pos, x))
        y = layer.norm2(y + mha(layer.cross_attn, y + pos, memory + pos, memory))
        y = layer.norm3(y + layer.linear2(torch.relu(layer.linear1(y))))
        torch.testing.assert_close(layer(x, memory, pos), y, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- quantiser
class TestQuantizer:
    def test_nearest_codes_per_sample_brute_force(self):
        g = torch.Generator().manual_seed(0)
        x, books = torch.randn(3, 7, 4, generator=g), torch.randn(3, 5, 4, generator=g)
        idx = nearest_codes_per_sample(x, books)
        assert idx.shape == (3, 7) and idx.dtype == torch.int64
        assert idx.tolist() == [[brute_nearest(x[b, i], books[b]) for i in range(7)] for b in range(3)]

    def test_straight_through_value_and_gradient(self):
        torch.manual_seed(0)
        q = SwitchedEMAQuantizer(2, 5, 3).eval()
        x = torch.randn(2, 4, 3, requires_grad=True)
        ci = torch.tensor([1, 0])
        out = q(x, ci)
        for b in range(2):
            for i in range(4):
                k = brute_nearest(x[b, i].detach(), q.codebook[ci[b]])
                assert int(out.indices[b, i]) == k
                torch.testing.assert_close(out.quantized[b, i], q.codebook[ci[b], k])
        weight = torch.randn(2, 4, 3)
        (out.quantized * weight).sum().backward()
        torch.testing.assert_close(x.grad, weight)  # the gradient passes unchanged
        chosen = q.codebook[ci[:, None], out.indices]
        torch.testing.assert_close(out.commitment_loss, ((chosen - x.detach()) ** 2).mean())

    def test_ema_update_by_hand(self):
        """Two classes, 3 codes of 2 dims, decay 0.5: one step of cluster sizes, sums and smoothed codes."""
        q = SwitchedEMAQuantizer(2, 3, 2, decay=0.5, epsilon=0.1).train()
        q.codebook.copy_(torch.tensor([[[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], [[1.0, 1.0], [5.0, 5.0], [9.0, 9.0]]]))
        q.embed_sum.copy_(q.codebook)
        before = {k: v.clone() for k, v in q.state_dict().items()}
        x = torch.tensor([[[1.0, 0.0], [9.0, 1.0], [0.0, 1.0]]])  # one sample of class 0: codes 0, 1, 0
        out = q(x, torch.tensor([0]))
        assert out.indices.tolist() == [[0, 1, 0]]
        counts, sums = [2.0, 1.0, 0.0], [[1.0, 1.0], [9.0, 1.0], [0.0, 0.0]]
        size = [0.5 * 0 + 0.5 * c for c in counts]  # [1, 0.5, 0]
        avg = [[0.5 * before["embed_sum"][0, k, j].item() + 0.5 * sums[k][j] for j in range(2)] for k in range(3)]
        n = sum(size)
        smoothed = [(s + 0.1) / (n + 3 * 0.1) * n for s in size]
        assert q.cluster_size[0].tolist() == pytest.approx(size)
        assert q.embed_sum[0].tolist() == [pytest.approx(a) for a in avg]
        expected = [[avg[k][j] / smoothed[k] for j in range(2)] for k in range(3)]
        assert q.codebook[0].tolist() == [pytest.approx(e) for e in expected]
        for key in ("codebook", "cluster_size", "embed_sum"):  # class 1 was absent: untouched
            assert torch.equal(getattr(q, key)[1], before[key][1])
        torch.testing.assert_close(out.quantized, before["codebook"][0][[0, 1, 0]].unsqueeze(0))  # pre-update codes

    def test_eval_mode_does_not_update(self):
        torch.manual_seed(0)
        q = SwitchedEMAQuantizer(2, 4, 3).eval()
        before = {k: v.clone() for k, v in q.state_dict().items()}
        q(torch.randn(2, 5, 3), torch.tensor([0, 1]))
        assert all(torch.equal(v, before[k]) for k, v in q.state_dict().items())

    @staticmethod
    def official_per_sample(q: SwitchedEMAQuantizer, x: torch.Tensor, ci: torch.Tensor) -> None:
        """The official loop: one ``Quantize`` call (search, then EMA step) per sample, in batch order."""
        for b in range(x.shape[0]):
            c = int(ci[b])
            book = q.codebook[c].clone()
            onehot = torch.zeros(x.shape[1], book.shape[0])
            for i in range(x.shape[1]):
                onehot[i, brute_nearest(x[b, i], book)] = 1.0
            q.cluster_size[c] = q.decay * q.cluster_size[c] + (1 - q.decay) * onehot.sum(0)
            q.embed_sum[c] = q.decay * q.embed_sum[c] + (1 - q.decay) * onehot.T @ x[b]
            n = q.cluster_size[c].sum()
            size = (q.cluster_size[c] + q.epsilon) / (n + book.shape[0] * q.epsilon) * n
            q.codebook[c] = q.embed_sum[c] / size[:, None]

    @pytest.mark.parametrize(("classes", "equal"), [([1, 0, 2], True), ([1, 1, 0], False)])
    def test_batched_update_equals_the_official_per_sample_loop_when_classes_are_distinct(self, classes, equal):
        torch.manual_seed(0)
        ours = SwitchedEMAQuantizer(3, 6, 2).train()
        reference = SwitchedEMAQuantizer(3, 6, 2)
        reference.load_state_dict(ours.state_dict())
        ci = torch.tensor(classes)
        for step in range(3):
            x = torch.randn(3, 10, 2, generator=torch.Generator().manual_seed(step))
            ours(x, ci)
            self.official_per_sample(reference, x, ci)
        same = all(torch.allclose(ours.state_dict()[k], v, rtol=1e-4, atol=1e-4)
                   for k, v in reference.state_dict().items())
        assert same == equal  # with a repeated class the official loop makes two steps (documented deviation)

    def test_transport_score_brute_force(self):
        g = torch.Generator().manual_seed(0)
        x, books = torch.randn(2, 5, 3, generator=g) * 3, torch.randn(2, 4, 3, generator=g) * 3
        books[1, 2] = 0.0  # a zero code: cosine 0 (sklearn's convention)
        score = prototype_transport_score(x, books)
        assert score.shape == (2, 5) and not score.requires_grad
        expected = torch.tensor([[brute_transport(x[b, i], books[b]) for i in range(5)] for b in range(2)])
        torch.testing.assert_close(score, expected.float(), rtol=1e-5, atol=1e-6)

    def test_transport_score_stays_finite_where_plain_exp_overflows(self):
        x, books = torch.full((1, 1, 2), 100.0), torch.tensor([[[1000.0, 1000.0], [-1.0, 2.0]]])
        assert torch.isinf(torch.exp(x[0] @ books[0].T / 2)).any()  # the official unnormalised exp (fp32)
        torch.testing.assert_close(prototype_transport_score(x, books), torch.zeros(1, 1), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------- network
class TestNet:
    def test_documented_shapes(self):
        net = tiny_net().eval()
        out = net(feature_maps(3), torch.tensor([0, 1, 1]))
        assert isinstance(out, HVQTransOutput)
        assert out.reconstruction.shape == out.features.shape == (3, 16, 4, 4)
        assert out.quant_loss.shape == () and out.ot_score.shape == (3, 4, 4)
        assert len(out.indices) == 3 and all(i.shape == (3, 4, 4) and i.dtype == torch.int64 for i in out.indices)
        assert net.anomaly_map(out).shape == (3, 1, 16, 16)
        enc = net.encode(torch.randn(3, 16, 16))
        assert len(enc) == 3 and all(e.shape == (3, 16, 16) for e in enc)

    def test_one_class_has_one_set(self):
        net = tiny_net(num_classes=1).train()
        assert len(net.output_projections) == 1 and all(q.codebook.shape[0] == 1 for q in net.quantizers)
        out = net(feature_maps(2), torch.zeros(2, dtype=torch.int32))
        assert out.reconstruction.shape == (2, 16, 4, 4)
        with pytest.raises(DataError, match="num_classes=1"):
            net(feature_maps(2), torch.tensor([0, 1]))

    def test_hierarchy_brute_force(self):
        """Top level alone; every lower level = concat(encoder output, quantised top), nearest code by loops."""
        net = tiny_net(num_encoder_layers=3, num_decoder_layers=3).eval()
        maps, ci = feature_maps(2), torch.tensor([1, 0])
        out = net(maps, ci)
        tokens = net.input_proj(align_features(maps, (4, 4))).flatten(2).transpose(1, 2)
        enc = net.encode(tokens)  # [tokens, layer 1, layer 2, layer 3]
        loss = 0.0
        for b in range(2):
            c = int(ci[b])
            top_book = net.quantizers[0].codebook[c]
            top_idx = [brute_nearest(v, top_book) for v in enc[3][b]]
            assert out.indices[0][b].flatten().tolist() == top_idx
            top = top_book[top_idx]  # [L, 16]
            loss += ((top - enc[3][b]) ** 2).mean() / 2
            for level, source in zip((1, 2, 3), (2, 1, 0), strict=True):  # layers 2, 1, then the input tokens
                x = torch.cat([enc[source][b], top], dim=1)
                book = net.quantizers[level].codebook[c]
                idx = [brute_nearest(v, book) for v in x]
                assert out.indices[level][b].flatten().tolist() == idx
                loss += ((book[idx] - x) ** 2).mean() / 2
                if level == 3:  # the transport score reads the lowest level's input
                    ot = [brute_transport(v, book) for v in x]
                    torch.testing.assert_close(out.ot_score[b].flatten(), torch.tensor(ot), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.quant_loss, torch.as_tensor(loss).float(), rtol=1e-5, atol=1e-6)

    def test_decoder_layer_i_attends_to_memory_i(self):
        net = tiny_net().eval()
        memories = [torch.randn(2, 16, 32) for _ in range(2)]
        pos = net.pos_embed()
        pos = torch.cat([pos, pos], dim=1)
        x = net.decoder_layers[0](memories[0], memories[0], pos)
        x = net.decoder_layers[1](x, memories[1], pos)
        torch.testing.assert_close(net.decode(memories), net.decoder_norm(x))

    def test_a_sample_uses_only_its_class_codebooks_and_projection(self):
        net = tiny_net().eval()
        maps, ci = feature_maps(3), torch.tensor([0, 1, 0])
        before = net(maps, ci)
        with torch.no_grad():
            for q in net.quantizers:
                q.codebook[1] = torch.randn_like(q.codebook[1])
            net.output_projections[1].weight.mul_(3.0)
        after = net(maps, ci)
        for field in ("reconstruction", "ot_score"):
            a, b = getattr(before, field), getattr(after, field)
            torch.testing.assert_close(a[[0, 2]], b[[0, 2]])
            assert not torch.allclose(a[1], b[1])

    def test_training_touches_only_the_batch_classes(self):
        net = tiny_net().train()
        before = {k: v.clone() for k, v in net.state_dict().items()}
        out = net(feature_maps(2), torch.tensor([1, 1]))
        net.loss(out).backward()
        assert net.output_projections[0].weight.grad is None and net.output_projections[0].bias.grad is None
        assert net.output_projections[1].weight.grad.abs().sum() > 0
        for level, q in enumerate(net.quantizers):
            for key in ("codebook", "cluster_size", "embed_sum"):
                state = f"quantizers.{level}.{key}"
                assert torch.equal(getattr(q, key)[0], before[state][0]), state
                assert not torch.equal(getattr(q, key)[1], before[state][1]), state

    def test_training_and_eval_projections_agree(self):
        net = tiny_net()
        decoded, ci = torch.randn(4, 16, 32), torch.tensor([1, 0, 1, 1])
        trained = net.train().project(decoded, ci)
        evaluated = net.eval().project(decoded, ci)
        torch.testing.assert_close(trained, evaluated)
        direct = torch.stack([net.output_projections[int(c)](decoded[b]) for b, c in enumerate(ci)])
        torch.testing.assert_close(evaluated, direct)

    @pytest.mark.parametrize(
        ("maps", "class_index", "needle"),
        [
            (None, torch.tensor([0, 2]), r"values in \[0, 2\].*num_classes=2"),
            (None, torch.tensor([-1, 0]), r"values in \[-1, 0\]"),
            (None, torch.tensor([[0, 1]]), r"\[B\] = \[2\]"),
            (None, torch.tensor([0.0, 1.0]), "integer"),
            ([torch.randn(2, 8, 8, 8), torch.randn(2, 4, 4, 4)], torch.tensor([0, 1]), "feature_channels"),
            ([torch.randn(2, 8, 8, 8), torch.randn(2, 8, 5, 5)], torch.tensor([0, 1]), "image_size"),
        ],
    )
    def test_bad_inputs_raise_one_line_data_errors(self, maps, class_index, needle):
        net = tiny_net().eval()
        with pytest.raises(DataError, match=needle) as info:
            net(maps if maps is not None else feature_maps(2), class_index)
        assert "\n" not in str(info.value)

    def test_loss_is_feature_mse_plus_quarter_commitment(self):
        net = tiny_net().train()
        out = net(feature_maps(2), torch.tensor([0, 1]))
        mse = ((out.reconstruction - out.features) ** 2).mean()
        torch.testing.assert_close(hvq_trans_loss(out), mse + 0.25 * out.quant_loss)
        torch.testing.assert_close(net.loss(out), hvq_trans_loss(out, 0.25))
        torch.testing.assert_close(hvq_trans_loss(out, 1.0), mse + out.quant_loss)

    def test_anomaly_map_direct(self):
        net = tiny_net().eval()
        out = net(feature_maps(2), torch.tensor([0, 1]))
        token_map = torch.zeros(2, 1, 4, 4)
        for b in range(2):
            for i in range(4):
                for j in range(4):
                    diff = (out.reconstruction[b, :, i, j] - out.features[b, :, i, j]).detach()
                    error = math.sqrt(float((diff**2).sum()))
                    token_map[b, 0, i, j] = error + 80.0 * float(out.ot_score[b, i, j])
        expected = nn.UpsamplingBilinear2d(scale_factor=4)(token_map)  # the official upsampling, x token_stride
        torch.testing.assert_close(net.anomaly_map(out), expected, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(hvq_anomaly_map(out, (4, 4), 80.0), token_map, rtol=1e-5, atol=1e-4)

    def test_image_score_brute_force(self):
        maps = torch.rand(2, 1, 20, 18, generator=torch.Generator().manual_seed(0))
        maps[1, 0, 3, 17] = 50.0  # a corner spike: the windows covering it count it
        scores = hvq_image_score(maps)
        for b in range(2):
            best = max(
                float(maps[b, 0, i : i + 16, j : j + 16].sum()) / 256 for i in range(20 - 15) for j in range(18 - 15)
            )
            assert abs(float(scores[b]) - best) < 1e-5
        with pytest.raises(ConfigError, match="avgpool_size"):
            hvq_image_score(torch.rand(1, 1, 12, 20))

    def test_feature_jitter(self):
        x = torch.randn(2, 6, 3, 3)
        torch.manual_seed(5)
        jittered = add_feature_jitter(x, 20.0, 1.0)
        torch.manual_seed(5)
        torch.rand(())  # the per-batch coin
        expected = x + torch.randn_like(x) * x.norm(dim=1, keepdim=True) / 6 * 20.0
        torch.testing.assert_close(jittered, expected)
        assert torch.equal(add_feature_jitter(x, 20.0, 0.0), x)
        # In the net: training only; the clean features stay the target.
        maps, ci = feature_maps(2), torch.tensor([0, 1])
        net = tiny_net(feature_jitter_scale=20.0)
        plain = tiny_net(feature_jitter_scale=0.0)
        plain.load_state_dict(net.state_dict())
        torch.testing.assert_close(net.eval()(maps, ci).reconstruction, plain.eval()(maps, ci).reconstruction)
        torch.manual_seed(0)
        a = net.train()(maps, ci)
        torch.manual_seed(0)
        b = plain.train()(maps, ci)
        torch.testing.assert_close(a.features, b.features)
        assert not torch.allclose(a.reconstruction, b.reconstruction)

    def test_seeded_runs_are_identical(self):
        results = []
        for _ in range(2):
            net = tiny_net(seed=3, dropout=0.1).train()
            torch.manual_seed(4)
            out = net(feature_maps(2), torch.tensor([0, 1]))
            net.loss(out).backward()
            results.append((out.reconstruction.detach(), net.input_proj.weight.grad, net.quantizers[2].codebook))
        for a, b in zip(*results, strict=True):
            assert torch.equal(a, b)

    def test_eval_forward_exports_with_the_class_index_as_input(self):
        net = tiny_net().eval()
        maps = feature_maps(2)
        exported = torch.export.export(net, (maps, torch.tensor([0, 0])), strict=False).module()
        for ci in (torch.tensor([1, 0]), torch.tensor([1, 1])):  # other classes than at export
            got, ref = exported(maps, ci), net(maps, ci)
            torch.testing.assert_close(got.reconstruction, ref.reconstruction)
            torch.testing.assert_close(got.ot_score, ref.ot_score)
            assert all(torch.equal(a, b) for a, b in zip(got.indices, ref.indices, strict=True))


# ---------------------------------------------------------------------------------------------------- learning
def normal_maps(batch: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Synthetic "normal" backbone maps: a fixed template, plus 2 fixed directions with random weights (rank 2,
    scale 0.3), plus noise (0.05)."""
    template = torch.Generator().manual_seed(123)
    out = []
    for size in (8, 4):
        base = torch.randn(8, size, size, generator=template)
        directions = torch.randn(2, 8, size, size, generator=template)
        weights = torch.randn(batch, 2, 1, 1, 1, generator=generator)
        noise = 0.05 * torch.randn(batch, 8, size, size, generator=generator)
        out.append(base + 0.3 * (weights * directions).sum(1) + noise)
    return out


def test_learns_normal_features_and_flags_corrupted_tokens():
    """200 steps on normal maps: the normal error falls, and a patch of noise reconstructs worse.

    EMA decay 0.9 instead of 0.99: the official initialisation (EMA sums equal to the random codes, counts 0)
    leaves the codes far from their clusters for about ``1 / (1 - decay)`` steps, longer than this test.
    """
    torch.manual_seed(0)
    config = dataclasses.replace(HVQTransConfig.tiny(), hidden_dim=32, dim_feedforward=64, ema_decay=0.9)
    net = HVQTransNet(config)
    data, test = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    normal_test, classes = normal_maps(16, test), torch.tensor([0, 1] * 8)

    def evaluate(maps: list[torch.Tensor]) -> tuple[torch.Tensor, HVQTransOutput]:
        with torch.no_grad():
            out = net.eval()(maps, classes)
        return hvq_anomaly_map(out, (4, 4), ot_weight=0.0)[:, 0], out  # [B, 4, 4] error per token

    before = evaluate(normal_test)[0].mean()
    optimiser = torch.optim.Adam(net.parameters(), lr=2e-3)
    net.train()
    for _ in range(200):
        out = net(normal_maps(16, data), classes)
        optimiser.zero_grad()
        net.loss(out).backward()
        optimiser.step()
    after = evaluate(normal_test)[0].mean()
    assert after < 0.5 * before

    corrupted = [m.clone() for m in normal_test]
    corrupted[0][:, :, 2:6, 2:6] = 2.0 * torch.randn(16, 8, 4, 4, generator=test)  # tokens (1..2, 1..2)
    corrupted[1][:, :, 1:3, 1:3] = 2.0 * torch.randn(16, 8, 2, 2, generator=test)
    errors, out = evaluate(corrupted)
    inside = torch.zeros(4, 4, dtype=torch.bool)
    inside[1:3, 1:3] = True
    assert errors[:, inside].mean() > 2.0 * errors[:, ~inside].mean()
    assert out.ot_score[:, inside].mean() > out.ot_score[:, ~inside].mean()
    full = net.anomaly_map(out)  # [16, 1, 16, 16]: the corrupted tokens cover pixels 4..11
    assert full[:, 0, 4:12, 4:12].mean() > full.mean()
