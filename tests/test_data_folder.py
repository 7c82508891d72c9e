"""ImageFolderDataModule (unlabelled images for predict) and FolderDataModule (labelled folders: contract tests
on three layouts of the demo images, one test per bad input, missing masks in the metrics, the pipeline)."""

from __future__ import annotations

import json
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

from data_modules import FolderDataModule, ImageFolderDataModule
from data_modules.folder import category_names
from lsgs.errors import ConfigError, DataError, DataNotFoundError
from lsgs.evaluation import AnomalyMapModule


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
                _copy(
                    mvtec / cat / "ground_truth" / d / f"{p.stem}_mask.png",
                    root / "defects" / d / f"{cat}_{p.stem}.png",
                )
    root = out / "suffix_dir"
    for cat in CATEGORIES:
        for p in sorted((mvtec / cat / "train" / "good").glob("*.png")):
            _copy(p, root / "train" / f"{cat}_{p.stem}.png")
        for p in sorted((mvtec / cat / "test" / "good").glob("*.png")):
            _copy(p, root / "test" / "good" / f"{cat}_{p.stem}.png")
        for d in DEFECTS:
            for p in sorted((mvtec / cat / "test" / d).glob("*.png")):
                _copy(p, root / "test" / d / f"{cat}_{p.stem}.png")
                _copy(
                    mvtec / cat / "ground_truth" / d / f"{p.stem}_mask.png",
                    root / "masks" / d / f"{cat}_{p.stem}_mask.png",
                )
    root = out / "no_normal_test"
    for cat in CATEGORIES:
        for split in ("train", "test"):
            for p in sorted((mvtec / cat / split / "good").glob("*.png")):
                _copy(p, root / "ok" / f"{cat}_{split}_{p.stem}.png")
        for d in DEFECTS:
            for p in sorted((mvtec / cat / "test" / d).glob("*.png")):
                _copy(p, root / "ng" / d / f"{cat}_{p.stem}.png")
                _copy(
                    mvtec / cat / "ground_truth" / d / f"{p.stem}_mask.png",
                    root / "ng" / d / f"{cat}_{p.stem}_mask.png",
                )
    root = out / "nut_as_folders"
    for p in sorted((mvtec / "nut" / "train" / "good").glob("*.png")):
        _copy(p, root / "train" / "nut" / p.name)
    for d in ("good", *DEFECTS):
        for p in sorted((mvtec / "nut" / "test" / d).glob("*.png")):
            _copy(p, root / ("test_good" if d == "good" else "test") / "nut" / f"{d}_{p.stem}.png")
            if d != "good":
                _copy(
                    mvtec / "nut" / "ground_truth" / d / f"{p.stem}_mask.png",
                    root / "masks" / "nut" / f"{d}_{p.stem}.png",
                )
    return {name: out / name for name in LAYOUTS}


