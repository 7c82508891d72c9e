"""BraTS: preprocessing against brute-force references, patient splits, layouts and bad input."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_modules import BraTSDataModule
from data_modules.base import n_holdout
from data_modules.brats import BraTSCase, normalize_volume, preprocess_case, scan_cases, split_patients
from lsgs.errors import ConfigError, DataError, DataNotFoundError

SIZE = 32


def make(root: Path, cache: Path, **kwargs) -> BraTSDataModule:
    kwargs = {"image_size": SIZE, "test_fraction": 0.25, "val_fraction": 0.2, **kwargs}
    return BraTSDataModule(str(root), cache_dir=str(cache), **kwargs)


def cases_of(root: Path) -> list[BraTSCase]:
    return scan_cases(root, ["HGG", "LGG"], "*_flair.nii.gz", "*_seg.nii.gz")


def copy_cases(demo: Path, dest: Path, n: int = 3) -> Path:
    """The first n HGG cases plus one LGG case, in the official layout."""
    for case in sorted((demo / "HGG").iterdir())[:n] + sorted((demo / "LGG").iterdir())[:1]:
        shutil.copytree(case, dest / case.parent.name / case.name)
    return dest


def load(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


def save(path: Path, data: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Pixel-centre nearest neighbour, written out: source index of each output pixel."""
    return np.array([min(int((i + 0.5) * n_in / n_out), n_in - 1) for i in range(n_out)])


def test_preprocess_matches_brute_force(demo_brats_root: Path) -> None:
    case = cases_of(demo_brats_root)[0]
    flair = load(case.flair).astype(np.float64)
    seg = load(case.seg)
    out = preprocess_case(case, SIZE, "percentile")

    brain = flair > 0
    values = np.sort(flair[brain])
    k = (len(values) - 1) * 0.995  # linear-interpolated 99.5th percentile
    p = values[int(np.floor(k))] + (k - np.floor(k)) * (values[int(np.ceil(k))] - values[int(np.floor(k))])
    norm = np.clip(flair / p, 0, 1) * brain
    rows, cols = nearest_indices(flair.shape[0], SIZE), nearest_indices(flair.shape[1], SIZE)

    kept = [z for z in range(flair.shape[2]) if brain[:, :, z].any()]
    assert out.slice_index.tolist() == kept
    for j, z in enumerate(kept):
        roi = brain[:, :, z][np.ix_(rows, cols)]
        assert np.array_equal(out.roi[j], roi)
        assert np.array_equal(out.masks[j], (seg[:, :, z] > 0)[np.ix_(rows, cols)])
        assert out.healthy[j] == (seg[:, :, z].max() == 0)
        assert out.brain_fraction[j] == pytest.approx(brain[:, :, z].mean())
        ref = F.interpolate(
            torch.from_numpy(norm[:, :, z]).float()[None, None],
            size=(SIZE, SIZE),
            mode="bilinear",
            antialias=True,
        )[0, 0].numpy()
        np.testing.assert_allclose(out.images[j].astype(np.float32), ref * roi, atol=2e-3)
    assert out.images.dtype == np.float16 and out.masks.dtype == np.uint8
    assert out.images.min() >= 0 and out.images.max() <= 1
    assert (~out.healthy).any() and out.healthy.any()


def test_zscore_normalisation() -> None:
    rng = np.random.default_rng(0)
    vol = np.zeros((10, 12, 6), np.float32)
    vol[2:8, 3:9, 1:5] = rng.uniform(50, 400, (6, 6, 4))
    out = normalize_volume(vol, "zscore")
    brain = vol > 0
    assert out[brain].mean() == pytest.approx(0, abs=1e-5) and out[brain].std() == pytest.approx(1, abs=1e-5)
    assert (out[~brain] == 0).all()
    pct = normalize_volume(vol, "percentile")
    np.testing.assert_allclose(
        pct[brain], np.clip(vol[brain] / np.percentile(vol[brain], 99.5), 0, 1), rtol=1e-6
    )
    with pytest.raises(ConfigError, match="normalization"):
        normalize_volume(vol, "minmax")


def test_zscore_data_module_is_not_bounded(demo_brats_root: Path, data_cache_dir: Path) -> None:
    dm = make(demo_brats_root, data_cache_dir, normalization="zscore")
    images = torch.stack([dm.dataset("train")[i]["image"] for i in range(0, dm.train_size, 7)])
    assert images.min() < 0 and images.max() > 1


