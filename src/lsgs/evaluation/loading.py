"""Rebuild an evaluated method from its finished stage folder, ready for ``Trainer.predict`` (``lsgs detect``)."""

from __future__ import annotations

from pathlib import Path

from lsgs.classpath import import_class
from lsgs.errors import ConfigError
from lsgs.evaluation.harness import AnomalyMapModule
from lsgs.layout import StageLayout, read_stage_config


def load_method(stage_dir: str | Path) -> AnomalyMapModule:
    """The method a finished evaluation stage ran, rebuilt with the thresholds it calibrated.

    The module is built from the stage's ``config.yaml`` (its ``model`` class and arguments), with no output
    folder, the stage's ``calibration.json`` (so no calibration pass runs: predicting needs no data module with
    validation normals) and whatever the method class adds through ``AnomalyMapModule.loading_arguments`` (the
    methods of ``lsgs.methods``: ``init_from`` their learned state). LSGS needs nothing more: its config names the
    VQ-VAE and transformer checkpoints relative to the stage folder (``lsgs.layout.read_stage_config`` resolves
    them), so a run folder loads wherever it was moved or copied to.

    Args:
        stage_dir: a finished stage folder: ``<run>/scoring`` (LSGS) or ``<run>/methods/<method>``.

    Returns:
        The module in eval mode. ``module.pixel_threshold`` (the validation quantile of the normal pixels' map
        values: the predicted region) and ``module.image_threshold`` (of the normal images' scores: the
        ``anomalous`` decision) are the stage's calibrated thresholds; ``module.calibration`` is the whole file,
        ``module.num_image_channels`` the channels its images need. ``Trainer.predict`` yields dicts with
        ``path``, ``image``, ``map`` ``[B, 1, H, W]``, ``score`` ``[B]`` and ``anomalous`` ``[B]``.

    Raises:
        ConfigError: the folder is not a finished evaluation stage, or lacks the state its method needs.
    """
    stage = StageLayout.of(stage_dir)
    if not stage.config.is_file() or not stage.calibration.is_file():
        raise ConfigError(
            f"'{stage.folder}' is not a finished evaluation stage ({stage.config.name} and "
            f"{stage.calibration.name} are needed); run the pipeline first"
        )
    config = read_stage_config(stage.config)
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict) or "class_path" not in model:
        raise ConfigError(f"{stage.config}: no model.class_path")
    try:
        method_class = import_class(model["class_path"])
    except (ImportError, AttributeError) as error:  # e.g. a class path of a run made before the classes moved
        raise ConfigError(
            f"{stage.config}: model {model['class_path']} cannot be imported ({error}); if the run was made with an "
            "older version, start a new run (--run_dir)"
        ) from None
    if not (isinstance(method_class, type) and issubclass(method_class, AnomalyMapModule)):
        raise ConfigError(f"{stage.config}: model {model['class_path']} is not an evaluated method")
    init_args = {
        **(model.get("init_args") or {}),
        "output_dir": None,
        "calibration": str(stage.calibration),
        **method_class.loading_arguments(stage),
    }
    return method_class(**init_args).eval()
