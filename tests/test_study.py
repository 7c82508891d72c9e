"""``lsgs study scoring`` end to end on the tiny demo run: the rows equal uncached scoring runs, a printed command
reproduces its row exactly, a SIGKILL mid-grid resumes to the same table, floors are listed, bad grids fail early."""

from __future__ import annotations

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_pipeline import copy_run, run_cli, tiny_args

import lsgs.study as study
from lsgs.errors import ConfigError
from lsgs.methods import BUILTIN_METHODS

GRID = {
    "map_reference": ["reconstruction", "input"],
    "reconstruction_weight": [0, 1],
    "nll_quantile": [0.5, 0.9],
}


@pytest.fixture(scope="module")
def studied(
    tiny_run: Path, tmp_path_factory: pytest.TempPathFactory, demo_mvtec_root: Path, data_cache_dir: Path
) -> Path:
    """A copy of the tiny run plus its two cheap baseline methods, and one uninterrupted study over GRID
    (in-process)."""
    from lsgs.pipeline import main as pipeline_main

    run_dir = copy_run(tiny_run, tmp_path_factory.mktemp("study"))
    cheap = ("intensity", "pixel_gaussian")
    others_off = [f"--methods.{name}.model=null" for name in BUILTIN_METHODS if name not in cheap]
    pipeline_main(tiny_args(demo_mvtec_root, data_cache_dir, run_dir, "--run_methods=true", *others_off))
    study.main(["scoring", f"--run_dir={run_dir}", f"--grid={json.dumps(GRID)}", "--name=full"])
    return run_dir


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_the_table_has_a_row_per_setting_and_the_floors(studied: Path) -> None:
    rows = read_csv(studied / "studies" / "full.csv")
    study_rows = [r for r in rows if r["row"] == "study"]
    assert [(r["map_reference"], r["reconstruction_weight"], r["nll_quantile"]) for r in study_rows] == [
        (m, str(w), str(q)) for m in GRID["map_reference"] for w in GRID["reconstruction_weight"]
        for q in GRID["nll_quantile"]
    ]  # fmt: skip
    assert [r["row"] for r in rows[len(study_rows) :]] == [
        "run as trained (scoring/)", "baseline: intensity", "baseline: pixel_gaussian",
    ]  # fmt: skip
    floor = json.loads((studied / "methods" / "pixel_gaussian" / "results.json").read_text())["mean"]
    assert float(rows[len(study_rows) + 2]["pixel_auroc"]) == floor["pixel_auroc"]
    # Settings matter: the input reference and the added reconstruction error change the metrics.
    assert len({r["pixel_ap"] for r in study_rows}) == len(study_rows)
    markdown = (studied / "studies" / "full.md").read_text()
    assert markdown.count("lsgs test -c") == len(study_rows) and "baseline: pixel_gaussian" in markdown


def test_the_row_of_the_runs_own_settings_equals_the_runs_scoring(studied: Path) -> None:
    """The cached study computation is the scoring stage's, to the last bit (run: nll_quantile 0.9, paper map)."""
    settings = {"map_reference": "reconstruction", "reconstruction_weight": 0, "nll_quantile": 0.9}
    record = json.loads(
        (studied / "studies" / "full" / "rows" / f"{study.row_id(settings)}.json").read_text()
    )
    results = json.loads((studied / "scoring" / "results.json").read_text())
    assert record["results"]["per_category"] == results["per_category"]
    assert record["results"]["mean"] == results["mean"]
    assert record["calibration"] == results["calibration"]


