"""Stage 5 LightningModule ``ScoringModule``: calibration on validation normals only (checked against numpy), 2-process
DDP on an odd-sized test set, the three attention settings, restoration of an implanted foreign patch, the output
files, reused calibration, prediction, the harness options and every user error."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import seed_everything
from sklearn.metrics import roc_auc_score
from test_module_vqvae import make_trainer, mvtec_datamodule
from torch.utils.data import Dataset

import lsgs.modules.scoring as scoring_module
from data_modules import MVTecDataModule
from lsgs.distributed import spawn_teardown_callback
from lsgs.errors import CheckpointError, ConfigError
from lsgs.layout import StageLayout, evaluation_files
from lsgs.metrics.histogram import bin_of_threshold, threshold_of_bin
from lsgs.metrics.quantile import score_quantile
from lsgs.modules import CausalTransformer, CodebookAggregator, GlobalTransformer, ScoringModule
from lsgs.nn.restoration import code_nll, smooth_anomaly_map

BITS = 16
TEST_IMAGES = 30  # 3 categories x (2 good + 4 defects x 2)
TRANSFORMER = {"d_model": 32, "n_layers": 1, "n_heads": 2, "dropout": 0.0, "lr": 3e-3, "warmup_steps": 5}


# ----------------------------------------------------------------------------------------------- data wrappers
class CountingDataset(Dataset):
    """A split that counts its item reads; ``roi_columns`` (if set) limits the roi to the first columns."""

    def __init__(self, base: Any, roi_columns: int | None = None) -> None:
        self.base, self.roi_columns, self.reads = base, roi_columns, 0
        self.items = base.items  # for the heatmap selection

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        self.reads += 1
        item = self.base[index]
        if self.roi_columns is not None:
            roi = torch.zeros_like(item["roi"])
            roi[..., : self.roi_columns] = 1.0
            item = {**item, "roi": roi}
        return item


class InstrumentedMVTec(MVTecDataModule):
    """Counts reads of the test and validation splits; validation normals get a left-half roi (so the
    threshold must use roi pixels only to match the reference)."""

    def dataset(self, split: str) -> Any:
        wrapped = self.__dict__.setdefault("_wrapped", {})
        if split not in ("val", "test"):
            return super().dataset(split)
        if split not in wrapped:
            wrapped[split] = CountingDataset(super().dataset(split), 16 if split == "val" else None)
        return wrapped[split]


class OddSplits(MVTecDataModule):
    """The demo test set minus its last image (29 images, split 15 / 14 over two ranks) and a single validation
    normal (so the second of two ranks calibrates on no image at all)."""

    def _make_splits(self, entries: list[Path]) -> dict[str, list]:
        splits = dict(super()._make_splits(entries))
        splits["test"] = splits["test"][:-1]
        splits["val"] = splits["val"][:1]
        return splits


class RecordingScoring(ScoringModule):
    """Records how many test and validation items were read while calibrating."""

    def calibrate(self) -> dict[str, float]:
        datamodule = self.trainer.datamodule
        test, val = datamodule.dataset("test"), datamodule.dataset("val")
        before = (test.reads, val.reads)
        calibration = super().calibrate()
        self.calibration_reads = {"test": test.reads - before[0], "val": val.reads - before[1]}
        return calibration


# ----------------------------------------------------------------------------------------------- fixtures
@dataclass
class Models:
    stage1: Path  # learned codebook
    vqvae: Path  # aggregated codebook: the VQ-VAE the transformers were trained on
    global_transformer: Path
    causal_transformer: Path


@pytest.fixture(scope="module")
def datamodule(demo_mvtec_root: Path, data_cache_dir: Path) -> MVTecDataModule:
    return mvtec_datamodule(demo_mvtec_root, data_cache_dir)


@pytest.fixture(scope="module")
def models(
    tmp_path_factory: pytest.TempPathFactory, datamodule: MVTecDataModule, tiny_vqvae: tuple[Path, Any]
) -> Models:
    """Stages 1 (the session's tiny VQ-VAE), 2 and 4 on the demo data; the global transformer trains long enough
    to know normal codes."""
    out = tmp_path_factory.mktemp("models")
    aggregator = CodebookAggregator(str(tiny_vqvae[0]), output_dir=str(out))
    make_trainer(out).predict(aggregator, datamodule=datamodule, return_predictions=False)
    paths = {}
    for attention, epochs in (("global", 15), ("causal", 1)):
        seed_everything(0, verbose=False)
        model = {"global": GlobalTransformer, "causal": CausalTransformer}[attention](
            str(StageLayout.of(out).aggregated_checkpoint), **TRANSFORMER
        )
        trainer = make_trainer(out, max_epochs=epochs)
        trainer.fit(model, datamodule=datamodule)
        paths[attention] = out / f"{attention}.ckpt"
        trainer.save_checkpoint(paths[attention], weights_only=True)
    return Models(tiny_vqvae[0], StageLayout.of(out).aggregated_checkpoint, paths["global"], paths["causal"])


@dataclass
class Scored:
    module: RecordingScoring
    datamodule: InstrumentedMVTec
    output_dir: Path


@pytest.fixture(scope="module")
def scored(
    tmp_path_factory: pytest.TempPathFactory, models: Models, demo_mvtec_root: Path, data_cache_dir: Path
) -> Scored:
    """One full ``trainer.test`` of the LSGS scorer with output files (read-only)."""
    out = tmp_path_factory.mktemp("scoring")
    datamodule = mvtec_datamodule(demo_mvtec_root, data_cache_dir, cls=InstrumentedMVTec)
    module = RecordingScoring(
        str(models.vqvae),
        str(models.global_transformer),
        num_restorations=5,
        nll_quantile=0.8,
        val_quantile=0.95,
        image_quantile=0.5,
        metric_bits=BITS,
        output_dir=str(out),
    )
    make_trainer(out).test(module, datamodule=datamodule, verbose=False)
    return Scored(module, datamodule, out)


def bin_edge_quantile(values: np.ndarray, q: float) -> float:
    """numpy's ``lower`` quantile rounded down to its histogram bin edge: what ``ScoreQuantile`` documents."""
    return threshold_of_bin(bin_of_threshold(float(np.quantile(values, q, method="lower")), BITS), BITS)


# ----------------------------------------------------------------------------------------------- errors
def test_a_transformer_of_another_vqvae_is_rejected(models: Models) -> None:
    with pytest.raises(CheckpointError) as error:
        ScoringModule(str(models.stage1), str(models.global_transformer))
    message = str(error.value)
    assert "trained on the codes of another VQ-VAE" in message
    assert str(models.global_transformer) in message and str(models.stage1) in message


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"vqvae_checkpoint": None}, ConfigError, "model.vqvae_checkpoint is required"),
        ({"num_restorations": 0}, ConfigError, "^model.num_restorations=0 must be an int >= 1$"),
        ({"nll_quantile": 1.0}, ConfigError, r"^model.nll_quantile=1.0 must be a number in \(0, 1\)$"),
        ({"nll_quantile": 0.0}, ConfigError, r"^model.nll_quantile=0.0 must be a number in \(0, 1\)$"),
        ({"val_quantile": 1.0}, ConfigError, r"^model.val_quantile=1.0 must be a number in \(0, 1\)$"),
        ({"image_quantile": 0.0}, ConfigError, r"^model.image_quantile=0.0 must be a number in \(0, 1\)$"),
        ({"metric_region": "mask"}, ConfigError, r"^model.metric_region=\"mask\" must be one of \['all', 'roi'\]$"),
        ({"calibration": "/nonexistent/calibration.json"}, ConfigError, "model.calibration: file"),
        (
            {"transformer_checkpoint": "VQVAE"},
            CheckpointError,
            "model.transformer_checkpoint: .* is a 'vqvae'",
        ),
    ],
)
def test_bad_settings(kwargs: dict[str, Any], error: type, match: str, models: Models) -> None:
    arguments: dict[str, Any] = {"vqvae_checkpoint": str(models.vqvae), **kwargs}
    if arguments.get("transformer_checkpoint") == "VQVAE":
        arguments["transformer_checkpoint"] = str(models.vqvae)
    with pytest.raises(error, match=match):
        ScoringModule(**arguments)


