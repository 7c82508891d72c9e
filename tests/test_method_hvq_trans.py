"""HVQ-Trans on the harness (``lsgs.methods.hvq_trans``): through ``lsgs pipeline``, ``lsgs detect``, ``lsgs report``
and the summary; the per-class switch at method level; the feature cache in ``fit``; the DDP strategy check; the
paper configuration on CPU with a B4 weight file of the right names. The network itself is tested in
``test_hvq_trans_net.py`` and ``test_hvq_trans_ddp.py``."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from sklearn.metrics import roc_auc_score
from test_pipeline import REPO, copy_run, nut_test_images, run_detect

from data_modules import FolderDataModule, MVTecDataModule
from lsgs.errors import ConfigError, DataError
from lsgs.methods.feature_method import ALL_CATEGORIES
from lsgs.methods.hvq_trans import HVQTransMethod, check_ddp_strategy
from lsgs.nn.backbone import FeatureExtractor

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# The method at the size of TINY_HVQ, built directly (in-process fits): 32 px, a 2 x 2 token grid.
TINY_KWARGS = {
    "weights": None, "input_size": 32, "hidden_dim": 16, "nhead": 2, "num_encoder_layers": 1,
    "num_decoder_layers": 1, "dim_feedforward": 32, "codebook_size": 8, "dropout": 0.0, "image_score_pool": 4,
}  # fmt: skip


def test_hvq_trans_runs_through_the_pipeline_into_the_summary_and_the_report(
    tiny_run_with_hvq: Path, tiny_run_with_methods: Path
) -> None:
    stage = tiny_run_with_hvq / "methods" / "hvq_trans"
    for name in ("intensity", "pixel_gaussian", "ae", "vae", "patchcore"):  # finished earlier: skipped
        done = tiny_run_with_hvq / "methods" / name / "done.json"
        assert done.read_text() == (tiny_run_with_methods / "methods" / name / "done.json").read_text()
    results = json.loads((stage / "results.json").read_text())
    scoring = json.loads((tiny_run_with_hvq / "scoring" / "results.json").read_text())
    assert (results["method"], results["kind"], results["image_score"]) == ("hvq_trans", "method", "pooled max (own)")
    # One model for the three categories of the demo (each has normals of its own): one class each.
    info = results["method_info"]
    assert info["categories"] == ["fabric", "mesh", "nut"] and info["input_size"] == 64
    assert info["backbone"]["name"] == "lite0" and info["backbone"]["weights"] == "random"
    assert results["metric_region"] == scoring["metric_region"] and results["num_test_images"] == 30
    assert sorted(p.name for p in (stage / "heatmaps").glob("*.png")) == sorted(
        p.name for p in (tiny_run_with_hvq / "scoring" / "heatmaps").glob("*.png"))  # fmt: skip
    with (stage / "image_scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    for category in ("fabric", "mesh", "nut"):  # the image AUROC is that of the scores the stage wrote
        chosen = [r for r in rows if r["category"] == category]
        expected = roc_auc_score([int(r["label"]) for r in chosen], [float(r["score"]) for r in chosen])
        assert results["per_category"][category]["image_auroc"] == pytest.approx(expected, abs=1e-12)
    # Its learned state is the training checkpoint: the net, its classes, and "fitted".
    checkpoint = torch.load(stage / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["lsgs"]["categories"] == ["fabric", "mesh", "nut"] and bool(checkpoint["state_dict"]["fitted"])
    assert {f"net.output_projections.{i}.weight" for i in range(3)} <= set(checkpoint["state_dict"])
    assert checkpoint["state_dict"]["net.quantizers.0.codebook"].shape == (3, 8, 16)
    # The summary and the report have its row, labelled with its kind and its own image score.
    with (tiny_run_with_hvq / "summary.csv").open() as handle:
        summary = {r["method"]: r for r in csv.DictReader(handle)}
    assert list(summary)[:2] == ["LSGS", "hvq_trans"] and summary["hvq_trans"]["kind"] == "method"
    assert summary["hvq_trans"]["image_score"] == "pooled max (own)"
    assert float(summary["hvq_trans"]["pixel_auroc"]) == results["mean"]["pixel_auroc"]
    assert "<td>hvq_trans</td><td>method</td>" in (tiny_run_with_hvq / "report.html").read_text()


def test_lsgs_report_rewrites_the_summary_with_hvq_trans(tiny_run_with_hvq: Path, tmp_path: Path) -> None:
    from lsgs.cli import main as lsgs_main

    run_dir = copy_run(tiny_run_with_hvq, tmp_path)
    (run_dir / "summary.csv").unlink()
    (run_dir / "report.html").unlink()
    lsgs_main(["report", f"--run_dir={run_dir}"])
    with (run_dir / "summary.csv").open() as handle:
        assert "hvq_trans" in [r["method"] for r in csv.DictReader(handle)]
    report = (run_dir / "report.html").read_text()
    assert "<td>hvq_trans</td><td>method</td>" in report
    assert report.count("data:image/png;base64,") >= 2 + 6 * 7  # curves + 6 panels x 7 methods


def test_detect_scores_test_images_as_the_stage_did(
    tiny_run_with_hvq: Path, tmp_path: Path, demo_mvtec_root: Path
) -> None:
    """``lsgs detect --method hvq_trans`` takes the category from the folder name (``nut``: the nut codebooks)
    and gives the scores the test stage wrote, flagged by the stage's image threshold."""
    stage = tiny_run_with_hvq / "methods" / "hvq_trans"
    copied = nut_test_images(demo_mvtec_root, tmp_path / "nut")
    rows = run_detect(tiny_run_with_hvq, tmp_path / "nut", tmp_path / "out", "hvq_trans")
    with (stage / "image_scores.csv").open() as handle:
        tested = {Path(r["path"]).resolve(): float(r["score"]) for r in csv.DictReader(handle)}
    threshold = json.loads((stage / "calibration.json").read_text())["image_threshold"]
    assert [Path(r["path"]).name for r in rows] == sorted(copied)
    for row in rows:
        assert float(row["score"]) == pytest.approx(tested[copied[Path(row["path"]).name].resolve()], rel=1e-5)
        assert int(row["anomalous"]) == int(float(row["score"]) > threshold)
    # Another class's codebooks and projection give other scores: the folder name did choose the class.
    shutil.copytree(tmp_path / "nut", tmp_path / "fabric")
    other = run_detect(tiny_run_with_hvq, tmp_path / "fabric", tmp_path / "out-fabric", "hvq_trans")
    assert [float(r["score"]) for r in other] != pytest.approx([float(r["score"]) for r in rows], rel=1e-3)


