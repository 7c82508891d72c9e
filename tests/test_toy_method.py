"""A method added from outside ``lsgs`` (tests/toy_method.py: one class plus one config entry) runs through
``lsgs pipeline``, ``lsgs detect --method toy`` and ``lsgs report`` with no edit to any ``lsgs`` file."""

from __future__ import annotations

import ast
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from test_pipeline import REPO, STAGES, TINY_METHODS, copy_run, nut_test_images, run_detect, tiny_args
from toy_method import TOY_CONFIG, TRAIN_MEAN, MeanDifference, toy_map

from lsgs.methods import BUILTIN_METHODS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def toy_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory, demo_mvtec_root: Path, data_cache_dir: Path):
    """A copy of the tiny run plus the toy method (the built-in methods switched off), through ``lsgs``'s CLI."""
    from lsgs.cli import main as lsgs_main

    folder = tmp_path_factory.mktemp("toy")
    run_dir = copy_run(tiny_run, folder)
    config = folder / "toy.yaml"
    config.write_text(TOY_CONFIG)
    no_builtins = [f"--methods.{name}.model=null" for name in BUILTIN_METHODS]
    # The toy section comes from its own config file; an override of it from the command line must work too.
    args = tiny_args(demo_mvtec_root, data_cache_dir, run_dir, "--config", str(config), *no_builtins,
                     "--run_methods=true", "--stages=[methods]")
    lsgs_main(["pipeline", *args])
    return run_dir


