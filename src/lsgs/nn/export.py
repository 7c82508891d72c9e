"""The export contract: a method as pure torch graphs (no Lightning), for ``lsgs export`` and the ``Inferencer``.

A method (``AnomalyMapModule.export_graphs``) returns a :class:`MethodExport`: named graphs, each an ``nn.Module``
with named example inputs and named outputs, plus the ``runtime`` that says how they are combined:

- ``map``: one graph ``map``, ``images`` (+ ``class_index``) -> ``map`` (+ ``image_score``), the raw map of the
  method's ``raw_anomaly_map`` (the statistics methods, the AE/VAE, LSGS without a transformer, and the
  feature methods: PatchCore's nearest-neighbour search is a matrix product and a minimum inside the graph,
  HVQ-Trans takes the class as ``class_index``);
- ``restoration`` (LSGS): ``encoder``, ``transformer`` and ``decoder`` graphs; the resampling, the decoding of the
  restorations and their weighting run outside the graphs (``lsgs.nn.restoration``), because the number of
  resampled codes depends on the data and the noise comes from a per-image seed.

The graph wrappers of the nets of this package are here too; a method whose maths lives elsewhere (the statistics
methods) defines its own next to it. Every graph here is traceable: the value checks of the nets step aside
while a graph is recorded (``lsgs.nn.tracing``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from lsgs.nn.autoencoder import ConvAutoencoder
from lsgs.nn.restoration import reconstruction_error_map
from lsgs.nn.vqvae import VQVAENet

# Graph input and output names (ONNX names them; the runtime feeds and reads them by name).
IMAGES = "images"  # [B, C, h, w] float32 in [0, 1], at the method's input size
CLASS_INDEX = "class_index"  # [B] int64, row of MethodExport.categories
MAP = "map"  # [B, 1, h', w'] float32 raw anomaly map
IMAGE_SCORE = "image_score"  # [B] float32, the method's own image score
CODES = "codes"  # [B, L] int64 code indices in raster order
LOGITS = "logits"  # [B, L, K] float32 transformer logits
DECODED = "decoded"  # [B, C, h, w] float32 images decoded from codes

RUNTIME_MAP = "map"
RUNTIME_RESTORATION = "restoration"
RUNTIMES = (RUNTIME_MAP, RUNTIME_RESTORATION)
# The graphs each runtime needs.
RUNTIME_GRAPHS = {RUNTIME_MAP: ("map",), RUNTIME_RESTORATION: ("encoder", "transformer", "decoder")}
EXAMPLE_BATCH = 2  # the batch of the tracing examples: not 1, which tracers may treat as a constant


@dataclass(frozen=True)
class ExportGraph:
    """One graph: a module in eval mode and the names of what goes in and out.

    Attributes:
        module: called with the inputs in ``inputs`` order; returns a tensor, or a tuple in ``outputs`` order.
        inputs: input name -> example tensor (shape and dtype of a real input; axis 0 is the batch).
        outputs: output names; axis 0 of each is the batch.
    """

    module: nn.Module
    inputs: dict[str, Tensor]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class MethodExport:
    """What ``AnomalyMapModule.export_graphs`` returns (see the module docstring for the runtimes).

    Attributes:
        runtime: one of ``RUNTIMES``.
        graphs: graph name -> graph (the names ``RUNTIME_GRAPHS[runtime]``).
        options: what the runtime needs besides the harness settings (JSON-serialisable): for ``restoration``
            ``num_restorations``, ``softmax_k``, ``temperature``, ``map_reference``, ``reconstruction_weight``,
            ``seed`` (the run's scoring seed) and ``code_grid`` ``[h, w]``.
        categories: None when the graphs take no ``class_index``; else the class of each index (a method with
            a single class serves images of any category with it).
    """

    runtime: str
    graphs: dict[str, ExportGraph]
    options: dict[str, Any] = field(default_factory=dict)
    categories: list[str] | None = None

    def __post_init__(self) -> None:
        assert self.runtime in RUNTIMES, self.runtime
        assert set(self.graphs) == set(RUNTIME_GRAPHS[self.runtime]), (self.runtime, sorted(self.graphs))


class VQVAEEncoderGraph(nn.Module):
    """``images`` ``[B, C, H, W]`` -> ``codes`` ``[B, L]`` int64 (the VQ-VAE's nearest codes, raster order)."""

    def __init__(self, net: VQVAENet) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: Tensor) -> Tensor:
        return self.net.encode_indices(images).flatten(1)  # [B, h, w] -> [B, L]


class VQVAEDecoderGraph(nn.Module):
    """``codes`` ``[B, L]`` -> ``decoded`` ``[B, C, H, W]`` (the VQ-VAE's decoder on a code map of ``grid``)."""

    def __init__(self, net: VQVAENet, grid: tuple[int, int]) -> None:
        super().__init__()
        self.net = net
        self.grid = tuple(grid)

    def forward(self, codes: Tensor) -> Tensor:
        return self.net.decode_indices(codes.reshape(-1, *self.grid))  # [B, L] -> [B, h, w]


class VQVAEReconstructionMapGraph(nn.Module):
    """``images`` -> ``map`` ``[B, 1, H, W]``: ``|x - decode(encode(x))|`` averaged over channels (LSGS without a
    transformer)."""

    def __init__(self, net: VQVAENet) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: Tensor) -> Tensor:
        reconstruction = self.net.decode_indices(self.net.encode_indices(images))
        return reconstruction_error_map(images, reconstruction)


class AutoencoderMapGraph(nn.Module):
    """``images`` -> ``map`` ``[B, 1, H, W]``: the reconstruction error of an AE, or of a VAE decoding its posterior
    mean (deterministic), in float32."""

    def __init__(self, net: ConvAutoencoder) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: Tensor) -> Tensor:
        reconstruction = self.net(images, sample=False).reconstruction
        return reconstruction_error_map(images.float(), reconstruction.float())
