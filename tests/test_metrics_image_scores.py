"""Image-score reductions (src/lsgs/metrics/image.py, harness argument ``image_score``): each against a
brute-force loop, ``max`` bit for bit equal to the code path it replaced, and through the harness on demo data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from sklearn.metrics import roc_auc_score

from data_modules import MVTecDataModule
from lsgs.errors import ConfigError, DataError
from lsgs.methods.intensity import IntensityBaseline
from lsgs.metrics.quantile import score_quantile
from lsgs.nn.image_score import reduce_image_scores, topk_count, topk_mean_scores


def brute_topk_mean(maps: torch.Tensor, fraction: float, valid: torch.Tensor | None) -> list[float]:
    """Per image: sort the valid values in Python, average the first max(1, round(q * n)) of them."""
    out = []
    for b in range(maps.shape[0]):
        values = maps[b].flatten().tolist()
        keep = [True] * len(values) if valid is None else valid[b].flatten().tolist()
        chosen = sorted((v for v, k in zip(values, keep) if k), reverse=True)
        count = min(len(chosen), max(1, round(fraction * len(chosen))))  # Python rounds half to even too
        out.append(sum(chosen[:count]) / count)
    return out


@pytest.fixture
def maps_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(5, 1, 9, 11, generator=generator) * 3 - 1  # negatives too: masked pixels must not be 0
    valid = torch.rand(5, 1, 9, 11, generator=generator) > 0.6
    valid[2] = False
    valid[2, 0, 4, 4] = True  # one valid pixel
    valid[3] = True
    return maps, valid


@pytest.mark.parametrize("fraction", [1e-4, 0.01, 0.05, 0.1, 0.37, 0.5, 1.0])
@pytest.mark.parametrize("masked", [False, True])
def test_topk_mean_matches_a_brute_force_loop(
    fraction: float, masked: bool, maps_and_mask: tuple[torch.Tensor, torch.Tensor]
) -> None:
    maps, valid = maps_and_mask
    mask = valid if masked else None
    got = topk_mean_scores(maps, fraction, mask)
    assert got.shape == (5,) and got.dtype == maps.dtype
    assert got.tolist() == pytest.approx(brute_topk_mean(maps, fraction, mask), rel=1e-6, abs=1e-7)
    assert torch.equal(reduce_image_scores(maps, "topk_mean", fraction, mask), got)


def test_topk_mean_limits_are_the_max_and_the_mean(maps_and_mask: tuple[torch.Tensor, torch.Tensor]) -> None:
    maps, valid = maps_and_mask
    assert torch.equal(topk_mean_scores(maps, 1e-6, valid), reduce_image_scores(maps, "max", valid=valid))
    means = [maps[b][valid[b]].double().mean().item() for b in range(5)]
    assert topk_mean_scores(maps, 1.0, valid).tolist() == pytest.approx(means, rel=1e-6)


def test_topk_count_rounds_to_the_nearest_integer() -> None:
    counts = torch.tensor([1, 100, 150, 249, 250, 16384, 7])
    # 1 % of 150 = 1.5 rounds half to even (2); 1 % of 249 = 2.49 -> 2; 1 % of 250 = 2.5 -> 2; of 16384 -> 164.
    assert topk_count(counts, 0.01).tolist() == [1, 1, 2, 2, 2, 164, 1]
    assert topk_count(counts, 1.0).tolist() == counts.tolist()


def test_max_is_the_maximum_over_the_valid_pixels(maps_and_mask: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Against a loop over the images: the maximum of each map, and of its valid pixels only."""
    maps, valid = maps_and_mask
    assert torch.equal(reduce_image_scores(maps, "max"), torch.stack([m.max() for m in maps]))
    masked = torch.stack([m[v].max() for m, v in zip(maps, valid)])
    assert torch.equal(reduce_image_scores(maps, "max", 0.5, valid), masked)


def test_errors(maps_and_mask: tuple[torch.Tensor, torch.Tensor]) -> None:
    maps, valid = maps_and_mask
    valid = valid.clone()
    valid[1] = False
    for method in ("max", "topk_mean"):
        with pytest.raises(DataError, match=r"image\(s\) \[1\] of the batch have no valid pixel"):
            reduce_image_scores(maps, method, 0.1, valid)
    with pytest.raises(ConfigError, match="image_score='mean' is not one of"):
        reduce_image_scores(maps, "mean")
    for fraction in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="fraction must be in"):
            topk_mean_scores(maps, fraction)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_score": "mean"},
         r"^model.image_score=\"mean\" must be one of \['max', 'topk_mean'\] or null \(null: the method's own\)$"),
        ({"image_score": "topk_mean", "image_topk": 0.0}, r"^model.image_topk=0.0 must be a number in \(0, 1\]$"),
        ({"image_topk": 1.5}, r"^model.image_topk=1.5 must be a number in \(0, 1\]$"),
    ],
)
def test_bad_harness_settings(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        IntensityBaseline(in_channels=3, **kwargs)


def test_the_harness_uses_the_reduction_everywhere(
    demo_mvtec_root: Path, data_cache_dir: Path, tmp_path: Path
) -> None:
    """A baseline through the harness with topk_mean: the test image scores, the image AUROC and the image
    threshold all come from brute-force top-k means of the maps (computed outside the harness)."""
    dm = MVTecDataModule(str(demo_mvtec_root), image_size=32, batch_size=8, cache_dir=str(data_cache_dir))
    dm.setup()
    fraction = 0.05
    module = IntensityBaseline(
        in_channels=dm.num_channels, image_score="topk_mean", image_topk=fraction, compute_aupro=False,
        heatmaps_per_category=0, output_dir=str(tmp_path), metric_bits=20,
    )  # fmt: skip
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)  # fmt: skip
    trainer.test(module, datamodule=dm, verbose=False)

    def brute(split: str) -> tuple[list[float], list[int]]:
        scores, labels = [], []
        with torch.no_grad():
            for batch in (dm.val_dataloader() if split == "val" else dm.test_dataloader()):
                maps, _ = module.anomaly_map(batch)
                scores += brute_topk_mean(maps, fraction, None)
                labels += batch["label"].tolist()
        return scores, labels

    test_scores, labels = brute("test")
    rows = np.genfromtxt(tmp_path / "image_scores.csv", delimiter=",", names=True, dtype=None, encoding=None)
    assert rows["score"].tolist() == pytest.approx(test_scores, rel=1e-6)
    assert module.results["pooled"]["image_auroc"] == pytest.approx(roc_auc_score(labels, test_scores), abs=1e-12)
    val_scores, _ = brute("val")
    expected = score_quantile(torch.tensor(val_scores), module.image_quantile, num_bits=20)
    assert module.calibration["image_threshold"] == expected
