"""ImageFolderDataModule (unlabelled images for predict) and FolderDataModule (labelled folders: contract tests
on three layouts of the demo images, one test per bad input, missing masks in the metrics, the pipeline)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score
from test_data_modules import IMAGE_SIZE, DataModuleContract

from data_modules import FolderDataModule, ImageFolderDataModule, MVTecDataModule
from data_modules.folder import category_names
from lsgs.errors import ConfigError, DataError, DataNotFoundError
from lsgs.modules.scoring import AnomalyMapModule


@pytest.fixture
def folder(demo_mvtec_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "inbox"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    shutil.copy(demo_mvtec_root / "nut" / "test" / "hole" / "000.png", root / "a.png")
    shutil.copy(demo_mvtec_root / "mesh" / "test" / "good" / "000.png", root / "b.PNG")
    Image.open(demo_mvtec_root / "fabric" / "train" / "good" / "000.png").save(root / "c.jpg", quality=95)
    shutil.copy(demo_mvtec_root / "nut" / "train" / "good" / "000.png", root / "sub" / "d.png")
    shutil.copy(demo_mvtec_root / "nut" / "train" / "good" / "001.png", root / ".hidden" / "e.png")
    (root / "readme.txt").write_text("x")
    (root / ".DS_Store").write_bytes(b"x")
    return root


def test_predict_items(folder: Path, data_cache_dir: Path) -> None:
    dm = ImageFolderDataModule(str(folder), image_size=24, cache_dir=str(data_cache_dir), eval_batch_size=2)
    batches = list(dm.predict_dataloader())
    names = [Path(p).name for b in batches for p in b["path"]]
    assert names == ["a.png", "b.PNG", "c.jpg"]
    batch = batches[0]
    assert batch["image"].shape == (2, 3, 24, 24) and batch["label"].tolist() == [-1, -1]
    assert batch["mask"].sum() == 0 and batch["roi"].min() == 1 and batch["category"] == ["inbox", "inbox"]
    ref = np.asarray(Image.open(folder / "a.png").convert("RGB").resize((24, 24), Image.Resampling.BILINEAR))
    np.testing.assert_allclose(batch["image"][0].permute(1, 2, 0).numpy(), ref / 255.0, atol=1e-6)
    assert dm.test_categories == ["inbox"] and dm.num_channels == 3


def test_grayscale_and_recursive(folder: Path, data_cache_dir: Path) -> None:
    dm = ImageFolderDataModule(
        str(folder), channels=1, recursive=True, image_size=16, cache_dir=str(data_cache_dir)
    )
    data = dm.dataset("test")
    assert [Path(i.path).name for i in data.items] == ["a.png", "b.PNG", "c.jpg", "d.png"]
    item = data[0]
    assert item["image"].shape == (1, 16, 16) and dm.num_channels == 1
    ref = np.asarray(Image.open(folder / "a.png").convert("L").resize((16, 16), Image.Resampling.BILINEAR))
    assert torch.allclose(item["image"][0], torch.from_numpy(ref / 255.0).float(), atol=1e-6)


def test_only_predict_is_available(folder: Path, data_cache_dir: Path) -> None:
    dm = ImageFolderDataModule(str(folder), image_size=16, cache_dir=str(data_cache_dir))
    for name in ("train_dataloader", "val_dataloader", "test_dataloader", "train_eval_dataloader"):
        with pytest.raises(ConfigError, match="use predict"):
            getattr(dm, name)()


def test_bad_folder_input(tmp_path: Path, data_cache_dir: Path) -> None:
    with pytest.raises(DataNotFoundError, match="missing"):
        ImageFolderDataModule(str(tmp_path / "missing"), cache_dir=str(data_cache_dir)).prepare_data()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no image files"):
        ImageFolderDataModule(str(tmp_path / "empty"), cache_dir=str(data_cache_dir)).prepare_data()
    with pytest.raises(ConfigError, match="channels"):
        ImageFolderDataModule(str(tmp_path), channels=2)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not png")
    with pytest.raises(DataError, match=r"x.png: cannot decode image"):
        ImageFolderDataModule(str(tmp_path / "bad"), cache_dir=str(data_cache_dir)).setup()


def test_sixteen_bit_images_are_rescaled(tmp_path: Path, data_cache_dir: Path) -> None:
    ramp = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    dm = ImageFolderDataModule(str(tmp_path), channels=1, image_size=16, cache_dir=str(data_cache_dir))
    image = dm.dataset("test")[0]["image"][0].numpy()
    expected = np.floor(ramp / 65535 * 255 + 0.5) / 255  # scaled by the 16-bit range, not clipped at 255
    np.testing.assert_allclose(image, expected, atol=1e-6)


# =============================================================================== FolderDataModule (labelled)
DEFECTS = ("color", "contamination", "hole", "scratch")
CATEGORIES = ("fabric", "nut", "mesh")


def _copy(src: Path, dst: Path, jpeg: bool = False) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if jpeg:
        Image.open(src).convert("RGB").save(dst, quality=95)
    else:
        shutil.copy(src, dst)


# FolderDataModule settings of each layout written by `write_folder_layouts`.
LAYOUTS: dict[str, dict[str, Any]] = {
    # 1. Masks beside the images with another extension: crack_01.jpg + crack_01.png; a normal test folder.
    "beside_ext": {
        "normal_dir": "normal",
        "normal_test_dir": "normal_test",
        "abnormal_dir": [f"defects/{d}" for d in DEFECTS],
        "image_glob": "*.jpg",
        "mask_glob": "*.png",
    },
    # 2. Masks with a suffix in their own folders (one per defect folder); grayscale.
    "suffix_dir": {
        "normal_dir": "train",
        "normal_test_dir": "test/good",
        "abnormal_dir": [f"test/{d}" for d in DEFECTS],
        "mask_dir": [f"masks/{d}" for d in DEFECTS],
        "mask_suffix": "_mask",
        "channels": 1,
    },
    # 3. No normal test folder (held out), masks beside with a suffix, categories named by a mapping.
    "no_normal_test": {
        "normal_dir": "ok",
        "abnormal_dir": {d.upper(): f"ng/{d}" for d in DEFECTS},
        "mask_suffix": "_mask",
        "normal_test_fraction": 0.2,
    },
    # 4. MVTec `nut` as folders, so that MVTecDataModule(category="nut") and FolderDataModule see the same
    # images in the same order: the normal folder is named "nut" (the split is seeded by its name, as MVTec's
    # by the category) and test files <defect>_<stem> (test order = file-name order = MVTec's folder order).
    "nut_as_folders": {
        "normal_dir": "train/nut",
        "normal_test_dir": "test_good/nut",
        "abnormal_dir": "test/nut",
        "mask_dir": "masks/nut",
    },
}


def write_folder_layouts(mvtec: Path, out: Path) -> dict[str, Path]:
    """The MVTec demo images re-arranged into the `LAYOUTS`. Returns {layout: root}."""
    root = out / "beside_ext"
    for cat in CATEGORIES:
        for p in sorted((mvtec / cat / "train" / "good").glob("*.png")):
            _copy(p, root / "normal" / f"{cat}_{p.stem}.jpg", jpeg=True)
        for p in sorted((mvtec / cat / "test" / "good").glob("*.png")):
            _copy(p, root / "normal_test" / f"{cat}_{p.stem}.jpg", jpeg=True)
        for d in DEFECTS:
            for p in sorted((mvtec / cat / "test" / d).glob("*.png")):
                _copy(p, root / "defects" / d / f"{cat}_{p.stem}.jpg", jpeg=True)
                _copy(mvtec / cat / "ground_truth" / d / f"{p.stem}_mask.png", root / "defects" / d / f"{cat}_{p.stem}.png")
    root = out / "suffix_dir"
    for cat in CATEGORIES:
        for p in sorted((mvtec / cat / "train" / "good").glob("*.png")):
            _copy(p, root / "train" / f"{cat}_{p.stem}.png")
        for p in sorted((mvtec / cat / "test" / "good").glob("*.png")):
            _copy(p, root / "test" / "good" / f"{cat}_{p.stem}.png")
        for d in DEFECTS:
            for p in sorted((mvtec / cat / "test" / d).glob("*.png")):
                _copy(p, root / "test" / d / f"{cat}_{p.stem}.png")
                _copy(mvtec / cat / "ground_truth" / d / f"{p.stem}_mask.png", root / "masks" / d / f"{cat}_{p.stem}_mask.png")
    root = out / "no_normal_test"
    for cat in CATEGORIES:
        for split in ("train", "test"):
            for p in sorted((mvtec / cat / split / "good").glob("*.png")):
                _copy(p, root / "ok" / f"{cat}_{split}_{p.stem}.png")
        for d in DEFECTS:
            for p in sorted((mvtec / cat / "test" / d).glob("*.png")):
                _copy(p, root / "ng" / d / f"{cat}_{p.stem}.png")
                _copy(mvtec / cat / "ground_truth" / d / f"{p.stem}_mask.png", root / "ng" / d / f"{cat}_{p.stem}_mask.png")
    root = out / "nut_as_folders"
    for p in sorted((mvtec / "nut" / "train" / "good").glob("*.png")):
        _copy(p, root / "train" / "nut" / p.name)
    for d in ("good", *DEFECTS):
        for p in sorted((mvtec / "nut" / "test" / d).glob("*.png")):
            _copy(p, root / ("test_good" if d == "good" else "test") / "nut" / f"{d}_{p.stem}.png")
            if d != "good":
                _copy(mvtec / "nut" / "ground_truth" / d / f"{p.stem}_mask.png", root / "masks" / "nut" / f"{d}_{p.stem}.png")
    return {name: out / name for name in LAYOUTS}


@pytest.fixture(scope="session")
def folder_layouts(demo_mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo images in the four `LAYOUTS` (built once per session). Read-only."""
    return write_folder_layouts(demo_mvtec_root, tmp_path_factory.mktemp("folder-layouts"))


