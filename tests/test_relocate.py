"""A finished run folder moved to another path (the old one deleted) scores (``lsgs detect``), reports, studies,
re-runs its stages alone and resumes its pipeline exactly as before the move; with its data moved too,
``lsgs study --data.root`` points at the data. Paths inside the run are stored relative to it."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import pytest
from test_pipeline import STAGES, done_mtimes, tiny_args

import lsgs.study as study
from lsgs.cli import main as lsgs_main
from lsgs.detect import detect
from lsgs.errors import ConfigError
from lsgs.methods.registry import load_method
from lsgs.pipeline import main as pipeline_main
from lsgs.reports.summary import write_summary

GRID = {"nll_quantile": [0.5]}
# Text files of a run; the logger folders (Lightning's hparams.yaml, W&B) record what a stage ran with and are
# never read back.
TEXT_SUFFIXES = {".yaml", ".json", ".md", ".csv", ".html", ".txt"}
LOG_FOLDERS = {"logs", "wandb", "tensorboard"}


def outputs(run_dir: Path, images: Path, out: Path, name: str, data_root: Path | None = None) -> dict[str, object]:
    """What the run gives: detect's scores and heatmaps, the report, a one-row study table (its values)."""
    detect(run_dir, images, out, recursive=True)
    write_summary(run_dir)
    study.run_study(run_dir, GRID, name=name, data_root=None if data_root is None else str(data_root))
    table = list(csv.DictReader(io.StringIO((run_dir / "studies" / f"{name}.csv").read_text())))
    return {
        "scores": (out / "scores.csv").read_text(),
        "heatmaps": {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "heatmaps").rglob("*.png"))},
        "summary": (run_dir / "summary.md").read_text(),
        "report": (run_dir / "report.html").read_text(),
        "study": [{k: v for k, v in row.items() if k != "command"} for row in table],
    }


@pytest.fixture(scope="module")
def moved(tiny_run: Path, demo_mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """A copy of the tiny run used in place, then moved elsewhere (same folder name, the old path deleted) and used
    again: ``(new run folder, outputs before, outputs after)``."""
    base = tmp_path_factory.mktemp("relocate")
    images = base / "images"
    shutil.copytree(demo_mvtec_root / "nut" / "test", images)
    first = base / "first" / "run"
    shutil.copytree(tiny_run, first)
    before = outputs(first, images, base / "out-before", "before")
    second = base / "elsewhere" / "deeper" / "run"
    second.parent.mkdir(parents=True)
    shutil.move(first, second)
    assert not first.exists()
    after = outputs(second, images, base / "out-after", "after")
    return second, before, after


def test_a_moved_run_detects_reports_and_studies_as_before(moved: tuple[Path, dict, dict]) -> None:
    run_dir, before, after = moved
    assert before["heatmaps"] and before["study"]
    for key in before:
        assert after[key] == before[key], key
    # ... with its own checkpoints: the copy's, not those of the run it was copied from (which still exists).
    hparams = load_method(run_dir, "lsgs").hparams
    for checkpoint in (hparams.vqvae_checkpoint, hparams.transformer_checkpoint):
        assert Path(checkpoint).is_relative_to(run_dir), checkpoint


def test_no_text_file_of_the_run_names_where_it_is(moved: tuple[Path, dict, dict]) -> None:
    run_dir, _, _ = moved
    for path in run_dir.rglob("*"):
        if path.suffix in TEXT_SUFFIXES and not LOG_FOLDERS & set(path.relative_to(run_dir).parts):
            text = path.read_text()
            assert str(run_dir) not in text and "/first/run" not in text, path
    config = (run_dir / "scoring" / "config.yaml").read_text()
    assert "vqvae_checkpoint: ../finetune/vqvae_ft.ckpt" in config and "output_dir: ." in config


def test_a_stage_config_runs_alone_from_any_working_directory(
    moved: tuple[Path, dict, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir, _, _ = moved
    monkeypatch.chdir(tmp_path)
    lsgs_main(["test", "-c", str(run_dir / "scoring" / "config.yaml"), "--trainer.logger=false",
               "--trainer.enable_progress_bar=false", "--model.init_args.output_dir=again",
               "--trainer.default_root_dir=again"])  # fmt: skip
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    results = json.loads((run_dir / "scoring" / "results.json").read_text())
    assert again["per_category"] == results["per_category"] and again["calibration"] == results["calibration"]


def test_the_moved_run_resumes_without_retraining(
    moved: tuple[Path, dict, dict], demo_mvtec_root: Path, data_cache_dir: Path
) -> None:
    run_dir, _, _ = moved
    finished = done_mtimes(run_dir)
    pipeline_main(tiny_args(demo_mvtec_root, data_cache_dir, run_dir))
    assert done_mtimes(run_dir) == finished and set(finished) == set(STAGES)


def test_a_study_finds_moved_data_with_data_root(
    moved: tuple[Path, dict, dict], demo_mvtec_root: Path, tmp_path: Path
) -> None:
    run_dir, before, _ = moved
    data = tmp_path / "data" / "mvtec"
    shutil.copytree(demo_mvtec_root, data)
    study.main(["scoring", f"--run_dir={run_dir}", f"--grid={json.dumps(GRID)}", "--name=data", f"--data.root={data}"])
    rows = list(csv.DictReader(io.StringIO((run_dir / "studies" / "data.csv").read_text())))
    assert [{k: v for k, v in row.items() if k != "command"} for row in rows] == before["study"]
    assert f"--data.init_args.root={data}" in rows[0]["command"]
    with pytest.raises(ConfigError, match=r"--data.root: data folder '.*nowhere' does not exist"):
        study.main(["scoring", f"--run_dir={run_dir}", f"--grid={json.dumps(GRID)}", "--name=x",
                    f"--data.root={tmp_path / 'nowhere'}"])  # fmt: skip