@pytest.fixture(scope="session")
def folder_layouts(demo_mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo images in the four `LAYOUTS` (built once per session). Read-only."""
    return write_folder_layouts(demo_mvtec_root, tmp_path_factory.mktemp("folder-layouts"))


class _FolderContract(DataModuleContract):
    max_empty_anomalous = 0.1  # thin scratches may vanish at 32 px, as for MVTec
    decoders = ("data_modules.folder.decode_folder_sample", "data_modules.image_io.open_image")
    layout: str

    @pytest.fixture
    def root(self, folder_layouts: dict) -> Path:
        return folder_layouts[self.layout]

    def make(self, root: Path, cache: Path, **kwargs) -> FolderDataModule:
        kwargs = {
            "image_size": IMAGE_SIZE,
            "batch_size": 8,
            "val_fraction": 0.25,
            **LAYOUTS[self.layout],
            **kwargs,
        }
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
        assert len(train | val | normal_test) == n and not (
            train & val or train & normal_test or val & normal_test
        )
        assert summary["seed"] == 0 and summary["normal_test_source"] == "held out"
        other = self.make(root, data_cache_dir, seed=3)
        assert {i.path for i in other.dataset("test").items if i.label == 0} != normal_test


# ------------------------------------------------------------------------------------------- layout rules
@pytest.fixture
def small(demo_mvtec_root: Path, tmp_path: Path) -> Path:
    """6 normal images in good/, 3 anomalous in crack/ with <stem>_mask.png beside them."""
    root = tmp_path / "small"
    nut = demo_mvtec_root / "nut"
    for i, p in enumerate(sorted((nut / "train" / "good").glob("*.png"))[:6]):
        _copy(p, root / "good" / f"ok_{i}.png")
    for i, (d, stem) in enumerate((("hole", "000"), ("scratch", "000"), ("color", "001"))):
        _copy(nut / "test" / d / f"{stem}.png", root / "crack" / f"crack_{i}.png")
        _copy(nut / "ground_truth" / d / f"{stem}_mask.png", root / "crack" / f"crack_{i}_mask.png")
    return root


def small_dm(root: Path, cache: Path, **kwargs: Any) -> FolderDataModule:
    kwargs = {"normal_dir": "good", "abnormal_dir": "crack", "mask_suffix": "_mask", "image_size": 16,
              "val_fraction": 0.25, "normal_test_fraction": 0.2, **kwargs}  # fmt: skip
    return FolderDataModule(str(root), cache_dir=str(cache), **kwargs)


def test_masks_pair_by_stem_and_decode_like_pil(small: Path, data_cache_dir: Path) -> None:
    dm = small_dm(small, data_cache_dir)
    test = dm.dataset("test")
    anomalous = [(Path(i.path).name, test[k]) for k, i in enumerate(test.items) if i.label == 1]
    assert [name for name, _ in anomalous] == ["crack_0.png", "crack_1.png", "crack_2.png"]
    for name, item in anomalous:
        mask = Image.open(small / "crack" / name.replace(".png", "_mask.png")).convert("L")
        ref = np.asarray(
            Image.fromarray((np.asarray(mask) > 0).astype(np.uint8)).resize((16, 16), Image.NEAREST)
        )
        assert (
            torch.equal(item["mask"][0], torch.tensor(ref, dtype=torch.float32)) and item["has_mask"] is True
        )
        img = np.asarray(Image.open(small / "crack" / name).convert("RGB").resize((16, 16), Image.BILINEAR))
        np.testing.assert_allclose(item["image"].permute(1, 2, 0).numpy(), img / 255.0, atol=1e-6)
    assert dm.test_categories == ["crack"] and {i.category for i in dm.dataset("train").items} == {"crack"}


def test_mixed_sizes_resized_and_each_mask_checked_against_its_own_image(
    small: Path, data_cache_dir: Path
) -> None:
    def resize(path: Path, size: tuple[int, int], resample: int) -> None:
        Image.open(path).resize(size, resample).save(path)

    resize(small / "crack" / "crack_1.png", (100, 70), Image.BILINEAR)
    resize(small / "crack" / "crack_1_mask.png", (100, 70), Image.NEAREST)
    resize(small / "good" / "ok_0.png", (90, 60), Image.BILINEAR)
    dm = small_dm(small, data_cache_dir, channels=1)
    items = {Path(i.path).name: dm.dataset(s)[k] for s in ("train", "val", "test")
             for k, i in enumerate(dm.dataset(s).items)}  # fmt: skip
    ref = np.asarray(Image.open(small / "good" / "ok_0.png").convert("L").resize((16, 16), Image.BILINEAR))
    np.testing.assert_allclose(items["ok_0.png"]["image"][0].numpy(), ref / 255.0, atol=1e-6)
    mask = np.asarray(Image.open(small / "crack" / "crack_1_mask.png").convert("L")) > 0
    ref = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((16, 16), Image.NEAREST))
    assert items["crack_1.png"]["image"].shape == (1, 16, 16)
    assert torch.equal(items["crack_1.png"]["mask"][0], torch.tensor(ref, dtype=torch.float32))
    # A mask of another image's size (128x128, like every other image) but not its own image's: an error.
    resize(small / "crack" / "crack_2.png", (100, 70), Image.BILINEAR)
    with pytest.raises(
        DataError, match=r"crack_2_mask.png: mask size 128x128 differs from its image's 100x70"
    ):
        small_dm(small, data_cache_dir).setup()


def test_masks_in_a_single_mask_dir_for_several_abnormal_folders(small: Path, data_cache_dir: Path) -> None:
    (small / "masks").mkdir()
    (small / "dent").mkdir()
    for p in sorted((small / "crack").glob("*_mask.png")):
        p.rename(small / "masks" / p.name)
    (small / "crack" / "crack_2.png").rename(small / "dent" / "dent_0.png")
    (small / "masks" / "crack_2_mask.png").rename(small / "masks" / "dent_0_mask.png")
    dm = small_dm(small, data_cache_dir, abnormal_dir=["crack", "dent"], mask_dir="masks")
    test = dm.dataset("test")
    assert dm.test_categories == ["crack", "dent"]
    assert sorted((i.category, Path(i.path).name) for i in test.items if i.label == 1) == [
        ("crack", "crack_0.png"), ("crack", "crack_1.png"), ("dent", "dent_0.png")]  # fmt: skip
    for k, i in enumerate(test.items):
        if i.label == 1:
            mask = np.asarray(Image.open(small / "masks" / f"{Path(i.path).stem}_mask.png").convert("L")) > 0
            ref = np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((16, 16), Image.NEAREST))
            assert torch.equal(test[k]["mask"][0], torch.tensor(ref, dtype=torch.float32))


def test_category_names_from_folders() -> None:
    assert category_names(["defects/crack", "hole/"]) == ["crack", "hole"]
    assert category_names(["MT_Crack/Imgs", "MT_Break/Imgs", "x/dent"]) == [
        "MT_Crack/Imgs",
        "MT_Break/Imgs",
        "dent",
    ]


def test_no_anomalous_images_trains_and_validates_only(small: Path, data_cache_dir: Path) -> None:
    with pytest.warns(UserWarning, match="no normal test image"):
        small_dm(small, data_cache_dir, normal_test_fraction=0.0).setup()
    dm = small_dm(small, data_cache_dir, abnormal_dir=None, mask_suffix="")
    assert len(dm.dataset("train")) + len(dm.dataset("val")) == 6 and len(dm.dataset("test")) == 0
    assert dm.test_categories == [] and dm.split_summary["normal_test_source"] == "none"
    assert next(iter(dm.train_dataloader()))["image"].shape[1:] == (3, 16, 16)
    with pytest.raises(
        ConfigError, match="no test set: abnormal_dir is not set, so there are no anomalous images"
    ):
        dm.test_dataloader()


def test_soft_masks_with_mask_threshold(small: Path, data_cache_dir: Path) -> None:
    path = small / "crack" / "crack_0_mask.png"
    hard = np.asarray(Image.open(path).convert("L")) > 0
    soft = np.where(hard, 200, 0).astype(np.uint8)
    soft[0, :5] = [1, 2, 3, 127, 128]  # compression noise and a fuzzy border
    Image.fromarray(soft).save(path)
    with pytest.raises(
        DataError, match=r"crack_0_mask.png: mask is not binary: 6 non-zero values \(1, 2, 3, 127, \.\.\.\)"
    ):
        small_dm(small, data_cache_dir).setup()
    dm = small_dm(small, data_cache_dir, mask_threshold=127)
    item = next(
        dm.dataset("test")[k]
        for k, i in enumerate(dm.dataset("test").items)
        if i.path.endswith("crack_0.png")
    )
    ref = np.asarray(Image.fromarray((soft > 127).astype(np.uint8)).resize((16, 16), Image.NEAREST))
    assert torch.equal(item["mask"][0], torch.tensor(ref, dtype=torch.float32))
    # One foreground value that is not 255 (a class id, a colour) is binary.
    Image.fromarray(np.where(hard, 7, 0).astype(np.uint8)).save(path)
    small_dm(small, data_cache_dir).setup()


# ----------------------------------------------------------------------------- bad input: one test per case
def test_error_anomalous_image_without_mask(small: Path, data_cache_dir: Path) -> None:
    (small / "crack" / "crack_1_mask.png").unlink()
    with pytest.raises(
        DataError, match=r"crack_1.png: anomalous image without a mask: no 'crack_1_mask.\*' beside"
    ):
        small_dm(small, data_cache_dir).prepare_data()


def test_error_mask_of_wrong_size(small: Path, data_cache_dir: Path) -> None:
    path = small / "crack" / "crack_0_mask.png"
    Image.open(path).resize((64, 64), Image.NEAREST).save(path)
    with pytest.raises(
        DataError, match=r"crack_0_mask.png: mask size 64x64 differs from its image's 128x128"
    ):
        small_dm(small, data_cache_dir).prepare_data()


def test_error_mask_not_binary_before_any_image_is_decoded(
    small: Path, data_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = small / "crack" / "crack_2_mask.png"
    Image.open(path).convert("L").resize((128, 128)).filter(
        __import__("PIL.ImageFilter").ImageFilter.BLUR
    ).save(path)

    def no_decoding(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("an image was decoded before the masks were checked")

    monkeypatch.setattr("data_modules.folder.decode_folder_sample", no_decoding)
    with pytest.raises(
        DataError, match=r"crack_2_mask.png: mask is not binary: \d+ non-zero values .*mask_threshold"
    ):
        small_dm(small, data_cache_dir).prepare_data()


def test_error_empty_folder(small: Path, data_cache_dir: Path) -> None:
    (small / "empty").mkdir()
    (small / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"normal_test_dir 'empty': folder .*empty is empty \(no .png.*\)$"):
        small_dm(small, data_cache_dir, normal_test_dir="empty").prepare_data()
    (small / "empty" / "a").mkdir()
    with pytest.raises(
        DataError, match=r"is empty .*; sub-folders are not searched, list them instead: \['a'\]"
    ):
        small_dm(small, data_cache_dir, normal_test_dir="empty").prepare_data()


def test_error_glob_matching_nothing(small: Path, data_cache_dir: Path) -> None:
    with pytest.raises(
        DataError, match=r"normal_dir 'good': image_glob '\*.jpg' matches none of the 6 image files"
    ):
        small_dm(small, data_cache_dir, image_glob="*.jpg").prepare_data()


def test_error_corrupt_file(small: Path, data_cache_dir: Path) -> None:
    (small / "good" / "ok_3.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match=r"ok_3.png: cannot decode image"):
        small_dm(small, data_cache_dir).prepare_data()


def test_error_corrupt_mask(small: Path, data_cache_dir: Path) -> None:
    (small / "crack" / "crack_1_mask.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"crack_1_mask.png: cannot decode image"):
        small_dm(small, data_cache_dir).prepare_data()


def test_error_missing_folder(small: Path, data_cache_dir: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"abnormal_dir: folder .*dent does not exist"):
        small_dm(small, data_cache_dir, abnormal_dir=["crack", "dent"]).prepare_data()


def test_error_two_masks_share_a_stem(small: Path, data_cache_dir: Path) -> None:
    Image.open(small / "crack" / "crack_0_mask.png").save(small / "crack" / "crack_0_mask.bmp")
    with pytest.raises(DataError, match=r"two masks share the stem 'crack_0_mask'"):
        small_dm(small, data_cache_dir).prepare_data()


def test_error_bad_settings(small: Path) -> None:
    with pytest.raises(ConfigError, match="masks beside the images must be told apart"):
        FolderDataModule(str(small), normal_dir="good", abnormal_dir="crack")
    with pytest.raises(ConfigError, match="mask_dir lists 2 folders but abnormal_dir 3"):
        FolderDataModule(str(small), abnormal_dir=["a", "b", "c"], mask_dir=["m", "n"])
    with pytest.raises(ConfigError, match="mask_dir is set but abnormal_dir is not"):
        FolderDataModule(str(small), mask_dir="m")
    with pytest.raises(ConfigError, match="channels must be 1 or 3, got 2"):
        FolderDataModule(str(small), channels=2)
    with pytest.raises(ConfigError, match=r"mask_threshold must be None or an int in \[0, 254\], got 255"):
        FolderDataModule(str(small), abnormal_dir="crack", mask_suffix="_mask", mask_threshold=255)
    with pytest.raises(ConfigError, match=r"normal_test_fraction must be in \[0, 1\), got 1.0"):
        FolderDataModule(str(small), normal_test_fraction=1.0)
    with pytest.raises(ConfigError, match="normal_dir must be a folder or a non-empty list"):
        FolderDataModule(str(small), normal_dir=[])


# ------------------------------------------------------------------------------- missing masks in the metrics
class MeanIntensity(AnomalyMapModule):
    """Test-only method: the map is the mean intensity, plus 10 on images without ground truth (so that counting
    their pixels as normal would visibly change the pixel metrics)."""

    method_name = "mean-intensity"

    def raw_anomaly_map(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        offset = 10.0 * (~batch["has_mask"]).float().view(-1, 1, 1, 1)
        return batch["image"].float().mean(dim=1, keepdim=True) + offset, {}


def test_missing_masks_count_for_image_metrics_only(small: Path, data_cache_dir: Path) -> None:
    (small / "crack" / "crack_0_mask.png").unlink()
    with pytest.raises(DataError, match="without a mask"):
        small_dm(small, data_cache_dir).prepare_data()
    dm = small_dm(small, data_cache_dir, allow_missing_masks=True)
    test = dm.dataset("test")
    items = [test[k] for k in range(len(test))]
    by_name = {Path(i["path"]).name: i for i in items}
    assert not by_name["crack_0.png"]["has_mask"] and by_name["crack_0.png"]["label"] == 1
    assert by_name["crack_1.png"]["has_mask"] and dm.split_summary["anomalous_without_mask"] == 1
    module = MeanIntensity(smoothing=False, compute_aupro=False)
    Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).test(
        module, datamodule=dm, verbose=False
    )
    pooled = module.results["pooled"]
    # Reference: pixels of images with ground truth only; image scores (max of the map) of every image.
    maps = [i["image"].mean(dim=0).numpy().ravel() + (0.0 if i["has_mask"] else 10.0) for i in items]
    masks = [i["mask"][0].numpy().ravel() for i in items]
    keep = [bool(i["has_mask"]) for i in items]
    scores = np.concatenate([m for m, k in zip(maps, keep) if k])
    truth = np.concatenate([m for m, k in zip(masks, keep) if k])
    assert pooled["pixel_auroc"] == pytest.approx(roc_auc_score(truth, scores), abs=1e-3)
    assert pooled["pixel_ap"] == pytest.approx(average_precision_score(truth, scores), abs=1e-3)
    labels = [int(i["label"]) for i in items]
    assert pooled["image_auroc"] == pytest.approx(roc_auc_score(labels, [m.max() for m in maps]), abs=1e-9)
    # Counting the unannotated image's pixels as normal would change the values: the test can fail.
    wrong = roc_auc_score(np.concatenate(masks), np.concatenate(maps))
    assert abs(wrong - pooled["pixel_auroc"]) > 0.05 and module.results["num_test_images"] == len(items)


# ------------------------------------------------------------------------------------------------ pipeline
def test_pipeline_through_folders_equals_mvtec_on_the_same_images(
    folder_layouts: dict[str, Path], demo_mvtec_root: Path, data_cache_dir: Path, tmp_path: Path
) -> None:
    """The tiny demo pipeline (LSGS, all five stages) on MVTec `nut` and on the same images as folders: same
    splits, same order, so the same metrics, calibration and image scores."""
    from test_pipeline import TINY, metrics_of

    from lsgs.pipeline import main as pipeline_main

    def run(name: str, data: list[str]) -> Path:
        run_dir = tmp_path / name
        pipeline_main([*TINY[:2], *data, *TINY[2:], f"--data.init_args.cache_dir={data_cache_dir}",
                       f"--run_dir={run_dir}"])  # fmt: skip
        return run_dir

    mvtec = run("mvtec", [f"--data.init_args.root={demo_mvtec_root}", "--data.init_args.category=nut"])
    folder_data = {
        "class_path": "data_modules.FolderDataModule",
        "init_args": {"root": str(folder_layouts["nut_as_folders"]), **LAYOUTS["nut_as_folders"]},
    }
    folder = run("folder", [f"--data={json.dumps(folder_data)}"])
    expected, got = metrics_of(mvtec), metrics_of(folder)
    assert list(got["per_category"]) == ["nut"]
    assert got == expected  # exactly: the same images in the same order give the same numbers
    scores = [
        (row.split(",")[-1]) for row in (folder / "scoring" / "image_scores.csv").read_text().splitlines()
    ]
    assert scores == [
        (row.split(",")[-1]) for row in (mvtec / "scoring" / "image_scores.csv").read_text().splitlines()
    ]


def test_signature_parses_with_lightning_cli_parser() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(FolderDataModule, "data")
    cfg = parser.parse_args(
        ["--data.root=/d", "--data.normal_dir=[a, b]", "--data.abnormal_dir={crack: x/Imgs, hole: y}",
         "--data.mask_dir=m", "--data.mask_threshold=127", "--data.allow_missing_masks=true"]
    )  # fmt: skip
    assert cfg.data.normal_dir == ["a", "b"] and cfg.data.abnormal_dir == {"crack": "x/Imgs", "hole": "y"}
    assert (
        cfg.data.mask_dir == "m" and cfg.data.mask_threshold == 127 and cfg.data.allow_missing_masks is True
    )
    cfg = parser.parse_args(["--data.root=/d", "--data.abnormal_dir=[x, y]"])
    assert cfg.data.abnormal_dir == ["x", "y"] and cfg.data.normal_dir == "good"
