"""A run on normal images only (a folder data set without ``abnormal_dir``): the pipeline trains every stage,
calibrates every method's thresholds on the validation normals, says in its results and report that there was no
labelled test set, and serves ``lsgs detect`` and ``load_method``."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_pipeline import TINY

import lsgs.study as study
from data_modules import FolderDataModule, MVTecDataModule
from lsgs.contracts import has_test_set_of
from lsgs.detect import detect
from lsgs.errors import ConfigError
from lsgs.methods.registry import load_method
from lsgs.metrics import ScoreQuantile
from lsgs.pipeline import main as pipeline_main

METHODS = ("lsgs", "ae", "intensity", "patchcore", "pixel_gaussian")
STAGE = {"lsgs": "scoring", **{m: f"methods/{m}" for m in METHODS[1:]}}


@pytest.fixture(scope="module")
def normal_run(demo_mvtec_root: Path, data_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline (LSGS, AE for one epoch, two statistics methods, PatchCore at its own input size) on the
    demo's 16 fabric training normals, copied into a folder data set with no anomalous folder."""
    base = tmp_path_factory.mktemp("normal-only")
    shutil.copytree(demo_mvtec_root / "fabric" / "train" / "good", base / "data" / "good")
    run_dir = base / "run"
    pipeline_main([
        *TINY, "--data=data_modules.FolderDataModule", f"--data.root={base / 'data'}", "--data.normal_dir=good",
        f"--data.cache_dir={data_cache_dir}", "--data.val_fraction=0.25", f"--run_dir={run_dir}",
        "--run_methods=true", "--methods.vae.model=null", "--methods.ae.trainer.max_epochs=1",
    ])  # fmt: skip
    return run_dir


def test_the_data_contract_says_whether_there_is_a_test_set(demo_mvtec_root: Path) -> None:
    assert not has_test_set_of(FolderDataModule(str(demo_mvtec_root), normal_dir="fabric/train/good"))
    assert has_test_set_of(MVTecDataModule(str(demo_mvtec_root)))
    assert has_test_set_of(object())  # a data module that does not say has one


@pytest.mark.parametrize("method", METHODS)
def test_every_method_is_calibrated_on_the_validation_normals(
    normal_run: Path, data_cache_dir: Path, method: str
) -> None:
    """Each stage finished with thresholds, and they are the validation normals' quantiles: the image threshold
    is the quantile of the scores its image_scores.csv lists: the data module's 4 validation normals."""
    stage = normal_run / STAGE[method]
    assert (stage / "done.json").is_file()
    calibration = json.loads((stage / "calibration.json").read_text())
    results = json.loads((stage / "results.json").read_text())
    assert results["has_test_set"] is False and results["num_test_images"] == 0
    assert results["calibration"] == calibration and results["pooled"] == {}
    with (stage / "image_scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    data = FolderDataModule(str(normal_run.parent / "data"), normal_dir="good", val_fraction=0.25,
                            cache_dir=str(data_cache_dir))  # fmt: skip
    assert [r["path"] for r in rows] == [item.path for item in data.dataset("val").items]
    assert len(rows) == 4 and {r["label"] for r in rows} == {"0"}
    scores = torch.tensor([float(r["score"]) for r in rows])
    quantile = ScoreQuantile(num_bits=16)
    quantile.update(scores)
    assert calibration["image_threshold"] == quantile.quantile(calibration["image_quantile"])
    flagged = sum(float(r["score"]) > calibration["image_threshold"] for r in rows)
    assert results["validation"] == {"num_images": 4, "num_flagged": flagged}
    if method == "lsgs":
        assert calibration["nll_threshold"] > 0
    assert calibration["val_threshold"] >= 0


def test_the_report_says_there_was_no_labelled_test_set(normal_run: Path) -> None:
    summary = (normal_run / "summary.md").read_text()
    assert "No labelled test set for LSGS, ae, intensity, patchcore, pixel_gaussian" in summary
    assert "no labelled test set" in (normal_run / "results.md").read_text()
    assert (normal_run / "report.html").is_file()
    # A scoring study compares metrics, which need a labelled test set: one line says so.
    with pytest.raises(ConfigError, match="no labelled test set"):
        study.main(["scoring", f"--run_dir={normal_run}", '--grid={"seed": [1]}'])


@pytest.mark.parametrize("method", ["lsgs", "ae", "patchcore", "pixel_gaussian"])
def test_the_run_serves_detect(
    normal_run: Path, demo_mvtec_root: Path, data_cache_dir: Path, tmp_path: Path, method: str
) -> None:
    """``lsgs detect`` scores with the calibrated thresholds, as the harness scores the same files read by a data
    module at the stage's sizes (PatchCore reads its images at its own input size, 224 px)."""
    from lightning.pytorch import Trainer

    from data_modules import ImageFolderDataModule
    from lsgs.layout import read_stage_config

    images = tmp_path / "line"
    images.mkdir()
    for defect in ("good", "hole"):
        shutil.copy(demo_mvtec_root / "fabric" / "test" / defect / "000.png", images / f"{defect}.png")
    out = detect(normal_run, images, tmp_path / "out", method=method)
    with (out / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    model = load_method(normal_run, method)
    assert [r["path"] for r in rows] == ["good.png", "hole.png"]
    assert all(int(r["anomalous"]) == int(float(r["score"]) > model.image_threshold) for r in rows)
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == ["good.png", "hole.png"]
    data = read_stage_config(normal_run / STAGE[method] / "config.yaml")["data"]["init_args"]
    assert (data.get("model_input_size") is not None) == (method == "patchcore")
    datamodule = ImageFolderDataModule(str(images), image_size=data["image_size"], cache_dir=str(data_cache_dir),
                                       model_input_size=data.get("model_input_size"))  # fmt: skip
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False)
    scores = torch.cat([p["score"] for p in trainer.predict(model, datamodule=datamodule)])
    assert [float(r["score"]) for r in rows] == pytest.approx(scores.tolist(), rel=1e-5)  # scores.csv: 6 digits
