"""albumentations specs: building, errors, joint application to image, mask and roi."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch

import data_modules
import lsgs
from data_modules import BraTSDataModule, MVTecDataModule
from data_modules.transforms import apply_transform, build_transforms
from lsgs.errors import ConfigError


def test_build_none_and_list() -> None:
    assert build_transforms(None) is None and build_transforms([]) is None
    compose = build_transforms(
        [{"name": "HorizontalFlip", "p": 0.5}, {"name": "Rotate", "limit": 10, "p": 1.0}]
    )
    assert isinstance(compose, A.Compose)
    assert [type(t) for t in compose.transforms] == [A.HorizontalFlip, A.Rotate]
    assert compose.transforms[0].p == 0.5 and compose.transforms[1].limit == (-10, 10)


def test_nested_composition() -> None:
    compose = build_transforms(
        [{"name": "OneOf", "p": 1.0, "transforms": [{"name": "VerticalFlip"}, {"name": "Transpose"}]}]
    )
    one_of = compose.transforms[0]
    assert isinstance(one_of, A.OneOf) and [type(t) for t in one_of.transforms] == [
        A.VerticalFlip,
        A.Transpose,
    ]


@pytest.mark.parametrize(
    ("specs", "match"),
    [
        (
            [{"name": "HorizantalFlip"}],
            r"train_transforms\[0\]: unknown albumentations transform 'HorizantalFlip'",
        ),
        ([{"p": 0.5}], r"train_transforms\[0\]: expected a mapping with a string 'name'"),
        (["HorizontalFlip"], "expected a mapping"),
        ([{"name": "HorizontalFlip"}, {"name": "Compose_"}], r"train_transforms\[1\]: unknown"),
        ([{"name": "np"}], "unknown albumentations transform 'np'"),
        ([{"name": "HorizontalFlip", "prob": 0.5}], r"invalid arguments for 'HorizontalFlip'"),
        ([{"name": "Rotate", "limit": "abc"}], r"invalid arguments for 'Rotate'"),
        ([{"name": "OneOf", "p": 1.0}], "needs a 'transforms' list"),
        (
            [{"name": "OneOf", "transforms": [{"name": "Nope"}]}],
            r"train_transforms\[0\].transforms\[0\]: unknown",
        ),
        ({"name": "HorizontalFlip"}, "expected a list of transform specs"),
    ],
)
def test_bad_specs_raise_config_error(specs, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_transforms(specs)


def test_unknown_name_suggests_close_match() -> None:
    with pytest.raises(ConfigError, match="did you mean HorizontalFlip"):
        build_transforms([{"name": "HorizontalFlp"}])


def test_data_module_rejects_bad_spec_at_construction(demo_mvtec_root: Path, data_cache_dir: Path) -> None:
    with pytest.raises(ConfigError, match="'Flipp'"):
        MVTecDataModule(
            str(demo_mvtec_root), cache_dir=str(data_cache_dir), train_transforms=[{"name": "Flipp"}]
        )


def test_flip_moves_image_mask_and_roi_together() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    mask = np.zeros((8, 8), np.uint8)
    mask[2:4, 0:3] = 1
    roi = np.zeros((8, 8), np.uint8)
    roi[:, :5] = 1
    compose = build_transforms([{"name": "HorizontalFlip", "p": 1.0}])
    out_image, out_mask, out_roi = apply_transform(compose, image, mask, roi, seed=0)
    assert np.array_equal(out_image, image[:, ::-1]) and np.array_equal(out_mask, mask[:, ::-1])
    assert np.array_equal(out_roi, roi[:, ::-1])
    # pixel-level transforms leave the masks alone
    bright = build_transforms(
        [{"name": "RandomBrightnessContrast", "brightness_limit": (0.3, 0.3), "p": 1.0}]
    )
    out_image, out_mask, out_roi = apply_transform(bright, image, mask, roi, seed=0)
    assert not np.array_equal(out_image, image)
    assert np.array_equal(out_mask, mask) and np.array_equal(out_roi, roi)


def test_seeded_application_is_reproducible() -> None:
    compose = build_transforms([{"name": "Rotate", "limit": 45, "p": 1.0}])
    image = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    roi = np.ones((16, 16), np.uint8)
    a = apply_transform(compose, image, mask, roi, seed=5)[0]
    b = apply_transform(compose, image, mask, roi, seed=5)[0]
    c = apply_transform(compose, image, mask, roi, seed=6)[0]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_size_changing_transform_is_rejected() -> None:
    compose = build_transforms([{"name": "CenterCrop", "height": 4, "width": 4}])
    z = np.zeros((8, 8), np.uint8)
    with pytest.raises(ConfigError, match="changed the image size"):
        apply_transform(compose, np.zeros((8, 8, 3), np.uint8), z, z, seed=0)


@pytest.mark.parametrize("kind", ["mvtec", "brats"])
def test_train_split_augmented_jointly(
    kind: str, demo_mvtec_root: Path, demo_brats_root: Path, data_cache_dir: Path
):
    flip = [{"name": "HorizontalFlip", "p": 1.0}]
    if kind == "mvtec":
        dm = MVTecDataModule(
            str(demo_mvtec_root), image_size=32, cache_dir=str(data_cache_dir), train_transforms=flip
        )
    else:
        dm = BraTSDataModule(
            str(demo_brats_root), image_size=32, cache_dir=str(data_cache_dir), train_transforms=flip
        )
    for i in (0, len(dm.dataset("train")) - 1):
        aug, plain = dm.dataset("train")[i], dm.dataset("train_eval")[i]
        for key in ("image", "mask", "roi"):
            assert torch.equal(aug[key], plain[key].flip(-1)), key
            assert aug[key].dtype == torch.float32
    # only the train split is augmented
    for split in ("val", "test"):
        assert dm.dataset(split).transform is None
    # augmentation draws from torch's RNG: reproducible under a seed
    torch.manual_seed(0)
    rot = [{"name": "Rotate", "limit": 30, "p": 1.0}]
    dm.train_transform = build_transforms(rot)
    dm._datasets = None
    dm.setup()
    torch.manual_seed(3)
    a = dm.dataset("train")[0]["image"]
    torch.manual_seed(3)
    assert torch.equal(a, dm.dataset("train")[0]["image"])


# Run in a fresh interpreter: an audit hook records and refuses every URL request, then the data modules are imported.
NO_NETWORK_IMPORT = """
import os, sys
requests = []

def refuse(event, args):
    if event == "urllib.Request":
        requests.append(args[0])
        raise RuntimeError("no network in this test")

sys.addaudithook(refuse)
import data_modules
import data_modules.transforms
assert "albumentations" in sys.modules
print(os.environ.get("NO_ALBUMENTATIONS_UPDATE"), requests)
"""


def test_importing_the_data_modules_never_asks_pypi_for_albumentations_updates() -> None:
    """albumentations looks for a newer version on PyPI when it is imported, unless NO_ALBUMENTATIONS_UPDATE is
    set: importing the data modules sets it (keeping a user's own value) before albumentations is imported."""
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    # The same data_modules and lsgs as this process, whether installed or on PYTHONPATH.
    roots = [str(Path(data_modules.__file__).parents[1]), str(Path(lsgs.__file__).parents[1])]
    env["PYTHONPATH"] = os.pathsep.join([*roots, env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", NO_NETWORK_IMPORT], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "[]"], result.stdout