class _FolderContract(DataModuleContract):
    max_empty_anomalous = 0.1  # thin scratches may vanish at 32 px, as for MVTec
    decoders = ("data_modules.folder.decode_folder_sample", "data_modules.image_io.read_image")
    layout: str

    @pytest.fixture
    def root(self, folder_layouts: dict) -> Path:
        return folder_layouts[self.layout]

    def make(self, root: Path, cache: Path, **kwargs) -> FolderDataModule:
        kwargs = {"image_size": IMAGE_SIZE, "batch_size": 8, "val_fraction": 0.25, **LAYOUTS[self.layout], **kwargs}
        return FolderDataModule(str(root), cache_dir=str(cache), **kwargs)

    def test_categories_are_the_abnormal_folders(self, dm: FolderDataModule) -> None:
        test = dm.dataset("test").items
        assert [c.lower() for c in dm.test_categories] == list(DEFECTS)
        for item in test:
            if item.label == 1:
                assert Path(item.path).parent.name.lower() == item.category.lower()
        # every category has normal and anomalous test images; each normal test image appears once
        for category in dm.test_categories:
            assert {i.label for i in test if i.category == category} == {0, 1}
        normal_paths = [i.path for i in test if i.label == 0]
        assert len(normal_paths) == len(set(normal_paths)) == dm.split_summary["normal_test"]


class TestFolderBesideOtherExtension(_FolderContract):
    layout = "beside_ext"
    num_channels = 3


class TestFolderSuffixMaskDirs(_FolderContract):
    layout = "suffix_dir"
    num_channels = 1


class TestFolderNoNormalTest(_FolderContract):
    layout = "no_normal_test"
    num_channels = 3

    def test_held_out_normals_are_disjoint_and_seeded(self, root: Path, data_cache_dir: Path) -> None:
        dm = self.make(root, data_cache_dir)
        summary = dm.split_summary
        normal_test = {i.path for i in dm.dataset("test").items if i.label == 0}
        train = {i.path for i in dm.dataset("train").items}
        val = {i.path for i in dm.dataset("val").items}
        n = 3 * (16 + 2)  # every image of ok/
        assert len(normal_test) == round(0.2 * n) and len(val) == round(0.25 * (n - len(normal_test)))
        assert len(train | val | normal_test) == n and not (train & val or train & normal_test or val & normal_test)
        assert summary["seed"] == 0 and summary["normal_test_source"] == "held out"
        other = self.make(root, data_cache_dir, seed=3)
        assert {i.path for i in other.dataset("test").items if i.label == 0} != normal_test
