"""Tests of the built-in baseline methods (src/lsgs/methods/, src/lsgs/nn/autoencoder.py): end to end through the
evaluation harness on the demo data, learned statistics against numpy references from the dataset arrays, the
harness's metrics against sklearn / exhaustive references on maps computed outside it, and every raise."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score
from torch.utils.data import default_collate

from data_modules import BraTSDataModule, MVTecDataModule
from lsgs.checkpoints import METHOD_KIND, checkpoint_metadata
from lsgs.errors import CheckpointError, ConfigError, DataError, TrainingDivergedError
from lsgs.evaluation import AnomalyMapModule
from lsgs.methods.autoencoder import AutoencoderBaseline
from lsgs.methods.intensity import IntensityBaseline
from lsgs.methods.pixel_gaussian import PixelGaussianBaseline
from lsgs.methods.statistics import mean_and_variance, pixel_gaussian_map, standardised_intensity
from lsgs.nn.autoencoder import ConvAutoencoder, gaussian_kl, kl_per_image_element
from lsgs.nn.restoration import smooth_anomaly_map
from lsgs.nn.vqvae import VQVAEConfig

SIZE, BATCH = 32, 8
TINY = {"channels": (8, 16), "num_res_blocks": 1, "res_channels": 8, "code_dim": 8}
QUIET = {"compute_aupro": False, "heatmaps_per_category": 0}
METHODS = ("intensity", "pixel_gaussian", "ae", "vae")


# ------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def mvtec_dm(demo_mvtec_root: Path, data_cache_dir: Path) -> MVTecDataModule:
    dm = MVTecDataModule(str(demo_mvtec_root), image_size=SIZE, batch_size=BATCH, cache_dir=str(data_cache_dir))
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def brats_dm(demo_brats_root: Path, data_cache_dir: Path) -> BraTSDataModule:
    dm = BraTSDataModule(str(demo_brats_root), image_size=SIZE, batch_size=BATCH, cache_dir=str(data_cache_dir))
    dm.setup()
    return dm


@pytest.fixture
def dms(mvtec_dm: MVTecDataModule, brats_dm: BraTSDataModule) -> dict[str, Any]:
    return {"mvtec": mvtec_dm, "brats": brats_dm}


def trainer(**kwargs: Any) -> Trainer:
    return Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, **kwargs)


def make(method: str, channels: int, **kwargs: Any) -> AnomalyMapModule:
    if method == "intensity":
        return IntensityBaseline(in_channels=channels, **kwargs)
    if method == "pixel_gaussian":
        return PixelGaussianBaseline(in_channels=channels, **kwargs)
    return AutoencoderBaseline(variational=method == "vae", in_channels=channels, **TINY, **kwargs)


def run(module: AnomalyMapModule, dm: Any, epochs: int = 1) -> AnomalyMapModule:
    """Fit (autoencoders only) and test through the harness."""
    if isinstance(module, AutoencoderBaseline) and not bool(module.fitted):
        seed_everything(0)
        trainer(max_epochs=epochs, limit_val_batches=1).fit(module, datamodule=dm)
    trainer().test(module, datamodule=dm, verbose=False)
    return module


def arrays(dm: Any, split: str, key: str) -> np.ndarray:
    """[N, C, H, W] float64 array of one field of a split, straight from the dataset."""
    data = dm.dataset(split)
    return np.stack([data[i][key].numpy() for i in range(len(data))]).astype(np.float64)


def whole_split(dm: Any, split: str) -> dict[str, Any]:
    data = dm.dataset(split)
    return default_collate([data[i] for i in range(len(data))])


def attach(module: AnomalyMapModule, reduce: Any = None, image_size: int | None = None) -> None:
    """A stand-in trainer for calling the calibration hooks directly (single process unless ``reduce``)."""
    module.trainer = SimpleNamespace(
        strategy=SimpleNamespace(reduce=reduce or (lambda tensor, reduce_op: tensor)),
        datamodule=SimpleNamespace(image_size=image_size) if image_size else None,
    )


def fit_statistics(module: AnomalyMapModule, images: torch.Tensor, roi: torch.Tensor | None = None,
                   **attach_kwargs: Any) -> AnomalyMapModule:
    attach(module, **attach_kwargs)
    module.calibration_phases()
    roi = torch.ones_like(images[:, :1]) if roi is None else roi
    for start in range(0, len(images), 3):
        module.calibrate_step("statistics", {"image": images[start:start + 3], "roi": roi[start:start + 3]})
    module.finish_calibration("statistics")
    return module


def best_dice(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Best Dice over every distinct threshold (prediction: score >= t), exhaustively by sorting.

    Returns:
        the best Dice and its threshold.
    """
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order].astype(np.int64)
    tp, fp = np.cumsum(y), np.cumsum(1 - y)
    last = np.r_[s[1:] != s[:-1], True]  # the end of each group of tied scores
    dice = 2 * tp[last] / (tp[last] + fp[last] + y.sum())
    best = int(np.argmax(dice))
    return float(dice[best]), float(s[last][best])


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    return float(2 * (predicted & truth).sum() / (predicted.sum() + truth.sum()))


