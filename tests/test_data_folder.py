"""ImageFolderDataModule: unlabelled images for predict."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_modules import ImageFolderDataModule
from lsgs.errors import ConfigError, DataError, DataNotFoundError


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
