"""PatchCore on the harness (``lsgs.methods.patchcore``): maps against a direct ``torch.cdist`` computation, one
memory bank per category, the bank built from the training patches in dataset order whatever the number of
processes, and the bank as the learned state of the stage. The maths is tested in ``test_patchcore_net.py``;
``lsgs detect --method patchcore`` in ``test_pipeline.py``."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch.strategies import SingleDeviceStrategy

from data_modules import MVTecDataModule
from data_modules.samplers import EvalDistributedSampler
from lsgs.evaluation import OWN_IMAGE_SCORE
from lsgs.methods import patchcore as patchcore_module
from lsgs.methods.feature_method import ALL_CATEGORIES
from lsgs.methods.patchcore import MEMORY_BANK_PHASE, PatchCoreBaseline
from lsgs.nn.patchcore import anomaly_map, greedy_coreset, reweighted_image_score

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def tiny_patchcore(**kwargs: Any) -> PatchCoreBaseline:
    """PatchCore on a random Lite0 (seeded, so two instances are the same model) at 32 px: 4x4 and 2x2 maps."""
    torch.manual_seed(0)
    kwargs = {"weights": None, "input_size": 32, "coreset_fraction": 0.25, "projection_dim": 16, **kwargs}
    return PatchCoreBaseline(**kwargs)


def direct_patch_features(method: PatchCoreBaseline, images: torch.Tensor) -> torch.Tensor:
    """``[B, h*w, D]`` locally aware patch features, written out: 3x3 average pooling (zero padding counted) of
    each backbone map, the coarser map resized bilinearly to the finer one's grid, concatenated."""
    maps = method.backbone(images)
    pooled = [F.avg_pool2d(m, 3, stride=1, padding=1, count_include_pad=True) for m in maps]
    size = pooled[0].shape[-2:]
    joined = torch.cat([pooled[0], F.interpolate(pooled[1], size=size, mode="bilinear", align_corners=False)], 1)
    return joined.flatten(2).transpose(1, 2)  # [B, D, h, w] -> [B, h*w, D]


@pytest.mark.parametrize("search", ["faiss", "torch"])
def test_maps_are_the_nearest_bank_distance_of_each_patch_with_its_category_s_bank(search: str) -> None:
    method = tiny_patchcore(search=search).eval()
    method._build(["fabric", "nut"])  # the banks: patches of other random images, one set per category
    generator = torch.Generator().manual_seed(1)
    banks = [direct_patch_features(method, torch.rand(3, 3, 32, 32, generator=generator)).flatten(0, 1)
             for _ in range(2)]  # fmt: skip
    for net, bank in zip(method.nets, banks, strict=True):
        net.set_memory_bank(bank)
    method.fitted.fill_(True)
    images = torch.rand(3, 3, 32, 32, generator=generator)
    categories = ["nut", "fabric", "nut"]
    maps, extras = method.raw_anomaly_map({"image": images, "category": categories})
    assert maps.shape == (3, 1, 32, 32) and extras[OWN_IMAGE_SCORE].shape == (3,)
    patches = direct_patch_features(method, images)  # [3, 16, D]
    for i, category in enumerate(categories):
        bank = banks[method.categories.index(category)]
        distances = torch.cdist(patches[i], bank)  # [16, M], every pair
        nearest, rows = distances.min(dim=1)
        expected = anomaly_map(nearest.reshape(1, 4, 4), (32, 32), sigma=4.0)  # upsampled, blurred (the net's)
        torch.testing.assert_close(maps[i : i + 1], expected, rtol=1e-4, atol=1e-5)
        score = reweighted_image_score(patches[i : i + 1], nearest[None], rows[None], bank, num_neighbors=9)
        torch.testing.assert_close(extras[OWN_IMAGE_SCORE][i : i + 1], score, rtol=1e-4, atol=1e-5)
        # Scored against its own category's bank only: the other bank gives another map.
        other = banks[1 - method.categories.index(category)]
        wrong = anomaly_map(torch.cdist(patches[i], other).min(dim=1).values.reshape(1, 4, 4), (32, 32))
        assert not torch.allclose(maps[i : i + 1], wrong, rtol=1e-2)


def attach(method: PatchCoreBaseline, datamodule: MVTecDataModule) -> PatchCoreBaseline:
    method._trainer = SimpleNamespace(datamodule=datamodule, strategy=SingleDeviceStrategy("cpu"))
    method.setup("test")
    return method


def fill_bank(method: PatchCoreBaseline, datamodule: MVTecDataModule, world: int = 1, rank: int = 0) -> None:
    """The calibration pass of the harness over rank ``rank``'s shard of the training split (its sampler)."""
    assert method.calibration_phases() == [(MEMORY_BANK_PHASE, "train")]
    data = datamodule.dataset("train_eval")
    sampler = EvalDistributedSampler(data, num_replicas=world, rank=rank)
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler):
            method.calibrate_step(MEMORY_BANK_PHASE, batch)


