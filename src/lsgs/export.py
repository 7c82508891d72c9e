"""``lsgs export``: one evaluated method of a finished run as ONNX, OpenVINO IR or TorchScript graphs plus
``metadata.json`` (input size and channels, evaluation size, calibrated thresholds, scoring options, categories,
seed rule, versions), for ``lsgs.Inferencer.from_export`` or any runtime that reads those formats.

The folder names no absolute path: copy it anywhere; it needs neither the run nor Lightning.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from jsonargparse import ArgumentParser

from lsgs.inference.exporter import EXPORT_FORMATS, ONNX_EXPORTERS, export_method


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lsgs export", description=__doc__)
    parser.add_argument("--run_dir", type=str, required=True, help="a finished pipeline run folder")
    parser.add_argument("--method", type=str, default="lsgs", help="which evaluated method of the run (lsgs, ae, ...)")
    parser.add_argument("--format", type=str, default="onnx", help=f"one of {list(EXPORT_FORMATS)}")
    parser.add_argument("--output", type=str | None, default=None, help="default: <run_dir>/exports/<method>-<format>")
    parser.add_argument("--onnx_exporter", type=str, default="dynamo",
                        help=f"torch.onnx exporter for onnx and openvino, one of {list(ONNX_EXPORTERS)}")  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    folder = export_method(args.run_dir, args.method, args.format, args.output, args.onnx_exporter)
    print(f"{args.method} exported ({args.format}) to {folder}")