def test_the_pipeline_evaluates_the_toy_method_with_the_shared_harness(toy_run: Path, demo_mvtec_root) -> None:
    stage = toy_run / "methods" / "toy"
    results = json.loads((stage / "results.json").read_text())
    assert results["method"] == "toy" and json.loads((stage / "done.json").read_text())["stage"] == "methods.toy"
    assert sorted(p.name for p in (toy_run / "methods").iterdir()) == ["toy"]
    # Same harness settings as LSGS (copied from the scoring stage), and the image AUROC equals a recomputation
    # from the image scores the stage wrote.
    scoring = json.loads((toy_run / "scoring" / "results.json").read_text())
    assert results["metric_region"] == scoring["metric_region"]
    from sklearn.metrics import roc_auc_score

    with (stage / "image_scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 30
    labels, scores = [int(r["label"]) for r in rows], [float(r["score"]) for r in rows]
    assert results["pooled"]["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_detect_with_the_toy_method_gives_the_maxima_of_its_maps(
    toy_run: Path, tmp_path: Path, demo_mvtec_root: Path
) -> None:
    """scores.csv equals the maximum of the toy map computed here from the image files and the learned mean,
    smoothed as the harness does (MinPool 3x3, AvgPool 7x7)."""
    from data_modules import ImageFolderDataModule
    from lsgs.nn.restoration import smooth_anomaly_map

    stage = toy_run / "methods" / "toy"
    calibration = json.loads((stage / "calibration.json").read_text())
    harness = yaml.safe_load((stage / "config.yaml").read_text())["model"]["init_args"]
    copied = nut_test_images(demo_mvtec_root, tmp_path / "nut")
    rows = run_detect(toy_run, tmp_path / "nut", tmp_path / "out", "toy")
    data = ImageFolderDataModule(root=str(tmp_path / "nut"), channels=3, image_size=32, batch_size=8)
    data.setup("predict")
    batch = next(iter(data.predict_dataloader()))
    raw = toy_map(batch["image"], calibration[TRAIN_MEAN])  # [B, 1, H, W]; ROI: the whole image
    maps = smooth_anomaly_map(raw, count_include_pad=harness["smoothing_count_include_pad"])
    expected = dict(zip([Path(p).name for p in batch["path"]], maps.flatten(1).max(dim=1).values.tolist()))
    assert [Path(r["path"]).name for r in rows] == sorted(copied)
    for row in rows:
        assert float(row["score"]) == pytest.approx(expected[Path(row["path"]).name], rel=1e-5), row
        assert int(row["anomalous"]) == int(float(row["score"]) > calibration["image_threshold"])


def test_the_learned_mean_is_the_mean_of_the_training_images(toy_run: Path) -> None:
    """The toy's one learned number, recomputed by brute force over the training split of the stage's data."""
    import yaml

    from lsgs.stage_cli import instantiate_stage

    config = yaml.safe_load((toy_run / "methods" / "toy" / "config.yaml").read_text())
    config["trainer"].update(logger=False, callbacks=[], enable_checkpointing=False, default_root_dir=None)
    config["model"]["init_args"]["output_dir"] = None
    datamodule = instantiate_stage(config).datamodule
    datamodule.setup("test")
    images = torch.cat([b["image"].double() for b in datamodule.train_eval_dataloader()])
    calibration = json.loads((toy_run / "methods" / "toy" / "calibration.json").read_text())
    assert calibration[TRAIN_MEAN] == pytest.approx(float(images.mean()), rel=1e-12)


def test_the_report_lists_the_toy_row(toy_run: Path, tmp_path: Path) -> None:
    from lsgs.cli import main as lsgs_main

    run_dir = tmp_path / "run"
    shutil.copytree(toy_run, run_dir)
    (run_dir / "summary.csv").unlink()
    lsgs_main(["report", f"--run_dir={run_dir}"])
    with (run_dir / "summary.csv").open() as handle:
        rows = {r["method"]: r for r in csv.DictReader(handle)}
    assert list(rows) == ["LSGS", "toy"] and rows["toy"]["kind"] == "method"
    results = json.loads((run_dir / "methods" / "toy" / "results.json").read_text())
    which = "mean" if len(results["per_category"]) > 1 else "pooled"
    for key in ("pixel_auroc", "pixel_ap", "image_auroc"):
        assert float(rows["toy"][key]) == results[which][key], key
    assert "<td>toy</td><td>method</td>" in (run_dir / "report.html").read_text()


# What a method defined outside lsgs may import: the public API (the names of ``lsgs.evaluation.__all__``, from
# that package itself, not from its internal modules), torch and typing (and their submodules).
PUBLIC_PACKAGE = "lsgs.evaluation"
OTHER_ALLOWED = ("torch", "typing", "__future__")


def imports_of(path: Path) -> set[str]:
    """Every import of ``path``, wherever it is (``ast``): ``import a.b`` -> ``a.b``; ``from a.b import c`` ->
    ``a.b:c`` (relative imports with their dots)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            found |= {f"{module}:{alias.name}" for alias in node.names}
    return found


def only_public_imports(path: Path) -> list[str]:
    """The imports of ``path`` outside the public API: anything from lsgs other than a name of
    ``lsgs.evaluation.__all__`` taken from ``lsgs.evaluation``, and any other package than OTHER_ALLOWED."""
    import lsgs.evaluation

    def allowed(item: str) -> bool:
        module, _, name = item.partition(":")
        if module == PUBLIC_PACKAGE:
            return name in lsgs.evaluation.__all__
        return any(module == p or module.startswith(p + ".") for p in OTHER_ALLOWED)

    return sorted(item for item in imports_of(path) if not allowed(item))


def test_the_toy_class_is_a_harness_subclass_using_the_public_api_only(tmp_path: Path) -> None:
    from lsgs.evaluation import AnomalyMapModule

    assert issubclass(MeanDifference, AnomalyMapModule) and MeanDifference.__module__ == "toy_method"
    assert only_public_imports(Path(__file__).with_name("toy_method.py")) == []
    # The check sees a reach into lsgs internals, wherever the import is.
    source = tmp_path / "mine.py"
    source.write_text("import torch.nn\nfrom lsgs.evaluation import AnomalyMapModule\nfrom lsgs.evaluationx import y\n"
                      "def f():\n    from lsgs.nn.restoration import smooth_anomaly_map\n    import numpy\n"
                      "from . import sibling\nfrom lsgs.evaluation.outputs import gather_lists\n"
                      "from lsgs.evaluation import harness\nimport lsgs.evaluation\n")  # fmt: skip
    assert only_public_imports(source) == [
        ".:sibling", "lsgs.evaluation", "lsgs.evaluation.outputs:gather_lists", "lsgs.evaluation:harness",
        "lsgs.evaluationx:y", "lsgs.nn.restoration:smooth_anomaly_map", "numpy",
    ]  # fmt: skip


def test_a_method_added_to_the_default_set_runs_with_the_built_ins(
    tiny_run_with_methods: Path,
    tmp_path: Path,
    demo_mvtec_root: Path,
    data_cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A built-in addition to the default set changes three files (README, "Methods"): its module (here
    tests/toy_method.py), one line of BUILTIN_METHODS (patched here), one entry of the default method-set file (a
    copy of experiments/methods/images.yaml, which a copy of the demo experiment composes with ``methods:``). The
    default command then evaluates it beside the other methods, with no argument naming it."""
    from lsgs.methods.registry import builtin_method_names
    from lsgs.pipeline import main as pipeline_main

    monkeypatch.setitem(BUILTIN_METHODS, "toy", "toy_method.MeanDifference")
    experiments = tmp_path / "experiments"
    (experiments / "methods").mkdir(parents=True)
    shutil.copy(REPO / "experiments" / "demo_mvtec.yaml", experiments / "demo_mvtec.yaml")
    entry = "toy:\n  model:\n    class_path: toy_method.MeanDifference\n"
    (experiments / "methods" / "images.yaml").write_text((REPO / "experiments" / "methods" / "images.yaml").read_text()
                                                         + entry)  # fmt: skip
    run_dir = copy_run(tiny_run_with_methods, tmp_path)
    finished = sorted(p.parent for p in run_dir.glob("**/done.json"))
    before = {p: (p / "done.json").stat().st_mtime_ns for p in finished}
    args = tiny_args(demo_mvtec_root, data_cache_dir, run_dir, "--run_methods=true", *TINY_METHODS)
    args[args.index(str(REPO / "experiments" / "demo_mvtec.yaml"))] = str(experiments / "demo_mvtec.yaml")
    assert not any("toy" in argument for argument in args)
    pipeline_main(args)
    assert builtin_method_names()[-1] == "toy"
    results = json.loads((run_dir / "methods" / "toy" / "results.json").read_text())
    assert results["method"] == "toy" and results["kind"] == "method"
    # LSGS and the other methods finished earlier with the same configs: skipped, not re-run.
    assert {p: (p / "done.json").stat().st_mtime_ns for p in finished} == before
    assert {p.name for p in finished} >= {*STAGES, "intensity", "pixel_gaussian", "ae", "vae"}
    with (run_dir / "summary.csv").open() as handle:
        rows = {r["method"]: r["kind"] for r in csv.DictReader(handle)}
    assert set(rows) == {"LSGS", "toy", *(p.name for p in finished if p.name not in STAGES)}
    assert rows["toy"] == "method" and rows["ae"] == "baseline"


def test_method_names_come_from_config_files_and_the_command_line(tmp_path: Path) -> None:
    from lsgs.errors import ConfigError
    from lsgs.methods.registry import discover_method_names

    nested, dotted = tmp_path / "nested.yaml", tmp_path / "dotted.yaml"
    nested.write_text(TOY_CONFIG)
    dotted.write_text("methods.zeta.model: {class_path: toy_method.MeanDifference}\n")
    argv = ["--config", str(nested), f"-c={dotted}", "--methods.alpha.trainer.max_epochs=1",
            "--methods.ae.model=null"]  # fmt: skip
    assert discover_method_names(argv) == [*BUILTIN_METHODS, "alpha", "toy", "zeta"]
    assert discover_method_names([]) == list(BUILTIN_METHODS)
    with pytest.raises(ConfigError, match="method name 'lsgs'"):
        discover_method_names(["--methods.lsgs.model=null"])
