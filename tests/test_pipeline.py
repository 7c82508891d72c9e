"""End to end: the experiment runner on tiny configs (skip, invalidate, kill + resume, 2-process DDP, ablations,
single-stage CLI, detect, errors)."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from tiny_feature_methods import TINY_HVQ, TINY_HVQ_DDP_STRATEGY

from lsgs.pipeline import main as pipeline_main

REPO = Path(__file__).resolve().parents[1]
STAGES = ("vqvae", "aggregator", "finetune", "transformer", "scoring")
# A CPU-seconds version of the demo experiment: the real demo config with every size shrunk by overrides
# (which also exercises the override syntax). Dropout 0: dropout masks come from each process's own RNG, so
# they are the one thing a 2-process run cannot reproduce from a 1-process run.
TINY = [
    "--config", str(REPO / "experiments" / "demo_mvtec.yaml"),
    "--logger=csv",
    "--data.image_size=32", "--data.batch_size=8", "--data.eval_batch_size=8",
    "--vqvae.model.channels=[8,16]", "--vqvae.model.res_channels=8", "--vqvae.model.num_res_blocks=1",
    "--vqvae.model.codebook_size=32", "--vqvae.model.code_dim=8", "--vqvae.trainer.max_epochs=2",
    "--finetune.trainer.max_epochs=1",
    "--transformer.model.d_model=32", "--transformer.model.n_layers=1", "--transformer.model.n_heads=2",
    "--transformer.model.dropout=0.0", "--transformer.trainer.max_epochs=2",
    "--scoring.model.num_restorations=3", "--scoring.model.metric_bits=16",
    "--run_methods=false",
]  # fmt: skip


def tiny_args(root: Path, cache: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY, f"--data.root={root}", f"--data.cache_dir={cache}", f"--run_dir={run_dir}", *extra]


def run_cli(
    args: list[str], *, launcher: list[str] | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [*(launcher or [sys.executable, "-m"]), "lsgs", *args]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def metrics_of(run_dir: Path) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    return {
        "per_category": results["per_category"],
        "pooled": results["pooled"],
        "calibration": results["calibration"],
    }


def assert_close(a: object, b: object, tol: float, path: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_close(a[key], b[key], tol, f"{path}/{key}")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    elif isinstance(a, float):
        assert abs(a - b) <= tol, f"{path}: {a} vs {b}"
    else:
        assert a == b, path


# tiny_run (a finished run of these TINY args) is a session fixture in conftest.py, shared with test_study.py.


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run_dir, target)
    return target


def done_mtimes(run_dir: Path) -> dict[str, int]:
    return {s: (run_dir / s / "done.json").stat().st_mtime_ns for s in STAGES}


def test_pipeline_writes_every_stage_and_the_results(tiny_run: Path) -> None:
    for stage, output in zip(
        STAGES, ("vqvae.ckpt", "aggregated.ckpt", "vqvae_ft.ckpt", "transformer.ckpt", "results.json")
    ):
        done = json.loads((tiny_run / stage / "done.json").read_text())
        assert done["stage"] == stage and done["output"] == output
        assert (tiny_run / stage / output).is_file()
        assert (tiny_run / stage / "config.yaml").is_file()
        # What bit-for-bit repeatability depends on besides config and seed (threads, processes, CPU, versions).
        environment = done["environment"]
        assert environment["torch_threads"] == torch.get_num_threads() and environment["world_size"] == 1
        assert environment["versions"]["torch"] == torch.__version__ and environment["cpu"]
    for name in ("results.json", "results.csv", "results.md", "experiment.yaml", "summary.md", "report.html"):
        assert (tiny_run / name).is_file(), name
    results = json.loads((tiny_run / "results.json").read_text())
    assert set(results["per_category"]) == {"fabric", "nut", "mesh"}
    # The metrics equal recomputations from the saved per-image scores and the saved pooled ROC curve: what a
    # mix-up of labels, categories or ranks between the metrics and the written outputs would break. (The tiny
    # 2-epoch models score near chance, so a quality floor would say nothing here.)
    with (tiny_run / "scoring" / "image_scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 * 10  # every test image once: 3 categories x (2 good + 4 defects x 2)
    labels = np.array([int(r["label"]) for r in rows])
    scores = np.array([float(r["score"]) for r in rows])
    assert results["pooled"]["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    for category in ("fabric", "nut", "mesh"):
        mine = np.array([r["category"] == category for r in rows])
        assert results["per_category"][category]["image_auroc"] == pytest.approx(
            roc_auc_score(labels[mine], scores[mine]), abs=1e-12
        ), category
    roc = np.load(tiny_run / "scoring" / "curves" / "curves.npz")
    assert len(roc["fpr"]) < 2048  # not thinned: the curve holds every threshold, so the area is exact
    assert results["pooled"]["pixel_auroc"] == pytest.approx(np.trapezoid(roc["tpr"], roc["fpr"]), abs=1e-9)
    assert list((tiny_run / "scoring" / "heatmaps").glob("*.png"))
    assert (tiny_run / "scoring" / "curves" / "roc.png").is_file()
    aggregation = json.loads((tiny_run / "aggregator" / "aggregation.json").read_text())
    assert aggregation["train_vectors"] == 42 * 8 * 8  # the whole training split (42 images), 8x8 codes each
    assert aggregation["effective_size_after"] >= aggregation["effective_size_before"]


def test_rerun_skips_finished_stages(
    tiny_run: Path, tmp_path: Path, demo_mvtec_root: Path, data_cache_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = copy_run(tiny_run, tmp_path)
    before = done_mtimes(run_dir)
    pipeline_main(tiny_args(demo_mvtec_root, data_cache_dir, run_dir))
    out = capsys.readouterr().out
    assert all(f"[lsgs] {stage}: finished earlier" in out for stage in STAGES), out
    assert done_mtimes(run_dir) == before


def test_changed_config_reruns_that_stage_and_the_later_ones(
    tiny_run: Path, tmp_path: Path, demo_mvtec_root: Path, data_cache_dir: Path
) -> None:
    run_dir = copy_run(tiny_run, tmp_path)
    before = done_mtimes(run_dir)
    pipeline_main(tiny_args(demo_mvtec_root, data_cache_dir, run_dir, "--transformer.model.d_model=16"))
    after = done_mtimes(run_dir)
    assert [after[s] == before[s] for s in STAGES] == [True, True, True, False, False]
    # Presentation settings (progress bar, logger) do not invalidate anything.
    pipeline_main(
        tiny_args(
            demo_mvtec_root,
            data_cache_dir,
            run_dir,
            "--transformer.model.d_model=16",
            "--trainer.enable_progress_bar=false",
            "--logger=tensorboard",
        )
    )
    assert done_mtimes(run_dir) == after


def plan_tiny(root: Path, cache: Path, run_dir: Path, *extra: str) -> dict[str, bool]:
    """Plan the tiny experiment over ``run_dir`` (nothing runs or is written): stage -> finished with this config."""
    from lsgs.run import parse_experiment, plan_experiment

    _, config = parse_experiment(tiny_args(root, cache, run_dir, *extra))
    return {stage: plan.is_done() for stage, plan in plan_experiment(config).plans.items()}


def callback(name: str, **init_args: object) -> str:
    """A one-callback ``trainer.callbacks`` value: Lightning's callback ``name`` with ``init_args``."""
    return json.dumps([{"class_path": f"lightning.pytorch.callbacks.{name}", "init_args": init_args}])


