"""BraTS FLAIR slices: scanning, NIfTI reading, normalisation, slicing, caching, and `BraTSDataModule`.

Layouts. BraTS 2018 (official): `<root>/{HGG,LGG}/<case>/<case>_flair.nii.gz` and `<case>_seg.nii.gz`,
240x240x155. BraTS 2019/2020 keep the HGG/LGG level with other names; BraTS 2021 puts the cases directly under
root: use `case_dirs=[]` (or `["."]`) and, if needed, other `flair_pattern`/`seg_pattern` globs. Every visible
directory under a case directory is a case and must hold exactly one FLAIR and one segmentation file.

Preprocessing of one case (vectorised over slices; well under 1 s for 240x240x155 on 2 CPU cores):
    brain  = FLAIR > 0
    FLAIR is normalised per volume over brain voxels ("percentile": / 99.5th percentile, clipped to [0, 1];
    "zscore": (x - mean) / std, NOT bounded to [0, 1]); background stays exactly 0.
    Axial slices (last array axis, kept as [X, Y] = [H, W]) are resized to image_size: image bilinear with
    anti-aliasing (area-like when shrinking), whole-tumour mask (seg > 0) and brain mask nearest; the image is
    then multiplied by the resized brain mask, so roi == brain and the background is 0.
    Slices without any brain voxel are never cached; `min_brain_fraction` is applied when splitting.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from data_modules import image_io
from data_modules.base import AnomalyDataModule, Item, check_fraction, decode_workers, n_holdout
from data_modules.cache import (
    IMAGES,
    MASKS,
    ROI,
    NpyStreamWriter,
    array_path,
    build_entry,
    cache_key,
    read_index,
    write_index,
)
from lsgs.errors import ConfigError, DataError, DataNotFoundError

CATEGORY = "brats"
NORMALIZATIONS = ("percentile", "zscore")
PERCENTILE = 99.5


@dataclass(frozen=True)
class BraTSCase:
    """One patient: id (its directory name), group (e.g. "HGG"; "." for cases directly under root), files."""

    case_id: str
    group: str
    flair: Path
    seg: Path


@dataclass
class CaseSlices:
    """The cached slices of one case, S = slices with at least one brain voxel.

    Attributes:
        images: [S, H, W] float16, normalised FLAIR, 0 outside the brain.
        masks: [S, H, W] uint8, whole tumour (seg > 0) after resizing.
        roi: [S, H, W] uint8, brain mask (FLAIR > 0) after resizing.
        slice_index: [S] int, axial index in the volume.
        healthy: [S] bool, seg == 0 everywhere in the full-resolution slice.
        brain_fraction: [S] float, brain pixels / slice pixels at full resolution.
    """

    images: np.ndarray
    masks: np.ndarray
    roi: np.ndarray
    slice_index: np.ndarray
    healthy: np.ndarray
    brain_fraction: np.ndarray


def _single_match(case_dir: Path, pattern: str, what: str) -> Path:
    matches = sorted(p for p in case_dir.glob(pattern) if image_io.is_visible(p) and p.is_file())
    if not matches:
        raise DataError(f"BraTS case {case_dir}: no {what} file matching {pattern!r}")
    if len(matches) > 1:
        raise DataError(
            f"BraTS case {case_dir}: {len(matches)} files match {what} pattern {pattern!r}: "
            f"{[m.name for m in matches]}"
        )
    return matches[0]


def scan_cases(root: Path, case_dirs: Sequence[str], flair_pattern: str, seg_pattern: str) -> list[BraTSCase]:
    """Every case under `root/<case_dir>/`, sorted by case id.

    Args:
        root: data root.
        case_dirs: group directories under root holding the case directories; [] or ["."] = root itself.
        flair_pattern: glob of the FLAIR file inside a case directory.
        seg_pattern: glob of the segmentation file inside a case directory.

    Raises:
        DataNotFoundError: root or a case directory is missing, or no case is found.
        DataError: a case without FLAIR or without seg, several matches, or a case id in two groups.
    """
    if not root.is_dir():
        raise DataNotFoundError(f"BraTS root {root} does not exist or is not a directory")
    cases: dict[str, BraTSCase] = {}
    for group in list(case_dirs) or ["."]:
        group_dir = root / group
        if not group_dir.is_dir():
            raise DataNotFoundError(
                f"BraTS case directory {group_dir} (case_dirs entry {group!r}) does not exist; "
                "for cases directly under root (BraTS 2021) use case_dirs=[]"
            )
        for case_dir in sorted(p for p in group_dir.iterdir() if image_io.is_visible(p) and p.is_dir()):
            flair = _single_match(case_dir, flair_pattern, "FLAIR")
            seg = _single_match(case_dir, seg_pattern, "segmentation")
            if case_dir.name in cases:
                raise DataError(
                    f"BraTS case id {case_dir.name!r} appears twice: {cases[case_dir.name].flair.parent} "
                    f"and {case_dir}"
                )
            cases[case_dir.name] = BraTSCase(case_dir.name, group, flair, seg)
    if not cases:
        raise DataNotFoundError(f"no BraTS case directories found under {root} / {list(case_dirs) or ['.']}")
    return [cases[k] for k in sorted(cases)]


def read_volume(path: Path) -> np.ndarray:
    """Read a 3-D NIfTI volume.

    Returns:
        [X, Y, Z] array in its stored dtype (scaled to float if the header has a slope).

    Raises:
        DataError: the file is not a readable NIfTI (truncated gzip, bad header...) or not 3-D.
    """
    try:
        data = np.asanyarray(nib.load(str(path)).dataobj)
    except Exception as exc:  # nibabel/gzip/zlib raise many unrelated types for a corrupt file
        raise DataError(f"{path}: cannot read NIfTI volume ({type(exc).__name__}: {exc})") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    return data


def normalize_volume(flair: np.ndarray, method: str = "percentile") -> np.ndarray:
    """Normalise intensities over brain voxels (FLAIR > 0); background is set to 0.

    Args:
        flair: [X, Y, Z] FLAIR volume with at least one voxel > 0.
        method: "percentile" (x / p99.5 of brain voxels, clipped to [0, 1]) or "zscore" ((x - mean) / std of
            brain voxels; unbounded).

    Returns:
        [X, Y, Z] float32.
    """
    x = flair.astype(np.float32, copy=False)
    brain = x > 0
    values = x[brain]
    if method == "percentile":
        out = np.clip(x / np.float32(np.percentile(values, PERCENTILE)), 0.0, 1.0)
    elif method == "zscore":
        mean, std = values.mean(dtype=np.float64), values.std(dtype=np.float64)
        out = (x - np.float32(mean)) / np.float32(std)
    else:
        raise ConfigError(f"normalization must be one of {NORMALIZATIONS}, got {method!r}")
    out[~brain] = 0.0
    return out.astype(np.float32, copy=False)


def resize_slices(volume: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """Resize every axial slice in one call.

    Args:
        volume: [X, Y, S] (float for images, uint8 for masks).
        size: output side.
        nearest: nearest neighbour (pixel-centre aligned) instead of anti-aliased bilinear.

    Returns:
        [S, size, size], float32 (bilinear) or the input dtype (nearest).
    """
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume, -1, 0)))[:, None]  # [S, 1, X, Y]
    if nearest:
        out = F.interpolate(t, size=(size, size), mode="nearest-exact")
    else:
        out = F.interpolate(
            t.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
    return out[:, 0].numpy()


def preprocess_case(case: BraTSCase, size: int, normalization: str = "percentile") -> CaseSlices:
    """Read, validate, normalise and slice one case.

    Raises:
        DataError: unreadable files, FLAIR and seg shapes differ, non-finite or all-zero FLAIR, or a
            constant brain (zscore undefined).
    """
    flair = read_volume(case.flair)
    seg = read_volume(case.seg)
    if seg.shape != flair.shape:
        raise DataError(
            f"{case.seg}: segmentation shape {seg.shape} differs from FLAIR {case.flair} shape {flair.shape}"
        )
    flair = flair.astype(np.float32, copy=False)
    if not np.isfinite(flair).all():
        raise DataError(f"{case.flair}: FLAIR volume contains NaN or infinite values")
    brain = flair > 0
    brain_fraction = brain.mean(axis=(0, 1))  # [Z]
    keep = np.flatnonzero(brain_fraction > 0)
    if keep.size == 0:
        raise DataError(f"{case.flair}: FLAIR volume has no voxel > 0 (all-zero or negative volume)")
    if normalization == "zscore" and np.ptp(flair[brain]) == 0:
        raise DataError(f"{case.flair}: brain intensities are constant; zscore normalisation is undefined")
    image = normalize_volume(flair, normalization)[..., keep]
    tumour = seg[..., keep] > 0
    roi = resize_slices(brain[..., keep].view(np.uint8), size, nearest=True)
    images = resize_slices(image, size) * roi
    return CaseSlices(
        images=images.astype(np.float16),
        masks=resize_slices(tumour.view(np.uint8), size, nearest=True),
        roi=roi,
        slice_index=keep,
        healthy=~tumour.any(axis=(0, 1)),
        brain_fraction=brain_fraction[keep],
    )


def split_patients(
    case_ids: Sequence[str], test_fraction: float, val_fraction: float, seed: int
) -> tuple[list[str], list[str], list[str]]:
    """Seeded patient split: test = test_fraction of cases; of the rest, val_fraction are validation.

    Returns:
        (train, val, test) case ids, each sorted; disjoint, covering all cases, train never empty.
    """
    ids = sorted(case_ids)
    perm = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    n_test = n_holdout(len(ids), test_fraction)
    test, rest = perm[:n_test], perm[n_test:]
    n_val = n_holdout(len(rest), val_fraction)
    return sorted(rest[n_val:]), sorted(rest[:n_val]), sorted(test)


def build_brats_cache(
    cases: Sequence[BraTSCase], root: Path, size: int, normalization: str, config: Mapping, cache_root: Path
) -> Path:
    """Return the cache entry for `cases`, building it if needed.

    The entry holds the arrays IMAGES [N, size, size] float16, MASKS and ROI [N, size, size] uint8, and an
    index {"cases": [{case_id, group, flair, seg}], "rows": {column: [N values]}} with row columns
    case (index into cases), slice_index, label (tumour in the resized mask), healthy, brain_fraction.
    """
    files = [f for c in cases for f in (c.flair, c.seg)]
    key = cache_key("brats", root, {**config, "image_size": size, "normalization": normalization}, files)

    def build(tmp: Path) -> None:
        writers = {
            name: NpyStreamWriter(array_path(tmp, name), (size, size), dtype)
            for name, dtype in ((IMAGES, np.float16), (MASKS, np.uint8), (ROI, np.uint8))
        }
        rows: dict[str, list] = {
            "case": [],
            "slice_index": [],
            "label": [],
            "healthy": [],
            "brain_fraction": [],
        }
        slices = image_io.parallel_map(
            lambda c: preprocess_case(c, size, normalization), cases, decode_workers()
        )
        for case_id, case_slices in enumerate(slices):
            writers[IMAGES].append(case_slices.images)
            writers[MASKS].append(case_slices.masks)
            writers[ROI].append(case_slices.roi)
            n = len(case_slices.slice_index)
            rows["case"] += [case_id] * n
            rows["slice_index"] += case_slices.slice_index.tolist()
            rows["label"] += case_slices.masks.any(axis=(1, 2)).astype(int).tolist()
            rows["healthy"] += case_slices.healthy.tolist()
            rows["brain_fraction"] += case_slices.brain_fraction.astype(float).tolist()
        for writer in writers.values():
            writer.close()
        meta = [
            {"case_id": c.case_id, "group": c.group, "flair": str(c.flair), "seg": str(c.seg)} for c in cases
        ]
        write_index(tmp, {"image_size": size, "normalization": normalization, "cases": meta, "rows": rows})

    return build_entry(cache_root, key, build)


class BraTSDataModule(AnomalyDataModule):
    """BraTS FLAIR axial slices, split by patient (never by slice).

    Train = healthy slices (seg == 0 everywhere) of training patients; val = healthy slices of validation
    patients; test = slices of test patients whose resized whole-tumour mask is non-empty (label 1), plus
    their healthy slices (label 0) when `include_healthy_in_test`. Slices with tumour voxels that vanish when
    resized are in no split (neither healthy nor scorable). Slices whose brain fraction is below
    `min_brain_fraction` are dropped everywhere. roi = brain mask; category = "brats".

    Args:
        root: BraTS root (holding HGG/ and LGG/ for 2018).
        test_fraction: fraction of patients in the test split, in [0, 1).
        include_healthy_in_test: also evaluate the test patients' healthy slices.
        min_brain_fraction: drop slices with fewer brain pixels than this fraction of the slice, in [0, 1].
        flair_pattern: glob of the FLAIR file in a case directory.
        seg_pattern: glob of the segmentation file in a case directory.
        case_dirs: directories under root holding the cases; [] or ["."] = cases directly under root.
        normalization: "percentile" (output in [0, 1]) or "zscore" (output NOT in [0, 1]).
        **kwargs: the arguments every data module takes (`image_size`, `batch_size`, ...): see `AnomalyDataModule`.
    """

    def __init__(
        self,
        root: str,
        test_fraction: float = 0.2,
        include_healthy_in_test: bool = False,
        min_brain_fraction: float = 0.05,
        flair_pattern: str = "*_flair.nii.gz",
        seg_pattern: str = "*_seg.nii.gz",
        case_dirs: Sequence[str] = ("HGG", "LGG"),
        normalization: Literal["percentile", "zscore"] = "percentile",
        **kwargs: Any,
    ) -> None:
        super().__init__(root=root, **kwargs)
        check_fraction("test_fraction", test_fraction)
        if not isinstance(min_brain_fraction, (int, float)) or not 0.0 <= min_brain_fraction <= 1.0:
            raise ConfigError(f"min_brain_fraction must be in [0, 1], got {min_brain_fraction!r}")
        if normalization not in NORMALIZATIONS:
            raise ConfigError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if isinstance(case_dirs, str):
            raise ConfigError(f"case_dirs must be a list of directory names, got the string {case_dirs!r}")
        if flair_pattern == seg_pattern:
            raise ConfigError(f"flair_pattern and seg_pattern are both {flair_pattern!r}")
        self.test_fraction = float(test_fraction)
        self.include_healthy_in_test = bool(include_healthy_in_test)
        self.min_brain_fraction = float(min_brain_fraction)
        self.flair_pattern = flair_pattern
        self.seg_pattern = seg_pattern
        self.case_dirs = [d for d in case_dirs if os.path.normpath(d) != "."]
        self.normalization = normalization

    @property
    def num_channels(self) -> int:
        return 1

    @property
    def test_categories(self) -> list[str]:
        return [CATEGORY]

    def _build_cache(self) -> list[Path]:
        cases = scan_cases(self.root, self.case_dirs, self.flair_pattern, self.seg_pattern)
        config = {
            "flair_pattern": self.flair_pattern,
            "seg_pattern": self.seg_pattern,
            "case_dirs": self.case_dirs,
        }
        return [
            build_brats_cache(cases, self.root, self.image_size, self.normalization, config, self.cache_root)
        ]

    def _make_splits(self, entries: list[Path]) -> Mapping[str, list[Item]]:
        index = read_index(entries[0])
        cases, rows = index["cases"], index["rows"]
        train_ids, _, test_ids = (
            set(ids)
            for ids in split_patients(
                [c["case_id"] for c in cases], self.test_fraction, self.val_fraction, self.seed
            )
        )
        splits: dict[str, list[Item]] = {"train": [], "val": [], "test": []}
        for row, (case, z, label, healthy, fraction) in enumerate(
            zip(rows["case"], rows["slice_index"], rows["label"], rows["healthy"], rows["brain_fraction"])
        ):
            if fraction < self.min_brain_fraction:
                continue
            case_id = cases[case]["case_id"]
            if case_id in test_ids:
                if not (label == 1 or (healthy and self.include_healthy_in_test)):
                    continue
                split = "test"
            elif healthy:
                split = "train" if case_id in train_ids else "val"
            else:
                continue
            splits[split].append(Item(0, row, int(label), CATEGORY, cases[case]["flair"], int(z)))
        if not splits["train"]:
            raise DataError(
                f"BraTS data under {self.root}: no healthy training slice left after the patient split and "
                f"min_brain_fraction={self.min_brain_fraction}"
            )
        return splits
