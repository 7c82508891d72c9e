"""Demo-data generator: layouts, exact defect masks, brain structure, determinism, idempotence, CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from data_modules import synthetic
from data_modules.synthetic import (
    DEFECTS,
    MARKER,
    RENDERERS,
    main,
    write_brats_demo,
    write_mvtec_demo,
)
from lsgs.errors import ConfigError, DataError

TINY_MVTEC = {"n_train": 2, "n_test_good": 1, "n_test_per_defect": 1, "size": 64}
TINY_BRATS = {"n_hgg": 1, "n_lgg": 1, "shape": (40, 40, 24)}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_mvtec_layout(demo_mvtec_root: Path) -> None:
    kw = json.loads((demo_mvtec_root / MARKER).read_text())  # the parameters the fixture used

    for category in ("fabric", "nut", "mesh"):
        base = demo_mvtec_root / category
        assert len(list((base / "train" / "good").glob("*.png"))) == kw["n_train"]
        assert sorted(p.name for p in (base / "test").iterdir()) == sorted([*DEFECTS, "good"])
        assert len(list((base / "test" / "good").glob("*.png"))) == kw["n_test_good"]
        for defect in DEFECTS:
            images = sorted((base / "test" / defect).glob("*.png"))
            assert len(images) == kw["n_test_per_defect"]
            masks = sorted((base / "ground_truth" / defect).glob("*.png"))
            assert [m.name for m in masks] == [f"{p.stem}_mask.png" for p in images]
        img = Image.open(base / "train" / "good" / "000.png")
        assert img.size == (kw["size"], kw["size"]) and img.mode == ("L" if category == "mesh" else "RGB")


def test_defect_masks_are_exactly_the_painted_pixels(demo_mvtec_root: Path) -> None:
    kw = json.loads((demo_mvtec_root / MARKER).read_text())  # the parameters the fixture used

    for category in ("fabric", "nut", "mesh"):
        for defect in DEFECTS:
            for i in range(kw["n_test_per_defect"]):
                # re-render the clean image from the same generator state the writer used
                image, _, _ = RENDERERS[category](
                    synthetic.keyed_rng(kw["seed"], category, "test", defect, i), kw["size"]
                )
                clean = synthetic.to_uint8(image)
                base = demo_mvtec_root / category
                painted = np.asarray(Image.open(base / "test" / defect / f"{i:03d}.png"))
                mask = np.asarray(Image.open(base / "ground_truth" / defect / f"{i:03d}_mask.png"))
                if painted.ndim == 2:
                    painted = painted[..., None]
                assert set(np.unique(mask)) == {0, 255}
                assert np.array_equal((painted != clean).any(-1), mask > 0), (category, defect, i)


def test_good_images_vary_but_keep_structure(demo_mvtec_root: Path) -> None:
    nuts = [
        np.asarray(Image.open(p), np.float32) for p in sorted((demo_mvtec_root / "nut/train/good").glob("*"))
    ]
    assert not np.array_equal(nuts[0], nuts[1])
    # aligned object: the mean image is still a sharp nut (pose jitter is small)
    diffs = [np.abs(n - nuts[0]).mean() for n in nuts[1:]]
    assert max(diffs) < 40 and min(diffs) > 0.5


def test_brats_volumes(demo_brats_root: Path) -> None:
    kw = json.loads((demo_brats_root / MARKER).read_text())

    cases = sorted(demo_brats_root.glob("*/*/*_flair.nii.gz"))
    assert len(cases) == kw["n_hgg"] + kw["n_lgg"]
    for flair_path in cases:
        group = flair_path.parts[-3]
        img = nib.load(str(flair_path))
        seg = np.asanyarray(nib.load(str(flair_path).replace("_flair", "_seg")).dataobj)
        flair = np.asanyarray(img.dataobj)
        assert flair.shape == seg.shape == tuple(kw["shape"]) and flair.dtype == np.int16
        assert np.allclose(img.affine, np.eye(4))
        brain = flair > 0
        assert flair.min() == 0 and brain.mean() > 0.1
        assert set(np.unique(seg)) <= ({0, 1, 2, 4} if group == "HGG" else {0, 1, 2})
        tumour = seg > 0
        assert tumour.any() and not (tumour & ~brain).any()
        # whole tumour = the FLAIR-bright region
        assert np.median(flair[tumour]) > 1.3 * np.median(flair[brain & ~tumour])
        assert np.percentile(flair[tumour], 5) > np.median(flair[brain & ~tumour])
        per_slice = tumour.any(axis=(0, 1))
        healthy_brain_slices = brain.any(axis=(0, 1)) & ~per_slice
        assert per_slice.sum() >= 2 and healthy_brain_slices.sum() >= 5
        # gzip header: mtime 0, so identical content gives identical bytes
        assert flair_path.read_bytes()[4:8] == b"\0\0\0\0"


def test_same_seed_byte_identical_other_seed_differs(tmp_path: Path) -> None:
    a = write_mvtec_demo(tmp_path / "a" / "mvtec", seed=3, categories=("nut", "mesh"), **TINY_MVTEC)
    b = write_mvtec_demo(tmp_path / "b" / "mvtec", seed=3, categories=("nut", "mesh"), **TINY_MVTEC)
    c = write_mvtec_demo(tmp_path / "c" / "mvtec", seed=4, categories=("nut", "mesh"), **TINY_MVTEC)
    assert tree_bytes(a) == tree_bytes(b)
    ta, tc = tree_bytes(a), tree_bytes(c)
    assert ta.keys() == tc.keys() and ta["nut/train/good/000.png"] != tc["nut/train/good/000.png"]
    a = write_brats_demo(tmp_path / "a" / "brats", seed=3, **TINY_BRATS)
    b = write_brats_demo(tmp_path / "b" / "brats", seed=3, **TINY_BRATS)
    c = write_brats_demo(tmp_path / "c" / "brats", seed=4, **TINY_BRATS)
    assert tree_bytes(a) == tree_bytes(b) and tree_bytes(a) != tree_bytes(c)


def test_images_independent_of_counts(tmp_path: Path) -> None:
    small = write_mvtec_demo(tmp_path / "s", categories=("fabric",), **TINY_MVTEC)
    big = write_mvtec_demo(tmp_path / "b", categories=("fabric",), **{**TINY_MVTEC, "n_train": 3})
    assert (small / "fabric/train/good/001.png").read_bytes() == (
        big / "fabric/train/good/001.png"
    ).read_bytes()


def test_idempotent_and_replaces_other_params(tmp_path: Path) -> None:
    root = write_mvtec_demo(tmp_path / "mvtec", categories=("nut",), **TINY_MVTEC)
    marker = root / MARKER
    stamp = marker.stat().st_mtime_ns
    assert json.loads(marker.read_text())["n_train"] == 2
    write_mvtec_demo(tmp_path / "mvtec", categories=("nut",), **TINY_MVTEC)
    assert marker.stat().st_mtime_ns == stamp  # nothing rewritten
    write_mvtec_demo(tmp_path / "mvtec", categories=("nut",), **{**TINY_MVTEC, "n_train": 3})
    assert len(list((root / "nut/train/good").glob("*.png"))) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["mvtec"]  # no temporary directory left


def test_refuses_to_overwrite_foreign_dir_and_cleans_leftovers(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("user data")
    with pytest.raises(DataError, match="not an LSGS demo data set"):
        write_brats_demo(foreign, **TINY_BRATS)
    assert (foreign / "precious.txt").exists()
    (tmp_path / "empty").mkdir()
    write_brats_demo(tmp_path / "empty", **TINY_BRATS)  # an empty directory may be filled
    # a temporary directory from a killed run, older than the staleness limit, is removed
    leftover = tmp_path / ".tmp-fresh-deadbeef"
    leftover.mkdir()
    os.utime(leftover, (0, 0))
    write_brats_demo(tmp_path / "fresh", **TINY_BRATS)
    assert not leftover.exists()


def test_cli_small(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--out", str(tmp_path / "demo"), "--seed", "2", "--small"]) == 0
    assert "demo data ready" in capsys.readouterr().out
    mvtec = json.loads((tmp_path / "demo" / "mvtec" / MARKER).read_text())
    brats = json.loads((tmp_path / "demo" / "brats" / MARKER).read_text())
    assert mvtec["seed"] == brats["seed"] == 2 and mvtec["size"] == synthetic.SMALL_MVTEC["size"]
    assert len(list((tmp_path / "demo" / "brats").glob("*/*/*_seg.nii.gz"))) == 4


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda p: write_mvtec_demo(p, categories=("bottle",)), "unknown demo category 'bottle'"),
        (lambda p: write_mvtec_demo(p, size=16), "size must be >= 32"),
        (lambda p: write_brats_demo(p, shape=(40, 40)), "shape must be 3 sizes"),
    ],
)
def test_bad_generator_arguments(tmp_path: Path, call, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        call(tmp_path / "x")


def test_unknown_defect(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    image, body, under = RENDERERS["nut"](rng, 64)
    with pytest.raises(ConfigError, match="unknown demo defect"):
        synthetic.paint_defect("nut", "dent", rng, image, body, under)
