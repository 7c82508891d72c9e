"""``lsgs detect`` on the tiny demo run and on its export: one output per input over a tree with repeated file
names, heatmaps at each input's own resolution and format, threshold overrides, videos frame by frame, the scoring
equal to the data modules' path, and a help path that imports neither torch nor Lightning."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from PIL import Image

from lsgs.detect import RunScorer, detect
from lsgs.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parents[1]


def read_rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "scores.csv").open() as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def tree(demo_mvtec_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MVTec-like ``test/`` tree: ``000.png`` in three defect folders (repeated names), plus a non-square JPEG
    and a 2x-enlarged PNG at the top."""
    root = tmp_path_factory.mktemp("detect") / "nut"
    for defect in ("color", "contamination", "good"):
        (root / defect).mkdir(parents=True)
        shutil.copy(demo_mvtec_root / "nut" / "test" / defect / "000.png", root / defect / "000.png")
    image = Image.open(demo_mvtec_root / "nut" / "test" / "hole" / "000.png").convert("RGB")
    image.resize((90, 60), Image.Resampling.BILINEAR).save(root / "wide.jpg", quality=95)
    image.resize((256, 256), Image.Resampling.NEAREST).save(root / "big.png")
    return root


@pytest.fixture(scope="module")
def detected(tiny_run: Path, tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return detect(tiny_run, tree, tmp_path_factory.mktemp("out") / "out", recursive=True, accelerator="cpu")


def test_repeated_names_get_one_heatmap_each(detected: Path, tree: Path) -> None:
    rows = read_rows(detected)
    inputs = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file())
    assert [r["path"] for r in rows] == inputs  # one row per input, by relative path
    assert len({r["output"] for r in rows}) == len(inputs)
    for row in rows:
        assert row["output"] == f"heatmaps/{row['path']}" and (detected / row["output"]).is_file(), row
        assert row["frame"] == ""
    heatmaps = sorted(p.relative_to(detected / "heatmaps").as_posix() for p in (detected / "heatmaps").rglob("*.*"))
    assert heatmaps == inputs
    # Different images under one name keep different heatmaps (nothing overwritten).
    first, second = (np.asarray(Image.open(detected / "heatmaps" / d / "000.png")) for d in ("color", "good"))
    assert not np.array_equal(first, second)


def test_heatmaps_are_at_each_input_s_resolution(detected: Path, tree: Path, tiny_run: Path) -> None:
    """A panel is input | map over the input | region, each at the input's own size, in the input's format; its
    region tile is the scorer's map (resized to the input's size) above the pixel threshold."""
    from data_modules.image_io import read_original

    scorer = RunScorer(tiny_run, accelerator="cpu")
    for name, (width, height) in {"wide.jpg": (90, 60), "big.png": (256, 256), "good/000.png": (128, 128)}.items():
        picture = Image.open(detected / "heatmaps" / name)
        assert picture.format == ("JPEG" if name.endswith(".jpg") else "PNG")
        panel = np.asarray(picture.convert("RGB"))
        assert panel.shape == (height, 3 * width + 4, 3), name
        original = read_original(tree / name)
        if name.endswith(".png"):  # lossless: the first tile is the input itself
            np.testing.assert_array_equal(panel[:, :width], original)
        index = sorted(p.relative_to(tree).as_posix() for p in tree.rglob("*") if p.is_file()).index(name)
        anomaly, score = scorer.score([original], [index], tree.name)[0]
        assert anomaly.shape == (height, width)
        if name.endswith(".png"):  # JPEG compression blurs the region edge
            region = panel[:, 2 * width + 4 :, 0] > 127
            np.testing.assert_array_equal(region, anomaly > scorer.pixel_threshold)
        row = next(r for r in read_rows(detected) if r["path"] == name)
        assert float(row["score"]) == pytest.approx(score, rel=1e-5)


