"""Tests of lsgs.nn.fast_decode: the code-table decoder and the batched restoration decode equal the plain
``VQVAENet.decode_indices``; the receptive field and dirty masks match what perturbing codes really changes."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from lsgs.nn.fast_decode import (
    decode_original_and_restored,
    decode_with_table,
    decoder_dirty_masks,
    decoder_receptive_field,
    first_layer_table,
    table_first_layer,
)
from lsgs.nn.vqvae import VQVAEConfig, VQVAENet


def net_of(config: VQVAEConfig, seed: int = 0, channels_last: bool = False) -> VQVAENet:
    torch.manual_seed(seed)
    net = VQVAENet(config).eval()
    with torch.no_grad():  # codes of unit scale, so decoded images depend visibly on them
        net.quantizer.codebook.normal_()
    return net.to(memory_format=torch.channels_last) if channels_last else net


def codes_of(config: VQVAEConfig, b: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, config.codebook_size, (b, h, w), generator=torch.Generator().manual_seed(seed))


TINY_CONFIGS = {
    "tiny": VQVAEConfig.tiny(),
    "no-res-blocks": dataclasses.replace(VQVAEConfig.tiny(), num_res_blocks=0),
    "three-stages": VQVAEConfig(
        channels=(8, 8, 16), num_res_blocks=2, res_channels=4, codebook_size=16, code_dim=6
    ),
    "lookup-dim": dataclasses.replace(VQVAEConfig.tiny(), lookup_dim=4),
    "l2-normalize": dataclasses.replace(VQVAEConfig.tiny(), l2_normalize=True),
    "grayscale": VQVAEConfig.tiny(in_channels=1),
}


@pytest.mark.parametrize("name", TINY_CONFIGS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_table_decoder_equals_plain_decode(name, channels_last):
    config = TINY_CONFIGS[name]
    net = net_of(config, channels_last=channels_last)
    indices = codes_of(config, 3, 5, 7)  # not square: the borders of both axes matter
    with torch.no_grad():
        expected = net.decode_indices(indices)
        actual = decode_with_table(net, first_layer_table(net), indices)
    assert (
        actual.shape
        == expected.shape
        == (3, config.in_channels, 5 * config.downsample_factor, 7 * config.downsample_factor)
    )
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_first_layer_equals_the_convolution_of_the_codes():
    config = VQVAEConfig.tiny()
    net = net_of(config)
    indices = codes_of(config, 2, 4, 6)
    with torch.no_grad():
        expected = net.decoder[0](net.quantizer.lookup(indices))  # [B, C, h, w]
        actual = table_first_layer(net, first_layer_table(net), indices)
    assert actual.shape == (2, config.channels[-1], 4, 6)
    assert actual.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_table_decoder_equals_plain_decode_at_paper_size():
    config = VQVAEConfig.paper()
    net = net_of(config, channels_last=True)
    indices = codes_of(config, 2, 16, 16)
    with torch.inference_mode():
        expected = net.decode_indices(indices)
        actual = decode_with_table(net, first_layer_table(net), indices)
    assert actual.shape == (2, 3, 128, 128)
    # Relative to the image scale: only the rounding of the first layer's sums differs.
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5 * float(expected.abs().max()))


def test_table_is_a_snapshot_of_the_weights():
    config = VQVAEConfig.tiny()
    net = net_of(config)
    old = first_layer_table(net)
    indices = codes_of(config, 1, 4, 4)
    with torch.no_grad():
        net.quantizer.codebook.mul_(2.0)
        fresh = decode_with_table(net, first_layer_table(net), indices)
        torch.testing.assert_close(fresh, net.decode_indices(indices), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(decode_with_table(net, old, indices), fresh)  # the old codebook's table


def test_table_decoder_rejects_bad_indices_and_tables():
    config = VQVAEConfig.tiny()
    net = net_of(config)
    table = first_layer_table(net)
    assert table.shape == (9 * (config.codebook_size + 1), config.channels[-1])
    with pytest.raises(ValueError, match="integer tensor"):
        decode_with_table(net, table, torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="integer tensor"):
        decode_with_table(net, table, torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 32\)"):
        decode_with_table(net, table, torch.full((1, 4, 4), config.codebook_size))
    with pytest.raises(ValueError, match="table must be"):
        decode_with_table(net, table[:-1], torch.zeros(1, 4, 4, dtype=torch.long))


def test_decode_restorations_equals_separate_decodes_and_decodes_each_map_once():
    config = VQVAEConfig.tiny()
    net = net_of(config)
    b, n, h, w = 3, 4, 4, 5
    codes = codes_of(config, b, h, w).flatten(1)  # [B, L]
    restored = codes.unsqueeze(1).repeat(1, n, 1)  # [B, n, L]
    restored[0, 1, 3] = (codes[0, 3] + 1) % config.codebook_size
    restored[0, 2, 3] = (codes[0, 3] + 1) % config.codebook_size  # the same map as restoration 1
    restored[2, 0, :5] = (codes[2, :5] + 2) % config.codebook_size
    # image 1: nothing resampled, every restoration is X_hat
    calls = []

    def decode(indices):
        calls.append(indices.shape[0])
        return net.decode_indices(indices)

    with torch.no_grad():
        x_hat, decoded = decode_original_and_restored(decode, codes, restored, (h, w))
        expected_x_hat = net.decode_indices(codes.view(b, h, w))
        expected = net.decode_indices(restored.view(b * n, h, w)).view(b, n, *expected_x_hat.shape[1:])
    assert calls == [3 + 2]  # one call: the 3 originals and the 2 distinct changed maps
    assert x_hat.shape == (b, 3, h * 4, w * 4) and decoded.shape == (b, n, 3, h * 4, w * 4)
    torch.testing.assert_close(x_hat, expected_x_hat, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(decoded, expected, rtol=1e-5, atol=1e-6)


def test_decode_restorations_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="L = h"):
        decode_original_and_restored(
            lambda x: x, torch.zeros(2, 12, dtype=torch.long), torch.zeros(2, 3, 12, dtype=torch.long), (3, 5)
        )
    with pytest.raises(ValueError, match="codes"):
        decode_original_and_restored(
            lambda x: x, torch.zeros(1, 12, dtype=torch.long), torch.zeros(2, 3, 12, dtype=torch.long), (3, 4)
        )


def changed_pixels(net: VQVAENet, indices: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
    """[B, H, W] bool: pixels whose decoded value moves when the codes under ``changed`` are replaced."""
    other = torch.where(changed, (indices + 1) % net.config.codebook_size, indices)
    with torch.no_grad():
        return (net.decode_indices(other) - net.decode_indices(indices)).abs().amax(dim=1) > 0


@pytest.mark.parametrize("name", ["tiny", "no-res-blocks", "three-stages"])
def test_receptive_field_is_what_one_code_changes(name):
    config = TINY_CONFIGS[name]
    net = net_of(config)
    indices = codes_of(config, 1, 12, 12)
    changed = torch.zeros(1, 12, 12, dtype=torch.bool)
    changed[0, 6, 6] = True
    rows, cols = changed_pixels(net, indices, changed)[0].nonzero(as_tuple=True)
    width = decoder_receptive_field(config)
    assert int(rows.max() - rows.min()) + 1 == width
    assert int(cols.max() - cols.min()) + 1 == width


def test_receptive_field_of_the_paper_decoder():
    # 3 code-resolution 3x3 convs (radius 3 cells), then three stride-2 4x4 transposed convs: 70 pixels.
    assert decoder_receptive_field(VQVAEConfig.paper()) == 70


@pytest.mark.parametrize("name", ["tiny", "three-stages"])
def test_dirty_masks_cover_exactly_what_changes(name):
    config = TINY_CONFIGS[name]
    net = net_of(config)
    indices = codes_of(config, 4, 8, 8)
    changed = torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(2)) < 0.05
    changed[0] = False  # an image with nothing resampled
    changed[1, 0, 0] = True  # a corner
    masks = decoder_dirty_masks(config, changed)
    f = config.downsample_factor
    assert [tuple(m.shape) for m in masks] == [
        (4, 8 * 2**i, 8 * 2**i) for i in range(len(config.channels) + 1)
    ]
    moved = changed_pixels(net, indices, changed)
    assert not (moved & ~masks[-1]).any()  # nothing changes outside the mask
    # ... and the mask is tight: with random weights every pixel of it moves, bar a rare ReLU zero.
    assert moved.sum() >= 0.98 * masks[-1].sum()
    assert not masks[-1][0].any() and masks[-1].shape[1:] == (8 * f, 8 * f)


def test_dirty_mask_of_one_code_is_the_receptive_field():
    config = VQVAEConfig.paper()
    changed = torch.zeros(1, 16, 16, dtype=torch.bool)
    changed[0, 8, 8] = True
    final = decoder_dirty_masks(config, changed)[-1][0]
    rows, cols = final.nonzero(as_tuple=True)
    assert (int(rows.min()), int(rows.max()), int(cols.min()), int(cols.max())) == (33, 102, 33, 102)
    assert final.sum() == 70 * 70


def test_dirty_masks_rejects_non_bool():
    with pytest.raises(ValueError, match="bool"):
        decoder_dirty_masks(VQVAEConfig.tiny(), torch.zeros(1, 4, 4))


def test_code_table_matches_conv_with_zero_padding_at_the_border():
    # A code map of a single cell: only the centre tap of the 3x3 kernel sees a code, the rest is padding.
    config = VQVAEConfig.tiny()
    net = net_of(config)
    indices = torch.tensor([[[5]]])
    first = net.decoder[0]
    with torch.no_grad():
        expected = F.conv2d(net.quantizer.lookup(indices), first.weight, first.bias, padding=1)
        actual = table_first_layer(net, first_layer_table(net), indices)
        centre = first.weight[:, :, 1, 1] @ net.quantizer.lookup(indices)[0, :, 0, 0] + first.bias
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(actual[0, :, 0, 0], centre, rtol=1e-5, atol=1e-6)