@pytest.mark.parametrize(
    ("n", "test_f", "val_f"), [(8, 0.25, 0.2), (5, 0.2, 0.0), (3, 0.5, 0.5), (1, 0.5, 0.5)]
)
def test_split_patients(n: int, test_f: float, val_f: float) -> None:
    ids = [f"case{i}" for i in range(n)]
    train, val, test = split_patients(ids[::-1], test_f, val_f, seed=3)
    assert sorted(train + val + test) == ids and train
    assert len(test) == n_holdout(n, test_f) and len(val) == n_holdout(n - len(test), val_f)
    assert (train, val, test) == split_patients(ids, test_f, val_f, seed=3)  # order of input irrelevant


def test_split_rules(demo_brats_root: Path, data_cache_dir: Path) -> None:
    dm = make(demo_brats_root, data_cache_dir)
    with_healthy = make(demo_brats_root, data_cache_dir, include_healthy_in_test=True)
    case_ids = [c.case_id for c in cases_of(demo_brats_root)]
    train_ids, val_ids, test_ids = split_patients(case_ids, 0.25, 0.2, seed=0)
    segs: dict[str, np.ndarray] = {}

    def seg_slice(item) -> np.ndarray:
        if item.path not in segs:
            segs[item.path] = load(Path(item.path.replace("_flair.nii.gz", "_seg.nii.gz")))
        return segs[item.path][:, :, item.slice_index]

    for split, ids in (("train", train_ids), ("val", val_ids)):
        for item in dm.dataset(split).items:
            assert Path(item.path).parent.name in ids and seg_slice(item).max() == 0 and item.label == 0
    test_items = dm.dataset("test").items
    assert {Path(i.path).parent.name for i in test_items} <= set(test_ids)
    assert all(i.label == 1 and seg_slice(i).max() > 0 for i in test_items)
    extra = set(with_healthy.dataset("test").items) - set(test_items)
    assert extra and all(i.label == 0 and seg_slice(i).max() == 0 for i in extra)
    assert with_healthy.dataset("train").items == dm.dataset("train").items
    assert all(i.category == "brats" for i in test_items)


def test_min_brain_fraction(demo_brats_root: Path, data_cache_dir: Path) -> None:
    loose = make(demo_brats_root, data_cache_dir, min_brain_fraction=0.0)
    strict = make(demo_brats_root, data_cache_dir, min_brain_fraction=0.2)
    fractions: dict[str, np.ndarray] = {}
    for item in loose.dataset("train").items:
        if item.path not in fractions:
            fractions[item.path] = (load(Path(item.path)) > 0).mean(axis=(0, 1))
    kept = {(i.path, i.slice_index) for i in strict.dataset("train").items}
    expected = {
        (i.path, i.slice_index)
        for i in loose.dataset("train").items
        if fractions[i.path][i.slice_index] >= 0.2
    }
    assert kept == expected and len(kept) < loose.train_size


def test_cases_directly_under_root_2021_style(
    demo_brats_root: Path, tmp_path: Path, data_cache_dir: Path
) -> None:
    for i, case in enumerate(cases_of(demo_brats_root)[:4]):
        name = f"BraTS2021_{i:05d}"
        (tmp_path / name).mkdir()
        shutil.copy(case.flair, tmp_path / name / f"{name}_flair.nii.gz")
        shutil.copy(case.seg, tmp_path / name / f"{name}_seg.nii.gz")
    for case_dirs in ([], ["."]):
        dm = make(tmp_path, data_cache_dir, case_dirs=case_dirs, test_fraction=0.25, val_fraction=0.0)
        dm.setup()
        assert len({Path(i.path).parent.name for i in dm.dataset("train").items}) == 3
        assert {Path(i.path).parent.name for i in dm.dataset("test").items} <= {
            f"BraTS2021_{i:05d}" for i in range(4)
        }


def test_other_file_patterns(demo_brats_root: Path, tmp_path: Path, data_cache_dir: Path) -> None:
    case = cases_of(demo_brats_root)[0]
    for i in range(2):
        d = tmp_path / "HGG" / f"P{i}"
        d.mkdir(parents=True)
        shutil.copy(case.flair, d / "t2_flair.nii.gz")
        shutil.copy(case.seg, d / "labels.nii.gz")
    dm = make(
        tmp_path, data_cache_dir, case_dirs=["HGG"], flair_pattern="*flair*", seg_pattern="labels.nii.gz"
    )
    dm.setup()
    assert dm.train_size > 0


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_root_and_case_dir(demo_brats_root: Path, tmp_path: Path, data_cache_dir: Path) -> None:
    with pytest.raises(DataNotFoundError, match="nowhere"):
        make(tmp_path / "nowhere", data_cache_dir).prepare_data()
    with pytest.raises(DataNotFoundError, match=r"XYZ.*case_dirs entry 'XYZ'"):
        make(demo_brats_root, data_cache_dir, case_dirs=["HGG", "XYZ"]).prepare_data()
    (tmp_path / "HGG").mkdir()
    (tmp_path / "LGG").mkdir()
    with pytest.raises(DataNotFoundError, match="no BraTS case directories"):
        make(tmp_path, data_cache_dir).prepare_data()


