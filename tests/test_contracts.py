"""The data/stage contract (``lsgs.contracts``): every data module satisfies ``StageData`` with values that match
the items it serves, the read functions keep the tolerant defaults, and ``predict_split`` picks the split."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from data_modules import (
    BraTSDataModule,
    FolderDataModule,
    ImageFolderDataModule,
    MVTec3DDataModule,
    MVTecDataModule,
)
from lsgs.contracts import (
    DEFAULT_PREDICT_SPLIT,
    PredictSplit,
    StageData,
    categories_of,
    channels_of,
    image_size_of,
    predict_split_of,
    trainer_data,
    val_fraction_of,
)

SIZE = 32


def data_modules(roots: dict[str, Path], cache: str) -> dict[str, Any]:
    """One instance of every data module of ``data_modules``, on the session's demo data."""
    nut = roots["mvtec"] / "nut"
    defects = sorted(p.name for p in (nut / "test").iterdir() if p.name != "good")
    common = {"image_size": SIZE, "cache_dir": cache}
    return {
        "mvtec": MVTecDataModule(str(roots["mvtec"]), val_fraction=0.25, **common),
        "mvtec3d": MVTec3DDataModule(str(roots["mvtec3d"]), **common),
        "brats": BraTSDataModule(str(roots["brats"]), val_fraction=0.2, **common),
        "folder": FolderDataModule(
            str(nut), normal_dir="train/good", normal_test_dir="test/good",
            abnormal_dir=[f"test/{d}" for d in defects], mask_dir=[f"ground_truth/{d}" for d in defects],
            mask_suffix="_mask", **common,
        ),
        "image_folder": ImageFolderDataModule(str(nut / "test" / "good"), **common),
    }  # fmt: skip


@pytest.fixture(scope="module")
def modules(
    demo_mvtec_root: Path, demo_mvtec3d_root: Path, demo_brats_root: Path, data_cache_dir: Path
) -> dict[str, Any]:
    roots = {"mvtec": demo_mvtec_root, "mvtec3d": demo_mvtec3d_root, "brats": demo_brats_root}
    return data_modules(roots, str(data_cache_dir))


@pytest.mark.parametrize("name", ["mvtec", "mvtec3d", "brats", "folder", "image_folder"])
def test_every_data_module_satisfies_the_stage_data_protocol(name: str, modules: dict[str, Any]) -> None:
    dm = modules[name]
    assert isinstance(dm, StageData)
    test = dm.dataset("test")
    image = test[0]["image"]  # [C, H, W]
    # The facts the stages read describe the data the module serves.
    assert channels_of(dm) == dm.num_channels == image.shape[0]
    assert image_size_of(dm) == dm.image_size == image.shape[1] == image.shape[2] == SIZE
    assert categories_of(dm) == list(dm.test_categories)
    assert set(categories_of(dm)) == {item.category for item in test.items}
    assert val_fraction_of(dm) == dm.val_fraction == {"mvtec": 0.25, "brats": 0.2}.get(name, dm.val_fraction)
    assert isinstance(dm.val_fraction, float) and isinstance(dm.image_size, int)


def test_missing_facts_read_as_the_documented_defaults() -> None:
    partial = SimpleNamespace(image_size=16)  # a test double that says only its image size
    assert not isinstance(partial, StageData)
    assert (channels_of(partial), image_size_of(partial), val_fraction_of(partial)) == (None, 16, None)
    assert categories_of(partial) == [] and categories_of(SimpleNamespace(test_categories=None)) == []
    assert categories_of(SimpleNamespace(test_categories=("a", "b"))) == ["a", "b"]
    assert trainer_data(None) is None and trainer_data(SimpleNamespace()) is None
    assert trainer_data(SimpleNamespace(datamodule=partial)) is partial


def test_the_model_chooses_the_predict_split(modules: dict[str, Any]) -> None:
    from lsgs.modules import CodebookAggregator

    assert predict_split_of(object()) == DEFAULT_PREDICT_SPLIT == "test"
    assert CodebookAggregator.predict_split == "train"
    assert isinstance(SimpleNamespace(predict_split="train"), PredictSplit)
    dm = modules["mvtec"]

    def predicted_items(model: Any) -> int:
        dm.trainer = SimpleNamespace(lightning_module=model, world_size=1, global_rank=0)
        try:
            return len(dm.predict_dataloader().dataset)
        finally:
            dm.trainer = None

    sizes = {split: predicted_items(SimpleNamespace(predict_split=split)) for split in ("train", "test")}
    assert predicted_items(object()) == sizes["test"] == len(dm.dataset("test"))  # a model that does not say
    assert sizes["train"] == len(dm.dataset("train_eval")) != sizes["test"]