def test_detect_with_an_unknown_category_is_a_one_line_error(
    tiny_run_with_hvq: Path, tmp_path: Path, demo_mvtec_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lsgs.cli import main as lsgs_main

    nut_test_images(demo_mvtec_root, tmp_path / "screws")
    with pytest.raises(SystemExit) as stop:
        lsgs_main(["detect", f"--run_dir={tiny_run_with_hvq}", f"--images={tmp_path / 'screws'}", "--method=hvq_trans",
                   f"--output={tmp_path / 'out'}", "--accelerator=cpu"])  # fmt: skip
    assert stop.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'screws'" in errors[0] and "['fabric', 'mesh', 'nut']" in errors[0], errors


# ------------------------------------------------------------------------------------------- the class switch
def attach(method: HVQTransMethod, datamodule) -> HVQTransMethod:
    """``method`` set up for testing on ``datamodule`` as a trainer would (no trainer run needed)."""
    method._trainer = SimpleNamespace(datamodule=datamodule, strategy=SingleDeviceStrategy("cpu"))
    method.setup("test")
    return method


def folder_data(demo_mvtec_root: Path, root: Path, cache: Path) -> FolderDataModule:
    """A folder data set of the demo's fabric images: normals in ``good/``, two defect folders with masks."""
    fabric = demo_mvtec_root / "fabric"
    for p in sorted((fabric / "train" / "good").glob("*.png")):
        (root / "good").mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / "good" / p.name)
    for defect in ("hole", "color"):
        (root / defect).mkdir(parents=True)
        for p in sorted((fabric / "test" / defect).glob("*.png")):
            shutil.copy(p, root / defect / p.name)
            shutil.copy(fabric / "ground_truth" / defect / f"{p.stem}_mask.png", root / defect / f"{p.stem}_mask.png")
    return FolderDataModule(str(root), normal_dir="good", abnormal_dir=["hole", "color"], mask_suffix="_mask",
                            image_size=32, cache_dir=str(cache))  # fmt: skip


