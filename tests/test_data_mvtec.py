"""MVTec AD layout handling: real-layout quirks, pairing, category selection, references and bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_modules import MVTEC_CATEGORIES, MVTecDataModule
from data_modules.base import n_holdout
from lsgs.errors import ConfigError, DataError, DataNotFoundError

SIZE = 32


def make(root: Path, cache: Path, **kwargs) -> MVTecDataModule:
    return MVTecDataModule(
        str(root), cache_dir=str(cache), image_size=kwargs.pop("image_size", SIZE), **kwargs
    )


def copy_category(demo: Path, dest: Path, category: str = "nut") -> Path:
    shutil.copytree(demo / category, dest / category)
    return dest


def test_official_category_names() -> None:
    assert len(MVTEC_CATEGORIES) == 15 and len(set(MVTEC_CATEGORIES)) == 15
    assert {"bottle", "metal_nut", "toothbrush", "zipper", "grid", "screw"} <= set(MVTEC_CATEGORIES)


def test_real_layout_junk_is_ignored(demo_mvtec_root: Path, tmp_path: Path, data_cache_dir: Path) -> None:
    root = tmp_path / "mvtec"
    shutil.copytree(demo_mvtec_root, root)
    (root / "readme.txt").write_text("MVTec AD")
    (root / "license.txt").write_text("CC BY-NC-SA 4.0")
    (root / ".DS_Store").write_bytes(b"\0\1")
    hidden_cat = root / ".hidden_category" / "train" / "good"
    hidden_cat.mkdir(parents=True)
    shutil.copy(root / "nut" / "train" / "good" / "000.png", hidden_cat / "000.png")
    for d in (
        root / "nut" / "train" / "good",
        root / "nut" / "test" / "scratch",
        root / "nut" / "ground_truth",
    ):
        (d / ".DS_Store").write_bytes(b"junk")
        (d / "notes.txt").write_text("not an image")
        ckpt = d / ".ipynb_checkpoints"
        ckpt.mkdir()
        shutil.copy(root / "nut" / "train" / "good" / "001.png", ckpt / "001-checkpoint.png")
    (root / "nut" / "test" / ".ipynb_checkpoints").mkdir()
    # Upper-case suffixes are images too.
    (root / "nut" / "train" / "good" / "003.png").rename(root / "nut" / "train" / "good" / "003.PNG")

    dm = make(root, data_cache_dir, val_fraction=0.0)
    dm.setup()
    clean = make(demo_mvtec_root, data_cache_dir, val_fraction=0.0)
    assert dm.test_categories == clean.test_categories == ["fabric", "mesh", "nut"]
    assert len(dm.dataset("train")) == len(clean.dataset("train"))
    assert len(dm.dataset("test")) == len(clean.dataset("test"))
    paths = [i.path for s in ("train", "test") for i in dm.dataset(s).items]
    assert not any(part.startswith(".") for p in paths for part in Path(p).relative_to(root).parts)
    assert any(p.endswith("003.PNG") for p in paths)


def test_grayscale_category_becomes_three_equal_channels(demo_mvtec_root: Path, data_cache_dir: Path) -> None:
    source = demo_mvtec_root / "mesh" / "train" / "good" / "000.png"
    assert Image.open(source).mode == "L"
    dm = make(demo_mvtec_root, data_cache_dir, category="mesh", val_fraction=0.0)
    item = dm.dataset("train")[0]
    assert item["path"] == str(source)
    image = item["image"]
    assert image.shape == (3, SIZE, SIZE)
    assert np.array_equal(image[0], image[1]) and np.array_equal(image[1], image[2])
    ref = (
        np.asarray(Image.open(source).resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.float32) / 255
    )
    np.testing.assert_allclose(image[0].numpy(), ref, atol=1e-6)


def test_image_and_mask_match_pil_reference(demo_mvtec_root: Path, data_cache_dir: Path) -> None:
    dm = make(demo_mvtec_root, data_cache_dir, category="nut")
    items = [it for it in dm.dataset("test") if it["label"] == 1]
    assert items
    for item in items[:4]:
        path = Path(item["path"])
        mask_path = path.parents[2] / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
        img = Image.open(path).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        np.testing.assert_allclose(item["image"].permute(1, 2, 0).numpy(), np.asarray(img) / 255.0, atol=1e-6)
        mask = (
            Image.open(mask_path)
            .point(lambda v: 255 * (v > 0))
            .resize((SIZE, SIZE), Image.Resampling.NEAREST)
        )
        assert np.array_equal(item["mask"][0].numpy(), (np.asarray(mask) > 0).astype(np.float32))
        assert item["slice_index"] == -1 and item["category"] == "nut" and item["roi"].min() == 1


def test_mask_paired_by_exact_stem_and_binarised(
    demo_mvtec_root: Path, tmp_path: Path, data_cache_dir: Path
) -> None:
    root = copy_category(demo_mvtec_root, tmp_path)
    gt = root / "nut" / "ground_truth" / "scratch"
    real = np.asarray(Image.open(gt / "000_mask.png")) > 0
    # All-white decoys containing the stem "000": substring or sort-order pairing would pick one.
    white = Image.fromarray(np.full(real.shape, 255, np.uint8))
    for name in ("0000_mask.png", "000_mask_old.png", "x000_mask.png", "000.png"):
        white.save(gt / name)
    # A mask stored with value 1 instead of 255 must still be foreground (binarised with > 0).
    Image.fromarray(real.astype(np.uint8)).save(gt / "000_mask.png")
    dm = make(root, data_cache_dir, image_size=128)
    item = next(it for it in dm.dataset("test") if it["path"].endswith("scratch/000.png"))
    assert np.array_equal(item["mask"][0].numpy().astype(bool), real)


def test_category_selection_and_order(demo_mvtec_root: Path, data_cache_dir: Path) -> None:
    assert make(demo_mvtec_root, data_cache_dir).test_categories == ["fabric", "mesh", "nut"]
    assert make(demo_mvtec_root, data_cache_dir, category="nut").test_categories == ["nut"]
    dm = make(demo_mvtec_root, data_cache_dir, category=["nut", "fabric"])
    assert dm.test_categories == ["nut", "fabric"]
    cats = [i.category for i in dm.dataset("test").items]
    assert cats == sorted(cats, key=["nut", "fabric"].index)  # grouped in test_categories order
    # A category's validation split does not depend on which other categories are selected.
    alone = make(demo_mvtec_root, data_cache_dir, category="nut", val_fraction=0.25)
    together = make(demo_mvtec_root, data_cache_dir, val_fraction=0.25)
    nut_val = [i.path for i in together.dataset("val").items if i.category == "nut"]
    assert [i.path for i in alone.dataset("val").items] == nut_val
    assert len(nut_val) == n_holdout(16, 0.25) == 4


def test_val_fraction_per_category(demo_mvtec_root: Path, data_cache_dir: Path) -> None:
    dm = make(demo_mvtec_root, data_cache_dir, val_fraction=0.1)
    for cat in dm.test_categories:
        assert sum(i.category == cat for i in dm.dataset("val").items) == 2  # round(1.6)
    empty = make(demo_mvtec_root, data_cache_dir, val_fraction=0.0)
    assert len(empty.dataset("val")) == 0 and empty.train_size == 48


@pytest.mark.parametrize(
    ("n", "fraction", "expected"),
    [
        (10, 0.0, 0),
        (10, 0.1, 1),
        (10, 0.25, 2),
        (10, 0.26, 3),
        (3, 0.01, 1),
        (2, 0.9, 1),
        (1, 0.5, 0),
        (0, 0.5, 0),
    ],
)
def test_n_holdout(n: int, fraction: float, expected: int) -> None:
    assert n_holdout(n, fraction) == expected


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_root(tmp_path: Path, data_cache_dir: Path) -> None:
    dm = make(tmp_path / "nowhere", data_cache_dir)
    with pytest.raises(DataNotFoundError, match="nowhere"):
        dm.prepare_data()


def test_unknown_category_lists_valid_ones(demo_mvtec_root: Path, data_cache_dir: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"'bottle'.*\['fabric', 'mesh', 'nut'\]"):
        make(demo_mvtec_root, data_cache_dir, category="bottle").prepare_data()
    with pytest.raises(ConfigError, match="empty"):
        make(demo_mvtec_root, data_cache_dir, category=[]).setup()
    with pytest.raises(ConfigError, match="repeated"):
        make(demo_mvtec_root, data_cache_dir, category=["nut", "nut"]).setup()


def test_all_finds_no_category(tmp_path: Path, data_cache_dir: Path) -> None:
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(DataNotFoundError, match="no category"):
        make(tmp_path / "empty_root", data_cache_dir).setup()


def test_category_without_train_images(demo_mvtec_root: Path, tmp_path: Path, data_cache_dir: Path) -> None:
    root = copy_category(demo_mvtec_root, tmp_path)
    for p in (root / "nut" / "train" / "good").iterdir():
        p.unlink()
    (root / "nut" / "train" / "good" / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match=r"no training images in .*nut/train/good"):
        make(root, data_cache_dir).prepare_data()


def test_category_without_test_dir(demo_mvtec_root: Path, tmp_path: Path, data_cache_dir: Path) -> None:
    root = copy_category(demo_mvtec_root, tmp_path)
    shutil.rmtree(root / "nut" / "test")
    with pytest.raises(DataError, match="missing test directory"):
        make(root, data_cache_dir).prepare_data()


def test_defect_image_without_mask(demo_mvtec_root: Path, tmp_path: Path, data_cache_dir: Path) -> None:
    root = copy_category(demo_mvtec_root, tmp_path)
    (root / "nut" / "ground_truth" / "hole" / "001_mask.png").unlink()
    with pytest.raises(DataError, match=r"test/hole/001.png: defect image without its mask.*001_mask.png"):
        make(root, data_cache_dir).prepare_data()


def test_two_masks_with_one_stem(demo_mvtec_root: Path, tmp_path: Path, data_cache_dir: Path) -> None:
    root = copy_category(demo_mvtec_root, tmp_path)
    gt = root / "nut" / "ground_truth" / "hole"
    shutil.copy(gt / "001_mask.png", gt / "001_mask.bmp")
    with pytest.raises(DataError, match="two masks share the stem '001_mask'"):
        make(root, data_cache_dir).prepare_data()


def test_mask_size_differs_from_image(demo_mvtec_root: Path, tmp_path: Path, data_cache_dir: Path) -> None:
    root = copy_category(demo_mvtec_root, tmp_path)
    mask = root / "nut" / "ground_truth" / "color" / "000_mask.png"
    Image.open(mask).resize((100, 90)).save(mask)
    with pytest.raises(DataError, match=r"000_mask.png: mask size 100x90 differs from its image's 128x128"):
        make(root, data_cache_dir).prepare_data()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_png(demo_mvtec_root: Path, tmp_path: Path, data_cache_dir: Path, damage: str) -> None:
    root = copy_category(demo_mvtec_root, tmp_path)
    png = root / "nut" / "train" / "good" / "005.png"
    data = png.read_bytes()
    png.write_bytes(b"this is not a PNG" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(DataError, match=r"train/good/005.png: cannot decode image"):
        make(root, data_cache_dir).prepare_data()
    # nothing half-built is left in the cache
    assert not any(p.name.startswith(".tmp-") for p in data_cache_dir.iterdir())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 4}, "image_size"),
        ({"image_size": 5000}, "image_size"),
        ({"image_size": 32.0}, "image_size"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"batch_size": 0}, "batch_size"),
        ({"eval_batch_size": -2}, "eval_batch_size"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_config_out_of_range(demo_mvtec_root: Path, data_cache_dir: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make(demo_mvtec_root, data_cache_dir, **kwargs)


def test_unknown_split(demo_mvtec_root: Path, data_cache_dir: Path) -> None:
    with pytest.raises(ConfigError, match="unknown split 'tset'"):
        make(demo_mvtec_root, data_cache_dir).dataset("tset")