@pytest.mark.parametrize("with_transformer", [True, False])
def test_an_empty_validation_split_is_a_config_error(
    with_transformer: bool, models: Models, demo_mvtec_root: Path, data_cache_dir: Path
) -> None:
    datamodule = mvtec_datamodule(demo_mvtec_root, data_cache_dir, val_fraction=0.0)
    transformer = str(models.global_transformer) if with_transformer else None
    module = ScoringModule(str(models.vqvae), transformer, num_restorations=2, metric_bits=BITS)
    with pytest.raises(ConfigError, match=r"MVTecDataModule's val split is empty \(data.val_fraction=0.0\)"):
        make_trainer().test(module, datamodule=datamodule, verbose=False)


# ----------------------------------------------------------------------------------------------- calibration
def test_thresholds_are_quantiles_of_validation_normals_and_test_data_is_not_read(
    scored: Scored, models: Models
) -> None:
    module, datamodule = scored.module, scored.datamodule
    calibration = module.calibration
    # Calibration read every validation normal once per pass (NLL, then threshold) and no test image.
    val_size = len(datamodule.dataset("val"))
    assert module.calibration_reads == {"test": 0, "val": 2 * val_size}
    assert datamodule.dataset("test").reads == TEST_IMAGES  # ... and the test pass read each test image once

    nlls, pixels, all_pixels, image_scores = [], [], [], []
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            codes = module.vqvae.net.encode_indices(batch["image"]).flatten(1)  # [B, L]
            log_probs = F.log_softmax(module.transformer(codes).double(), dim=-1)
            nlls.append(-log_probs.gather(-1, codes[..., None])[..., 0].float().numpy().ravel())
            maps, _ = module.anomaly_map(batch)  # [B, 1, H, W], with the calibrated NLL threshold
            pixels.append(maps[batch["roi"] > 0.5].numpy())
            all_pixels.append(maps.numpy().ravel())
            image_scores.append(maps.flatten(1).amax(1).numpy())
    assert calibration["nll_quantile"] == 0.8 and calibration["val_quantile"] == 0.95
    # code_nll is fp32; the float64 reference may fall on the other side of a bin edge only by rounding.
    assert calibration["nll_threshold"] == bin_edge_quantile(np.concatenate(nlls), 0.8)
    assert calibration["val_threshold"] == bin_edge_quantile(np.concatenate(pixels), 0.95)
    assert calibration["val_threshold"] != bin_edge_quantile(np.concatenate(all_pixels), 0.95)  # roi matters
    assert calibration["image_threshold"] == bin_edge_quantile(np.concatenate(image_scores), 0.5)
    assert calibration["image_quantile"] == 0.5
    # The scale of the Inferencer's normalised score: the population standard deviation of the same image scores.
    assert calibration["image_score_std"] == pytest.approx(float(np.std(np.concatenate(image_scores))), rel=1e-6)