@pytest.mark.parametrize(
    ("extra", "rerun_from"),
    [
        ([f"--vqvae.trainer.callbacks={callback('EarlyStopping', monitor='val/loss')}"], "vqvae"),
        ([f"--transformer.trainer.callbacks={callback('StochasticWeightAveraging', swa_lrs=0.01)}"], "transformer"),
        # Shared trainer settings reach every stage.
        ([f"--trainer.callbacks={callback('GradientAccumulationScheduler', scheduling={0: 2})}"], "vqvae"),
        # Display and logging only: nothing re-runs.
        ([f"--trainer.callbacks={callback('TQDMProgressBar', refresh_rate=5)}"], None),
        ([f"--vqvae.trainer.callbacks={callback('RichProgressBar')}",
          f"--transformer.trainer.callbacks={callback('LearningRateMonitor')}"], None),
        (["--trainer.log_every_n_steps=7", "--vqvae.trainer.enable_model_summary=false"], None),
    ],
    ids=["early-stopping", "swa", "grad-accumulation", "progress-bar", "rich-bar+lr-monitor", "log-every-n-steps"],
)
def test_callbacks_that_change_training_rerun_their_stage(
    tiny_run: Path, demo_mvtec_root: Path, data_cache_dir: Path, extra: list[str], rerun_from: str | None
) -> None:
    """A callback that may change what a stage computes is in its hash: the stage and the later ones re-run; one that
    only displays or logs, and the logging interval, are not (planned over the finished tiny run)."""
    assert all(plan_tiny(demo_mvtec_root, data_cache_dir, tiny_run).values())
    done = plan_tiny(demo_mvtec_root, data_cache_dir, tiny_run, *extra)
    expected = [rerun_from is None or STAGES.index(stage) < STAGES.index(rerun_from) for stage in STAGES]
    assert [done[stage] for stage in STAGES] == expected, done


