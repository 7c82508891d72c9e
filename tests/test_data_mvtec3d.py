"""MVTec 3D-AD layout handling: official validation split, rgb/gt pairing, class-id masks, xyz ignored, bad input.

The batch contract, caching and DDP loaders are covered by `TestMVTec3DContract` in test_data_modules.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_modules import MVTec3DDataModule
from data_modules.synthetic import DEFECTS, MVTEC3D_MASK_VALUES
from lsgs.errors import ConfigError, DataError, DataNotFoundError

SIZE = 32


def make(root: Path, cache: Path, **kwargs) -> MVTec3DDataModule:
    return MVTec3DDataModule(
        str(root), cache_dir=str(cache), image_size=kwargs.pop("image_size", SIZE), **kwargs
    )


def copy_category(demo: Path, dest: Path, category: str = "nut") -> Path:
    shutil.copytree(demo / category, dest / category)
    return dest


def images(directory: Path) -> list[str]:
    return sorted(str(p) for p in directory.glob("*.png"))


def test_splits_follow_the_official_folders(demo_mvtec3d_root: Path, data_cache_dir: Path) -> None:
    dm = make(demo_mvtec3d_root, data_cache_dir, category="nut")
    base = demo_mvtec3d_root / "nut"
    assert [i.path for i in dm.dataset("train").items] == images(base / "train" / "good" / "rgb")
    assert [i.path for i in dm.dataset("val").items] == images(base / "validation" / "good" / "rgb")
    expected_test = [p for d in sorted([*DEFECTS, "good"]) for p in images(base / "test" / d / "rgb")]
    assert [i.path for i in dm.dataset("test").items] == expected_test
    assert [i.label for i in dm.dataset("test").items] == [int("/good/" not in p) for p in expected_test]
    assert len(dm.dataset("val")) == 3 and dm.train_size == 8  # DEMO_MVTEC3D_KWARGS: no train/good split
    assert all(i.label == 0 for i in dm.dataset("val").items)


def test_no_val_fraction_argument() -> None:
    # The official validation split replaces the fraction-of-train split; accepting the key would mislead.
    with pytest.raises(TypeError, match="val_fraction"):
        MVTec3DDataModule("root", val_fraction=0.2)  # type: ignore[call-arg]


def test_image_and_mask_match_pil_reference(demo_mvtec3d_root: Path, data_cache_dir: Path) -> None:
    dm = make(demo_mvtec3d_root, data_cache_dir, category="nut")
    checked = 0
    for item in dm.dataset("test"):
        path = Path(item["path"])
        gt = path.parents[1] / "gt" / path.name
        img = Image.open(path)
        assert img.size == (128, 96)  # non-square source, resized to SIZE x SIZE like MVTec AD
        ref = np.asarray(img.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)) / 255.0
        np.testing.assert_allclose(item["image"].permute(1, 2, 0).numpy(), ref, atol=1e-6)
        raw = np.asarray(Image.open(gt))
        defect = path.parents[1].name
        assert set(np.unique(raw)) <= {0, MVTEC3D_MASK_VALUES.get(defect, 0)}  # class ids, not 255
        mask = Image.fromarray(((raw > 0) * 255).astype(np.uint8)).resize(
            (SIZE, SIZE), Image.Resampling.NEAREST
        )
        assert np.array_equal(item["mask"][0].numpy(), (np.asarray(mask) > 0).astype(np.float32))
        assert item["label"] == int(defect != "good") and item["roi"].min() == 1 and item["slice_index"] == -1
        checked += 1
    assert checked == 10


def test_mask_value_253_is_foreground_and_paired_by_stem(
    demo_mvtec3d_root: Path, tmp_path: Path, data_cache_dir: Path
) -> None:
    root = copy_category(demo_mvtec3d_root, tmp_path)
    gt = root / "nut" / "test" / "hole" / "gt"
    # Distinct masks per stem: a left block (value 253) for 000, a right block (value 1) for 001.
    left = np.zeros((96, 128), np.uint8)
    left[10:40, 5:50] = 253
    right = np.zeros((96, 128), np.uint8)
    right[50:90, 70:120] = 1
    Image.fromarray(left).save(gt / "000.png")
    Image.fromarray(right).save(gt / "001.png")
    dm = make(root, data_cache_dir, image_size=128)
    by_name = {Path(i["path"]).name: i for i in dm.dataset("test") if "/hole/" in i["path"]}
    for name, raw in (("000.png", left), ("001.png", right)):
        expected = np.asarray(Image.fromarray((raw > 0).astype(np.uint8)).resize((128, 128), Image.NEAREST))
        assert np.array_equal(by_name[name]["mask"][0].numpy(), expected.astype(np.float32))
        assert by_name[name]["mask"].sum() > 0


def test_xyz_calibration_and_text_files_are_ignored(
    demo_mvtec3d_root: Path, tmp_path: Path, data_cache_dir: Path
) -> None:
    root = copy_category(demo_mvtec3d_root, tmp_path)
    base = root / "nut"
    (root / "readme.txt").write_text("MVTec 3D-AD")
    (base / "class_ids.json").write_text('{"253": "hole"}')
    (base / "calibration").mkdir()
    (base / "calibration" / "camera_parameters.json").write_text("{}")
    for rgb in base.glob("*/*/rgb"):
        xyz = rgb.parent / "xyz"
        xyz.mkdir()
        for png in rgb.glob("*.png"):  # corrupt "point clouds": reading any of them would fail
            (xyz / f"{png.stem}.tiff").write_bytes(b"not a tiff")
        (rgb / ".DS_Store").write_bytes(b"junk")
    dm = make(root, data_cache_dir)
    clean = make(demo_mvtec3d_root, data_cache_dir, category="nut")
    for split in ("train", "val", "test"):
        got, ref = dm.dataset(split), clean.dataset(split)
        assert len(got) == len(ref) > 0
        assert all(np.array_equal(got[i]["image"], ref[i]["image"]) for i in range(len(got)))
        assert all(np.array_equal(got[i]["mask"], ref[i]["mask"]) for i in range(len(got)))
    paths = [i.path for s in ("train", "val", "test") for i in dm.dataset(s).items]
    assert all(Path(p).parent.name == "rgb" and p.endswith(".png") for p in paths)


def test_good_without_gt_folder_has_empty_masks(
    demo_mvtec3d_root: Path, tmp_path: Path, data_cache_dir: Path
) -> None:
    root = copy_category(demo_mvtec3d_root, tmp_path)
    shutil.rmtree(root / "nut" / "test" / "good" / "gt")
    good = [i for i in make(root, data_cache_dir).dataset("test") if "/good/" in i["path"]]
    assert len(good) == 2 and all(i["mask"].sum() == 0 and i["label"] == 0 for i in good)


def test_category_selection(demo_mvtec3d_root: Path, data_cache_dir: Path) -> None:
    assert make(demo_mvtec3d_root, data_cache_dir).test_categories == ["fabric", "nut"]
    dm = make(demo_mvtec3d_root, data_cache_dir, category=["nut", "fabric"])
    assert dm.test_categories == ["nut", "fabric"]
    for split in ("train", "val", "test"):
        cats = [i.category for i in dm.dataset(split).items]
        assert cats == sorted(cats, key=["nut", "fabric"].index) and set(cats) == {"nut", "fabric"}
    assert len(dm.dataset("val")) == 6


def test_cli_parses_signature() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(MVTec3DDataModule, "data")
    cfg = parser.parse_args(["--data.root=/data/mvtec_3d", "--data.category=[tire, bagel]"])
    assert cfg.data.category == ["tire", "bagel"] and cfg.data.image_size == 128


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_root(tmp_path: Path, data_cache_dir: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"MVTec 3D-AD root .*nowhere"):
        make(tmp_path / "nowhere", data_cache_dir).prepare_data()


def test_mvtec_ad_layout_is_not_a_3d_category(demo_mvtec_root: Path, data_cache_dir: Path) -> None:
    # MVTec AD's train/good has no rgb/ folder: no category found, and the message says what one needs.
    with pytest.raises(DataNotFoundError, match="no category directory with a train/good/rgb folder"):
        make(demo_mvtec_root, data_cache_dir).prepare_data()
    with pytest.raises(DataNotFoundError, match=r"'nut' not found .*<root>/<name>/train/good/rgb"):
        make(demo_mvtec_root, data_cache_dir, category="nut").prepare_data()
    with pytest.raises(ConfigError, match="repeated"):
        make(demo_mvtec_root, data_cache_dir, category=["nut", "nut"]).prepare_data()


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda b: shutil.rmtree(b / "validation"), r"missing directory .*nut/validation/good/rgb"),
        (
            lambda b: [p.unlink() for p in (b / "validation" / "good" / "rgb").iterdir()],
            r"no images in .*validation",
        ),
        (lambda b: shutil.rmtree(b / "test"), r"missing test directory .*nut/test"),
        (lambda b: shutil.rmtree(b / "test" / "hole" / "rgb"), r"test/hole: missing image directory"),
        (
            lambda b: (b / "test" / "hole" / "gt" / "001.png").unlink(),
            r"hole/rgb/001.png: image without its mask",
        ),
        (lambda b: shutil.rmtree(b / "test" / "hole" / "gt"), r"test/hole: missing mask directory"),
        (
            lambda b: (b / "test" / "hole" / "rgb" / "001.png").unlink(),
            r"hole/gt/001.png: mask without its image",
        ),
        (
            lambda b: (b / "test" / "good" / "gt" / "000.png").rename(
                b / "test" / "good" / "gt" / "000_mask.png"
            ),
            r"good/rgb/000.png: image without its mask",
        ),
        (
            lambda b: shutil.copy(
                b / "test" / "hole" / "gt" / "000.png", b / "test" / "hole" / "gt" / "000.bmp"
            ),
            r"hole/gt: two images share the stem '000'",
        ),
    ],
)
def test_layout_errors(
    demo_mvtec3d_root: Path, tmp_path: Path, data_cache_dir: Path, damage, match: str
) -> None:
    root = copy_category(demo_mvtec3d_root, tmp_path)
    damage(root / "nut")
    with pytest.raises(DataError, match=match):
        make(root, data_cache_dir).prepare_data()


def test_mask_size_differs_from_image(demo_mvtec3d_root: Path, tmp_path: Path, data_cache_dir: Path) -> None:
    root = copy_category(demo_mvtec3d_root, tmp_path)
    mask = root / "nut" / "test" / "color" / "gt" / "000.png"
    Image.open(mask).resize((128, 128)).save(mask)
    with pytest.raises(
        DataError, match=r"color/gt/000.png: mask size 128x128 differs from its image's 128x96"
    ):
        make(root, data_cache_dir).prepare_data()


def test_good_mask_with_foreground(demo_mvtec3d_root: Path, tmp_path: Path, data_cache_dir: Path) -> None:
    root = copy_category(demo_mvtec3d_root, tmp_path)
    mask = root / "nut" / "test" / "good" / "gt" / "001.png"
    raw = np.zeros((96, 128), np.uint8)
    raw[5, 5] = 253
    Image.fromarray(raw).save(mask)
    with pytest.raises(DataError, match=r"good/gt/001.png: mask of a normal .* has 1 foreground pixels"):
        make(root, data_cache_dir).prepare_data()


@pytest.mark.parametrize(
    "where", ["train/good/rgb/004.png", "validation/good/rgb/002.png", "test/scratch/gt/001.png"]
)
def test_corrupt_file(demo_mvtec3d_root: Path, tmp_path: Path, data_cache_dir: Path, where: str) -> None:
    root = copy_category(demo_mvtec3d_root, tmp_path)
    png = root / "nut" / where
    data = png.read_bytes()
    png.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(DataError, match=f"{where}: cannot decode image"):
        make(root, data_cache_dir).prepare_data()
    assert not any(p.name.startswith(".tmp-") for p in data_cache_dir.iterdir())