def test_outputs_are_written(scored: Scored) -> None:
    out, module = scored.output_dir, scored.module
    for path in evaluation_files(StageLayout.of(out)):
        assert path.is_file(), path
    assert not StageLayout.of(out).last_checkpoint.exists()  # LSGS learns nothing while it is evaluated
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(json.dumps(module.results))
    assert results["method"] == "lsgs" and results["num_test_images"] == TEST_IMAGES
    assert set(results["per_category"]) == {"fabric", "nut", "mesh"}
    # The pooled metrics equal recomputations from the written per-image scores and pooled ROC curve: a mix-up of
    # labels or images between the metrics and the files would break this.
    with (out / "image_scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == TEST_IMAGES
    labels = np.array([int(r["label"]) for r in rows])
    scores = np.array([float(r["score"]) for r in rows])
    assert results["pooled"]["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    roc = np.load(out / "curves" / "curves.npz")
    assert results["pooled"]["pixel_auroc"] == pytest.approx(np.trapezoid(roc["tpr"], roc["fpr"]), abs=1e-9)
    assert json.loads((out / "calibration.json").read_text()) == module.calibration
    assert "lsgs" in (out / "results.md").read_text()
    assert (out / "results.csv").read_text().splitlines()[0].startswith("category,pixel_auroc")
    assert len(list((out / "heatmaps").glob("*.png"))) == 3 * 2  # heatmaps_per_category = 2
    for name in ("roc.png", "pr.png", "curves.npz"):
        assert (out / "curves" / name).is_file(), name

    # image_scores.csv: one row per test image, in dataset order, the max of the image's final map.
    with (out / "image_scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["index"]) for r in rows] == list(range(TEST_IMAGES))
    test_set = scored.datamodule.dataset("test")
    with torch.no_grad():
        for i in (0, 7, TEST_IMAGES - 1):
            item = test_set[i]
            batch = {
                key: value[None] if isinstance(value, torch.Tensor) else value for key, value in item.items()
            }
            batch["index"] = torch.tensor([i])
            maps, _ = module.anomaly_map(batch)
            # rel 1e-5: the decoder batch differs (1 image here, 8 in the test pass), so float sums do too.
            assert float(rows[i]["score"]) == pytest.approx(float(maps.max()), rel=1e-5)
            assert int(rows[i]["label"]) == item["label"] and rows[i]["category"] == item["category"]


def test_a_saved_calibration_is_reused_without_a_calibration_pass(
    scored: Scored, models: Models, demo_mvtec_root: Path, data_cache_dir: Path
) -> None:
    datamodule = mvtec_datamodule(demo_mvtec_root, data_cache_dir, cls=InstrumentedMVTec)
    module = RecordingScoring(
        str(models.vqvae),
        str(models.global_transformer),
        num_restorations=5,
        metric_bits=BITS,
        calibration=str(scored.output_dir / "calibration.json"),
    )
    make_trainer().test(module, datamodule=datamodule, verbose=False)
    assert module.calibration_reads == {"test": 0, "val": 0}
    assert module.calibration == scored.module.calibration
    assert module.results["pooled"] == scored.module.results["pooled"]


def test_predict_flags_images_above_the_image_threshold(scored: Scored, models: Models) -> None:
    module = ScoringModule(
        str(models.vqvae), str(models.global_transformer), num_restorations=5, metric_bits=BITS
    )
    batches = make_trainer().predict(module, datamodule=scored.datamodule)
    scores = torch.cat([b["score"] for b in batches])
    assert scores.shape == (TEST_IMAGES,) and batches[0]["map"].shape[1:] == (1, 32, 32)
    flags = torch.cat([b["anomalous"] for b in batches])
    assert torch.equal(flags, scores > module.calibration["image_threshold"])
    assert sum(len(b["path"]) for b in batches) == TEST_IMAGES


# ----------------------------------------------------------------------------------------------- methods
@pytest.mark.parametrize(
    ("attention", "method"), [("none", "vqvae-reconstruction"), ("causal", "lsgs-causal"), ("global", "lsgs")]
)
def test_every_attention_setting_produces_results(
    attention: str, method: str, models: Models, datamodule: MVTecDataModule
) -> None:
    transformer = {"none": None, "causal": models.causal_transformer, "global": models.global_transformer}
    path = transformer[attention]
    module = ScoringModule(
        str(models.vqvae),
        str(path) if path else None,
        num_restorations=2,
        metric_bits=BITS,
        compute_aupro=False,
    )
    make_trainer().test(module, datamodule=datamodule, verbose=False)
    results = module.results
    assert results["method"] == method == module.method_name
    assert results["method_info"]["attention"] == attention
    assert results["num_test_images"] == TEST_IMAGES
    assert ("nll_threshold" in results["calibration"]) == (attention != "none")
    assert math.isfinite(results["pooled"]["pixel_auroc"]) and math.isfinite(results["pooled"]["image_auroc"])
    # Export (lsgs export, Inferencer): one map graph without a transformer, the restoration graphs with the
    # global one; the causal restoration runs position by position and is refused in one line.
    if attention == "causal":
        with pytest.raises(ConfigError, match=r"lsgs-causal method \(attention='causal'\) cannot be exported"):
            module.export_graphs(32)
    else:
        export = module.export_graphs(32)
        assert (export.runtime, sorted(export.graphs)) == (
            ("map", ["map"]) if attention == "none" else ("restoration", ["decoder", "encoder", "transformer"]))


def test_restoration_repairs_an_implanted_foreign_patch(
    scored: Scored, datamodule: MVTecDataModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A black 12x12 patch on validation normals: its codes are resampled away in every restoration far more
    often than other codes, and the anomaly map is higher on it than elsewhere and than on the clean image."""
    module = scored.module
    restorations: list[torch.Tensor] = []
    original = scoring_module.restore_global

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        restorations.append(original(*args, **kwargs))
        return restorations[-1]

    monkeypatch.setattr(scoring_module, "restore_global", spy)
    batch = next(iter(datamodule.val_dataloader()))
    images = batch["image"].clone()
    images[:, :, 10:22, 10:22] = 0.0
    with torch.no_grad():
        clean_codes = module.vqvae.net.encode_indices(batch["image"]).flatten(1)  # [B, L]
        codes = module.vqvae.net.encode_indices(images).flatten(1)
        clean_map = module.anomaly_map(batch)[0][:, 0]  # [B, H, W]
        implanted_map = module.anomaly_map({**batch, "image": images})[0][:, 0]
    restored = restorations[-1]  # [B, n, L]
    assert restored.shape == (images.shape[0], 5, 64)
    footprint = codes != clean_codes
    assert footprint.any(1).all()  # the patch changed the code map of every image
    always = (restored != codes[:, None]).all(1)  # resampled to another code in all n restorations
    assert (always & footprint).any(1).all()
    rate_inside = float((always & footprint).sum() / footprint.sum())
    rate_outside = float((always & ~footprint).sum() / (~footprint).sum())
    assert rate_inside > 3 * rate_outside, (rate_inside, rate_outside)
    patch = torch.zeros(32, 32, dtype=torch.bool)
    patch[10:22, 10:22] = True
    inside, outside = implanted_map[:, patch].mean(1), implanted_map[:, ~patch].mean(1)
    assert (inside > 1.5 * outside).all(), (inside, outside)
    assert (inside > clean_map[:, patch].mean(1)).all()


# ----------------------------------------------------------------------------------------------- options
def test_harness_options(
    scored: Scored, models: Models, demo_mvtec_root: Path, data_cache_dir: Path, tmp_path: Path
) -> None:
    """smoothing off / padding counted or not, metric_region roi (with a left-half test roi), no AUPRO, no
    heatmaps."""

    class HalfRoiTest(MVTecDataModule):
        def dataset(self, split: str) -> Any:
            wrapped = self.__dict__.setdefault("_wrapped", {})
            if split != "test":
                return super().dataset(split)
            return wrapped.setdefault(split, CountingDataset(super().dataset(split), roi_columns=16))

    datamodule = mvtec_datamodule(demo_mvtec_root, data_cache_dir, cls=HalfRoiTest)
    common = {"vqvae_checkpoint": str(models.vqvae), "transformer_checkpoint": None, "metric_bits": BITS}
    plain = ScoringModule(
        **common, smoothing=False, compute_aupro=False, heatmaps_per_category=0, output_dir=str(tmp_path)
    )
    make_trainer().test(plain, datamodule=datamodule, verbose=False)
    assert not (tmp_path / "heatmaps").exists() and (tmp_path / "results.json").is_file()
    assert "aupro" not in plain.results["pooled"] and "aupro" in scored.module.results["pooled"]
    batch = next(iter(datamodule.test_dataloader()))
    with torch.no_grad():
        raw, _ = plain.raw_anomaly_map(batch)
        final, _ = plain.anomaly_map(batch)
    assert torch.equal(final, raw * batch["roi"])  # no smoothing: the roi-masked raw map
    for include_pad in (True, False):
        smoothed = ScoringModule(**common, smoothing_count_include_pad=include_pad)
        with torch.no_grad():
            expected = smooth_anomaly_map(raw * batch["roi"], count_include_pad=include_pad)
            assert torch.equal(smoothed.anomaly_map(batch)[0], expected)
    assert not torch.equal(expected, smooth_anomaly_map(raw * batch["roi"], count_include_pad=True))

    region = ScoringModule(**common, smoothing=False, compute_aupro=False, metric_region="roi")
    make_trainer().test(region, datamodule=datamodule, verbose=False)
    assert region.results["metric_region"] == "roi"
    # Only the left half counts: fewer pixels in the pooled metrics, so the AUROC changes.
    assert region.results["pooled"]["pixel_auroc"] != plain.results["pooled"]["pixel_auroc"]


# ----------------------------------------------------------------------------------------------- DDP
def test_two_process_ddp_on_odd_splits_equals_the_single_process_run(
    models: Models, demo_mvtec_root: Path, data_cache_dir: Path, tmp_path: Path
) -> None:
    def run(out: Path, **trainer_options: Any) -> None:
        module = ScoringModule(
            str(models.vqvae),
            str(models.global_transformer),
            num_restorations=3,
            metric_bits=BITS,
            heatmaps_per_category=1,
            output_dir=str(out),
        )
        datamodule = mvtec_datamodule(demo_mvtec_root, data_cache_dir, cls=OddSplits)
        make_trainer(out, **trainer_options).test(module, datamodule=datamodule, verbose=False)

    run(tmp_path / "single")
    run(tmp_path / "ddp", devices=2, strategy="ddp_spawn", callbacks=[spawn_teardown_callback()])
    single = json.loads((tmp_path / "single" / "results.json").read_text())
    assert single["num_test_images"] == TEST_IMAGES - 1
    assert json.loads((tmp_path / "ddp" / "results.json").read_text()) == single
    for name in ("image_scores.csv", "calibration.json", "results.csv"):
        assert (tmp_path / "ddp" / name).read_text() == (tmp_path / "single" / name).read_text(), name
    assert sorted(p.name for p in (tmp_path / "ddp" / "heatmaps").iterdir()) == sorted(
        p.name for p in (tmp_path / "single" / "heatmaps").iterdir()
    )


# ----------------------------------------------------------------------------------------------- scoring options
def brute_force_map(
    images: torch.Tensor, x_hat: torch.Tensor, ys: torch.Tensor, reference: str, k: float, weight: float
) -> torch.Tensor:
    """``sum_i w_i mean_c|R - Y_i| + weight * mean_c|X - X_hat|``, ``w = softmax(k / mean|R - Y_i|)``, by loops
    in float64 over images and restorations (R = X_hat or X)."""
    images, x_hat, ys = images.double(), x_hat.double(), ys.double()
    out = torch.zeros(images.shape[0], 1, *images.shape[2:], dtype=torch.float64)
    for b in range(images.shape[0]):
        ref = x_hat[b] if reference == "reconstruction" else images[b]
        scores = [k / float((ref - ys[b, i]).abs().mean()) for i in range(ys.shape[1])]
        exps = [math.exp(s - max(scores)) for s in scores]
        for i in range(ys.shape[1]):
            out[b, 0] += exps[i] / sum(exps) * (ref - ys[b, i]).abs().mean(0)
        out[b, 0] += weight * (images[b] - x_hat[b]).abs().mean(0)
    return out


@pytest.mark.parametrize(("reference", "weight"), [("reconstruction", 0.0), ("input", 0.0), ("input", 0.7)])
def test_map_reference_and_reconstruction_weight_match_brute_force(
    reference: str,
    weight: float,
    models: Models,
    datamodule: MVTecDataModule,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = ScoringModule(
        str(models.vqvae),
        str(models.global_transformer),
        num_restorations=3,
        map_reference=reference,
        reconstruction_weight=weight,
        softmax_k=2.0,
    )
    module.calibration = {"nll_threshold": 2.0}
    restorations: list[torch.Tensor] = []
    original = scoring_module.restore_global
    monkeypatch.setattr(
        scoring_module,
        "restore_global",
        lambda *a, **kw: restorations.append(original(*a, **kw)) or restorations[-1],
    )
    batch = next(iter(datamodule.test_dataloader()))
    batch = {key: value[:3] for key, value in batch.items()}
    with torch.no_grad():
        raw, _ = module.raw_anomaly_map(batch)
        net = module.vqvae.net
        codes = net.encode_indices(batch["image"])  # [B, h, w]
        x_hat = net.decode_indices(codes)
        restored = restorations[-1]  # [B, n, L]
        assert (restored != codes.flatten(1)[:, None]).any()  # some codes were resampled
        ys = torch.stack(
            [net.decode_indices(r.reshape(-1, *codes.shape[1:])) for r in restored]
        )  # [B, n, C, H, W]
    expected = brute_force_map(batch["image"], x_hat, ys, reference, 2.0, weight)
    torch.testing.assert_close(raw.double(), expected, atol=1e-5, rtol=1e-5)
    if reference == "input":  # the input reference really changes the map
        paper = brute_force_map(batch["image"], x_hat, ys, "reconstruction", 2.0, 0.0)
        assert (expected - paper).abs().max() > 1e-2


def test_a_fixed_nll_threshold_skips_the_nll_pass_and_is_used(
    models: Models, demo_mvtec_root: Path, data_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    datamodule = mvtec_datamodule(demo_mvtec_root, data_cache_dir, cls=InstrumentedMVTec)
    module = RecordingScoring(
        str(models.vqvae), str(models.global_transformer), num_restorations=2, nll_threshold=3.5,
        metric_bits=BITS, compute_aupro=False,
    )  # fmt: skip
    used: list[torch.Tensor] = []
    original = scoring_module.restore_global

    def spy(
        logits: torch.Tensor, codes: torch.Tensor, threshold: Any, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        used.append(torch.as_tensor(threshold))
        return original(logits, codes, threshold, *args, **kwargs)

    monkeypatch.setattr(scoring_module, "restore_global", spy)
    make_trainer().test(module, datamodule=datamodule, verbose=False)
    assert module.calibration["nll_threshold"] == 3.5 and "nll_quantile" not in module.calibration
    # Only the pixel-threshold pass read the validation normals: no NLL pass.
    assert module.calibration_reads == {"test": 0, "val": len(datamodule.dataset("val"))}
    assert used and all(bool((t == 3.5).all()) for t in used)
    assert module.results["method_info"]["nll_threshold"] == 3.5


def test_per_category_nll_thresholds(
    models: Models, datamodule: MVTecDataModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each category's threshold is the quantile of its own validation normals' NLLs, and each test image is
    restored with the threshold of its category."""
    module = ScoringModule(
        str(models.vqvae), str(models.global_transformer), num_restorations=2, nll_quantile=0.7,
        nll_threshold_scope="category", metric_bits=BITS, compute_aupro=False,
    )  # fmt: skip
    seen: list[tuple[list[str], torch.Tensor]] = []
    original_thresholds = ScoringModule.nll_thresholds

    def spy(self: ScoringModule, batch: dict[str, Any]) -> torch.Tensor:
        seen.append((list(batch["category"]), original_thresholds(self, batch)))
        return seen[-1][1]

    monkeypatch.setattr(ScoringModule, "nll_thresholds", spy)
    make_trainer().test(module, datamodule=datamodule, verbose=False)
    thresholds = module.calibration["nll_thresholds"]
    assert "nll_threshold" not in module.calibration
    nlls: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            codes = module.vqvae.net.encode_indices(batch["image"]).flatten(1)
            log_probs = F.log_softmax(module.transformer(codes).double(), dim=-1)
            nll = -log_probs.gather(-1, codes[..., None])[..., 0].float().numpy()
            for row, category in zip(nll, batch["category"]):
                nlls.setdefault(category, []).append(row)
    assert sorted(thresholds) == sorted(nlls) == ["fabric", "mesh", "nut"]
    expected = {c: bin_edge_quantile(np.concatenate(rows), 0.7) for c, rows in nlls.items()}
    assert thresholds == expected
    assert len(set(expected.values())) > 1  # the categories really differ
    test_categories = [c for categories, _ in seen for c in categories]
    assert len(test_categories) >= TEST_IMAGES  # every test image went through the lookup
    for categories, values in seen:
        assert values.tolist() == [expected[c] for c in categories]


class NoNutValidation(MVTecDataModule):
    """The demo data without the validation normals of category 'nut'."""

    def _make_splits(self, entries: list[Path]) -> dict[str, list]:
        splits = dict(super()._make_splits(entries))
        splits["val"] = [item for item in splits["val"] if item.category != "nut"]
        return splits


def test_a_test_category_without_validation_normals_is_a_config_error(
    models: Models, demo_mvtec_root: Path, data_cache_dir: Path
) -> None:
    datamodule = mvtec_datamodule(demo_mvtec_root, data_cache_dir, cls=NoNutValidation)
    module = ScoringModule(
        str(models.vqvae), str(models.global_transformer), num_restorations=2,
        nll_threshold_scope="category", metric_bits=BITS,
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"test category \['nut'\] has no validation normals"):
        make_trainer().test(module, datamodule=datamodule, verbose=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"map_reference": "image"}, r"^model.map_reference=\"image\" must be one of \['reconstruction', 'input'\]$"),
        ({"reconstruction_weight": -0.5}, "^model.reconstruction_weight=-0.5 must be a finite number >= 0$"),
        ({"reconstruction_weight": math.inf}, "^model.reconstruction_weight=Infinity must be a finite number >= 0$"),
        ({"nll_threshold": -1.0}, r"^model.nll_threshold=-1.0 must be null or a number of nats >= 0 \(null: "),
        ({"nll_threshold": math.nan}, "^model.nll_threshold=NaN must be null or a number"),
        ({"nll_threshold_scope": "image"},
         r"^model.nll_threshold_scope=\"image\" must be one of \['all', 'category'\]$"),
        ({"softmax_k": 0}, "^model.softmax_k=0 must be a finite number > 0$"),
        ({"temperature": -1.0}, "^model.temperature=-1.0 must be a finite number > 0$"),
        ({"seed": 1.5}, "^model.seed=1.5 must be an int$"),
        ({"num_restorations": True}, "^model.num_restorations=true must be an int >= 1$"),
        ({"smoothing": "yes"}, r"^model.smoothing=\"yes\" must be true, false or null \(null: "),
    ],
)
def test_bad_scoring_options(kwargs: dict[str, Any], match: str, models: Models) -> None:
    with pytest.raises(ConfigError, match=match):
        ScoringModule(str(models.vqvae), str(models.global_transformer), **kwargs)


def test_bf16_mixed_calibration_runs_in_the_precision_of_the_test_maps(
    models: Models, datamodule: MVTecDataModule
) -> None:
    """Under precision='bf16-mixed', the NLL and pixel thresholds equal the quantiles of NLLs and maps computed
    under bf16 autocast (as test_step computes its maps), not of fp32 ones."""
    module = ScoringModule(
        str(models.vqvae), str(models.global_transformer), num_restorations=3, nll_quantile=0.8,
        val_quantile=0.9, metric_bits=BITS, compute_aupro=False,
    )  # fmt: skip
    make_trainer(precision="bf16-mixed").test(module, datamodule=datamodule, verbose=False)
    calibration = module.calibration

    def references(autocast: bool) -> tuple[float, float]:
        reference = ScoringModule(str(models.vqvae), str(models.global_transformer), num_restorations=3)
        nlls, pixels = [], []
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for batch in datamodule.val_dataloader():
                flat, logits, _ = reference.encode_batch(batch)
                nlls.append(code_nll(logits, flat))
            reference.calibration = {"nll_threshold": score_quantile(torch.cat(nlls), 0.8, BITS)}
            for batch in datamodule.val_dataloader():
                maps, _ = reference.anomaly_map(batch)
                pixels.append(maps[batch["roi"] > 0.5])
        return reference.calibration["nll_threshold"], score_quantile(torch.cat(pixels), 0.9, BITS)

    bf16 = references(autocast=True)
    assert (calibration["nll_threshold"], calibration["val_threshold"]) == bf16
    assert references(autocast=False) != bf16  # fp32 maps would have given other thresholds


def test_nll_threshold_lookup_for_categories_without_their_own(models: Models) -> None:
    module = ScoringModule(str(models.vqvae), str(models.global_transformer), nll_threshold_scope="category")
    batch = {"image": torch.zeros(2, 3, 32, 32), "category": ["fabric", "folder"]}
    # One calibrated category serves every image (lsgs detect on a folder of a single-category run).
    module.calibration = {"nll_thresholds": {"fabric": 2.5}}
    assert module.nll_thresholds(batch).tolist() == [2.5, 2.5]
    module.calibration = {"nll_thresholds": {"fabric": 2.5, "nut": 1.5}}
    with pytest.raises(ConfigError, match=r"no NLL threshold for category \['folder'\]"):
        module.nll_thresholds(batch)
    assert module.nll_thresholds({**batch, "category": ["nut", "fabric"]}).tolist() == [1.5, 2.5]
