"""The export contract's pure pieces without a run: traced graphs keep every vector of a larger batch, the value
checks step aside only while tracing, the graph wrappers' documented shapes and numbers, the harness's refusal
for a method without ``export_graphs``, and the image preparation the Inferencer shares with the data modules."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_modules.image_io import prepare_image, read_image, resize_float_planes
from lsgs.errors import ConfigError
from lsgs.inference.inputs import load_image
from lsgs.nn.export import VQVAEDecoderGraph, VQVAEEncoderGraph, VQVAEReconstructionMapGraph
from lsgs.nn.nearest import nearest_codes
from lsgs.nn.restoration import reconstruction_error_map
from lsgs.nn.tracing import is_tracing
from lsgs.nn.transformer import check_code_range
from lsgs.nn.vqvae import VQVAEConfig, VQVAENet


def trace(function: object, *examples: torch.Tensor) -> torch.jit.ScriptFunction:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python values
        return torch.jit.trace(function, examples, check_trace=False)


def test_a_traced_nearest_code_search_keeps_every_vector_of_a_larger_batch() -> None:
    """Traced on 6 vectors with chunks of 4, it must still search all 40 of a later call (the chunked loop would
    keep the example's two chunks and leave the rest of the output uninitialised)."""
    codebook = torch.randn(16, 5, generator=torch.Generator().manual_seed(0))
    traced = trace(lambda v: nearest_codes(v, codebook, chunk_size=4)[0], torch.randn(6, 5))
    vectors = torch.randn(40, 5, generator=torch.Generator().manual_seed(1))
    brute = torch.cdist(vectors, codebook).argmin(dim=1)
    assert torch.equal(traced(vectors), brute)
    assert torch.equal(nearest_codes(vectors, codebook, chunk_size=4)[0], brute)  # eager: chunked, same answer


def test_value_checks_step_aside_only_while_tracing() -> None:
    assert not is_tracing()
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 4\), got values in \[0, 9\]"):
        check_code_range(torch.tensor([[0, 9]]), 4)
    seen = []

    def record(codes: torch.Tensor) -> torch.Tensor:
        seen.append(is_tracing())
        check_code_range(codes, 4)  # would read the codes' values into Python
        return codes + 1

    trace(record, torch.tensor([[0, 9]]))
    assert seen == [True]


def test_the_vqvae_graphs_give_the_net_s_codes_decodings_and_error_map() -> None:
    torch.manual_seed(0)
    net = VQVAENet(dataclasses.replace(VQVAEConfig.tiny(), codebook_size=16)).eval()
    images = torch.rand(3, 3, 16, 16)
    codes = VQVAEEncoderGraph(net)(images)
    assert codes.shape == (3, 16) and codes.dtype == torch.int64  # [B, L], L = (16 / 4) ** 2
    assert torch.equal(codes, net.encode_indices(images).flatten(1))
    decoded = VQVAEDecoderGraph(net, (4, 4))(codes)
    assert decoded.shape == (3, 3, 16, 16)
    torch.testing.assert_close(decoded, net(images).reconstruction, rtol=0, atol=1e-6)
    anomaly = VQVAEReconstructionMapGraph(net)(images)
    assert anomaly.shape == (3, 1, 16, 16)
    torch.testing.assert_close(anomaly, reconstruction_error_map(images, decoded))


def test_a_method_without_export_graphs_is_refused_in_one_line() -> None:
    from toy_method import MeanDifference

    with pytest.raises(ConfigError, match=r"toy method \(MeanDifference\) cannot be exported: it does not implement"):
        MeanDifference().export_graphs(32)


def test_images_in_memory_are_prepared_as_files_are(tmp_path: Path) -> None:
    """``prepare_image`` is ``read_image`` after decoding; a uint8 array, its PIL image and its PNG give the same
    input; float planes at the size are kept, and resized by the same bilinear filter (no 8-bit rounding)."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    from_file, original = read_image(tmp_path / "a.png", 16, channels=1)
    assert original == (30, 40)
    np.testing.assert_array_equal(from_file, prepare_image(Image.fromarray(rgb), 16, channels=1))
    for source in (rgb, Image.fromarray(rgb), tmp_path / "a.png", str(tmp_path / "a.png")):
        tensor, shape = load_image(source, 16, 1)
        assert shape == (40, 30) and tensor.shape == (1, 16, 16)
        torch.testing.assert_close(tensor, torch.from_numpy(np.array(from_file)).float()[None] / 255, rtol=0, atol=0)
    planes = rng.random((3, 16, 16)).astype(np.float32)
    assert resize_float_planes(planes, 16) is planes
    resized = resize_float_planes(np.repeat(planes[:1], 3, 0) * 0 + 0.25, 8)  # a constant stays constant
    np.testing.assert_allclose(resized, 0.25, rtol=1e-6)
    as_gray = load_image(np.moveaxis(planes, 0, -1), 16, 1)[0]  # float RGB -> PIL's luma weights, unrounded
    torch.testing.assert_close(as_gray[0], torch.from_numpy(0.299 * planes[0] + 0.587 * planes[1] + 0.114 * planes[2]))


class OwnScoreGraph(torch.nn.Module):
    """A per-class method with its own image score, as PatchCore and HVQ-Trans plug in: ``images``, ``class_index``
    -> ``map`` (the channel mean times class + 1) and ``image_score`` (10 x the map's mean)."""

    def forward(self, images: torch.Tensor, class_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        anomaly = images.mean(dim=1, keepdim=True) * (class_index + 1).to(images.dtype).view(-1, 1, 1, 1)
        return anomaly, 10 * anomaly.flatten(1).mean(dim=1)


def test_a_per_class_method_with_its_own_image_score_runs_through_the_inferencer() -> None:
    """The ``map`` runtime feeds ``class_index`` from ``category=`` and scores by the graph's own ``image_score``
    when the metadata says ``own``; the map is resized to the evaluation size (16), then to the input's (24 x 20)."""
    from lsgs.inference.backends import TorchBackend
    from lsgs.inference.inferencer import Inferencer

    graphs = {"map": {"inputs": ["images", "class_index"], "outputs": ["map", "image_score"]}}
    metadata = {
        "method": "fake", "runtime": "map", "graphs": graphs, "input": {"size": 8, "channels": 3},
        "evaluation_size": 16, "categories": ["a", "b"],
        "thresholds": {"pixel": 0.5, "image": 5.0, "image_score_std": 2.0, "nll": None},
        "scoring": {"smoothing": False, "smoothing_count_include_pad": True, "image_score": "own", "image_topk": 0.01},
    }  # fmt: skip
    inferencer = Inferencer(metadata, TorchBackend(graphs, {"map": OwnScoreGraph()}))
    image = np.full((24, 20, 3), 0.6, np.float32)
    first, second = inferencer.predict([image, image], category=["a", "b"])
    assert (first.score, second.score) == (pytest.approx(6.0), pytest.approx(12.0))  # own scores, not the max
    assert (first.label, second.label) == (True, True)
    assert first.normalized_score == pytest.approx(1 / (1 + np.exp(-0.5)))  # (6 - 5) / 2
    assert first.anomaly_map.shape == (24, 20)
    np.testing.assert_allclose(first.anomaly_map, 0.6, rtol=1e-6)
    np.testing.assert_allclose(second.anomaly_map, 1.2, rtol=1e-6)
    metadata["scoring"]["image_score"] = "max"  # an imposed reduction wins over the method's own
    assert inferencer.predict(image, category="b").score == pytest.approx(1.2)
