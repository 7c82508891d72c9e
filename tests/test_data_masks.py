"""Mask pairing, decoding and binarisation (`data_modules.masks`) and the image reading they build on
(`data_modules.image_io`), on tiny files written here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_modules import image_io
from data_modules.masks import decode_mask, index_by_stem, mask_foreground, read_mask
from lsgs.errors import DataError


def save(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(array, mode=mode).save(path)
    return path


def test_index_by_stem_pairs_exact_stems_and_names_a_clash(tmp_path: Path) -> None:
    a, b, c = tmp_path / "x.png", tmp_path / "x_mask.png", tmp_path / "x.bmp"
    assert index_by_stem([a, b], tmp_path, "masks") == {"x": a, "x_mask": b}
    with pytest.raises(DataError, match=r"two images share the stem 'x': x.png, x.bmp"):
        index_by_stem([a, b, c], tmp_path, "images")


def test_read_size_reads_the_header_and_names_an_undecodable_file(tmp_path: Path) -> None:
    assert image_io.read_size(save(tmp_path / "a.png", np.zeros((3, 5), np.uint8))) == (5, 3)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"bad.png: cannot decode image \(UnidentifiedImageError"):
        image_io.read_size(tmp_path / "bad.png")


def test_to_8bit_rescales_16_bit_by_the_dtype_range() -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    grey = np.asarray(image_io.to_8bit(Image.fromarray(values)))  # PIL mode "I;16"
    assert grey.tolist() == [[int(v / 65535 * 255 + 0.5) for v in values[0]]] == [[0, 1, 128, 255]]


def test_read_mask_binarises_any_non_zero_grey_and_resizes_nearest(tmp_path: Path) -> None:
    mask = np.zeros((4, 6), np.uint8)
    mask[1, 2], mask[2, 3:5] = 3, 255  # two foreground values: MVTec 3D-AD class ids are accepted here
    path = save(tmp_path / "m.png", mask)
    assert np.array_equal(read_mask(path, 4, (6, 4)), _nearest(mask > 0, 4))
    assert np.array_equal(read_mask(path, 8, (6, 4)), _nearest(mask > 0, 8))
    with pytest.raises(DataError, match=r"m.png: mask size 6x4 differs from its image's 4x6 \(width x height\)"):
        read_mask(path, 4, (4, 6))


def test_mask_foreground_takes_one_value_or_colour_and_a_threshold_for_soft_masks(tmp_path: Path) -> None:
    colour = np.zeros((3, 3, 3), np.uint8)
    colour[0, 0] = colour[2, 1] = (255, 0, 0)
    expected = np.zeros((3, 3), bool)
    expected[0, 0] = expected[2, 1] = True
    assert np.array_equal(mask_foreground(save(tmp_path / "c.png", colour), (3, 3), None), expected)
    soft = np.array([[0, 40, 200]], np.uint8)
    path = save(tmp_path / "s.png", soft)
    with pytest.raises(DataError, match=r"s.png: mask is not binary: 2 non-zero values \(40, 200\)"):
        mask_foreground(path, (3, 1), None)
    assert mask_foreground(path, (3, 1), 100).tolist() == [[False, False, True]]
    assert decode_mask(path, 2, (3, 1), 100).tolist() == _nearest(soft > 100, 2).tolist()


def _nearest(foreground: np.ndarray, size: int) -> np.ndarray:
    """Reference resize: PIL's nearest neighbour picks source pixel floor((i + 0.5) * n / size)."""
    rows = np.floor((np.arange(size) + 0.5) * foreground.shape[0] / size).astype(int)
    cols = np.floor((np.arange(size) + 0.5) * foreground.shape[1] / size).astype(int)
    return foreground[rows][:, cols].astype(np.uint8)