def test_the_scoring_equals_the_data_module_path(tiny_run: Path, tree: Path, data_cache_dir: Path) -> None:
    """At the run's size, ``RunScorer`` gives the maps and scores the harness gives the same images read by
    ``ImageFolderDataModule`` through ``Trainer.predict`` (same decoding, resizing, per-image seeds)."""
    from data_modules import ImageFolderDataModule
    from data_modules.image_io import list_images, read_original
    from lsgs.methods.registry import load_method

    model = load_method(tiny_run, "lsgs")
    datamodule = ImageFolderDataModule(str(tree), recursive=True, image_size=32, cache_dir=str(data_cache_dir),
                                       batch_size=8)  # fmt: skip
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    predicted = trainer.predict(model, datamodule=datamodule)
    maps = torch.cat([p["map"] for p in predicted])[:, 0]
    scores = torch.cat([p["score"] for p in predicted])
    paths = list_images(tree, recursive=True)
    # At the run's size (no resizing back), in one batch as the data module's.
    small = [np.array(Image.fromarray(read_original(p)).resize((32, 32), Image.Resampling.BILINEAR)) for p in paths]
    scored = RunScorer(tiny_run, accelerator="cpu").score(small, range(len(paths)), tree.name)
    assert len(scored) == len(paths) == len(scores)
    for index, (anomaly, score) in enumerate(scored):
        np.testing.assert_array_equal(anomaly, maps[index].numpy())
        assert score == float(scores[index])


def test_threshold_overrides(tiny_run: Path, tree: Path, tmp_path: Path) -> None:
    out = detect(tiny_run, tree / "good", tmp_path / "low", image_threshold=-1.0, pixel_threshold=-1.0)
    assert [r["anomalous"] for r in read_rows(out)] == ["1"]
    region = np.asarray(Image.open(out / "heatmaps" / "000.png"))[:, 2 * 128 + 4 :]
    assert region.min() == 255  # every pixel above a pixel threshold of -1
    record = json.loads((out / "thresholds.json").read_text())
    assert record["image_threshold"] == -1.0 and record["pixel_threshold"] == -1.0
    assert sorted(record["overridden"]) == ["image_threshold", "pixel_threshold"]
    calibration = json.loads((tiny_run / "scoring" / "calibration.json").read_text())
    assert record["calibrated"] == {
        "image_threshold": calibration["image_threshold"], "pixel_threshold": calibration["val_threshold"]}
    out = detect(tiny_run, tree / "good", tmp_path / "high", image_threshold=1e9)
    assert [r["anomalous"] for r in read_rows(out)] == ["0"]
    assert json.loads((out / "thresholds.json").read_text())["overridden"] == ["image_threshold"]
    with pytest.raises(ConfigError, match="--pixel_threshold must be a finite number"):
        detect(tiny_run, tree / "good", tmp_path / "nan", pixel_threshold=float("nan"))


def write_video(path: Path, source: Path, frames: int, fps: float, size: tuple[int, int]) -> None:
    """A short mp4v video: the source image shifted a little more in each frame."""
    image = np.asarray(Image.open(source).convert("RGB"))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    for i in range(frames):
        frame = cv2.resize(np.roll(image, 4 * i, axis=1), size, interpolation=cv2.INTER_AREA)
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()


def video_facts(path: Path) -> tuple[int, float, int, int]:
    """(frames read, frame rate, width, height) of a video file."""
    capture = cv2.VideoCapture(str(path))
    fps, width, height = (capture.get(p) for p in (cv2.CAP_PROP_FPS, cv2.CAP_PROP_FRAME_WIDTH,
                                                    cv2.CAP_PROP_FRAME_HEIGHT))  # fmt: skip
    count = 0
    while capture.read()[0]:
        count += 1
    capture.release()
    return count, fps, int(width), int(height)


