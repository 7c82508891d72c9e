"""``lsgs.evaluation.load_method``: every built-in method and LSGS rebuilt from a finished stage folder
predicts exactly the maps its stage computed, with the thresholds its stage calibrated; folders without what a
method needs are one-line ``ConfigError``s."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from test_module_vqvae import IMAGE_SIZE, make_trainer, mvtec_datamodule

from data_modules import MVTecDataModule
from lsgs.classpath import import_class
from lsgs.errors import ConfigError
from lsgs.evaluation import AnomalyMapModule, load_method
from lsgs.layout import StageLayout
from lsgs.methods import BUILTIN_METHODS
from lsgs.modules import GlobalTransformer

HARNESS = {"compute_aupro": False, "heatmaps_per_category": 0, "metric_bits": 16, "val_quantile": 0.95}
AE = {"channels": [8, 16], "num_res_blocks": 1, "res_channels": 8, "code_dim": 8}
METHOD_ARGS: dict[str, dict[str, Any]] = {
    "intensity": {},
    "pixel_gaussian": {"eps_fraction": 0.2},
    "ae": AE,
    "vae": {**AE, "variational": True},
    "patchcore": {"input_size": IMAGE_SIZE, "coreset_fraction": 0.05},  # at the data module's size: no resize
}


@pytest.fixture(scope="module")
def datamodule(demo_mvtec_root: Path, data_cache_dir: Path) -> MVTecDataModule:
    return mvtec_datamodule(demo_mvtec_root, data_cache_dir)


def run_stage(folder: Path, class_path: str, init_args: dict[str, Any], datamodule: Any) -> dict[str, torch.Tensor]:
    """Run one evaluation stage as the runner does (fit with the rolling ``last.ckpt`` if the method trains, then
    test into ``folder``, ``config.yaml`` beside it); returns the final map of every test image, by path."""
    seed_everything(0, verbose=False)
    init_args = {**init_args, "output_dir": str(folder)}
    module = import_class(class_path)(**init_args)
    stage = StageLayout.of(folder)
    maps: dict[str, torch.Tensor] = {}
    test_step = module.test_step

    def recording_test_step(batch: dict[str, Any], batch_idx: int) -> None:
        test_step(batch, batch_idx)
        computed, _ = module.anomaly_map(batch)  # what test_step scored (maps are deterministic)
        maps.update({path: m.float().cpu() for path, m in zip(batch["path"], computed)})

    module.test_step = recording_test_step
    if getattr(module, "requires_fit", False):
        last = ModelCheckpoint(dirpath=stage.checkpoints_dir, filename=stage.last_checkpoint.stem)
        trainer = make_trainer(folder, max_epochs=1, limit_val_batches=1, enable_checkpointing=True, callbacks=[last])
        trainer.fit(module, datamodule=datamodule)
    make_trainer(folder).test(module, datamodule=datamodule, verbose=False)
    stage.config.write_text(yaml.safe_dump({"model": {"class_path": class_path, "init_args": init_args}}))
    return maps


def predicted(module: AnomalyMapModule, datamodule: Any) -> dict[str, dict[str, Any]]:
    """``Trainer.predict`` over the test split: map, score and decision of every image, by path."""
    out: dict[str, dict[str, Any]] = {}
    for batch in make_trainer().predict(module, datamodule=datamodule):
        for i, path in enumerate(batch["path"]):
            out[path] = {key: batch[key][i] for key in ("map", "score", "anomalous")}
    return out


def check_loaded(folder: Path, maps: dict[str, torch.Tensor], datamodule: Any, method_class: type) -> None:
    loaded = load_method(folder)
    assert type(loaded) is method_class and not loaded.training and loaded.output_dir is None
    calibration = json.loads(StageLayout.of(folder).calibration.read_text())
    assert loaded.calibration == calibration
    assert (loaded.pixel_threshold, loaded.image_threshold) == (
        calibration["val_threshold"],
        calibration["image_threshold"],
    )
    rows = predicted(loaded, datamodule)
    assert len(rows) == len(datamodule.dataset("test")) == len(maps)
    with open(StageLayout.of(folder).image_scores) as handle:
        written = {line.split(",")[1]: line for line in handle.read().splitlines()[1:]}
    for path, row in rows.items():
        assert torch.equal(row["map"], maps[path]), path  # bit for bit
        score = float(written[path].split(",")[-1])  # what the stage wrote
        assert float(row["score"]) == score
        if loaded.effective_image_score == "max":  # the brute-force maximum of the stage's map
            assert score == float(maps[path].amax())
        assert bool(row["anomalous"]) == (score > calibration["image_threshold"])


@pytest.mark.parametrize("method", list(BUILTIN_METHODS))
def test_each_baseline_loads_from_its_stage_and_predicts_the_stage_maps(
    method: str, datamodule: MVTecDataModule, tmp_path: Path
) -> None:
    class_path = BUILTIN_METHODS[method]
    maps = run_stage(tmp_path, class_path, {**HARNESS, **METHOD_ARGS[method]}, datamodule)
    assert StageLayout.of(tmp_path).last_checkpoint.is_file()  # the learned state the stage leaves
    check_loaded(tmp_path, maps, datamodule, import_class(class_path))


def test_lsgs_loads_from_its_stage_and_predicts_the_stage_maps(
    tiny_vqvae: tuple[Path, Any], datamodule: MVTecDataModule, tmp_path: Path
) -> None:
    seed_everything(0, verbose=False)
    transformer = GlobalTransformer(str(tiny_vqvae[0]), d_model=16, n_layers=1, n_heads=2, dropout=0.0)
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(transformer, datamodule=datamodule)
    trainer.save_checkpoint(tmp_path / "transformer.ckpt", weights_only=True)
    init_args = {
        **HARNESS,
        "vqvae_checkpoint": str(tiny_vqvae[0]),
        "transformer_checkpoint": str(tmp_path / "transformer.ckpt"),
        "num_restorations": 2,
        "nll_quantile": 0.5,
    }
    folder = tmp_path / "scoring"
    maps = run_stage(folder, "lsgs.modules.ScoringModule", init_args, datamodule)
    assert "nll_threshold" in json.loads(StageLayout.of(folder).calibration.read_text())
    check_loaded(folder, maps, datamodule, import_class("lsgs.modules.ScoringModule"))


def test_folders_without_what_a_method_needs_are_config_errors(
    datamodule: MVTecDataModule, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"is not a finished evaluation stage \(config.yaml and calibration.json"):
        load_method(tmp_path)
    run_stage(tmp_path, BUILTIN_METHODS["intensity"], HARNESS, datamodule)
    stage = StageLayout.of(tmp_path)
    stage.last_checkpoint.unlink()  # a stage folder that lost its learned state
    with pytest.raises(ConfigError, match=r"has no learned state .*checkpoints/last.ckpt is missing.*re-run"):
        load_method(tmp_path)
    # A config naming a class where it was before it moved (lsgs.modules.IntensityBaseline).
    config = yaml.safe_load(stage.config.read_text())
    config["model"]["class_path"] = "lsgs.modules.IntensityBaseline"
    stage.config.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"lsgs.modules.IntensityBaseline cannot be imported .*start a new run"):
        load_method(tmp_path)