def test_the_classes_are_the_categories_with_normals_of_their_own(
    demo_mvtec_root: Path, data_cache_dir: Path, tmp_path: Path
) -> None:
    mvtec = MVTecDataModule(str(demo_mvtec_root), category=["nut", "fabric"], image_size=32,
                            cache_dir=str(data_cache_dir))
    method = attach(HVQTransMethod(**TINY_KWARGS), mvtec)
    assert method.categories == ["nut", "fabric"] and method.net.config.num_classes == 2  # the data module's order
    batch = {"image": torch.zeros(3, 3, 32, 32), "category": ["nut", "fabric", "nut"]}
    assert method.category_indices(batch).tolist() == [0, 1, 0]
    with pytest.raises(DataError, match=r"no class for category \['mesh'\]; it was trained on \['nut', 'fabric'\]"):
        method.category_indices({**batch, "category": ["nut", "mesh", "nut"]})
    # A folder data set: its categories (defect folders) share one population of normals, so one class that
    # serves an image of any category.
    folder = folder_data(demo_mvtec_root, tmp_path / "folder", data_cache_dir)
    assert folder.test_categories == ["hole", "color"]
    method = attach(HVQTransMethod(**TINY_KWARGS), folder)
    assert method.categories == [ALL_CATEGORIES] and method.net.config.num_classes == 1
    assert method.category_indices({**batch, "category": ["hole", "color", "anything"]}).tolist() == [0, 0, 0]


def test_plain_ddp_with_several_classes_stops_in_one_line() -> None:
    with pytest.raises(ConfigError) as error:
        check_ddp_strategy(DDPStrategy(), ["fabric", "nut"])
    message = str(error.value)
    assert "\n" not in message and "--trainer.strategy=ddp_find_unused_parameters_true" in message
    check_ddp_strategy(DDPStrategy(find_unused_parameters=True), ["fabric", "nut"])  # what the official code does
    check_ddp_strategy(DDPStrategy(), [ALL_CATEGORIES])  # one class: every parameter is used in every step
    check_ddp_strategy(SingleDeviceStrategy("cpu"), ["fabric", "nut"])


# ------------------------------------------------------------------------------------------- the feature cache
class BackboneCalls:
    """Counts ``FeatureExtractor.forward`` calls (images seen) while installed with ``monkeypatch``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.images = 0
        original = FeatureExtractor.forward

        def counting(extractor: FeatureExtractor, images: torch.Tensor) -> list[torch.Tensor]:
            self.images += len(images)
            return original(extractor, images)

        monkeypatch.setattr(FeatureExtractor, "forward", counting)


def fit_tiny(demo_mvtec_root: Path, cache: Path, **data_kwargs) -> HVQTransMethod:
    """Two epochs of the tiny method on the demo's nut category (no validation loop)."""
    datamodule = MVTecDataModule(str(demo_mvtec_root), category=["nut"], image_size=32, batch_size=4,
                                 eval_batch_size=8, cache_dir=str(cache), **data_kwargs)  # fmt: skip
    torch.manual_seed(0)
    method = HVQTransMethod(**TINY_KWARGS)
    trainer = Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(method, datamodule=datamodule)
    return method


