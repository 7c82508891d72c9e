"""Seeded demo data in the real on-disk layouts of MVTec AD and BraTS2018.

    python -m data_modules.synthetic --out data/demo [--seed 0]

writes `<out>/mvtec`, `<out>/mvtec3d` and `<out>/brats`. Each data set is written into a temporary sibling directory and
renamed into place, with a hidden marker `.lsgs-demo.json` (generator version + parameters) written last; a
complete copy with the same parameters is left untouched, so the command is idempotent. The same seed
gives byte-identical files: PNGs carry no metadata and the NIfTI volumes are gzipped with mtime 0 and no
file name.

MVTec-style categories (256x256 PNG by default):
    fabric  RGB texture: plain-weave threads with seeded colour, period, phase and rotation jitter.
    nut     RGB object: a hexagonal nut seen from above with a threaded bore, centred with small pose and
            lighting jitter, on a dark background.
    mesh    grayscale (mode "L") texture: a wire grid, to exercise the 1 -> 3 channel conversion.
Test defects, one directory each (every mask equals the set of pixels the defect changed, never empty):
    scratch        a thin curved line
    hole           a hole in the fabric / a missing part of the nut / broken wires
    color          a colour stain
    contamination  a foreign blob with its own texture
plus test/good.

MVTec 3D-AD-style categories (`write_mvtec3d_demo`, RGB only): the same renderers and defects in the layout
`<cat>/{train,validation}/good/rgb/*.png`, `<cat>/test/<defect>/{rgb,gt}/*.png` (test/good with all-zero gt),
4:3 images (the renders with the top and bottom eighths cut, like the release's 800x600 images), masks storing a
class id per defect (252-255) instead of 255, and no xyz/.

BraTS-style cases: `<root>/{HGG,LGG}/<case>/<case>_{flair,seg}.nii.gz`, 240x240x155 int16 FLAIR by default: a
skull-stripped brain-like ellipsoid (zero background) with cortex/white-matter contrast, sulci, a midline
fissure, dark ventricles and smooth texture, and one FLAIR-bright tumour spanning part of the z-range (so
every case also has healthy brain slices). seg labels: 2 oedema, 4 enhancing (HGG only), 1 core; seg > 0 is
exactly the bright region. Affine: identity (1 mm voxels).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import gaussian_filter

from data_modules.cache import atomic_directory
from data_modules.image_io import parallel_map
from lsgs.errors import ConfigError, DataError
from lsgs.io import atomic_write_json

GENERATOR_VERSION = 1
MARKER = ".lsgs-demo.json"
DEMO_CATEGORIES = ("fabric", "nut", "mesh")
DEFECTS = ("scratch", "hole", "color", "contamination")
BRATS_SHAPE = (240, 240, 155)

Render = tuple[np.ndarray, np.ndarray, np.ndarray]  # (image [S, S, C] float, body [S, S] bool, underlay)


# --------------------------------------------------------------------------------------------- shared helpers
def keyed_rng(seed: int, *keys: int | str) -> np.random.Generator:
    """A generator keyed by (seed, keys): an image depends on its own keys only, not on how many are made."""
    parts = [int(seed)] + [k if isinstance(k, int) else zlib.crc32(k.encode()) for k in keys]
    return np.random.default_rng(parts)


def smooth_noise(rng: np.random.Generator, shape: Sequence[int], cell: float) -> np.ndarray:
    """Smooth Gaussian noise with correlation length about `cell` pixels.

    White noise on a grid `f` times coarser (f <= 4, so the Gaussian filter runs on few voxels), filtered with
    sigma = cell / (2 f), then linearly upsampled by f; the blur hides the interpolation creases.

    Args:
        rng: random generator.
        shape: output shape, 2-D or 3-D.
        cell: correlation length in pixels.

    Returns:
        float32 array of `shape`, zero mean and unit standard deviation.
    """
    f = int(max(1, min(4, cell // 2)))
    coarse = [int(np.ceil(n / f)) + 1 for n in shape]
    low = gaussian_filter(rng.standard_normal(coarse, dtype=np.float32), sigma=cell / (2 * f), mode="wrap")
    if f > 1:
        mode = "bilinear" if len(shape) == 2 else "trilinear"
        big = [(c - 1) * f + 1 for c in coarse]
        low = F.interpolate(torch.from_numpy(low)[None, None], size=big, mode=mode, align_corners=True)[
            0, 0
        ].numpy()
    out = low[tuple(slice(0, n) for n in shape)]
    return ((out - out.mean()) / (out.std() + 1e-6)).astype(np.float32)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _blob(
    size: int, rng: np.random.Generator, center: tuple[float, float], radius: float, wobble: float
) -> np.ndarray:
    """An irregular star-convex blob: r(theta) = radius * (1 + sum_k a_k cos(k theta + phi_k)).

    Returns:
        [size, size] bool.
    """
    yy, xx = _grid(size)
    dy, dx = yy - center[0], xx - center[1]
    theta = np.arctan2(dy, dx)
    r = np.ones_like(theta)
    for k in range(2, 6):
        r += rng.uniform(0, wobble / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(dy, dx) < radius * r


def _curve(size: int, rng: np.random.Generator, start: np.ndarray, length: float, width: float) -> np.ndarray:
    """A thin quadratic Bezier curve of about `length` pixels and `width` thickness.

    Returns:
        [size, size] bool.
    """
    angle = rng.uniform(0, np.pi)
    direction = np.array([np.sin(angle), np.cos(angle)])
    normal = np.array([-direction[1], direction[0]])
    end = start + direction * length
    ctrl = (start + end) / 2 + normal * rng.uniform(-0.25, 0.25) * length
    t = np.linspace(0, 1, 24)[:, None]
    pts = ((1 - t) ** 2 * start + 2 * (1 - t) * t * ctrl + t**2 * end).astype(np.float32)  # [24, 2] (y, x)
    yy, xx = _grid(size)
    p = np.stack([yy, xx], -1)[:, :, None]  # [S, S, 1, 2]
    a, b = pts[:-1], pts[1:]  # segments [23, 2]
    ab = b - a
    u = np.clip(((p - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-6), 0, 1)  # [S, S, 23]
    dist = np.linalg.norm(p - (a + u[..., None] * ab), axis=-1).min(-1)
    return dist < width / 2


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A rendered float image (grey levels 0..255) rounded and clipped to uint8, as written to disk."""
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------- MVTec renderers
def render_fabric(rng: np.random.Generator, size: int) -> Render:
    """Plain weave: warp and weft threads alternate over/under in a checkerboard of crossings."""
    s = size / 256
    yy, xx = _grid(size)
    angle = np.deg2rad(rng.uniform(-2, 2))
    period = 9.0 * s * rng.uniform(0.97, 1.03)
    wy, wx = smooth_noise(rng, (size, size), 40 * s), smooth_noise(rng, (size, size), 40 * s)
    u = (np.cos(angle) * xx + np.sin(angle) * yy) / period + rng.uniform(0, 1) + 0.04 * wx
    v = (-np.sin(angle) * xx + np.cos(angle) * yy) / period + rng.uniform(0, 1) + 0.04 * wy
    fu, fv = u - np.floor(u), v - np.floor(v)
    warp_on_top = ((np.floor(u) + np.floor(v)) % 2 == 0)[..., None]
    tone = rng.uniform(0.93, 1.07) * rng.uniform(0.97, 1.03, 3)  # brightness, then a slight tint
    warp = np.array([196, 170, 130]) * tone
    weft = np.array([176, 150, 112]) * tone * rng.uniform(0.98, 1.02, 3)
    shade_warp = (0.62 + 0.38 * np.sin(np.pi * fu))[..., None]
    shade_weft = (0.62 + 0.38 * np.sin(np.pi * fv))[..., None]
    image = np.where(warp_on_top, warp * shade_warp, weft * shade_weft)
    light = 1 + 0.05 * smooth_noise(rng, (size, size), 96 * s)[..., None]
    image = image * light + rng.normal(0, 3, image.shape)
    underlay = np.array([28, 22, 18]) + rng.normal(0, 3, image.shape)  # dark backing seen through a hole
    return image.astype(np.float32), np.ones((size, size), bool), underlay.astype(np.float32)