def test_a_run_folder_of_an_older_layout_fails_in_one_line(
    tiny_run: Path, tmp_path: Path, demo_mvtec_root: Path, data_cache_dir: Path
) -> None:
    """A run folder made before the layout version existed (run.json without it, as every older lsgs wrote) holds
    stages whose hashes cover old class paths: one ConfigError line says to start a new run, nothing is touched."""
    from lsgs.errors import ConfigError

    run_dir = copy_run(tiny_run, tmp_path)
    record = json.loads((run_dir / "run.json").read_text())
    assert record.pop("layout_version") == 3
    (run_dir / "run.json").write_text(json.dumps(record))
    experiment_yaml = (run_dir / "experiment.yaml").read_bytes()
    with pytest.raises(ConfigError) as error:
        pipeline_main(tiny_args(demo_mvtec_root, data_cache_dir, run_dir))
    message = str(error.value)
    assert "\n" not in message and str(run_dir) in message and "start a new run" in message, message
    assert (run_dir / "experiment.yaml").read_bytes() == experiment_yaml
    assert json.loads((run_dir / "run.json").read_text()) == record
    assert done_mtimes(run_dir) == done_mtimes(tiny_run)


def test_killed_run_resumes_and_equals_the_uninterrupted_run(
    tiny_run: Path, tmp_path: Path, demo_mvtec_root: Path, data_cache_dir: Path
) -> None:
    """SIGKILL from inside the checkpoint write at the end of stage 1's second epoch (half of the temporary file
    written), then SIGKILL in the middle of stage 4's second epoch; each re-run resumes from the last complete
    epoch-end checkpoint (with its RNG state) and the final results equal the uninterrupted run's."""
    run_dir = tmp_path / "killed"
    args = tiny_args(demo_mvtec_root, data_cache_dir, run_dir)
    checkpoints = run_dir / "vqvae" / "checkpoints"
    first = run_cli(["pipeline", *args, "--fault_injection=vqvae:1:1:CHECKPOINT"], check=False)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    # The kill came while the epoch-1 checkpoint was being written: last.ckpt is still epoch 0's, whole, and the
    # half-written file sits beside it under a temporary name.
    partial = [p for p in checkpoints.iterdir() if p.name != "last.ckpt"]
    assert [p.name.startswith(".last.ckpt.") and p.name.endswith(".tmp") for p in partial] == [True], partial
    last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 0 and 0 < partial[0].stat().st_size < (checkpoints / "last.ckpt").stat().st_size
    assert not (run_dir / "vqvae" / "done.json").exists()
    # Stage 4 has 6 batches per epoch (42 images, batch 8): batch 3 of epoch 1 is in the middle of the epoch.
    second = run_cli(["pipeline", *args, "--fault_injection=transformer:1:3"], check=False)
    assert second.returncode == -signal.SIGKILL, second.stderr[-2000:]
    assert "vqvae: resuming from" in second.stdout
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]  # the partial file was removed
    assert (run_dir / "finetune" / "done.json").is_file() and not (
        run_dir / "transformer" / "done.json"
    ).exists()
    resumed = torch.load(run_dir / "transformer" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert (resumed["epoch"], resumed["global_step"]) == (0, 6)  # 3 optimiser steps after it are lost
    third = run_cli(["pipeline", *args])
    assert "transformer: resuming from" in third.stdout
    assert_close(metrics_of(run_dir), metrics_of(tiny_run), tol=0.0)


def test_sigterm_exits_non_zero_and_the_rerun_resumes(
    tiny_run: Path, tmp_path: Path, demo_mvtec_root: Path, data_cache_dir: Path
) -> None:
    """A scheduler's SIGTERM in stage 1: Lightning stops the stage by raising a SystemExit with no code; the run
    must still exit non-zero (128 + SIGTERM) with nothing marked finished, and the re-run resumes."""
    run_dir = tmp_path / "terminated"
    args = tiny_args(demo_mvtec_root, data_cache_dir, run_dir)
    first = run_cli(["pipeline", *args, "--fault_injection=vqvae:1:1:TERM"], check=False)
    assert first.returncode == 128 + signal.SIGTERM, first.stderr[-2000:]
    assert "stopped by SIGTERM" in first.stderr
    assert not (run_dir / "vqvae" / "done.json").exists() and not (run_dir / "aggregator").exists()
    second = run_cli(["pipeline", *args])
    assert "vqvae: resuming from" in second.stdout
    assert (run_dir / "scoring" / "done.json").is_file()


def method_metrics(run_dir: Path) -> dict[str, dict]:
    """The metrics and calibration of every other method of a run (``methods/<name>/results.json``)."""
    found = {}
    for results in sorted((run_dir / "methods").glob("*/results.json")):
        values = json.loads(results.read_text())
        found[results.parent.name] = {k: values[k] for k in ("per_category", "pooled", "calibration")}
    return found


def test_two_process_ddp_run_equals_the_single_process_run(
    tiny_run: Path, tiny_run_with_hvq: Path, tmp_path: Path, demo_mvtec_root: Path, data_cache_dir: Path
) -> None:
    """torchrun with 2 CPU processes (gloo), half the per-process batch, the methods on (HVQ-Trans too, dropout 0):
    same samples per optimiser step, so the same models up to float summation order (the VAE's latent noise is
    drawn per image, the same in both runs; HVQ-Trans's EMA statistics are summed over the ranks), and the same
    metrics to 1e-4 for LSGS and every method. HVQ-Trans has three classes here, so DDP looks for unused
    parameters (``TINY_HVQ_DDP_STRATEGY``)."""
    run_dir = tmp_path / "ddp"
    args = tiny_args(
        demo_mvtec_root,
        data_cache_dir,
        run_dir,
        "--data.batch_size=4",
        TINY_HVQ_DDP_STRATEGY,
        "--trainer.devices=2",
        "--run_methods=true",
        *TINY_METHODS,
        *TINY_HVQ,
    )
    logs = tmp_path / "torchrun-logs"
    # torchrun's own status is 0 only if every rank exited 0 (checked by run_cli); --tee also keeps each
    # rank's output in a file of its own, checked below.
    run_cli(
        ["pipeline", *args],
        launcher=[sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--log-dir={logs}",
                  "--tee=3", "-m"],
    )
    methods = method_metrics(tiny_run_with_hvq)
    assert {"intensity", "pixel_gaussian", "ae", "vae", "patchcore", "hvq_trans"} <= set(methods)
    rank_logs = {int(p.name): p for p in logs.glob("*/attempt_0/*") if p.is_dir()}
    assert sorted(rank_logs) == [0, 1], sorted(logs.rglob("*"))
    for rank, folder in rank_logs.items():
        stdout, stderr = (folder / "stdout.log").read_text(), (folder / "stderr.log").read_text()
        assert "terminate called" not in stderr and "Traceback" not in stderr, (rank, stderr[-2000:])
        # Every rank ran every stage; only rank 0 prints the final summary.
        stages = [*STAGES, *(f"methods.{name}" for name in methods)]
        assert all(f"[lsgs] {stage}: starting" in stdout for stage in stages), (rank, stdout[-2000:])
        assert ("run directory:" in stdout) == (rank == 0), rank
    assert_close(metrics_of(run_dir), metrics_of(tiny_run), tol=1e-4)
    # Relative too for the normals' image-score spread, summed over the ranks (LSGS's tiny maps are ~1e-3).
    std = [metrics_of(run)["calibration"]["image_score_std"] for run in (run_dir, tiny_run)]
    assert std[0] == pytest.approx(std[1], rel=1e-3)
    assert_close(method_metrics(run_dir), methods, tol=1e-4)
    assert json.loads((run_dir / "vqvae" / "done.json").read_text())["environment"]["world_size"] == 2
    assert json.loads((run_dir / "methods" / "vae" / "done.json").read_text())["environment"]["world_size"] == 2
    # Only rank 0 wrote results, and nothing was written twice under another name.
    assert sorted(p.name for p in (run_dir / "scoring").glob("results*")) == [
        "results.csv",
        "results.json",
        "results.md",
    ]


def test_single_stage_cli_reruns_a_saved_stage_config(tiny_run: Path, tmp_path: Path) -> None:
    """``lsgs validate -c vqvae/config.yaml`` with the stage's final weights gives the validation L1 of the stage's
    last epoch (its done.json and its own CSV log) to the last bit."""
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path)}}
    run_cli(
        [
            "validate",
            "--config",
            str(tiny_run / "vqvae" / "config.yaml"),
            f"--ckpt_path={tiny_run / 'vqvae' / 'vqvae.ckpt'}",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger={json.dumps(logger)}",
        ]
    )
    (log,) = tmp_path.glob("*/version_*/metrics.csv")
    with log.open() as handle:
        (row,) = list(csv.DictReader(handle))
    recorded = json.loads((tiny_run / "vqvae" / "done.json").read_text())["metrics"]["val/l1"]
    with (tiny_run / "vqvae" / "logs" / "metrics.csv").open() as handle:
        logged = [float(r["val/l1"]) for r in csv.DictReader(handle) if r["val/l1"]]
    assert len(logged) == 2  # one validation per epoch
    assert float(row["val/l1"]) == recorded == logged[-1]