def test_flair_without_seg(demo_brats_root: Path, tmp_path: Path, data_cache_dir: Path) -> None:
    root = copy_cases(demo_brats_root, tmp_path)
    seg = next((root / "HGG").glob("*/*_seg.nii.gz"))
    seg.unlink()
    with pytest.raises(DataError, match=rf"{seg.parent.name}: no segmentation file matching '\*_seg.nii.gz'"):
        make(root, data_cache_dir).prepare_data()


def test_case_without_flair_or_with_two(demo_brats_root: Path, tmp_path: Path, data_cache_dir: Path) -> None:
    root = copy_cases(demo_brats_root, tmp_path)
    flair = next((root / "HGG").glob("*/*_flair.nii.gz"))
    shutil.copy(flair, flair.parent / "copy_flair.nii.gz")
    with pytest.raises(DataError, match="2 files match FLAIR pattern"):
        make(root, data_cache_dir).prepare_data()
    (flair.parent / "copy_flair.nii.gz").unlink()
    flair.unlink()
    with pytest.raises(DataError, match="no FLAIR file matching"):
        make(root, data_cache_dir).prepare_data()


def test_seg_shape_differs(demo_brats_root: Path, tmp_path: Path, data_cache_dir: Path) -> None:
    root = copy_cases(demo_brats_root, tmp_path)
    seg = next((root / "LGG").glob("*/*_seg.nii.gz"))
    save(seg, load(seg)[:, :, :-2])
    with pytest.raises(DataError, match=r"segmentation shape \(96, 96, 46\) differs from FLAIR"):
        make(root, data_cache_dir).prepare_data()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not_3d"])
def test_corrupt_nifti(demo_brats_root: Path, tmp_path: Path, data_cache_dir: Path, damage: str) -> None:
    root = copy_cases(demo_brats_root, tmp_path)
    flair = next((root / "HGG").glob("*/*_flair.nii.gz"))
    data = flair.read_bytes()
    if damage == "truncated":
        flair.write_bytes(data[: len(data) // 2])
        match = "cannot read NIfTI volume"
    elif damage == "garbage":
        flair.write_bytes(gzip.compress(b"definitely not a nifti header" * 20))
        match = "cannot read NIfTI volume"
    else:
        save(flair, load(flair)[:, :, 10])
        match = "expected a 3-D volume"
    with pytest.raises(DataError, match=rf"{flair.name}: {match}"):
        make(root, data_cache_dir).prepare_data()
    assert not any(p.name.startswith(".tmp-") for p in data_cache_dir.iterdir())


@pytest.mark.parametrize("fill", [0.0, np.nan])
def test_all_zero_or_nan_volume(
    demo_brats_root: Path, tmp_path: Path, data_cache_dir: Path, fill: float
) -> None:
    root = copy_cases(demo_brats_root, tmp_path)
    flair = next((root / "HGG").glob("*/*_flair.nii.gz"))
    vol = load(flair).astype(np.float32)
    vol[:] = 0
    if np.isnan(fill):
        vol[5, 5, 5] = np.nan
    save(flair, vol)
    with pytest.raises(DataError, match=rf"{flair.name}: FLAIR volume (has no voxel > 0|contains NaN)"):
        make(root, data_cache_dir).prepare_data()


def test_constant_brain_with_zscore(demo_brats_root: Path, tmp_path: Path, data_cache_dir: Path) -> None:
    root = copy_cases(demo_brats_root, tmp_path)
    flair = next((root / "HGG").glob("*/*_flair.nii.gz"))
    save(flair, (load(flair) > 0).astype(np.int16) * 100)
    with pytest.raises(DataError, match="constant"):
        make(root, data_cache_dir, normalization="zscore").prepare_data()
    make(root, data_cache_dir, normalization="percentile").prepare_data()  # well defined


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"test_fraction": -0.2}, "test_fraction"),
        ({"min_brain_fraction": 1.5}, "min_brain_fraction"),
        ({"normalization": "minmax"}, "normalization"),
        ({"case_dirs": "HGG"}, "case_dirs"),
        ({"flair_pattern": "*.nii.gz", "seg_pattern": "*.nii.gz"}, "flair_pattern"),
        ({"image_size": 2}, "image_size"),
        ({"val_fraction": 1.2}, "val_fraction"),
    ],
)
def test_config_out_of_range(demo_brats_root: Path, data_cache_dir: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make(demo_brats_root, data_cache_dir, **kwargs)


def test_no_training_slice_left(demo_brats_root: Path, data_cache_dir: Path) -> None:
    with pytest.raises(DataError, match="no healthy training slice"):
        make(demo_brats_root, data_cache_dir, min_brain_fraction=1.0).setup()
