"""What an export (or a loaded method) tells the runtime: ``metadata.json``, built once for ``Inferencer.from_run`` and
``lsgs export`` alike, read back by ``Inferencer.from_export``.

Contents (``FORMAT_VERSION`` 1): ``method`` (its name in the run), ``method_name`` and ``kind`` (as the results
record them), ``runtime`` and ``graphs`` (``lsgs.nn.export``: per graph its ``inputs``, ``outputs`` and, in an
export, ``file``), ``format``, ``input`` (``size``, ``channels``, ``layout``, ``range`` and ``normalisation``),
``evaluation_size``, ``thresholds`` (``pixel``, ``image``, ``image_score_std``, ``nll``: a number, a
``{category: number}`` table or null), ``calibration`` (the stage's whole ``calibration.json``), ``scoring``
(``smoothing``, ``smoothing_count_include_pad``, ``image_score``, ``image_topk`` and the runtime's own options:
LSGS's ``num_restorations``, ``softmax_k``, ``temperature``, ``map_reference``, ``reconstruction_weight``,
``seed``, ``code_grid``), ``categories``, ``seed_rule``, ``versions`` and, in an export, ``onnx_exporter``
(``dynamo`` or ``legacy``; null for TorchScript). No absolute path: graph files are
named relative to the export folder.
"""

from __future__ import annotations

import math
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from lsgs.errors import ConfigError
from lsgs.nn.export import RUNTIME_GRAPHS, RUNTIME_RESTORATION, MethodExport
from lsgs.nn.restoration import NOISE_SEED_STRIDE

FORMAT_VERSION = 1
DEFAULT_IMAGE_SIZE = 128  # AnomalyDataModule's default image_size, for a stage config that leaves it out
SEED_RULE = (
    f"restoration noise of an image: lsgs.nn.restoration.per_image_uniforms with the seed scoring.seed * "
    f"{NOISE_SEED_STRIDE} + i, i the image's position (its index in the test set; lsgs detect: in its sorted folder;"
    " Inferencer.predict: in the call, unless seed= gives each image's seed)"
)
VERSIONED_PACKAGES = ("torch", "onnx", "onnxscript", "onnxruntime", "openvino", "lsgs")


def package_versions() -> dict[str, str | None]:
    """Installed versions of what writes and runs exports (None when a package is not installed)."""
    found: dict[str, str | None] = {}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def _data_sizes(stage_config: dict[str, Any]) -> tuple[int, int, dict[str, Any]]:
    """(input size, evaluation size, normalisation) of a stage's ``config.yaml``."""
    data = stage_config.get("data") or {}
    init_args = data.get("init_args") or {}
    evaluation_size = int(init_args.get("image_size") or DEFAULT_IMAGE_SIZE)
    input_size = int(init_args.get("model_input_size") or evaluation_size)
    normalisation = {
        "data_module": str(data.get("class_path", "?")).rsplit(".", 1)[-1],
        "scale": "8-bit images / 255; float images in [0, 1] as they are",
    }
    if "normalization" in init_args:  # BraTS: the per-volume normalisation the model was trained with
        normalisation["volume_normalization"] = init_args["normalization"]
    return input_size, evaluation_size, normalisation


def input_size_of(stage_config: dict[str, Any]) -> int:
    """Side of the images a method's stage scored (its ``data.model_input_size``, else ``data.image_size``)."""
    return _data_sizes(stage_config)[0]


def method_metadata(name: str, module: Any, stage_config: dict[str, Any], export: MethodExport) -> dict[str, Any]:
    """The metadata of method ``name`` of a run (``module`` loaded by ``load_method``, ``stage_config`` its stage's
    ``config.yaml``, ``export`` its ``export_graphs``), without the graph files (``lsgs export`` adds them).

    Raises:
        ConfigError: the stage's calibration lacks ``image_score_std`` (a run scored before it was recorded).
    """
    input_size, evaluation_size, normalisation = _data_sizes(stage_config)
    calibration = dict(module.calibration)
    if "image_score_std" not in calibration:
        raise ConfigError(
            f"--method {name}: its calibration has no image_score_std (the run was scored before it was recorded);"
            " re-score it: delete the method's done.json in its stage folder and run the same lsgs pipeline command"
        )
    nll = calibration.get("nll_thresholds", calibration.get("nll_threshold"))
    return {
        "format_version": FORMAT_VERSION,
        "method": name,
        "method_name": module.method_name,
        "kind": module.kind,
        "runtime": export.runtime,
        "graphs": {
            graph: {"inputs": list(spec.inputs), "outputs": list(spec.outputs)} for graph, spec in export.graphs.items()
        },
        "format": None,
        "input": {
            "size": input_size,
            "channels": int(module.num_image_channels),
            "layout": "NCHW float32",
            "range": [0.0, 1.0],
            "normalisation": normalisation,
        },
        "evaluation_size": evaluation_size,
        "thresholds": {
            "pixel": float(calibration["val_threshold"]),
            "image": float(calibration["image_threshold"]),
            "image_score_std": float(calibration["image_score_std"]),
            "nll": nll if export.runtime == RUNTIME_RESTORATION else None,
        },
        "calibration": calibration,
        "scoring": {
            "smoothing": bool(module.smoothing),
            "smoothing_count_include_pad": bool(module.smoothing_count_include_pad),
            "image_score": module.effective_image_score,
            "image_topk": float(module.image_topk),
            **export.options,
        },
        "categories": export.categories,
        "seed_rule": SEED_RULE if export.runtime == RUNTIME_RESTORATION else None,
        "versions": package_versions(),
    }


def check_metadata(metadata: Any, where: str) -> dict[str, Any]:
    """``metadata`` read from ``where``, checked for what the runtime reads; one ``ConfigError`` line otherwise."""
    if not isinstance(metadata, dict) or metadata.get("format_version") != FORMAT_VERSION:
        found = metadata.get("format_version") if isinstance(metadata, dict) else type(metadata).__name__
        raise ConfigError(f"{where}: not an lsgs export of format_version {FORMAT_VERSION} (found {found!r})")
    runtime = metadata.get("runtime")
    if runtime not in RUNTIME_GRAPHS or set(metadata.get("graphs") or {}) != set(RUNTIME_GRAPHS[runtime]):
        raise ConfigError(f"{where}: runtime {runtime!r} with graphs {sorted(metadata.get('graphs') or {})}")
    std = metadata["thresholds"].get("image_score_std")
    if std is None or not math.isfinite(float(std)) or float(std) < 0:
        raise ConfigError(f"{where}: thresholds.image_score_std is {std!r}; re-export from a re-scored run")
    return metadata