def test_help_on_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    from lsgs.cli import USAGE, main

    # The entry point itself, in a fresh interpreter (``python -m lsgs``).
    assert USAGE.strip() in run_cli(["--help"]).stdout
    # Each command's own help, in this process (a subprocess per command would re-import torch and Lightning
    # each time): the text a wrong dispatch (another command's help, an empty print) would lack.
    expected = {
        ("pipeline", "--help"): ["usage: lsgs pipeline", "--run_dir RUN_DIR", "--vqvae.model"],
        ("ablate", "--help"): ["usage: lsgs ablate {codebook,attention} --config EXPERIMENT.yaml"],
        ("detect", "--help"): ["usage: lsgs detect", "--run_dir", "--images", "--method"],
        ("export", "--help"): ["usage: lsgs export", "--run_dir", "--method", "--format", "--onnx_exporter"],
        ("report", "--help"): ["usage: lsgs report", "--run_dir"],
        ("study", "--help"): ["usage: lsgs study", "--run_dir", "--grid"],
        ("fit", "--help"): [" fit [-c CONFIG]", "--trainer.max_epochs"],
    }
    for command, texts in expected.items():
        try:
            main(list(command))
        except SystemExit as stop:  # argparse-style help exits 0; jsonargparse's returns
            assert stop.code in (0, None), command
        stdout = capsys.readouterr().out
        for text in texts:
            assert text in stdout, (command, text, stdout[:1000])


