"""Runtimes that run an export's graphs by name: torch (eager modules or TorchScript), onnxruntime, OpenVINO.

Each backend maps ``{input name: tensor}`` to ``{output name: tensor}`` for one graph; the ``Inferencer`` combines
the graphs the same way whatever runs them. onnxruntime and OpenVINO are imported only when used.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lsgs.errors import ConfigError

BACKENDS = ("torch", "onnxruntime", "openvino")
OPENVINO_HINT = "pip install 'lsgs[openvino]' (or pip install openvino)"


def import_openvino(what: str) -> Any:
    """The ``openvino`` module, or one ``ConfigError`` line saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise ConfigError(f"{what} needs OpenVINO, which is not installed: {OPENVINO_HINT}") from None
    return openvino


class GraphBackend:
    """Runs named graphs; ``graphs`` is the export metadata's ``{graph: {"inputs": [...], "outputs": [...]}}``."""

    name = "?"

    def __init__(self, graphs: Mapping[str, Mapping[str, Any]]) -> None:
        self.graphs = {name: (list(spec["inputs"]), list(spec["outputs"])) for name, spec in graphs.items()}

    def run(self, graph: str, inputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Run ``graph`` on named CPU tensors; the outputs as CPU tensors, by name."""
        names, outputs = self.graphs[graph]
        values = self._run(graph, [inputs[name] for name in names])
        assert len(values) == len(outputs), (graph, len(values), outputs)
        return dict(zip(outputs, values))

    def _run(self, graph: str, inputs: list[Tensor]) -> list[Tensor]:
        raise NotImplementedError


class TorchBackend(GraphBackend):
    """Eager modules (``Inferencer.from_run``) or TorchScript modules (a ``torchscript`` export)."""

    name = "torch"

    def __init__(
        self, graphs: Mapping[str, Mapping[str, Any]], modules: Mapping[str, nn.Module], device: str = "cpu"
    ) -> None:
        super().__init__(graphs)
        self.device = torch.device(device)
        self.modules = {name: module.to(self.device).eval() for name, module in modules.items()}

    def _run(self, graph: str, inputs: list[Tensor]) -> list[Tensor]:
        with torch.no_grad():
            out = self.modules[graph](*(value.to(self.device) for value in inputs))
        return [value.cpu() for value in (out if isinstance(out, tuple | list) else (out,))]

    @classmethod
    def load_torchscript(cls, folder: Path, graphs: Mapping[str, Mapping[str, Any]]) -> TorchBackend:
        return cls(graphs, {name: torch.jit.load(str(folder / spec["file"]), map_location="cpu")
                            for name, spec in graphs.items()})  # fmt: skip


class OnnxRuntimeBackend(GraphBackend):
    """ONNX graphs in onnxruntime (CPU)."""

    name = "onnxruntime"

    def __init__(self, folder: Path, graphs: Mapping[str, Mapping[str, Any]]) -> None:
        super().__init__(graphs)
        import onnxruntime

        self.sessions = {
            name: onnxruntime.InferenceSession(str(folder / spec["file"]), providers=["CPUExecutionProvider"])
            for name, spec in graphs.items()
        }

    def _run(self, graph: str, inputs: list[Tensor]) -> list[Tensor]:
        names = self.graphs[graph][0]
        feed = {name: np.ascontiguousarray(value.numpy()) for name, value in zip(names, inputs)}
        return [torch.from_numpy(np.asarray(value)) for value in self.sessions[graph].run(None, feed)]


class OpenVinoBackend(GraphBackend):
    """OpenVINO IR (an ``openvino`` export) or ONNX graphs (an ``onnx`` export) compiled for the CPU in fp32.

    The CPU plugin would otherwise run in bf16 on CPUs that have it, which moves the maps far more than the
    exported model's fp32 rounding.
    """

    name = "openvino"

    def __init__(self, folder: Path, graphs: Mapping[str, Mapping[str, Any]]) -> None:
        super().__init__(graphs)
        openvino = import_openvino("backend='openvino'")
        core = openvino.Core()
        self.models = {
            name: core.compile_model(str(folder / spec["file"]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            for name, spec in graphs.items()
        }

    def _run(self, graph: str, inputs: list[Tensor]) -> list[Tensor]:
        model = self.models[graph]
        names, outputs = self.graphs[graph]
        results = model({name: np.ascontiguousarray(value.numpy()) for name, value in zip(names, inputs)})
        by_name = {name: value for port, value in results.items() for name in port.get_names()}
        return [torch.from_numpy(np.array(by_name[name])) for name in outputs]