def test_banks_are_the_coresets_of_each_category_s_training_patches_whatever_the_process_count(
    demo_mvtec_root: Path, data_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    datamodule = MVTecDataModule(str(demo_mvtec_root), category=["nut", "fabric"], image_size=32,
                                 cache_dir=str(data_cache_dir))  # fmt: skip
    single = attach(tiny_patchcore(), datamodule)
    fill_bank(single, datamodule)
    single.finish_calibration(MEMORY_BANK_PHASE)
    assert single.categories == ["nut", "fabric"] and bool(single.fitted)
    # Direct: each category's training images in dataset order, all their patches, the greedy coreset.
    train = datamodule.dataset("train_eval")
    for category, net in zip(single.categories, single.nets, strict=True):
        images = torch.stack([train[i]["image"] for i in range(len(train)) if train[i]["category"] == category])
        with torch.no_grad():
            patches = direct_patch_features(single, images).flatten(0, 1)  # [N * 16, D], (image, y, x) order
        chosen = greedy_coreset(patches, 0.25, 16, 0)
        assert len(chosen) == round(0.25 * len(patches))
        torch.testing.assert_close(net.memory_bank, patches[chosen], rtol=1e-5, atol=1e-6)
    # Two processes: each takes its shard (every other image), all-gathers the patches, sorts them by dataset
    # index and builds the same banks. The all-gather is simulated in one process.
    ranks = [attach(tiny_patchcore(), datamodule) for _ in range(2)]
    for rank, method in enumerate(ranks):
        fill_bank(method, datamodule, world=2, rank=rank)
    shards = [method._patches for method in ranks]

    def all_gather_object(gathered: list, mine: list) -> None:
        gathered[:] = shards

    fake = SimpleNamespace(is_available=lambda: True, is_initialized=lambda: True, get_world_size=lambda: 2,
                           all_gather_object=all_gather_object)  # fmt: skip
    monkeypatch.setattr(patchcore_module, "dist", fake)
    for method in ranks:
        method.finish_calibration(MEMORY_BANK_PHASE)
        for mine, reference in zip(method.nets, single.nets, strict=True):
            torch.testing.assert_close(mine.memory_bank, reference.memory_bank, rtol=0, atol=0)


def test_one_bank_for_categories_that_share_their_normals(demo_mvtec_root: Path, data_cache_dir: Path) -> None:
    datamodule = MVTecDataModule(str(demo_mvtec_root), category=["nut", "fabric"], image_size=32,
                                 cache_dir=str(data_cache_dir))  # fmt: skip
    method = attach(tiny_patchcore(per_category=False), datamodule)
    fill_bank(method, datamodule)
    method.finish_calibration(MEMORY_BANK_PHASE)
    patches = len(datamodule.dataset("train_eval")) * 16
    assert method.categories == [ALL_CATEGORIES] and method.nets[0].memory_bank.shape[0] == round(0.25 * patches)


def test_the_memory_bank_is_the_stage_s_learned_state(tiny_run_with_methods: Path) -> None:
    """``methods/patchcore/checkpoints/last.ckpt`` holds one bank per category of the run, each the coreset of
    that category's training patches (recomputed here from the stage's own data and backbone), and
    ``load_method`` (what ``lsgs detect`` uses) rebuilds PatchCore with exactly those banks."""
    from lsgs.methods.registry import load_method
    from lsgs.stage_cli import instantiate_stage

    stage = tiny_run_with_methods / "methods" / "patchcore"
    checkpoint = torch.load(stage / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    results = json.loads((stage / "results.json").read_text())
    categories = checkpoint["lsgs"]["categories"]
    assert categories == ["fabric", "mesh", "nut"] and bool(checkpoint["state_dict"]["fitted"])
    banks = [checkpoint["state_dict"][f"nets.{i}.memory_bank"] for i in range(len(categories))]
    assert results["method_info"]["memory_bank"] == {c: len(b) for c, b in zip(categories, banks, strict=True)}
    loaded = load_method(tiny_run_with_methods, "patchcore")
    for net, bank in zip(loaded.nets, banks, strict=True):
        assert torch.equal(net.memory_bank, bank)
    # Recomputed from the stage's config: its data module (images at the method's 64 px) and its backbone.
    config = yaml.safe_load((stage / "config.yaml").read_text())
    config["trainer"].update(logger=False, callbacks=[], enable_checkpointing=False, default_root_dir=None)
    config["model"]["init_args"]["output_dir"] = None
    datamodule = instantiate_stage(config).datamodule
    train = datamodule.dataset("train_eval")
    fraction, dim, seed = (config["model"]["init_args"].get(k, d) for k, d in
                           (("coreset_fraction", 0.1), ("projection_dim", 128), ("coreset_seed", 0)))  # fmt: skip
    for category, bank in zip(categories, banks, strict=True):
        images = torch.stack([train[i]["image"] for i in range(len(train)) if train[i]["category"] == category])
        assert images.shape[-1] == 64
        with torch.no_grad():
            patches = direct_patch_features(loaded, images).flatten(0, 1)
        torch.testing.assert_close(bank, patches[greedy_coreset(patches, fraction, dim, seed)], rtol=1e-4, atol=1e-5)