def split_categories(dm: Any, split: str) -> np.ndarray:
    data = dm.dataset(split)
    return np.array([data.items[i].category for i in range(len(data))])


def pixel_gaussian_reference(dm: Any, eps_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-category ``[n_categories, C, H, W]`` mean and std and ``[n_categories]`` eps, test_categories order."""
    train, categories = arrays(dm, "train_eval", "image"), split_categories(dm, "train_eval")
    means, stds = zip(*[(train[categories == c].mean(axis=0), train[categories == c].std(axis=0))
                        for c in dm.test_categories])
    stds = np.stack(stds)
    return np.stack(means), stds, eps_fraction * stds.mean(axis=(1, 2, 3))


def intensity_reference(dm: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-category ``[n_categories, C]`` mean colour/intensity and ``[n_categories]`` scale."""
    train, roi = arrays(dm, "train_eval", "image"), arrays(dm, "train_eval", "roi") > 0.5
    categories = split_categories(dm, "train_eval")
    means, scales = [], []
    for c in dm.test_categories:
        pick = categories == c
        pixels = train[pick].transpose(0, 2, 3, 1)[roi[pick][:, 0]]  # [P, C] training ROI pixels of c
        means.append(pixels.mean(axis=0))
        scales.append(float(np.sqrt(((pixels - means[-1]) ** 2).sum(axis=1).mean())))
    return np.stack(means), np.array(scales)


def rows_of(dm: Any, split: str) -> np.ndarray:
    """Each image's row in the per-category statistics."""
    return np.array([dm.test_categories.index(c) for c in split_categories(dm, split)])


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("dataset", ["mvtec", "brats"])
@pytest.mark.parametrize("method", METHODS)
def test_baseline_runs_through_harness(method: str, dataset: str, dms: dict, tmp_path: Path) -> None:
    dm = dms[dataset]
    module = run(make(method, dm.num_channels, output_dir=str(tmp_path), heatmaps_per_category=1,
                      compute_aupro=dataset == "mvtec"), dm)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["method"] == method and results["num_test_images"] == len(dm.dataset("test"))
    assert set(results["per_category"]) == set(dm.test_categories)
    for name, value in results["mean"].items():
        # BraTS evaluates tumour slices only (every demo test slice has tumour): one image class, so the image
        # AUROC is undefined, NaN, in every category and pooled; every other metric is a number.
        undefined = dataset == "brats" and name == "image_auroc"
        assert math.isnan(value) if undefined else math.isfinite(value), (name, value)
    if dataset == "brats":
        data = dm.dataset("test")
        assert all(data.items[i].label == 1 for i in range(len(data)))
        assert math.isnan(results["pooled"]["image_auroc"])
        assert all(math.isnan(values["image_auroc"]) for values in results["per_category"].values())
    assert {"val_threshold", "image_threshold"} <= set(json.loads((tmp_path / "calibration.json").read_text()))
    assert len(list((tmp_path / "heatmaps").glob("*.png"))) == len(dm.test_categories)
    assert module.results["method_info"] == module.method_info()


# ------------------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize("dataset", ["mvtec", "brats"])
def test_pixel_gaussian_matches_numpy(dataset: str, dms: dict) -> None:
    dm = dms[dataset]
    module = run(PixelGaussianBaseline(in_channels=dm.num_channels, eps_fraction=0.2, **QUIET), dm)
    mean, std, eps = pixel_gaussian_reference(dm, 0.2)
    assert module.categories == dm.test_categories
    np.testing.assert_allclose(module.pixel_mean.numpy(), mean, atol=1e-6)
    np.testing.assert_allclose(module.pixel_std.numpy(), std, atol=1e-6)
    np.testing.assert_allclose(module.eps.numpy(), eps, rtol=1e-6)
    test, rows = whole_split(dm, "test"), rows_of(dm, "test")
    expected = (np.abs(test["image"].double().numpy() - mean[rows]) / (std[rows] + eps[rows, None, None, None]))
    raw, pictures = module.raw_anomaly_map(test)
    np.testing.assert_allclose(raw.numpy(), expected.max(axis=1, keepdims=True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pictures["reconstruction"], module.pixel_mean[torch.as_tensor(rows)])


@pytest.mark.parametrize(("dataset", "signed"), [("mvtec", False), ("brats", False), ("brats", True)])
def test_intensity_matches_numpy(dataset: str, signed: bool, dms: dict) -> None:
    dm = dms[dataset]
    module = run(IntensityBaseline(signed=signed, in_channels=dm.num_channels, **QUIET), dm)
    mean, scale = intensity_reference(dm)
    np.testing.assert_allclose(module.channel_mean.numpy(), mean, atol=1e-6)
    np.testing.assert_allclose(module.scale.numpy(), scale, rtol=1e-5)
    test, rows = whole_split(dm, "test"), rows_of(dm, "test")
    centred = test["image"].double().numpy() - mean[rows][:, :, None, None]
    # One channel: the z-score (clipped at 0 unless signed); RGB: the distance from the mean colour.
    norm = centred if dataset == "brats" else np.sqrt((centred**2).sum(axis=1, keepdims=True))
    expected = norm / scale[rows][:, None, None, None]
    if dataset == "brats" and not signed:
        expected = np.maximum(expected, 0.0)
    raw, _ = module.raw_anomaly_map(test)
    np.testing.assert_allclose(raw.numpy(), expected, rtol=1e-5, atol=1e-5)
    statistic = module.method_info()["statistic"]
    if dataset == "brats":
        assert statistic == ("z-score (signed)" if signed else "z-score clipped at 0 (hyperintensity)")
    else:
        assert statistic == "distance from the mean colour"


def test_map_functions_match_formulas() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 4, 5, generator=g)
    mean, std = torch.rand(3, 4, 5, generator=g), torch.rand(3, 4, 5, generator=g)
    expected = torch.stack([((images[b] - mean).abs() / (std + 0.05)).amax(0, keepdim=True) for b in range(2)])
    torch.testing.assert_close(pixel_gaussian_map(images, mean, std, 0.05), expected)
    colour = torch.tensor([0.1, 0.2, 0.3])
    loop = torch.zeros(2, 1, 4, 5)
    for b, i, j in np.ndindex(2, 4, 5):
        loop[b, 0, i, j] = math.dist(images[b, :, i, j].tolist(), colour.tolist()) / 0.5
    torch.testing.assert_close(standardised_intensity(images, colour, torch.tensor(0.5)), loop)
    gray = images[:, :1]
    torch.testing.assert_close(standardised_intensity(gray, torch.tensor([0.4]), torch.tensor(2.0)),
                               (gray - 0.4) / 2.0)
    values = torch.rand(1000, generator=g, dtype=torch.float64)
    m, v = mean_and_variance(torch.tensor(1000.0, dtype=torch.float64), values.sum(), values.square().sum())
    assert float(m) == pytest.approx(float(values.mean()), rel=1e-12)
    assert float(v) == pytest.approx(float(values.var(unbiased=False)), rel=1e-10)


def shard_sums(cls: type, images: torch.Tensor, roi: torch.Tensor) -> torch.Tensor:
    """The (not yet reduced) sums one rank accumulates over its shard."""
    module = cls()
    attach(module)
    module.calibration_phases()
    for i in range(len(images)):
        module.calibrate_step("statistics", {"image": images[i:i + 1], "roi": roi[i:i + 1]})
    return module._sums


@pytest.mark.parametrize("cls", [IntensityBaseline, PixelGaussianBaseline])
def test_statistics_are_all_reduced_over_ranks(cls: type) -> None:
    """Rank 0 of a simulated 2-rank run, whose all-reduce adds rank 1's sums, gets the statistics of the whole
    set; so does a rank whose shard is empty (it must still join the all-reduce)."""
    g = torch.Generator().manual_seed(1)
    images, roi = torch.rand(7, 3, 6, 6, generator=g), (torch.rand(7, 1, 6, 6, generator=g) > 0.3).float()
    whole = fit_statistics(cls(), images, roi)
    calls = []

    def plus(other: torch.Tensor) -> Any:
        def reduce(tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
            calls.append((reduce_op, tensor.dtype))
            return tensor + other

        return reduce

    rank0 = fit_statistics(cls(), images[:4], roi[:4], reduce=plus(shard_sums(cls, images[4:], roi[4:])))
    empty = fit_statistics(cls(), images[:0], roi[:0], reduce=plus(shard_sums(cls, images, roi)), image_size=6)
    assert calls == [("sum", torch.float64)] * 2
    for rank in (rank0, empty):
        for name in cls._statistics:
            torch.testing.assert_close(getattr(rank, name), getattr(whole, name))


def test_statistics_errors() -> None:
    constant = torch.full((4, 3, 8, 8), 0.5)
    with pytest.raises(DataError, match="same intensity"):
        fit_statistics(IntensityBaseline(), constant)
    with pytest.raises(DataError, match="identical"):
        fit_statistics(PixelGaussianBaseline(), constant)
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(DataError, match="no training ROI pixels"):
        fit_statistics(IntensityBaseline(), images, roi=torch.zeros(4, 1, 8, 8))
    with pytest.raises(DataError, match="no training images"):  # empty split, size known from the data module
        fit_statistics(PixelGaussianBaseline(), images[:0], image_size=8)
    with pytest.raises(DataError, match="no training image and no data-module image_size"):
        fit_statistics(PixelGaussianBaseline(), images[:0])
    with pytest.raises(DataError, match=r"expected images \[B, 3, H, W\]"):
        fit_statistics(IntensityBaseline(), images[:, :1])
    module = PixelGaussianBaseline()
    attach(module, image_size=8)
    module.calibration_phases()
    with pytest.raises(DataError, match="needs one image size"):
        module.calibrate_step("statistics", {"image": torch.rand(2, 3, 16, 16), "roi": torch.ones(2, 1, 16, 16)})
    module = fit_statistics(PixelGaussianBaseline(), images)
    with pytest.raises(DataError, match="score at the training image_size"):
        module.raw_anomaly_map({"image": torch.rand(1, 3, 16, 16)})
    with pytest.raises(DataError, match=r"expected images \[B, 3, H, W\]"):
        module.raw_anomaly_map({"image": torch.rand(1, 1, 8, 8)})


def test_statistics_skip_the_train_pass_once_fitted() -> None:
    module = PixelGaussianBaseline()
    attach(module)
    assert module.calibration_phases() == [("statistics", "train")]
    fit_statistics(module, torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert module.calibration_phases() == [] and bool(module.fitted)


# ------------------------------------------------------------------------------------------ harness
class FixedMap(AnomalyMapModule):
    """Test-only method: the map is a fixed function of the batch (squared mean intensity)."""

    method_name = "fixed"

    def raw_anomaly_map(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return batch["image"].float().mean(dim=1, keepdim=True).square(), {}


class Oracle(AnomalyMapModule):
    """Test-only method: the ground-truth mask as the map (wiring check)."""

    method_name = "oracle"

    def raw_anomaly_map(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return batch["mask"].float(), {}


def float32_bins(scores: np.ndarray, num_bits: int = 20) -> np.ndarray:
    """The harness's histogram bin of each score, re-derived in numpy from the documented rule: the top
    ``num_bits`` bits of the order-preserving integer key of the float32 score."""
    bits = (scores.astype(np.float32) + np.float32(0.0)).view(np.int32)
    key = np.where(bits < 0, bits ^ np.int32(0x7FFFFFFF), bits)
    return key.astype(np.int64) >> (32 - num_bits)


def auroc_tie_bound(scores: np.ndarray, truth: np.ndarray) -> float:
    """Largest |AUROC change| from merging the scores of each bin into ties: each positive-negative pair
    sharing a bin moves by at most 1/2 of a pair's weight."""
    bins = float32_bins(scores)
    _, inverse = np.unique(bins, return_inverse=True)
    pos = np.bincount(inverse, weights=truth.astype(np.float64))
    neg = np.bincount(inverse, weights=(~truth).astype(np.float64))
    return 0.5 * float((pos * neg).sum()) / (truth.sum() * (~truth).sum())


def check_against_sklearn(results: dict, maps: np.ndarray, data: dict, val_maps: np.ndarray,
                          val_valid: np.ndarray, valid: np.ndarray | None) -> None:
    """Per category: the harness's metrics against sklearn / exhaustive references on the same maps.

    Pixel metrics live on 20-bit histograms (lsgs.metrics.histogram): scores in one bin are ties. So (1) on the
    scores replaced by their bin (order kept, ties merged), the harness must equal sklearn to float precision;
    (2) on the raw scores, AUROC must lie within the exact tie bound, and AP / best Dice within 1e-3 (the
    documented AP bias is about one relative bin width, 2**-11, times a constant).
    """
    categories = np.array(data["category"])
    masks, labels = data["mask"].numpy() > 0.5, data["label"].numpy()
    means = {name: [] for name in ("pixel_auroc", "pixel_ap", "dice_best")}
    quantile = np.quantile(val_maps[val_valid], 0.99, method="lower")
    for category, got in results["per_category"].items():
        pick = categories == category
        keep = np.ones_like(masks[pick]) if valid is None else valid[pick]
        scores, truth = maps[pick][keep], masks[pick][keep]
        binned = float32_bins(scores)
        assert got["pixel_auroc"] == pytest.approx(roc_auc_score(truth, binned), abs=1e-12)
        assert got["pixel_ap"] == pytest.approx(average_precision_score(truth, binned), abs=1e-12)
        assert got["dice_best"] == pytest.approx(best_dice(binned, truth)[0], abs=1e-12)
        assert abs(got["pixel_auroc"] - roc_auc_score(truth, scores)) <= auroc_tie_bound(scores, truth) + 1e-12
        assert got["pixel_ap"] == pytest.approx(average_precision_score(truth, scores), abs=1e-3)
        # Best Dice over bin edges: at most the exact best, at least the Dice at the edge below its threshold.
        exact_dice, exact_threshold = best_dice(scores, truth)
        at_edge = dice(binned >= float32_bins(np.array([exact_threshold]))[0], truth)
        assert at_edge - 1e-12 <= got["dice_best"] <= exact_dice + 1e-12
        # Honest Dice: threshold = the validation normals' 0.99 quantile, rounded down to its bin's lower edge.
        assert got["val_threshold"] <= quantile
        assert float32_bins(np.array([got["val_threshold"]])) == float32_bins(np.array([quantile]))
        assert got["dice_val"] == pytest.approx(dice(scores >= got["val_threshold"], truth), abs=1e-12)
        image_scores = np.where(keep, maps[pick], -np.inf).reshape(pick.sum(), -1).max(axis=1)
        if len(set(labels[pick])) == 2:  # image AUROC is exact (no histogram)
            assert got["image_auroc"] == pytest.approx(roc_auc_score(labels[pick], image_scores), abs=1e-12)
        for name in means:
            means[name].append(got[name])
    for name, values in means.items():
        assert results["mean"][name] == pytest.approx(np.mean(values), abs=1e-12)


def test_harness_metrics_equal_sklearn_on_maps_computed_outside(mvtec_dm: MVTecDataModule) -> None:
    """MVTec, pixel_gaussian, no smoothing, all pixels: maps from the numpy reference, metrics from sklearn."""
    module = run(PixelGaussianBaseline(smoothing=False, metric_region="all", **QUIET), mvtec_dm)
    mean, std, eps = pixel_gaussian_reference(mvtec_dm)

    def reference(images: np.ndarray, rows: np.ndarray) -> np.ndarray:
        z = np.abs(images - mean[rows]) / (std[rows] + eps[rows, None, None, None])
        return z.max(axis=1, keepdims=True).astype(np.float32)

    test = whole_split(mvtec_dm, "test")
    val_maps = reference(arrays(mvtec_dm, "val", "image"), rows_of(mvtec_dm, "val"))
    check_against_sklearn(module.results, reference(test["image"].double().numpy(), rows_of(mvtec_dm, "test")),
                          test, val_maps, np.ones_like(val_maps, dtype=bool), valid=None)


def test_harness_roi_region_and_smoothing_equal_scipy_and_sklearn(brats_dm: BraTSDataModule) -> None:
    """BraTS, a fixed map, MinPool/AvgPool smoothing on, brain pixels only: smoothing from scipy.ndimage."""
    module = FixedMap(smoothing=True, metric_region="roi", **QUIET)
    trainer().test(module, datamodule=brats_dm, verbose=False)

    def reference(split: str) -> tuple[np.ndarray, np.ndarray]:
        images, roi = arrays(brats_dm, split, "image"), arrays(brats_dm, split, "roi")
        raw = images.astype(np.float32).mean(axis=1, keepdims=True) ** 2 * roi
        # MinPool 3x3 over in-image pixels, then AvgPool 7x7 counting the zero padding (harness default).
        low = ndimage.minimum_filter(raw, size=(1, 1, 3, 3), mode="constant", cval=np.inf)
        smooth = ndimage.uniform_filter(low.astype(np.float64), size=(1, 1, 7, 7), mode="constant", cval=0.0)
        return smooth.astype(np.float32), roi > 0.5

    maps, valid = reference("test")
    val_maps, val_valid = reference("val")
    check_against_sklearn(module.results, maps, whole_split(brats_dm, "test"), val_maps, val_valid, valid)


def test_oracle_map_gives_perfect_pixel_metrics(mvtec_dm: MVTecDataModule) -> None:
    module = Oracle(smoothing=False, **QUIET)
    trainer().test(module, datamodule=mvtec_dm, verbose=False)
    for values in [*module.results["per_category"].values(), module.results["pooled"]]:
        assert values["pixel_auroc"] == 1.0 and values["pixel_ap"] == 1.0 and values["dice_best"] == 1.0


@pytest.mark.parametrize("include_pad", [True, False])
def test_smoothing_flag(include_pad: bool) -> None:
    g = torch.Generator().manual_seed(3)
    module = fit_statistics(PixelGaussianBaseline(smoothing_count_include_pad=include_pad),
                            torch.rand(5, 3, 12, 12, generator=g))
    batch = {"image": torch.rand(2, 3, 12, 12, generator=g), "roi": (torch.rand(2, 1, 12, 12, generator=g) > 0.2)}
    raw, _ = module.raw_anomaly_map(batch)
    masked = raw * batch["roi"].float()
    smoothed, _ = module.anomaly_map(batch)
    torch.testing.assert_close(smoothed, smooth_anomaly_map(masked, count_include_pad=include_pad))
    module.smoothing = False
    plain, _ = module.anomaly_map(batch)
    torch.testing.assert_close(plain, masked)
    assert not torch.allclose(plain, smoothed)


def test_maps_do_not_depend_on_batch_neighbours(mvtec_dm: MVTecDataModule) -> None:
    batch = default_collate([mvtec_dm.dataset("test")[i] for i in range(6)])
    g = torch.Generator().manual_seed(0)
    fitted = [fit_statistics(cls(), torch.rand(5, 3, SIZE, SIZE, generator=g))
              for cls in (IntensityBaseline, PixelGaussianBaseline)]
    ae = AutoencoderBaseline(variational=True, **TINY).eval()
    ae.fitted.fill_(True)
    for module in [*fitted, ae]:
        together, _ = module.anomaly_map(batch)
        alone = torch.cat([module.anomaly_map({k: v[i:i + 1] for k, v in batch.items() if torch.is_tensor(v)})[0]
                           for i in range(6)])
        torch.testing.assert_close(alone, together, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ autoencoders
@pytest.mark.parametrize("variational", [False, True])
def test_conv_autoencoder_shapes(variational: bool) -> None:
    config = VQVAEConfig(in_channels=3, **TINY)
    net = ConvAutoencoder(config, variational=variational)
    x = torch.rand(2, 3, 16, 12)
    mean, logvar = net.encode(x)
    assert mean.shape == (2, 8, 4, 3)
    assert (logvar is None) != variational and (logvar is None or logvar.shape == mean.shape)
    assert net.encoder[0].in_channels == 3 and net.encoder[-1].out_channels == (16 if variational else 8)
    out = net(x)
    assert out.reconstruction.shape == x.shape and out.latent.shape == out.mean.shape == (2, 8, 4, 3)
    assert net.decode(mean).shape == x.shape
    with pytest.raises(ValueError, match=r"expected images \[B, 3, H, W\]"):
        net.encode(x[:, :1])
    with pytest.raises(ValueError, match="divisible by the downsampling factor 4"):
        net.encode(torch.rand(1, 3, 10, 12))
    with pytest.raises(ValueError, match=r"z must be \[B, 8, h, w\]"):
        net.decode(torch.rand(1, 4, 4, 4))


def test_gaussian_kl_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    posterior = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    expected = torch.distributions.kl_divergence(posterior, torch.distributions.Normal(0.0, 1.0))
    torch.testing.assert_close(gaussian_kl(mean, logvar), expected)
    per_element = kl_per_image_element(mean, logvar, image_elements=3 * 8 * 8)
    torch.testing.assert_close(per_element, expected.sum(dim=(1, 2, 3)).mean() / 192)


def test_autoencoder_loss_decreases_on_a_fixed_batch(mvtec_dm: MVTecDataModule) -> None:
    torch.manual_seed(0)
    module = AutoencoderBaseline(**TINY, lr=3e-3)
    optimizer = module.configure_optimizers()
    images = default_collate([mvtec_dm.dataset("train_eval")[i] for i in range(BATCH)])["image"]
    losses = []
    for _ in range(30):
        loss = module.compute_losses(images)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_vae_kl_term_and_deterministic_scoring(mvtec_dm: MVTecDataModule) -> None:
    torch.manual_seed(0)
    module = AutoencoderBaseline(variational=True, kl_weight=0.5, **TINY)
    assert module.method_name == "vae" and AutoencoderBaseline(**TINY).method_name == "ae"
    batch = default_collate([mvtec_dm.dataset("test")[i] for i in range(4)])
    losses = module.train().compute_losses(batch["image"])
    assert set(losses) == {"loss", "l1", "kl"} and math.isfinite(losses["kl"].item()) and losses["kl"].item() > 0
    assert losses["loss"].item() == pytest.approx((losses["l1"] + 0.5 * losses["kl"]).item(), rel=1e-6)
    assert not torch.equal(module(batch["image"]), module(batch["image"]))  # training: sampled latent
    module.eval()
    module.fitted.fill_(True)
    first, pictures = module.raw_anomaly_map(batch)
    second, _ = module.raw_anomaly_map(batch)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    mean, _ = module.net.encode(batch["image"])
    torch.testing.assert_close(pictures["reconstruction"], module.net.decode(mean))
    torch.testing.assert_close(first, (batch["image"] - module.net.decode(mean)).abs().mean(1, keepdim=True))
    assert "kl" not in AutoencoderBaseline(**TINY).compute_losses(batch["image"])


def test_vae_noise_is_drawn_per_image_so_ddp_splits_give_the_single_process_gradient(
    mvtec_dm: MVTecDataModule,
) -> None:
    """The VAE's latent noise comes from (seed, epoch, dataset index): an image gets the same noise in any batch, so
    the mean of two half-batch gradients (what DDP all-reduces) is the whole batch's gradient, as for the AE."""
    torch.manual_seed(0)
    module = AutoencoderBaseline(variational=True, kl_weight=0.5, **TINY).train()
    batch = default_collate([mvtec_dm.dataset("train_eval")[i] for i in range(4)])
    images, indices = batch["image"], batch["index"]
    size = images.shape[-2:]
    noise = module.latent_noise(indices, size)
    assert noise.shape == (4, 8, size[0] // 4, size[1] // 4)  # [B, D, H/f, W/f], f = 4 with channels [8, 16]
    torch.testing.assert_close(module.latent_noise(indices[2:], size), noise[2:], rtol=0, atol=0)
    # seed 0, epoch 0: ((0 * 1_000_003 + 0 + 1) * 1_000_000_007 + index)
    reference = torch.randn(*noise.shape[1:], generator=torch.Generator().manual_seed(1_000_000_007 + int(indices[1])))
    torch.testing.assert_close(noise[1], reference, rtol=0, atol=0)
    assert not torch.equal(AutoencoderBaseline(variational=True, seed=1, **TINY).latent_noise(indices, size), noise)

    def gradient(rows: slice) -> torch.Tensor:
        module.zero_grad()
        module.compute_losses(images[rows], indices[rows])["loss"].backward()
        return torch.cat([p.grad.flatten() for p in module.parameters()])

    whole, halves = gradient(slice(0, 4)), (gradient(slice(0, 2)) + gradient(slice(2, 4))) / 2
    torch.testing.assert_close(halves, whole, rtol=1e-5, atol=1e-7)
    # Noise from the global generator (no indices) gives another gradient: the check can tell.
    module.zero_grad()
    module.compute_losses(images)["loss"].backward()
    assert not torch.allclose(torch.cat([p.grad.flatten() for p in module.parameters()]), whole, rtol=1e-3)
    with pytest.raises(ValueError, match="noise must be the latent's shape"):
        module.net(images, noise=noise[:, :2])


def test_autoencoder_in_channels_mismatch(brats_dm: BraTSDataModule) -> None:
    with pytest.raises(ConfigError, match=r"model.in_channels=3 but BraTSDataModule yields 1-channel"):
        trainer(max_epochs=1).fit(AutoencoderBaseline(in_channels=3, **TINY), datamodule=brats_dm)
    with pytest.raises(ConfigError, match=r"model.in_channels=3 but BraTSDataModule"):
        trainer().test(PixelGaussianBaseline(in_channels=3), datamodule=brats_dm, verbose=False)


def test_nan_loss_raises_training_diverged() -> None:
    module = AutoencoderBaseline(variational=True, **TINY)
    with pytest.raises(TrainingDivergedError, match=r"vae loss is not finite .*lower model.lr"):
        module.training_step({"image": torch.full((2, 3, 8, 8), float("nan")), "index": torch.arange(2)}, 0)


def test_fit_is_seeded(brats_dm: BraTSDataModule) -> None:
    def fitted_state() -> dict[str, torch.Tensor]:
        seed_everything(7)
        module = AutoencoderBaseline(variational=True, in_channels=1, **TINY)
        trainer(max_steps=3, limit_val_batches=0).fit(module, datamodule=brats_dm)
        return module.state_dict()

    first, second = fitted_state(), fitted_state()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)


def test_unfitted_methods_refuse_to_score(mvtec_dm: MVTecDataModule, tmp_path: Path) -> None:
    batch = default_collate([mvtec_dm.dataset("test")[0]])
    with pytest.raises(ConfigError, match=r"ae method has no learned state: run trainer.fit first"):
        AutoencoderBaseline(**TINY).raw_anomaly_map(batch)
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"val_threshold": 1.0, "image_threshold": 1.0}))
    # A given calibration skips every calibration pass, so the statistics must come from init_from.
    module = PixelGaussianBaseline(calibration=str(calibration), **QUIET)
    with pytest.raises(ConfigError, match=r"pixel_gaussian method has no learned state.*model.init_from"):
        trainer().test(module, datamodule=mvtec_dm, verbose=False)


# ------------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_round_trip_and_init_from(mvtec_dm: MVTecDataModule, tmp_path: Path) -> None:
    """A fitted baseline's checkpoint restores it: same maps, and with the saved calibration the same results
    without any pass over the training split (the ``lsgs detect`` path)."""
    run_trainer = trainer()
    module = PixelGaussianBaseline(output_dir=str(tmp_path), **QUIET)
    run_trainer.test(module, datamodule=mvtec_dm, verbose=False)
    run_trainer.save_checkpoint(tmp_path / "pg.ckpt")
    restored = PixelGaussianBaseline(init_from=str(tmp_path / "pg.ckpt"),
                                     calibration=str(tmp_path / "calibration.json"), **QUIET)
    assert restored.calibration_phases() == []
    for name in ("pixel_mean", "pixel_std", "eps", "fitted"):
        torch.testing.assert_close(getattr(restored, name), getattr(module, name))
    restored_trainer = trainer()
    restored_trainer.test(restored, datamodule=mvtec_dm, verbose=False)
    assert restored.results["per_category"] == module.results["per_category"]
    # A checkpoint is self-contained: Lightning's own loader rebuilds it without the init_from file.
    restored_trainer.save_checkpoint(tmp_path / "restored.ckpt")
    (tmp_path / "pg.ckpt").rename(tmp_path / "moved.ckpt")
    loaded = PixelGaussianBaseline.load_from_checkpoint(tmp_path / "restored.ckpt")
    torch.testing.assert_close(loaded.pixel_std, module.pixel_std)
    (tmp_path / "moved.ckpt").rename(tmp_path / "pg.ckpt")

    # The epoch checkpoint the pipeline writes during fit (ModelCheckpoint, after validation) is usable.
    ae = AutoencoderBaseline(**TINY, **QUIET)
    seed_everything(0)
    epoch_checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="ae", save_top_k=1, monitor=None)
    Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, max_epochs=1,
            limit_train_batches=2, limit_val_batches=1, callbacks=[epoch_checkpoint]).fit(ae, datamodule=mvtec_dm)
    assert Path(epoch_checkpoint.best_model_path) == tmp_path / "ae.ckpt"
    batch = default_collate([mvtec_dm.dataset("test")[i] for i in range(3)])
    again = AutoencoderBaseline(**TINY, init_from=str(tmp_path / "ae.ckpt")).eval()
    torch.testing.assert_close(again.raw_anomaly_map(batch)[0], ae.eval().raw_anomaly_map(batch)[0])

    with pytest.raises(CheckpointError, match="does not exist"):
        IntensityBaseline(init_from=str(tmp_path / "missing.ckpt"))
    with pytest.raises(CheckpointError, match="holds a 'pixel_gaussian' method; expected 'intensity'"):
        IntensityBaseline(init_from=str(tmp_path / "pg.ckpt"))
    with pytest.raises(CheckpointError, match="holds a 'ae' method; expected 'vae'"):
        AutoencoderBaseline(variational=True, **TINY, init_from=str(tmp_path / "ae.ckpt"))
    with pytest.raises(CheckpointError, match="is for in_channels=3, not 1"):
        PixelGaussianBaseline(in_channels=1, init_from=str(tmp_path / "pg.ckpt"))
    with pytest.raises(CheckpointError, match="does not match the configured model"):
        AutoencoderBaseline(**{**TINY, "code_dim": 4}, init_from=str(tmp_path / "ae.ckpt"))

    def write(path: Path, state: dict, method: str = "pixel_gaussian") -> str:
        torch.save({"state_dict": state, "hyper_parameters": {"in_channels": 3},
                    "lsgs": checkpoint_metadata(METHOD_KIND, method=method)}, path)
        return str(path)

    with pytest.raises(CheckpointError, match="saved before the method was fitted"):
        PixelGaussianBaseline(init_from=write(tmp_path / "unfitted.ckpt", PixelGaussianBaseline().state_dict()))
    with pytest.raises(CheckpointError, match=r"lacks \['fitted', 'pixel_mean', 'pixel_std'\]"):
        PixelGaussianBaseline(init_from=write(tmp_path / "partial.ckpt", {"eps": torch.tensor(1.0)}))


def test_config_errors() -> None:
    for value in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match=r"model.in_channels must be a positive int"):
            IntensityBaseline(in_channels=value)
    for value in (0.0, -0.1, math.inf, "0.1"):
        with pytest.raises(ConfigError, match=r"model.eps_fraction must be a positive finite number"):
            PixelGaussianBaseline(eps_fraction=value)
    for name, value in (("lr", 0.0), ("lr", math.nan), ("weight_decay", -1.0), ("kl_weight", -0.1),
                        ("kl_weight", math.inf)):
        with pytest.raises(ConfigError, match=rf"model\.{name} must be a finite number"):
            AutoencoderBaseline(**TINY, **{name: value})
    with pytest.raises(ConfigError, match=r"VQVAEConfig.code_dim"):
        AutoencoderBaseline(**{**TINY, "code_dim": 0})
    with pytest.raises(ConfigError, match="metric_region"):  # harness arguments pass through **kwargs
        PixelGaussianBaseline(metric_region="brain")
    module = AutoencoderBaseline(variational=True, in_channels=1, **TINY, lr=2e-3, weight_decay=1e-4,
                                 smoothing=False)
    assert module.num_image_channels == 1 and module.smoothing is False
    # The pipeline fits before testing exactly the methods that learn by gradient descent.
    assert AutoencoderBaseline.requires_fit
    assert not IntensityBaseline.requires_fit and not PixelGaussianBaseline.requires_fit
    assert module.hparams.smoothing is False and module.hparams.kl_weight == 0.01
    group = module.configure_optimizers().param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (2e-3, 1e-4)
    assert module.method_info() == {"variational": True, "channels": [8, 16], "code_dim": 8, "kl_weight": 0.01}


def test_pooled_statistics_without_per_category(mvtec_dm: MVTecDataModule) -> None:
    """per_category=False: one set of statistics for all training images (the mixture of categories)."""
    module = run(PixelGaussianBaseline(per_category=False, **QUIET), mvtec_dm)
    train = arrays(mvtec_dm, "train_eval", "image")
    assert module.categories == ["*"] and module.pixel_mean.shape[0] == 1
    np.testing.assert_allclose(module.pixel_mean[0].numpy(), train.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(module.pixel_std[0].numpy(), train.std(axis=0), atol=1e-6)
    per_category = run(PixelGaussianBaseline(**QUIET), mvtec_dm)
    assert len(per_category.categories) == 3
    assert not np.allclose(per_category.pixel_mean.numpy(), module.pixel_mean.numpy())
    with pytest.raises(DataError, match=r"no statistics for category \['bottle'\]"):
        batch = default_collate([mvtec_dm.dataset("test")[0]])
        batch["category"] = ["bottle"]
        per_category.raw_anomaly_map(batch)