def _nut_background(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = _grid(size)
    r = np.hypot(yy - size / 2, xx - size / 2) / size
    base = np.array([46, 48, 52]) * (1 - 0.35 * r**2)[..., None]
    return (base + rng.normal(0, 2.5, (size, size, 3))).astype(np.float32)


def render_nut(rng: np.random.Generator, size: int) -> Render:
    """Hex nut seen from above: chamfered hexagonal face, threaded bore, directional lighting."""
    s = size / 256
    yy, xx = _grid(size)
    cy, cx = size / 2 + rng.uniform(-4, 4) * s, size / 2 + rng.uniform(-4, 4) * s
    radius = 88 * s * rng.uniform(0.98, 1.02)  # circumradius of the hexagon
    rot = np.deg2rad(rng.uniform(-6, 6))
    dy, dx = yy - cy, xx - cx
    rho = np.hypot(dy, dx)
    theta = np.arctan2(dy, dx) - rot
    # Distance to a regular hexagon's edge along theta: apothem / cos(angle to the nearest edge normal).
    apothem = radius * np.cos(np.pi / 6)
    edge_angle = (theta + np.pi / 6) % (np.pi / 3) - np.pi / 6
    hexagon = rho < apothem / np.cos(edge_angle)
    bore = rho < 0.42 * radius
    body = hexagon & ~bore
    chamfer = rho > 0.93 * apothem
    light_dir = np.deg2rad(rng.uniform(30, 60))
    lam = 0.85 + 0.15 * (np.cos(light_dir) * dx + np.sin(light_dir) * dy) / radius
    steel = np.array([172, 168, 158]) * rng.uniform(0.95, 1.05)
    brushed = 1 + 0.03 * np.sin(rho * 1.7 / s + 3 * smooth_noise(rng, (size, size), 16 * s))
    face = steel * (lam * brushed)[..., None]
    face = np.where(chamfer[..., None], face * 0.78, face)
    # The bore's thread: dark and bright rings just inside the hole's rim.
    thread_zone = (rho > 0.36 * radius) & (rho < 0.42 * radius)
    background = _nut_background(rng, size)
    image = background.copy()
    image[body] = face[body]
    thread = steel * (0.45 + 0.2 * np.sin(rho / (1.1 * s)))[..., None]
    image[thread_zone] = thread[thread_zone]
    image += rng.normal(0, 2.0, image.shape)
    body = body | thread_zone
    return image.astype(np.float32), body, background


def render_mesh(rng: np.random.Generator, size: int) -> Render:
    """Grayscale wire grid on a dark background (single channel)."""
    s = size / 256
    yy, xx = _grid(size)
    angle = np.deg2rad(rng.uniform(-1.5, 1.5))
    period = 16 * s * rng.uniform(0.97, 1.03)
    warp = 0.6 * s * smooth_noise(rng, (size, size), 48 * s)
    u = (np.cos(angle) * xx + np.sin(angle) * yy + warp) / period + rng.uniform(0, 1)
    v = (-np.sin(angle) * xx + np.cos(angle) * yy + warp) / period + rng.uniform(0, 1)
    half = 1.9 * s / period  # wire half-width in periods
    du, dv = np.abs(u - np.rint(u)), np.abs(v - np.rint(v))
    wire = np.clip(1 - np.minimum(du, dv) / half, 0, 1) ** 0.7
    background = (52 + 8 * smooth_noise(rng, (size, size), 64 * s) + rng.normal(0, 2.5, (size, size)))[
        ..., None
    ]
    level = 192 * rng.uniform(0.94, 1.06) * (1 + 0.05 * smooth_noise(rng, (size, size), 80 * s))
    image = background[..., 0] * (1 - wire) + level * wire + rng.normal(0, 2.5, (size, size)) * wire
    # A texture: defects go anywhere; a hole removes only the wire pixels it covers.
    return image[..., None].astype(np.float32), np.ones((size, size), bool), background.astype(np.float32)


RENDERERS: dict[str, Callable[[np.random.Generator, int], Render]] = {
    "fabric": render_fabric,
    "nut": render_nut,
    "mesh": render_mesh,
}
# Defect colours per category, chosen to contrast with the category's palette.
_SCRATCH = {"fabric": (58, 40, 34), "nut": (238, 236, 230), "mesh": (236,)}
_STAIN = {"fabric": (160, 36, 44), "nut": (150, 86, 36), "mesh": (110,)}
_DEBRIS = {"fabric": (40, 52, 36), "nut": (38, 30, 26), "mesh": (150,)}


def paint_defect(
    category: str,
    defect: str,
    rng: np.random.Generator,
    image: np.ndarray,
    body: np.ndarray,
    underlay: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect on a rendered image.

    Args:
        category: demo category (selects the colours).
        defect: one of DEFECTS.
        rng: random generator.
        image: [S, S, C] float image.
        body: [S, S] bool, where the object is (defects are placed on it).
        underlay: [S, S, C] what shows where the object is missing.

    Returns:
        (defective image [S, S, C] uint8, mask [S, S] bool = exactly the pixels whose value changed).
    """
    size = image.shape[0]
    s = size / 256
    before = to_uint8(image)
    for _ in range(50):  # resample the placement until the defect covers enough of the object
        ys, xs = np.nonzero(body)
        pick = rng.integers(len(ys))
        center = np.array([ys[pick], xs[pick]], dtype=np.float64)
        out = image.copy()
        if defect == "scratch":
            region = _curve(size, rng, center, rng.uniform(30, 80) * s, rng.uniform(3.0, 4.5) * s) & body
            out[region] = np.array(_SCRATCH[category]) + rng.normal(0, 3, (region.sum(), image.shape[2]))
        elif defect == "hole":
            region = _blob(size, rng, tuple(center), rng.uniform(8, 18) * s, 0.5)
            region &= body
            out[region] = underlay[region]
        elif defect == "color":
            region = _blob(size, rng, tuple(center), rng.uniform(9, 22) * s, 0.35) & body
            out[region] = 0.4 * image[region] + 0.6 * np.array(_STAIN[category])
        elif defect == "contamination":
            region = _blob(size, rng, tuple(center), rng.uniform(6, 15) * s, 0.9)
            fibres = 1 + 0.25 * np.sin(smooth_noise(rng, (size, size), 3 * s) * 4)[..., None]
            out[region] = (np.array(_DEBRIS[category]) * fibres)[region]
        else:
            raise ConfigError(f"unknown demo defect {defect!r}; expected one of {DEFECTS}")
        after = to_uint8(out)
        if defect != "hole":
            # Every painted pixel must differ from the original, so the mask is exactly the painted region.
            same = region & (after == before).all(-1)
            after[same, 0] = np.where(before[same, 0] < 128, before[same, 0] + 8, before[same, 0] - 8)
        mask = (after != before).any(-1)
        assert not (mask & ~region).any()
        if mask.sum() >= 20 * s * s:
            return after, mask
    raise RuntimeError(f"could not place a {defect} defect on a {category} image")  # pragma: no cover


def _save_png(path: Path, array: np.ndarray) -> None:
    # No metadata chunks (PIL writes no tIME by default), fixed compression: byte-identical for a seed.
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    Image.fromarray(array).save(path, format="PNG", compress_level=6)


def _marker_params(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _write_dataset(root: str | Path, params: dict[str, Any], fill: Callable[[Path], None]) -> Path:
    """Write a demo data set atomically unless a complete copy with the same params exists."""
    root = Path(root)
    wanted = {"generator_version": GENERATOR_VERSION, **params}

    def trusted(path: Path) -> bool:
        return _marker_params(path) == wanted

    if root.exists() and not trusted(root):
        ours = _marker_params(root) is not None
        if not (ours or (root.is_dir() and not any(root.iterdir()))):
            raise DataError(
                f"{root} exists and is not an LSGS demo data set (no {MARKER}); not overwriting it"
            )

    def fill_and_mark(tmp: Path) -> None:
        fill(tmp)
        atomic_write_json(tmp / MARKER, wanted)

    return atomic_directory(root, fill_and_mark, trusted)


def write_mvtec_demo(
    root: str | Path,
    seed: int = 0,
    categories: Sequence[str] = DEMO_CATEGORIES,
    n_train: int = 100,
    n_test_good: int = 10,
    n_test_per_defect: int = 5,
    size: int = 256,
) -> Path:
    """Write an MVTec-AD-style data set at `root` (see the module docstring).

    Args:
        root: output directory (created atomically).
        seed: master seed; every image also depends on its category, split, defect and index only.
        categories: subset of DEMO_CATEGORIES.
        n_train: train/good images per category.
        n_test_good: test/good images per category.
        n_test_per_defect: test images per defect type per category.
        size: image side in pixels.

    Returns:
        `root`.
    """
    for name in categories:
        if name not in RENDERERS:
            raise ConfigError(f"unknown demo category {name!r}; expected some of {DEMO_CATEGORIES}")
    if size < 32:
        raise ConfigError(f"demo image size must be >= 32, got {size}")
    params = {
        "kind": "mvtec", "seed": seed, "categories": list(categories), "n_train": n_train,
        "n_test_good": n_test_good, "n_test_per_defect": n_test_per_defect, "size": size,
    }  # fmt: skip

    def write_one(tmp: Path, category: str, split: str, defect: str, i: int) -> None:
        rng = keyed_rng(seed, category, split, defect, i)
        image, body, underlay = RENDERERS[category](rng, size)
        if defect == "good":
            _save_png(tmp / category / split / defect / f"{i:03d}.png", to_uint8(image))
            return
        defective, mask = paint_defect(category, defect, rng, image, body, underlay)
        _save_png(tmp / category / split / defect / f"{i:03d}.png", defective)
        _save_png(tmp / category / "ground_truth" / defect / f"{i:03d}_mask.png", mask.astype(np.uint8) * 255)

    def fill(tmp: Path) -> None:
        jobs = []
        for category in categories:
            counts = [("train", "good", n_train), ("test", "good", n_test_good)]
            counts += [("test", d, n_test_per_defect) for d in DEFECTS]
            for split, defect, count in counts:
                (tmp / category / split / defect).mkdir(parents=True)
                if defect != "good":
                    (tmp / category / "ground_truth" / defect).mkdir(parents=True)
                jobs += [(category, split, defect, i) for i in range(count)]
        # Every image has its own generator, so threads change nothing but the wall time.
        for _ in parallel_map(lambda job: write_one(tmp, *job), jobs, _workers()):
            pass

    return _write_dataset(root, params, fill)


# Class ids stored in MVTec 3D-AD-style masks (the release stores e.g. 253 for "hole", never a plain 255 only).
MVTEC3D_MASK_VALUES = {"color": 252, "hole": 253, "scratch": 254, "contamination": 255}


def write_mvtec3d_demo(
    root: str | Path,
    seed: int = 0,
    categories: Sequence[str] = ("nut",),
    n_train: int = 60,
    n_val: int = 10,
    n_test_good: int = 10,
    n_test_per_defect: int = 5,
    size: int = 256,
) -> Path:
    """Write an MVTec 3D-AD-style RGB data set at `root` (see the module docstring).

    Args:
        root: output directory (created atomically).
        seed: master seed; every image depends on its category, split, defect and index only.
        categories: subset of DEMO_CATEGORIES.
        n_train: train/good images per category.
        n_val: validation/good images per category.
        n_test_good: test/good images per category.
        n_test_per_defect: test images per defect type per category.
        size: rendered side in pixels; images are size wide and size - 2 * (size // 8) high.

    Returns:
        `root`.
    """
    for name in categories:
        if name not in RENDERERS:
            raise ConfigError(f"unknown demo category {name!r}; expected some of {DEMO_CATEGORIES}")
    if size < 32:
        raise ConfigError(f"demo image size must be >= 32, got {size}")
    params = {
        "kind": "mvtec3d", "seed": seed, "categories": list(categories), "n_train": n_train, "n_val": n_val,
        "n_test_good": n_test_good, "n_test_per_defect": n_test_per_defect, "size": size,
    }  # fmt: skip
    rows = slice(size // 8, size - size // 8)  # 4:3 crop; the objects and their defects lie inside it

    def rgb(image: np.ndarray) -> np.ndarray:
        return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image

    def write_one(tmp: Path, category: str, split: str, defect: str, i: int) -> None:
        rng = keyed_rng(seed, "mvtec3d", category, split, defect, i)
        image, body, underlay = RENDERERS[category](rng, size)
        folder = tmp / category / split / defect
        mask = np.zeros((size, size), bool)
        if defect == "good":
            out = to_uint8(image)
        else:
            inside = np.zeros_like(body)
            inside[rows] = body[rows]  # defects of textures (body everywhere) must land inside the crop
            out, mask = paint_defect(category, defect, rng, image, inside, underlay)
        _save_png(folder / "rgb" / f"{i:03d}.png", rgb(out[rows]))
        if split == "test":
            value = MVTEC3D_MASK_VALUES.get(defect, 0)
            _save_png(folder / "gt" / f"{i:03d}.png", mask[rows].astype(np.uint8) * np.uint8(value))

    def fill(tmp: Path) -> None:
        jobs = []
        for category in categories:
            counts = [
                ("train", "good", n_train),
                ("validation", "good", n_val),
                ("test", "good", n_test_good),
            ]
            counts += [("test", d, n_test_per_defect) for d in DEFECTS]
            for split, defect, count in counts:
                for sub in ("rgb", "gt") if split == "test" else ("rgb",):
                    (tmp / category / split / defect / sub).mkdir(parents=True)
                jobs += [(category, split, defect, i) for i in range(count)]
        for _ in parallel_map(lambda job: write_one(tmp, *job), jobs, _workers()):
            pass

    return _write_dataset(root, params, fill)


# --------------------------------------------------------------------------------------------- BraTS
def _ellipsoid_distance(shape: Sequence[int], center: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """sqrt(sum_i ((x_i - c_i) / r_i)^2) on the voxel grid, by broadcasting 1-D axes; [X, Y, Z] float32."""
    total = np.zeros((1, 1, 1), np.float32)
    for dim, (n, c, r) in enumerate(zip(shape, center, radii)):
        axis = (np.arange(n, dtype=np.float32) - np.float32(c)) / np.float32(r)
        total = total + (axis * axis).reshape([-1 if d == dim else 1 for d in range(3)])
    return np.sqrt(total)


def render_brain_case(
    rng: np.random.Generator, shape: Sequence[int], grade: str
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic FLAIR volume and its segmentation.

    Args:
        rng: random generator.
        shape: (X, Y, Z) in 1 mm voxels; sizes scale with the shape relative to 240x240x155.
        grade: "HGG" (labels 1, 2, 4) or "LGG" (labels 1, 2).

    Returns:
        (flair [X, Y, Z] int16 with background 0 and brain > 0, seg [X, Y, Z] uint8 in {0, 1, 2, 4}).
    """
    shape = tuple(int(v) for v in shape)
    scale = np.array(shape, dtype=np.float64) / np.array(BRATS_SHAPE, dtype=np.float64)
    mm = float(scale.mean())
    axes = np.array([68, 86, 60]) * scale * rng.uniform(0.95, 1.05, 3)
    center = np.array(shape) / 2 + np.array([0, rng.uniform(-3, 3), rng.uniform(-3, 3)]) * scale
    rho = _ellipsoid_distance(shape, center, axes) * (1 + 0.035 * smooth_noise(rng, shape, 24 * mm))
    brain = rho < 1
    folds = smooth_noise(rng, shape, 5 * mm)
    cortex = rho > 0.86 + 0.04 * folds
    sulci = cortex & (np.abs(folds) < 0.12)
    # Interhemispheric fissure: a thin dark sheet at the midline, upper brain only.
    x = np.abs(np.arange(shape[0]) - center[0])[:, None, None] < 1.0 * scale[0]
    z = (np.arange(shape[2]) > center[2] - 0.1 * axes[2])[None, None, :]
    fissure = x & z & (_ellipsoid_distance(shape, center, axes * [1, 0.85, 1]) < 1)
    ventricles = np.zeros(shape, bool)
    for side in (-1, 1):
        c = center + np.array([side * 9, -4, 6]) * scale
        ventricles |= _ellipsoid_distance(shape, c, np.array([6, 24, 10]) * scale) < 1
    white = 300 * rng.uniform(0.8, 1.2)  # per-case scale, so per-volume normalisation matters
    flair = np.full(shape, white, dtype=np.float32)
    flair[cortex] *= 1.18
    flair[sulci | fissure] *= 0.45
    flair[ventricles] *= 0.25  # FLAIR suppresses CSF
    flair *= 1 + 0.05 * smooth_noise(rng, shape, 14 * mm)

    # Tumour: a distorted ellipsoid inside the brain; oedema (2) > enhancing rim (4, HGG) > core (1).
    t_radius = rng.uniform(11, 27) * scale * rng.uniform(0.8, 1.2, 3)
    direction = rng.normal(size=3)
    t_center = center + direction / np.linalg.norm(direction) * axes * rng.uniform(0.1, 0.55)
    d = _ellipsoid_distance(shape, t_center, t_radius) + 0.12 * smooth_noise(rng, shape, 8 * mm)
    seg = np.zeros(shape, np.uint8)
    seg[d < 1] = 2
    if grade == "HGG":
        seg[d < 0.55] = 4
    seg[d < 0.35] = 1
    seg[~brain] = 0
    tumour = seg > 0
    for label, factor in ((2, 1.75), (4, 1.55), (1, 1.35)):
        flair[seg == label] = white * factor * (1 + 0.05 * rng.standard_normal())
    flair[tumour] *= 1 + 0.06 * smooth_noise(rng, shape, 4 * mm)[tumour]
    flair += rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02 * white)
    flair = np.where(brain, np.maximum(flair, 1.0), 0.0)  # brain voxels > 0, background exactly 0
    return np.rint(flair).astype(np.int16), seg


def _save_nifti_gz(path: Path, data: np.ndarray) -> None:
    import nibabel as nib  # deferred: only the BraTS writer needs it

    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_xyzt_units("mm")
    # nibabel's own .gz writer stamps the current time into the gzip header; gzip with mtime=0 instead.
    path.write_bytes(gzip.compress(img.to_bytes(), compresslevel=1, mtime=0))


def write_brats_demo(
    root: str | Path, seed: int = 0, n_hgg: int = 10, n_lgg: int = 5, shape: Sequence[int] = BRATS_SHAPE
) -> Path:
    """Write a BraTS2018-style data set at `root` (see the module docstring).

    Args:
        root: output directory (created atomically).
        seed: master seed; every case depends on its group and index only.
        n_hgg: number of HGG cases.
        n_lgg: number of LGG cases.
        shape: volume shape (X, Y, Z); shrink it for tests.

    Returns:
        `root`.
    """
    if len(shape) != 3 or min(shape) < 16:
        raise ConfigError(f"demo volume shape must be 3 sizes >= 16, got {tuple(shape)}")
    params = {"kind": "brats", "seed": seed, "n_hgg": n_hgg, "n_lgg": n_lgg, "shape": [int(v) for v in shape]}

    def write_case(tmp: Path, group: str, i: int) -> None:
        case = f"Brats18_Demo_{group}_{i:03d}_1"
        case_dir = tmp / group / case
        case_dir.mkdir(parents=True)
        flair, seg = render_brain_case(keyed_rng(seed, group, i), shape, group)
        _save_nifti_gz(case_dir / f"{case}_flair.nii.gz", flair)
        _save_nifti_gz(case_dir / f"{case}_seg.nii.gz", seg)

    def fill(tmp: Path) -> None:
        for group in ("HGG", "LGG"):
            (tmp / group).mkdir()
        jobs = [("HGG", i) for i in range(n_hgg)] + [("LGG", i) for i in range(n_lgg)]
        for _ in parallel_map(lambda job: write_case(tmp, *job), jobs, _workers()):
            pass

    return _write_dataset(root, params, fill)


SMALL_MVTEC = {"n_train": 8, "n_test_good": 2, "n_test_per_defect": 1, "size": 64}
SMALL_BRATS = {"n_hgg": 3, "n_lgg": 1, "shape": (64, 64, 40)}
SMALL_MVTEC3D = {"n_train": 8, "n_val": 2, "n_test_good": 2, "n_test_per_defect": 1, "size": 64}


def write_demo(out: str | Path, seed: int = 0, small: bool = False) -> tuple[Path, Path]:
    """Write the demo sets to `<out>/mvtec` and `<out>/brats`; returns both roots.

    Args:
        out: output directory.
        seed: master seed.
        small: tiny sets (SMALL_MVTEC, SMALL_BRATS) for smoke tests instead of the demo defaults.
    """
    out = Path(out)
    mvtec = write_mvtec_demo(out / "mvtec", seed=seed, **(SMALL_MVTEC if small else {}))
    return mvtec, write_brats_demo(out / "brats", seed=seed, **(SMALL_BRATS if small else {}))


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: `python -m data_modules.synthetic --out data/demo [--seed 0]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/demo", help="output directory (default: data/demo)")
    parser.add_argument("--seed", type=int, default=0, help="master seed (default: 0)")
    parser.add_argument("--small", action="store_true", help="tiny sets for smoke tests")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    mvtec, brats = write_demo(args.out, seed=args.seed, small=args.small)
    mvtec3d = write_mvtec3d_demo(
        Path(args.out) / "mvtec3d", seed=args.seed, **(SMALL_MVTEC3D if args.small else {})
    )
    print(f"demo data ready in {time.perf_counter() - start:.1f} s: {mvtec} {mvtec3d} {brats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