def test_a_video_is_scored_frame_by_frame(tiny_run: Path, demo_mvtec_root: Path, tmp_path: Path) -> None:
    """One scores.csv row per frame, and an annotated copy with the same frame count, rate and size; a folder of
    videos gets one copy per video, under its relative path."""
    folder = tmp_path / "clips"
    (folder / "line2").mkdir(parents=True)
    write_video(folder / "clip.mp4", demo_mvtec_root / "nut" / "test" / "hole" / "000.png", 7, 12.5, (80, 64))
    write_video(folder / "line2" / "clip.avi", demo_mvtec_root / "fabric" / "test" / "good" / "000.png", 3, 5.0,
                (48, 48))  # fmt: skip
    out = detect(tiny_run, folder / "clip.mp4", tmp_path / "one", batch_size=3)
    rows = read_rows(out)
    assert [(r["path"], r["frame"]) for r in rows] == [("clip.mp4", str(i)) for i in range(7)]
    assert {r["output"] for r in rows} == {"videos/clip.mp4"}
    assert video_facts(out / "videos" / "clip.mp4") == (7, 12.5, 80, 64)
    # Frames are scored as images: frame 2 equals the same frame scored alone.
    from data_modules.video import read_frames

    frame = list(read_frames(folder / "clip.mp4"))[2]
    _, score = RunScorer(tiny_run, accelerator="cpu").score([frame], [2], folder.name)[0]
    assert float(rows[2]["score"]) == pytest.approx(score, rel=1e-5)
    out = detect(tiny_run, folder, tmp_path / "all", recursive=True)
    rows = read_rows(out)
    assert [(r["path"], r["frame"]) for r in rows] == [
        *(("clip.mp4", str(i)) for i in range(7)), *(("line2/clip.avi", str(i)) for i in range(3))]  # fmt: skip
    assert video_facts(out / "videos" / "line2" / "clip.avi") == (3, 5.0, 48, 48)
    assert not list(out.rglob(".*"))  # no partial file left


def test_input_errors_are_one_line(tiny_run: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="holds no image or video file"):
        detect(tiny_run, tmp_path / "empty")
    with pytest.raises(DataError, match="neither an image"):
        detect(tiny_run, tmp_path / "notes.txt")
    with pytest.raises(ConfigError, match="--accelerator 'tpu' is not one of"):
        detect(tiny_run, tmp_path / "notes.txt", accelerator="tpu")


def test_help_imports_neither_torch_nor_lightning() -> None:
    """``lsgs --help`` and ``lsgs detect --help`` answer without loading torch or Lightning (a fresh interpreter)."""
    code = (
        "import sys\n"
        "from lsgs.cli import main\n"
        "main(['--help'])\n"
        "try:\n"
        "    main(['detect', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('LOADED', sorted(m for m in ('torch', 'lightning', 'pytorch_lightning') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: lsgs detect" in proc.stdout and "--image_threshold" in proc.stdout
    assert "LOADED []" in proc.stdout, proc.stdout[-500:]


def test_an_export_scores_as_the_run_does(detected: Path, tiny_run: Path, tree: Path, tmp_path: Path) -> None:
    """``lsgs detect --export`` (the exported graphs in onnxruntime, no run folder) gives the run's scores to 1e-4
    of their range, the same decisions and one heatmap per input; giving both or neither source is one line."""
    from lsgs.inference import export_method

    exported = export_method(tiny_run, "lsgs", "onnx", tmp_path / "export", "legacy")
    out = detect(None, tree, recursive=True, export=exported)
    assert out == exported / "detect" / "nut"
    run_rows, export_rows = read_rows(detected), read_rows(out)
    assert [r["path"] for r in export_rows] == [r["path"] for r in run_rows]
    scores = np.array([float(r["score"]) for r in run_rows])
    spread = float(scores.max() - scores.min())
    for mine, theirs in zip(export_rows, run_rows, strict=True):
        assert abs(float(mine["score"]) - float(theirs["score"])) <= 1e-4 * spread, mine["path"]
        assert mine["anomalous"] == theirs["anomalous"] and (out / mine["output"]).is_file()
    for both in ({"export": exported}, {}):
        with pytest.raises(ConfigError, match=r"give one of --run_dir .* and --export"):
            detect(tiny_run if both else None, tree, **both)
