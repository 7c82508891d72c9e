"""Writing an export: a finished method's graphs (``AnomalyMapModule.export_graphs``) as ONNX, OpenVINO IR or
TorchScript files, and ``metadata.json`` (``lsgs.inference.metadata``), into a folder that names no absolute path.

ONNX comes from ``torch.onnx.export``: the dynamo exporter by default (``torch.export``, the maintained one), or
the legacy TorchScript-based one (``onnx_exporter="legacy"``, much faster to run). OpenVINO IR is converted from
that ONNX by ``openvino.convert_model`` and saved in fp32. TorchScript is ``torch.jit.trace`` of the same modules.
Every graph gets a dynamic batch axis.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from lsgs.errors import ConfigError
from lsgs.inference.backends import import_openvino
from lsgs.inference.metadata import input_size_of, method_metadata
from lsgs.io import atomic_write_json
from lsgs.layout import EXPORT_GRAPH_SUFFIXES, ExportLayout, RunLayout
from lsgs.nn.export import ExportGraph, MethodExport

EXPORT_FORMATS = tuple(EXPORT_GRAPH_SUFFIXES)
ONNX_EXPORTERS = ("dynamo", "legacy")
ONNX_OPSET = 18  # the dynamo exporter's default opset, for both exporters: one opset whatever wrote the file


def method_export(run_dir: str | Path, method: str) -> tuple[MethodExport, dict[str, Any]]:
    """Method ``method`` of a finished run as graphs (eval mode, CPU) and their metadata (without files)."""
    from lsgs.methods.registry import load_method, method_stage

    module = load_method(run_dir, method).cpu()
    stage_config = yaml.safe_load(method_stage(run_dir, method).config.read_text()) or {}
    export = module.export_graphs(input_size_of(stage_config))
    for graph in export.graphs.values():
        graph.module.eval()
    return export, method_metadata(method, module, stage_config, export)


def export_method(
    run_dir: str | Path,
    method: str = "lsgs",
    export_format: str = "onnx",
    output: str | Path | None = None,
    onnx_exporter: str = "dynamo",
) -> Path:
    """Export method ``method`` of the run ``run_dir`` in ``export_format`` into ``output`` (default
    ``<run_dir>/exports/<method>-<format>``); return the folder.

    Raises:
        ConfigError: an unknown format or exporter, OpenVINO not installed, a method that cannot be exported.
    """
    if export_format not in EXPORT_FORMATS:
        raise ConfigError(f"--format {export_format!r} is not one of {list(EXPORT_FORMATS)}")
    if onnx_exporter not in ONNX_EXPORTERS:
        raise ConfigError(f"--onnx_exporter {onnx_exporter!r} is not one of {list(ONNX_EXPORTERS)}")
    openvino = import_openvino("--format openvino") if export_format == "openvino" else None
    export, metadata = method_export(run_dir, method)
    folder = Path(output) if output is not None else RunLayout.of(run_dir).export_dir(method, export_format)
    layout = ExportLayout(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, graph in export.graphs.items():
        for stale in layout.graph_files(name, export_format):
            stale.unlink(missing_ok=True)
        target = folder / layout.graph_file(name, export_format)
        if export_format == "torchscript":
            write_torchscript(graph, target)
        elif export_format == "onnx":
            write_onnx(graph, target, onnx_exporter)
        else:
            with tempfile.TemporaryDirectory(dir=folder) as scratch:
                onnx_file = Path(scratch) / layout.graph_file(name, "onnx")
                write_onnx(graph, onnx_file, onnx_exporter)
                # fp32 weights: save_model would halve them to fp16 by default.
                openvino.save_model(openvino.convert_model(onnx_file), target, compress_to_fp16=False)
        metadata["graphs"][name]["file"] = target.name
    metadata["format"] = export_format
    metadata["onnx_exporter"] = onnx_exporter if export_format != "torchscript" else None
    atomic_write_json(layout.metadata, metadata)
    return folder


def write_onnx(graph: ExportGraph, target: Path, exporter: str) -> None:
    """One graph as an ONNX file with a dynamic batch axis on every input and output."""
    inputs, outputs = list(graph.inputs), list(graph.outputs)
    examples = tuple(graph.inputs.values())
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter about the legacy exporter
        if exporter == "legacy":
            torch.onnx.export(graph.module, examples, target, dynamo=False, input_names=inputs,
                              output_names=outputs, opset_version=ONNX_OPSET,
                              dynamic_axes={name: {0: "batch"} for name in inputs + outputs})  # fmt: skip
        else:
            batch = torch.export.Dim("batch", min=1)
            program = torch.onnx.export(graph.module, examples, dynamo=True, input_names=inputs,
                                        output_names=outputs, opset_version=ONNX_OPSET, verbose=False,
                                        dynamic_shapes=tuple({0: batch} for _ in inputs))  # fmt: skip
            program.save(str(target), external_data=False)
    _drop_source_locations(target)


def _drop_source_locations(target: Path) -> None:
    """Remove the Python stack traces the dynamo exporter records per node (file paths of this installation) and
    any doc string, so the file names no absolute path."""
    import onnx

    model = onnx.load(str(target))
    changed = False
    for holder in [model, model.graph, *model.graph.node]:
        keep = [prop for prop in holder.metadata_props if not prop.key.endswith("stack_trace")]
        if len(keep) != len(holder.metadata_props):
            del holder.metadata_props[:]
            holder.metadata_props.extend(keep)
            changed = True
        if holder.doc_string:
            holder.doc_string = ""
            changed = True
    if changed:
        onnx.save(model, str(target))


def write_torchscript(graph: ExportGraph, target: Path) -> None:
    """One graph traced by ``torch.jit.trace`` (batch axis dynamic: shapes are read at run time)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python values (the skipped checks)
        traced = torch.jit.trace(graph.module, tuple(graph.inputs.values()), check_trace=False)
    torch.jit.save(traced, str(target))

