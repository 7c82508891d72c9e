"""Every shipped experiment config parses and plans (every stage's keys validated, nothing runs), and the
recommended CPU configs differ from the paper-faithful ones exactly where the README says."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lsgs.run import parse_experiment, plan_experiment

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "experiments").glob("*.yaml"))


def _plan(config: Path, tmp_path: Path):
    _, namespace = parse_experiment(["--config", str(config), "--run_dir", str(tmp_path / config.stem)])
    return plan_experiment(namespace)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_parses_and_plans(config: Path, tmp_path: Path) -> None:
    """Every shipped experiment plans, and every method it evaluates gets each shared harness argument with the
    scoring stage's value (the signature default when neither sets it), whatever its own method-set entry says."""
    from lsgs.evaluation import AnomalyMapModule
    from lsgs.options import signature_defaults
    from lsgs.run.plan import harness_arguments

    experiment = _plan(config, tmp_path)
    assert "scoring" in experiment.plans and "vqvae" in experiment.plans, config.name
    methods = experiment.method_plans()
    assert methods, config.name  # every shipped experiment evaluates methods beside LSGS
    defaults = signature_defaults(AnomalyMapModule)
    scoring = _init_args(experiment, "scoring")
    for plan in methods:
        init_args = plan.config["model"]["init_args"]
        for name in harness_arguments():
            assert init_args.get(name, defaults[name]) == scoring.get(name, defaults[name]), (plan.spec.name, name)


# A value other than the default for every harness argument (the signature's, read by the test, not the planner's
# list), imposed on the scoring stage; a method entry that says otherwise must still get the scoring stage's.
NON_DEFAULT_HARNESS = {
    "smoothing": False, "smoothing_count_include_pad": False, "val_quantile": 0.95, "image_quantile": 0.9,
    "metric_region": "roi", "metric_bits": 16, "compute_aupro": False, "heatmaps_per_category": 1,
    "heatmap_seed": 7, "image_score": "topk_mean", "image_topk": 0.05,
}  # fmt: skip


def test_every_harness_argument_reaches_every_method(tmp_path: Path) -> None:
    import inspect

    from lsgs.evaluation import AnomalyMapModule

    signature = set(inspect.signature(AnomalyMapModule.__init__).parameters) - {"self", "output_dir", "calibration"}
    assert signature == set(NON_DEFAULT_HARNESS)  # a new harness argument needs a value here
    overrides = [f"--scoring.model.init_args.{k}={str(v).lower() if isinstance(v, bool) else v}"
                 for k, v in NON_DEFAULT_HARNESS.items()]  # fmt: skip
    overrides += ["--methods.ae.model.init_args.val_quantile=0.5", "--methods.ae.model.init_args.metric_bits=12"]
    config = REPO / "experiments" / "demo_mvtec.yaml"
    _, namespace = parse_experiment(["--config", str(config), "--run_dir", str(tmp_path / "run"), *overrides])
    experiment = plan_experiment(namespace)
    methods = experiment.method_plans()
    expected = {f"methods.{m}" for m in ("ae", "vae", "intensity", "pixel_gaussian", "patchcore")}
    assert {p.spec.name for p in methods} >= expected
    for plan in methods:
        init_args = plan.config["model"]["init_args"]
        assert {k: init_args.get(k) for k in NON_DEFAULT_HARNESS} == NON_DEFAULT_HARNESS, plan.spec.name


def _init_args(experiment, stage: str) -> dict:
    return experiment.plans[stage].config["model"]["init_args"]


@pytest.mark.parametrize("recommended", ["mvtec3d_cpu", "mvtec_cpu", "brats_cpu"])
def test_recommended_configs_use_the_studied_scoring(recommended: str, tmp_path: Path) -> None:
    experiment = _plan(REPO / "experiments" / f"{recommended}.yaml", tmp_path)
    scoring = _init_args(experiment, "scoring")
    assert (scoring["map_reference"], scoring["reconstruction_weight"], scoring["nll_quantile"]) == (
        "input", 0.5, 0.9
    )
    # The default method set for images (brats_cpu: for BraTS), as its file declares it.
    method_set = REPO / "experiments" / "methods" / ("brats.yaml" if recommended.startswith("brats") else "images.yaml")
    assert {p.split(".", 1)[1] for p in experiment.plans if p.startswith("methods.")} == set(
        yaml.safe_load(method_set.read_text())
    )
    # Same models and budget as the development-set configuration the study trained.
    base = _plan(REPO / "experiments" / "mvtec3d.yaml", tmp_path)
    for stage in ("vqvae", "transformer"):
        mine = {k: v for k, v in _init_args(experiment, stage).items() if k != "in_channels"}
        theirs = {k: v for k, v in _init_args(base, stage).items() if k != "in_channels"}
        assert mine == theirs, (recommended, stage)


@pytest.mark.parametrize("paper", ["mvtec", "brats"])
def test_paper_configs_keep_the_paper_scoring_and_loss(paper: str, tmp_path: Path) -> None:
    experiment = _plan(REPO / "experiments" / f"{paper}.yaml", tmp_path)
    scoring = _init_args(experiment, "scoring")
    assert (scoring["map_reference"], scoring["reconstruction_weight"]) == ("reconstruction", 0.0)
    assert _init_args(experiment, "transformer")["loss_reduction"] == "sum"  # Eq. 6
    vqvae = _init_args(experiment, "vqvae")
    assert not vqvae["ema_decay"] and not vqvae["dead_code_threshold"] and not vqvae["l2_normalize"]


def test_the_old_methods_key_is_refused_in_one_line(tmp_path: Path) -> None:
    """An experiment in the form before methods were called methods stops with one line naming the new key
    (the only place besides the refusal itself that spells the old word: tests/test_architecture.py)."""
    from lsgs.errors import ConfigError

    nested, dotted = tmp_path / "nested.yaml", tmp_path / "dotted.yaml"
    nested.write_text("baselines:\n  ae:\n    model: null\n")
    dotted.write_text("baselines.ae.model: null\n")
    cases = {
        ("--config", str(nested)): rf"^{nested}: the key 'baselines' is now 'methods' \(rename it\)$",
        (f"--config={dotted}",): rf"^{dotted}: the key 'baselines' is now 'methods' \(rename it\)$",
        ("--run_baselines=false",): r"^--run_baselines: 'baselines' is now 'methods' \(--run_methods\)$",
        ("--stages=[baselines]",): r"^--stages: 'baselines' is now 'methods' \(--stages\)$",
        ("--baselines.ae.model=null",): r"^--baselines.ae.model: 'baselines' is now 'methods' \(--methods.ae.model\)$",
    }
    for argv, match in cases.items():
        with pytest.raises(ConfigError, match=match):
            parse_experiment([*argv, "--run_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()