def test_bad_configs_fail_with_one_clear_line(
    tmp_path: Path, demo_mvtec_root: Path, data_cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lsgs.cli import main

    def lsgs_fails(args: list[str]) -> str:
        """Run ``lsgs`` in this process (no torch re-import per case); it must exit 2. Returns stderr."""
        with pytest.raises(SystemExit) as stop:
            main(args)
        assert stop.value.code == 2, args
        return capsys.readouterr().err

    stderr = lsgs_fails(
        ["pipeline", *tiny_args(demo_mvtec_root, data_cache_dir, tmp_path / "r"), "--vqvae.model.codebok_size=4"]
    )
    assert "codebok_size" in stderr
    missing = tmp_path / "no-such-root"
    stderr = lsgs_fails(["pipeline", *tiny_args(missing, data_cache_dir, tmp_path / "r2")])
    error_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and str(missing) in error_lines[0], stderr[-2000:]
    assert "Traceback" not in stderr
    stderr = lsgs_fails(
        ["pipeline", *tiny_args(demo_mvtec_root, data_cache_dir, tmp_path / "r3"), "--stages=[vqvae,nonsense]"]
    )
    assert "nonsense" in stderr


def test_ablations_write_their_tables(
    tiny_run: Path, tmp_path: Path, demo_mvtec_root: Path, data_cache_dir: Path
) -> None:
    from lsgs.ablations import run_ablation
    from lsgs.run import build_parser

    run_dir = copy_run(tiny_run, tmp_path)
    config = build_parser().parse_args(tiny_args(demo_mvtec_root, data_cache_dir, run_dir))
    _, table = run_ablation("codebook", config)
    rows = table.strip().splitlines()
    assert rows[0].startswith("method,") and [r.split(",")[0] for r in rows[1:]] == ["learned", "aggregated"]
    assert "effective size" in rows[0] and (run_dir / "ablations" / "codebook.md").is_file()
    learned = run_dir / "ablations" / "codebook-learned"
    assert not (learned / "vqvae").exists(), "stage 1 must be reused from the main run, not retrained"
    _, table = run_ablation("attention", config)
    assert [r.split(",")[0] for r in table.strip().splitlines()[1:]] == ["w/o", "causal", "global"]
    assert (
        json.loads((run_dir / "ablations" / "attention-wo" / "scoring" / "results.json").read_text())[
            "method"
        ]
        == "vqvae-reconstruction"
    )
    # The table also goes to W&B (offline here) as a table of its own run in the experiment's group.
    from lsgs.ablations import log_ablation_to_wandb

    config.logger = "wandb"
    log_ablation_to_wandb(config, "attention", table)
    assert len(list((run_dir / "ablations" / "wandb").glob("offline-run-*"))) == 1


# The AE/VAE take the tiny VQ-VAE's shape from the pipeline (pipeline_defaults); one epoch is enough here.
# PatchCore at 64 px (8x8 and 4x4 backbone maps) keeps its memory bank and coreset small.
TINY_METHODS = [
    *(f"--methods.{name}.trainer.max_epochs=1" for name in ("ae", "vae")),
    "--methods.patchcore.model.init_args.input_size=64",
]


def test_methods_join_the_summary_and_the_report(tiny_run: Path, tiny_run_with_methods: Path) -> None:
    run_dir = tiny_run_with_methods  # the default run (no --stages) with the methods on, over a copy of tiny_run
    assert done_mtimes(run_dir) == done_mtimes(tiny_run)  # the finished LSGS stages were skipped, not re-run
    scoring = json.loads((run_dir / "scoring" / "results.json").read_text())
    for name in ("intensity", "pixel_gaussian", "ae", "vae", "patchcore"):
        results = json.loads((run_dir / "methods" / name / "results.json").read_text())
        assert results["method"] == name
        # Same harness settings and the same calibration protocol as LSGS.
        assert results["metric_region"] == scoring["metric_region"]
        assert sorted(p.name for p in (run_dir / "methods" / name / "heatmaps").glob("*.png")) == sorted(
            p.name for p in (run_dir / "scoring" / "heatmaps").glob("*.png"))
    with (run_dir / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], r["kind"]) for r in rows] == [
        ("LSGS", "method"), ("ae", "baseline"), ("intensity", "baseline"), ("patchcore", "baseline"),
        ("pixel_gaussian", "baseline"), ("vae", "baseline")]  # fmt: skip
    assert {r["method"]: r["image_score"] for r in rows if r["method"] in ("LSGS", "patchcore")} == {
        "LSGS": "max", "patchcore": "patchcore (own)"}
    report = (run_dir / "report.html").read_text()
    assert report.count("data:image/png;base64,") >= 2 + 6 * 6  # curves + 6 panels x 6 methods


