"""Tests of lsgs.nn.vqvae: config, architecture, every documented shape, gradients, errors, bf16."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lsgs.errors import ConfigError
from lsgs.nn.nearest import nearest_codes
from lsgs.nn.quantizer import QuantizerOutput
from lsgs.nn.vqvae import Decoder, Encoder, VQVAEConfig, VQVAENet, VQVAEOutput


def tiny_net(seed: int = 0, **overrides) -> VQVAENet:
    torch.manual_seed(seed)
    return VQVAENet(dataclasses.replace(VQVAEConfig.tiny(), **overrides))


def images(b=2, c=3, h=16, w=12, seed=1) -> torch.Tensor:
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed))


class TestConfig:
    def test_defaults_and_factor(self):
        cfg = VQVAEConfig()
        assert cfg.downsample_factor == 4
        assert VQVAEConfig(channels=(8, 8, 8)).downsample_factor == 8

    def test_paper(self):
        cfg = VQVAEConfig.paper()
        assert (cfg.codebook_size, cfg.code_dim, cfg.downsample_factor, cfg.beta) == (1024, 512, 8, 1.0)
        assert cfg.in_channels == 3 and VQVAEConfig.paper(in_channels=1).in_channels == 1

    def test_tiny_is_a_few_thousand_params(self):
        n = sum(p.numel() for p in VQVAENet(VQVAEConfig.tiny()).parameters())
        assert 1_000 < n < 20_000
        assert VQVAEConfig.tiny(in_channels=1).in_channels == 1

    def test_list_channels_become_tuple_and_asdict_round_trip(self):
        cfg = VQVAEConfig(channels=[8, 16])
        assert cfg.channels == (8, 16)
        net = tiny_net()
        rebuilt = VQVAENet(VQVAEConfig(**dataclasses.asdict(net.config)))
        rebuilt.load_state_dict(net.state_dict())  # same structure, strict
        x = images()
        torch.testing.assert_close(rebuilt(x).reconstruction, net(x).reconstruction)

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"in_channels": 0}, "in_channels"),
            ({"res_channels": -1}, "res_channels"),
            ({"codebook_size": 0}, "codebook_size"),
            ({"code_dim": 2.5}, "code_dim"),
            ({"num_res_blocks": -1}, "num_res_blocks"),
            ({"channels": ()}, "channels"),
            ({"channels": (8, 0)}, "channels"),
            ({"beta": -0.5}, "beta"),
            ({"in_channels": True}, "in_channels"),
        ],
    )
    def test_invalid(self, kwargs, match):
        with pytest.raises(ConfigError, match=match):
            VQVAEConfig(**kwargs)


class TestArchitecture:
    def test_layers(self):
        cfg = VQVAEConfig(channels=(8, 16, 32), num_res_blocks=3, res_channels=4, code_dim=6)
        enc, dec = Encoder(cfg), Decoder(cfg)
        strided = [m for m in enc if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
        assert [(m.in_channels, m.out_channels, m.kernel_size) for m in strided] == [
            (3, 8, (4, 4)), (8, 16, (4, 4)), (16, 32, (4, 4))
        ]
        assert isinstance(enc[-1], nn.Conv2d) and enc[-1].kernel_size == (1, 1) and enc[-1].out_channels == 6
        transposed = [m for m in dec if isinstance(m, nn.ConvTranspose2d)]
        assert [(m.in_channels, m.out_channels, m.stride) for m in transposed] == [
            (32, 16, (2, 2)), (16, 8, (2, 2)), (8, 3, (2, 2))
        ]
        assert isinstance(dec[0], nn.Conv2d) and dec[0].in_channels == 6
        assert isinstance(dec[-1], nn.ConvTranspose2d)  # linear output
        assert sum(type(m).__name__ == "ResidualBlock" for m in enc) == 3

    def test_no_batchnorm_and_batch_independence(self):
        net = tiny_net()
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
        x = images(b=3)
        with torch.no_grad():
            batched = net(x).reconstruction
            single = torch.cat([net(x[i : i + 1]).reconstruction for i in range(3)])
        torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)

    def test_seeded_init(self):
        x = images()
        torch.testing.assert_close(tiny_net(seed=5)(x).reconstruction, tiny_net(seed=5)(x).reconstruction,
                                   rtol=0, atol=0)


class TestShapes:
    def test_every_method(self):
        net = tiny_net()
        x = images(b=2, h=16, w=12)  # f = 4 -> codes 4 x 3
        z_e = net.encode(x)
        assert z_e.shape == (2, 8, 4, 3)
        q = net.quantize(z_e)
        assert isinstance(q, QuantizerOutput)
        assert q.quantized.shape == (2, 8, 4, 3) and q.indices.shape == (2, 4, 3)
        assert net.decode(q.quantized).shape == (2, 3, 16, 12)
        assert net.decode_indices(q.indices).shape == (2, 3, 16, 12)
        idx = net.encode_indices(x)
        assert idx.shape == (2, 4, 3) and idx.dtype == torch.int64
        assert torch.equal(idx, q.indices)
        out = net(x)
        assert isinstance(out, VQVAEOutput)
        assert out.reconstruction.shape == (2, 3, 16, 12)
        assert out.z_e.shape == (2, 8, 4, 3)
        assert out.indices.shape == (2, 4, 3)
        assert out.codebook_loss.shape == () and out.commitment_loss.shape == ()

    def test_single_channel(self):
        net = tiny_net(in_channels=1)
        assert net(images(c=1)).reconstruction.shape == (2, 1, 16, 12)

    def test_paper_config_forward(self):
        torch.manual_seed(0)
        net = VQVAENet(VQVAEConfig.paper())
        with torch.no_grad():
            out = net(torch.rand(1, 3, 128, 128))
        assert out.indices.shape == (1, 16, 16)
        assert out.z_e.shape == (1, 512, 16, 16)
        assert out.reconstruction.shape == (1, 3, 128, 128)
        assert torch.isfinite(out.reconstruction).all()

    @pytest.mark.parametrize(
        ("shape", "match"),
        [
            ((2, 1, 16, 12), r"\[B, 3, H, W\], got shape \(2, 1, 16, 12\)"),
            ((3, 16, 12), r"got shape \(3, 16, 12\)"),
            ((2, 3, 18, 12), r"divisible by the downsampling factor 4, got shape \(2, 3, 18, 12\)"),
            ((2, 3, 16, 10), r"divisible .* \(2, 3, 16, 10\)"),
        ],
    )
    def test_bad_images(self, shape, match):
        net = tiny_net()
        for method in (net.encode, net.encode_indices, net.forward):
            with pytest.raises(ValueError, match=match):
                method(torch.zeros(shape))

    def test_bad_code_maps(self):
        net = tiny_net()
        with pytest.raises(ValueError, match=r"z_q must be \[B, 8, h, w\], got shape \(1, 4, 2, 2\)"):
            net.decode(torch.zeros(1, 4, 2, 2))
        with pytest.raises(ValueError, match=r"z_e must be \[B, 8, h, w\]"):
            net.quantize(torch.zeros(1, 4, 2, 2))
        with pytest.raises(ValueError, match="integer tensor"):
            net.decode_indices(torch.zeros(1, 2, dtype=torch.int64))
        with pytest.raises(ValueError, match=r"\[0, 32\)"):
            net.decode_indices(torch.full((1, 2, 2), 32))


class TestTraining:
    def test_straight_through_reaches_encoder(self):
        net = tiny_net()
        x = images()
        out = net(x)
        F.l1_loss(out.reconstruction, x).backward()
        for name, p in net.encoder.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        for name, p in net.decoder.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert net.quantizer.codebook.grad is None  # the reconstruction loss never moves the codes

    def test_vq_loss_gradients(self):
        net = tiny_net()
        out = net(images())
        out.codebook_loss.backward(retain_graph=True)
        assert net.quantizer.codebook.grad.abs().sum() > 0
        assert all(p.grad is None for p in net.encoder.parameters())
        assert all(p.grad is None for p in net.decoder.parameters())
        out.commitment_loss.backward()
        assert all(p.grad is not None for p in net.encoder.parameters())
        assert all(p.grad is None for p in net.decoder.parameters())

    def test_decode_indices_equals_decode_quantized(self):
        net = tiny_net().eval()
        x = images(b=3)
        with torch.no_grad():
            q = net.quantize(net.encode(x))
            assert torch.equal(net.decode_indices(q.indices), net.decode(q.quantized))
            assert torch.equal(net.decode_indices(q.indices), net(x).reconstruction)

    def test_loss_decreases(self):
        # A few Adam steps on one batch: the pieces fit together into something trainable.
        net = tiny_net()
        x = images(b=4)
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        losses = []
        for _ in range(20):
            out = net(x)
            loss = F.l1_loss(out.reconstruction, x) + net.quantizer.loss(out)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.7 * losses[0]

    def test_bf16_autocast_forward_backward(self):
        net = tiny_net()
        x = images()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
            loss = F.l1_loss(out.reconstruction.float(), x) + net.quantizer.loss(out)
        loss.backward()
        assert out.reconstruction.dtype == torch.bfloat16
        assert out.codebook_loss.dtype == torch.float32 and out.commitment_loss.dtype == torch.float32
        assert net.quantizer.codebook.dtype == torch.float32
        # The argmin was taken in fp32 on the bf16 encodings.
        flat = out.z_e.detach().float().permute(0, 2, 3, 1).reshape(-1, 8)
        ref, _ = nearest_codes(flat, net.quantizer.codebook.detach())
        assert torch.equal(out.indices.reshape(-1), ref)
        for p in net.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all()

    def test_channels_last(self):
        net = tiny_net()
        x = images()
        ref = net(x)
        net_cl = net.to(memory_format=torch.channels_last)
        out = net_cl(x.contiguous(memory_format=torch.channels_last))
        assert torch.equal(out.indices, ref.indices)
        torch.testing.assert_close(out.reconstruction, ref.reconstruction, rtol=1e-5, atol=1e-6)

    @pytest.mark.parametrize(
        "options",
        [
            {"lookup_dim": 4, "l2_normalize": True},
            {"ema_decay": 0.9, "dead_code_threshold": 1.0},
        ],
    )
    def test_codebook_options_under_bf16_autocast_and_channels_last(self, options):
        """The options keep the fp32 search and the fp32 codebook under bf16 autocast, in channels_last."""
        net = tiny_net(**options).to(memory_format=torch.channels_last)
        x = images().contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
            loss = F.l1_loss(out.reconstruction.float(), x) + net.quantizer.loss(out)
        loss.backward()
        q = net.quantizer
        assert q.codebook.dtype == torch.float32 and out.commitment_loss.dtype == torch.float32
        assert torch.isfinite(q.codebook).all()
        for p in net.parameters():
            if p.requires_grad:
                assert p.grad is not None and torch.isfinite(p.grad).all()
        if "lookup_dim" in options:  # argmax cosine, in fp32, of the bf16 projected encodings
            with torch.autocast("cpu", dtype=torch.bfloat16):
                projected = q.to_lookup_space(out.z_e.detach().permute(0, 2, 3, 1)).float().reshape(-1, 4)
            similarity = projected @ F.normalize(q.codebook.detach(), dim=1).t()
            assert torch.equal(out.indices.reshape(-1), similarity.argmax(1))