def test_a_printed_command_reproduces_its_row_exactly(studied: Path) -> None:
    settings = {"map_reference": "input", "reconstruction_weight": 1, "nll_quantile": 0.5}
    record = json.loads(
        (studied / "studies" / "full" / "rows" / f"{study.row_id(settings)}.json").read_text()
    )
    command = shlex.split(record["command"])
    assert command[:2] == ["lsgs", "test"]
    # The command holds no absolute path of the run: it runs from the run folder, wherever that is.
    assert str(studied) not in record["command"]
    proc = subprocess.run([sys.executable, "-m", "lsgs", *command[1:]], cwd=studied, capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = studied / "studies" / "repro" / study.row_id(settings)
    results = json.loads((out / "results.json").read_text())
    assert results["per_category"] == record["results"]["per_category"]
    assert results["mean"] == record["results"]["mean"]
    assert results["method_info"]["map_reference"] == "input"
    # The run's own scoring outputs were not touched.
    assert json.loads((studied / "scoring" / "results.json").read_text())["method_info"]["map_reference"] == (
        "reconstruction"
    )


def test_the_image_score_is_a_grid_key(studied: Path) -> None:
    """image_score / image_topk rows: max is the run's own scoring; topk_mean changes only the image score."""
    grid = {"image_score": ["max", "topk_mean"], "image_topk": [0.05]}
    study.main(["scoring", f"--run_dir={studied}", f"--grid={json.dumps(grid)}", "--name=image"])
    by_max, by_topk = (
        json.loads((studied / "studies" / "image" / "rows" / f"{study.row_id(s)}.json").read_text())
        for s in ({"image_score": m, "image_topk": 0.05} for m in grid["image_score"])
    )
    results = json.loads((studied / "scoring" / "results.json").read_text())
    assert by_max["results"]["mean"] == results["mean"]  # the run was scored with the default, max
    assert by_max["calibration"] == results["calibration"]
    pixel = ("pixel_auroc", "pixel_ap", "dice_best", "dice_val")
    assert [by_topk["values"][k] for k in pixel] == [by_max["values"][k] for k in pixel]
    assert by_topk["calibration"]["val_threshold"] == by_max["calibration"]["val_threshold"]
    assert by_topk["calibration"]["image_threshold"] < by_max["calibration"]["image_threshold"]  # mean <= max
    assert "--model.init_args.image_score=topk_mean" in by_topk["command"]


def test_a_killed_study_resumes_and_gives_the_same_table(
    studied: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["study", "scoring", f"--run_dir={studied}", f"--grid={json.dumps(GRID)}", "--name=killed"]
    first = run_cli([*args, "--kill_after_rows=3"], check=False)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert len(list((studied / "studies" / "killed" / "rows").glob("*.json"))) == 3
    second = run_cli(args)
    assert "3 of 8 rows done, scoring 5" in second.stdout
    assert (studied / "studies" / "killed.csv").read_text() == (studied / "studies" / "full.csv").read_text()
    # A third run has nothing left to score (in-process, with scoring disabled) and writes the same table.
    (studied / "studies" / "killed.csv").unlink()

    def no_scoring(*args: object, **kwargs: object) -> None:
        raise AssertionError("scoring ran")

    monkeypatch.setattr(study, "score_setting", no_scoring)
    study.main(args[1:])
    assert (studied / "studies" / "killed.csv").read_text() == (studied / "studies" / "full.csv").read_text()


@pytest.mark.parametrize(
    ("grid", "match"),
    [
        ('{"map_reference": ["input"', "--grid is not valid JSON"),
        ('["map_reference"]', "--grid must be a non-empty JSON object"),
        ('{"map_refrence": ["input"]}', "unknown scoring option 'map_refrence'; valid: map_reference"),
        ('{"map_reference": "input"}', "map_reference must be a non-empty list of values"),
        ('{"nll_quantile": []}', "nll_quantile must be a non-empty list"),
        (
            '{"map_reference": ["image"]}',
            r"map_reference=\"image\" must be one of \['reconstruction', 'input'\]",
        ),
        ('{"reconstruction_weight": ["1"]}', r"reconstruction_weight=\"1\" must be a finite number >= 0$"),
        ('{"reconstruction_weight": [-1]}', "reconstruction_weight=-1 must be a finite number >= 0$"),
        ('{"reconstruction_weight": [Infinity]}', "reconstruction_weight=Infinity must be a finite number >= 0$"),
        ('{"nll_quantile": [0.9, 1.5]}', r"nll_quantile=1.5 must be a number in \(0, 1\)"),
        ('{"num_restorations": [2.5]}', "num_restorations=2.5 must be an int >= 1"),
        ('{"nll_threshold_scope": [true]}', "nll_threshold_scope=true must be one of"),
        ('{"nll_quantile": [0.9, 0.9]}', "lists a value twice"),
        ('{"image_score": ["mean"]}', r"image_score=\"mean\" must be one of \['max', 'topk_mean'\] or null \(null: "),
        ('{"nll_threshold": [-1]}', r"nll_threshold=-1 must be null or a number of nats >= 0 \(null: "),
        ('{"seed": [true]}', "seed=true must be an int$"),
        ('{"smoothing": ["yes"]}', r"smoothing=\"yes\" must be true, false or null \(null: "),
        ('{"metric_region": ["brain"]}', r"metric_region=\"brain\" must be one of \['all', 'roi'\]$"),
        ('{"image_topk": [0]}', r"image_topk=0 must be a number in \(0, 1\]"),
    ],
)
def test_a_bad_grid_fails_before_any_scoring(
    grid: str, match: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_scoring(*args: object, **kwargs: object) -> None:
        raise AssertionError("scoring ran")

    monkeypatch.setattr(study, "score_setting", no_scoring)
    monkeypatch.setattr(study, "_load_run", no_scoring)
    with pytest.raises(ConfigError, match=match) as error:
        study.main(["scoring", f"--run_dir={tmp_path}", f"--grid={grid}"])
    assert "\n" not in str(error.value)


def test_cli_errors_are_one_line(tmp_path: Path, tiny_run: Path) -> None:
    proc = run_cli(["study", "scoring", f"--run_dir={tiny_run}", "--grid", '{"softmax_k": [0]}'], check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --grid: softmax_k=0 must be a finite number > 0"
    with pytest.raises(ConfigError, match="has no finished scoring stage"):
        study.main(["scoring", f"--run_dir={tmp_path}", '--grid={"seed": [1]}'])
    assert not (tiny_run / "studies").exists()