def nut_test_images(demo_mvtec_root: Path, folder: Path) -> dict[str, Path]:
    """Three test images of the demo's nut category copied into ``folder``: copied name -> original file.

    ``lsgs detect`` names a folder's images after the folder, so a folder named ``nut`` gets the nut statistics
    of the per-category methods."""
    folder.mkdir(parents=True)
    copied = {}
    for source in sorted((demo_mvtec_root / "nut" / "test").glob("*/000.png"))[:3]:
        shutil.copy(source, folder / f"{source.parent.name}.png")
        copied[f"{source.parent.name}.png"] = source
    return copied


def run_detect(run_dir: Path, images: Path, out: Path, method: str) -> list[dict[str, str]]:
    """``lsgs detect --method M`` (the CLI, in-process); the rows of its scores.csv."""
    from lsgs.cli import main as lsgs_main

    lsgs_main(["detect", f"--run_dir={run_dir}", f"--images={images}", f"--method={method}", f"--output={out}",
               "--accelerator=cpu"])  # fmt: skip
    assert len(list((out / "heatmaps").glob("*.png"))) == 3
    with (out / "scores.csv").open() as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("method", ["intensity", "pixel_gaussian", "ae", "vae", "patchcore"])
def test_detect_scores_test_images_as_the_method_s_stage_did(
    tiny_run_with_methods: Path, tmp_path: Path, demo_mvtec_root: Path, method: str
) -> None:
    """``lsgs detect --method M`` on test images of the run gives the scores M's own test stage wrote for them
    (image_scores.csv) and flags them by the stage's calibrated image threshold."""
    run_dir = tiny_run_with_methods
    copied = nut_test_images(demo_mvtec_root, tmp_path / "nut")
    rows = run_detect(run_dir, tmp_path / "nut", tmp_path / "out", method)
    stage = run_dir / "methods" / method
    with (stage / "image_scores.csv").open() as handle:
        tested = {Path(r["path"]).resolve(): float(r["score"]) for r in csv.DictReader(handle)}
    threshold = json.loads((stage / "calibration.json").read_text())["image_threshold"]
    assert [Path(r["path"]).name for r in rows] == sorted(copied)
    for row in rows:
        expected = tested[copied[Path(row["path"]).name].resolve()]
        assert float(row["score"]) == pytest.approx(expected, rel=1e-5), row  # scores.csv keeps 6 digits
        assert int(row["anomalous"]) == int(float(row["score"]) > threshold)