def test_training_reads_the_backbone_features_from_the_cache_built_once(
    demo_mvtec_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls = BackboneCalls(monkeypatch)
    method = fit_tiny(demo_mvtec_root, tmp_path)
    train = method.trainer.datamodule.dataset("train_eval")
    assert calls.images == len(train)  # the cache build: each training image once, for both epochs
    # The cached rows are the features the backbone gives each training image (batch["index"] picks them).
    batch = next(iter(method.trainer.datamodule.train_dataloader()))
    torch.testing.assert_close(method._batch_features(batch, cached=True), method.aligned_features(batch["image"]))
    # A second fit (a new method, data module and trainer) reads the entry: no backbone pass at all.
    calls.images = 0
    fit_tiny(demo_mvtec_root, tmp_path)
    assert calls.images == 0
    # Augmented training images change every epoch: no cache, the backbone runs on every training batch, and a
    # line says why.
    capsys.readouterr()
    fit_tiny(demo_mvtec_root, tmp_path, train_transforms=[{"name": "HorizontalFlip", "p": 0.5}])
    assert calls.images == 2 * len(train)
    assert "train_transforms change the training pixels every epoch" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- the paper config
def random_b4_file(path: Path) -> Path:
    """A state dict of EfficientNet-B4 with random values under EfficientNet-PyTorch's names (flat ``_blocks.N``,
    head included), as the real ImageNet file has them; nothing is downloaded."""
    nested = FeatureExtractor("b4", (2, 4, 8, 16)).net.state_dict()
    flat = {re.sub(r"^_blocks\.\d+\.(\d+)\.", r"_blocks.\1.", key): value for key, value in nested.items()}
    assert len(flat) == len(nested) and "_blocks.31._bn2.weight" in flat and "_fc.weight" in flat
    torch.save(flat, path)
    return path


def test_the_paper_config_builds_and_runs_a_training_and_a_scoring_step_on_cpu(tmp_path: Path) -> None:
    from lsgs.run import parse_experiment, plan_experiment

    weights = random_b4_file(tmp_path / "efficientnet-b4.pth")
    _, config = parse_experiment([
        "--config", str(REPO / "experiments" / "hvq_trans.yaml"), f"--run_dir={tmp_path / 'run'}",
        "--methods.hvq_trans.model.init_args.pretrained=false",
        f"--methods.hvq_trans.model.init_args.weights={weights}",
    ])  # fmt: skip
    plan = plan_experiment(config).plans["methods.hvq_trans"].config
    assert plan["data"]["init_args"]["category"] == "all" and plan["data"]["init_args"]["batch_size"] == 16
    assert plan["data"]["init_args"]["model_input_size"] == 224
    trainer = plan["trainer"]
    assert (trainer["max_epochs"], trainer["gradient_clip_val"], trainer["strategy"]) == (
        1000, 0.1, "ddp_find_unused_parameters_true")  # fmt: skip
    init_args = {**plan["model"]["init_args"], "output_dir": None}
    method = HVQTransMethod(**init_args)
    categories = ["bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
                  "screw", "tile", "toothbrush", "transistor", "wood", "zipper"]  # fmt: skip
    method._build(categories)  # the classes setup() takes from MVTec AD's 15 categories
    net = method.net
    assert method.backbone.channels == (24, 32, 56, 160) and net.config.feature_dim == 272
    assert net.config.token_grid == (14, 14) and net.config.num_classes == 15
    assert (net.config.hidden_dim, net.config.codebook_size, net.config.dropout) == (256, 512, 0.1)
    optimizers = method.configure_optimizers()
    optimizer, schedule = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["weight_decay"] == 1e-4
    assert optimizer.defaults["lr"] == 1e-4 and (schedule.step_size, schedule.gamma) == (800, 0.1)
    # One training step on two images of two classes.
    batch = {"image": torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)),
             "category": ["screw", "bottle"], "index": torch.tensor([0, 1])}  # fmt: skip
    method.train()
    out = net([method.aligned_features(batch["image"])], method.category_indices(batch))
    loss = net.loss(out)
    screw = categories.index("screw")
    before = net.output_projections[screw].weight.detach().clone()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), trainer["gradient_clip_val"])
    optimizer.step()
    assert torch.isfinite(loss) and not torch.equal(before, net.output_projections[screw].weight)
    assert net.output_projections[categories.index("carpet")].weight.grad is None  # absent from the batch: no gradient
    # One scoring step: the map at the input size and the official pooled-max image score.
    method.eval()
    method.fitted.fill_(True)
    maps, extras = method.raw_anomaly_map(batch)
    assert maps.shape == (2, 1, 224, 224) and extras["image_score"].shape == (2,)
    assert torch.isfinite(maps).all() and torch.isfinite(extras["image_score"]).all()