def test_detect_with_lsgs_is_repeatable_and_uses_the_run_s_threshold(
    tiny_run: Path, tmp_path: Path, demo_mvtec_root: Path
) -> None:
    """LSGS samples its restorations per batch, so its detect scores differ from the test stage's (other batches);
    they are repeatable, and flagged by the scoring stage's image threshold."""
    copied = nut_test_images(demo_mvtec_root, tmp_path / "nut")
    first = run_detect(tiny_run, tmp_path / "nut", tmp_path / "out1", "lsgs")
    assert run_detect(tiny_run, tmp_path / "nut", tmp_path / "out2", "lsgs") == first
    threshold = json.loads((tiny_run / "scoring" / "calibration.json").read_text())["image_threshold"]
    assert [Path(r["path"]).name for r in first] == sorted(copied)
    assert all(int(r["anomalous"]) == int(float(r["score"]) > threshold) for r in first)


def test_detect_names_the_finished_methods_when_one_is_missing(
    tiny_run: Path, tmp_path: Path, demo_mvtec_root: Path
) -> None:
    from lsgs.detect import detect
    from lsgs.errors import ConfigError

    nut_test_images(demo_mvtec_root, tmp_path / "nut")
    with pytest.raises(ConfigError, match=r"--method ae: .*finished in this run: \['lsgs'\]"):
        detect(tiny_run, tmp_path / "nut", method="ae")


def test_wandb_offline_runs_grouped_per_stage_without_secrets(
    tiny_run: Path, tmp_path: Path, demo_mvtec_root: Path, data_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """W&B offline (no account): one run per stage in the run's group, in the stage folder; an API key in the
    environment never reaches a file; WANDB_MODE=disabled turns W&B off (CSV logs stay)."""
    secret = "0123456789abcdef-not-a-real-key"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = copy_run(tiny_run, tmp_path)
    # A changed scoring setting re-runs only the scoring stage, now with W&B.
    pipeline_main(tiny_args(demo_mvtec_root, data_cache_dir, run_dir, "--logger=wandb",
                            "--scoring.model.heatmaps_per_category=1"))
    runs = list((run_dir / "scoring" / "wandb").glob("offline-run-*"))
    run_id = json.loads((run_dir / "run.json").read_text())["run_id"]
    digest = json.loads((run_dir / "scoring" / "done.json").read_text())["hash"]
    assert len(runs) == 1 and runs[0].name.endswith(f"demo-mvtec-{run_id}-scoring-{digest[:6]}"), runs
    for path in run_dir.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            assert secret.encode() not in path.read_bytes(), path
    monkeypatch.setenv("WANDB_MODE", "disabled")
    pipeline_main(tiny_args(demo_mvtec_root, data_cache_dir, run_dir, "--logger=wandb",
                            "--scoring.model.heatmaps_per_category=3"))
    assert not (run_dir / "scoring" / "wandb").exists()
    assert (run_dir / "scoring" / "logs" / "metrics.csv").is_file()
