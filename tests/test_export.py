"""``lsgs export`` and ``lsgs.Inferencer`` on the tiny demo run: every method's exported graphs (ONNX in
onnxruntime and OpenVINO, OpenVINO IR, TorchScript) reproduce what ``lsgs detect`` computes; ``predict`` on arrays
equals ``lsgs detect`` on the same pixels in files; normalised scores; bad inputs; an export runs without
Lightning."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from lsgs.errors import ConfigError, DataError, DataNotFoundError
from lsgs.inference import Inferencer, export_method
from lsgs.inference.inferencer import normalized_score
from lsgs.inference.inputs import load_batch
from lsgs.nn.anomaly_map import resize_map

REPO = Path(__file__).resolve().parents[1]
METHODS = ("lsgs", "intensity", "pixel_gaussian", "ae", "vae", "patchcore", "hvq_trans")
HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
NO_OPENVINO = "openvino is not installed (optional extra: pip install 'lsgs[openvino]')"
RELATIVE_TOLERANCE = 1e-4  # of the map's range: fp32 rounding of another runtime


def detect_predictions(run_dir: Path, method: str, folder: Path) -> dict[str, torch.Tensor | list[str]]:
    """What ``lsgs detect --run_dir RUN --method M --images FOLDER`` computes: the method rebuilt by ``load_method``,
    the folder read by ``ImageFolderDataModule`` at the run's size, ``Trainer.predict``; maps ``[N, 1, S, S]``,
    scores ``[N]`` and paths in the folder's sorted order."""
    from lightning.pytorch import Trainer

    from data_modules import ImageFolderDataModule
    from lsgs.methods.registry import load_method, method_stage

    model = load_method(run_dir, method)
    stage_data = yaml.safe_load(method_stage(run_dir, method).config.read_text())["data"]["init_args"]
    datamodule = ImageFolderDataModule(root=str(folder), channels=model.num_image_channels, image_size=32,
                                       model_input_size=stage_data.get("model_input_size"), batch_size=8,
                                       cache_dir=str(folder.parent / "cache"))  # fmt: skip
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)  # fmt: skip
    batches = trainer.predict(model, datamodule=datamodule)
    return {
        "map": torch.cat([b["map"] for b in batches]),
        "score": torch.cat([b["score"] for b in batches]),
        "path": [p for b in batches for p in b["path"]],
    }


def assert_matches_detect(predictions: list, reference: dict, inferencer: Inferencer, what: str) -> None:
    """Maps within ``RELATIVE_TOLERANCE`` of the range of detect's maps (compared at the input's resolution: both
    resized from the evaluation size by the same bilinear resize), scores likewise, identical labels. A map far
    from zero with a small range (the tiny HVQ-Trans: values near 60, range 0.19) cannot be closer than a few
    float32 steps at its magnitude, so four of those are the floor of the tolerance."""
    maps = reference["map"]
    scale = float(maps.max() - maps.min())
    assert scale > 0, what
    tolerance = max(RELATIVE_TOLERANCE * scale, 4 * float(np.finfo(np.float32).eps) * float(maps.abs().max()))
    for prediction, final_map, score in zip(predictions, maps, reference["score"], strict=True):
        expected = resize_map(final_map[None], prediction.anomaly_map.shape)[0, 0].numpy()
        assert np.abs(prediction.anomaly_map - expected).max() <= tolerance, what
        assert abs(prediction.score - float(score)) <= tolerance, what
        assert prediction.label == bool(score > inferencer.image_threshold), what


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, demo_mvtec_root: Path) -> Path:
    """Three 128 px test images of the demo's nut category (the run scores at 32 px) in a folder named ``nut``,
    so the per-category methods use their nut statistics, as ``lsgs detect`` names a folder's images."""
    target = tmp_path_factory.mktemp("detect") / "nut"
    target.mkdir()
    for source in sorted((demo_mvtec_root / "nut" / "test").glob("*/000.png"))[:3]:
        shutil.copy(source, target / f"{source.parent.name}.png")
    return target


@pytest.fixture(scope="module")
def exports(tiny_run_with_hvq: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """ONNX and TorchScript exports of every method, written once for this module. LSGS's ONNX comes from the
    default exporter, dynamo (torch.export), which has to get through the transformer's data-dependent code-range
    check (it steps aside while tracing); the others from the legacy exporter, ten times faster to run."""
    root = tmp_path_factory.mktemp("exports")
    exporter = {method: "dynamo" if method == "lsgs" else "legacy" for method in METHODS}
    return {
        (method, fmt): export_method(tiny_run_with_hvq, method, fmt, root / f"{method}-{fmt}", exporter[method])
        for method in METHODS
        for fmt in ("onnx", "torchscript")
    }


# ------------------------------------------------------------------------------------------- parity with detect
@pytest.mark.parametrize("method", METHODS)
def test_every_runtime_reproduces_lsgs_detect(
    method: str, tiny_run_with_hvq: Path, folder: Path, exports: dict[tuple[str, str], Path]
) -> None:
    """onnxruntime, OpenVINO (on the ONNX graphs) and TorchScript give detect's maps and scores to 1e-4 of the
    map's range and its labels; torch eager (``from_run``) gives them to float rounding."""
    reference = detect_predictions(tiny_run_with_hvq, method, folder)
    paths = reference["path"]
    runtimes = {
        "eager": Inferencer.from_run(tiny_run_with_hvq, method),
        "onnxruntime": Inferencer.from_export(exports[method, "onnx"]),
        "torchscript": Inferencer.from_export(exports[method, "torchscript"]),
    }
    if HAS_OPENVINO:
        runtimes["openvino"] = Inferencer.from_export(exports[method, "onnx"], backend="openvino")
    assert runtimes["onnxruntime"].backend.name == "onnxruntime" and runtimes["torchscript"].backend.name == "torch"
    for name, inferencer in runtimes.items():
        # seed=None: image i of the call gets the seed lsgs detect gives the i-th image of the sorted folder.
        predictions = inferencer.predict(paths, category="nut")
        assert_matches_detect(predictions, reference, inferencer, f"{method} {name}")
        assert predictions[0].anomaly_map.shape == (128, 128) and predictions[0].anomaly_map.dtype == np.float32
    # At the evaluation size, eager torch gives detect's maps to float rounding (LSGS decodes X_hat and the
    # restorations in one batch here, in two in the LightningModule).
    eager = runtimes["eager"]
    images = load_batch(paths, eager.input_size, eager.channels)[0]
    maps, scores = eager.score(images, ["nut"] * len(paths), eager.noise_seeds(range(len(paths))))
    # PatchCore's graph searches its bank by a matrix product where the method uses FAISS's exact search: the two
    # round differently (1e-5 of the map's range here), so it is held to the runtimes' tolerance.
    rounding = RELATIVE_TOLERANCE if method == "patchcore" else 1e-6
    torch.testing.assert_close(maps, reference["map"], rtol=0, atol=rounding * float(reference["map"].abs().max()))
    torch.testing.assert_close(scores, reference["score"], rtol=rounding, atol=0)


@pytest.mark.skipif(not HAS_OPENVINO, reason=NO_OPENVINO)
def test_openvino_ir_export_reproduces_lsgs_detect(tiny_run_with_hvq: Path, folder: Path, tmp_path: Path) -> None:
    """``lsgs export --format openvino`` (the CLI): IR files in fp32, run by OpenVINO, give detect's LSGS maps."""
    from lsgs.cli import main as lsgs_main

    out = tmp_path / "lsgs-openvino"
    lsgs_main(["export", f"--run_dir={tiny_run_with_hvq}", "--method=lsgs", "--format=openvino",
               f"--output={out}", "--onnx_exporter=legacy"])  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["metadata.json", *(f"{g}.{s}" for g in ("encoder", "transformer", "decoder") for s in ("xml", "bin"))]
    )
    inferencer = Inferencer.from_export(out)
    assert inferencer.backend.name == "openvino"
    reference = detect_predictions(tiny_run_with_hvq, "lsgs", folder)
    assert_matches_detect(inferencer.predict(reference["path"]), reference, inferencer, "lsgs openvino IR")


# ------------------------------------------------------------------------------------------- arrays vs files
def test_predict_on_arrays_equals_lsgs_detect_on_the_same_pixels_in_files(
    tiny_run_with_hvq: Path, tmp_path: Path, demo_mvtec_root: Path
) -> None:
    """An RGB, a grayscale and an RGBA array (128 px, resized to 32 px by the model) score as lsgs detect scores
    them written to PNG files: grayscale repeated, alpha dropped, the same PIL resize."""
    folder = tmp_path / "mesh"  # mesh: the demo's grayscale category
    folder.mkdir()
    rgb = np.asarray(Image.open(next((demo_mvtec_root / "nut" / "test" / "good").glob("*.png"))).convert("RGB"))
    gray = np.asarray(Image.open(next((demo_mvtec_root / "mesh" / "test" / "good").glob("*.png"))).convert("L"))
    rgba = np.concatenate([rgb[::-1], np.random.default_rng(0).integers(0, 256, (*rgb.shape[:2], 1), np.uint8)], -1)
    arrays = {"a_rgb.png": rgb, "b_gray.png": gray, "c_rgba.png": rgba}  # sorted names: detect's order
    for name, array in arrays.items():
        Image.fromarray(array).save(folder / name)
    for method in ("lsgs", "pixel_gaussian"):
        reference = detect_predictions(tiny_run_with_hvq, method, folder)
        inferencer = Inferencer.from_run(tiny_run_with_hvq, method)
        seeds = inferencer.noise_seeds(range(len(arrays)))
        predictions = [inferencer.predict(array, category="mesh", seed=seed)
                       for array, seed in zip(arrays.values(), seeds)]  # fmt: skip
        maps = reference["map"]
        for prediction, final_map, score in zip(predictions, maps, reference["score"], strict=True):
            expected = resize_map(final_map[None], (128, 128))[0, 0].numpy()
            np.testing.assert_allclose(prediction.anomaly_map, expected, rtol=0, atol=1e-6 * float(maps.max()))
            assert prediction.score == pytest.approx(float(score), rel=1e-6)


def test_float_arrays_are_taken_as_they_are_and_batches_in_every_form(tiny_run_with_hvq: Path) -> None:
    """A float image in [0, 1] at the input size is the uint8 image / 255; a list, an N x H x W x C array and the
    images one by one (with their seeds) give the same predictions; a 2-D or H x W x 1 image is one image."""
    inferencer = Inferencer.from_run(tiny_run_with_hvq, "lsgs")
    images = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    batch = inferencer.predict(images)
    assert len(batch) == 3
    as_list = inferencer.predict(list(images.astype(np.float32) / np.float32(255)))
    one_by_one = [inferencer.predict(image, seed=seed) for image, seed in zip(images, inferencer.noise_seeds(range(3)))]
    for a, b, c in zip(batch, as_list, one_by_one, strict=True):
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
        np.testing.assert_array_equal(a.anomaly_map, c.anomaly_map)
    gray = images[0, ..., 0]
    np.testing.assert_array_equal(inferencer.predict(gray).anomaly_map, inferencer.predict(gray[..., None]).anomaly_map)
    assert inferencer.predict(gray[:20]).anomaly_map.shape == (20, 32)  # the input's own resolution


def test_the_seed_drives_lsgs_restorations_only(tiny_run_with_hvq: Path) -> None:
    """Another noise seed gives LSGS other restorations (other maps); the same seed the same map; methods
    without randomness ignore it."""
    image = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    lsgs = Inferencer.from_run(tiny_run_with_hvq, "lsgs")
    first, again, other = (lsgs.predict(image, seed=s).anomaly_map for s in (5, 5, 6))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    ae = Inferencer.from_run(tiny_run_with_hvq, "ae")
    np.testing.assert_array_equal(ae.predict(image, seed=5).anomaly_map, ae.predict(image, seed=6).anomaly_map)


# ------------------------------------------------------------------------------------------- normalised scores
def test_normalized_scores_are_a_sigmoid_around_the_image_threshold(
    tiny_run_with_hvq: Path, exports: dict[tuple[str, str], Path]
) -> None:
    """``sigmoid((score - t) / s)`` with the calibrated t and s: 0.5 exactly at t, monotone, label = above 0.5."""
    inferencer = Inferencer.from_export(exports["ae", "onnx"])
    calibration = json.loads((tiny_run_with_hvq / "methods" / "ae" / "calibration.json").read_text())
    t, s = calibration["image_threshold"], calibration["image_score_std"]
    assert (inferencer.image_threshold, inferencer.metadata["thresholds"]["image_score_std"]) == (t, s) and s > 0
    images = np.random.default_rng(3).random((8, 32, 32, 3)).astype(np.float32) ** np.linspace(0.2, 5, 8)[:, None,
                                                                                                          None, None]
    predictions = inferencer.predict(images)
    for p in predictions:
        assert p.normalized_score == pytest.approx(1 / (1 + math.exp(-(p.score - t) / s)), rel=1e-12)
        assert p.label == (p.score > t) == (p.normalized_score > 0.5)
        np.testing.assert_array_equal(p.region, p.anomaly_map > inferencer.pixel_threshold)
    order = np.argsort([p.score for p in predictions])
    assert np.all(np.diff([predictions[i].normalized_score for i in order]) >= 0)
    assert normalized_score(t, t, s) == 0.5
    grid = np.linspace(t - 50 * s, t + 50 * s, 1001)
    values = [normalized_score(x, t, s) for x in grid]
    assert np.all(np.diff(values) >= 0) and values[0] < 1e-20 and values[-1] == 1.0
    assert [normalized_score(x, 1.0, 0.0) for x in (0.9, 1.0, 1.1)] == [0.0, 0.5, 1.0]  # s = 0: the step


# ------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (np.zeros((32, 32, 2), np.uint8), DataError, r"shape \(32, 32, 2\).* C = 1, 3 or 4"),
        (np.zeros((3, 32, 32), np.uint8), DataError, r"shape \(3, 32, 32\).*channels last"),
        (np.zeros((0, 32), np.uint8), DataError, r"shape \(0, 32\).*: an empty image"),
        (np.zeros((0, 32, 32, 3), np.uint8), DataError, r"an empty batch"),
        ([], DataError, "empty list"),
        (np.full((32, 32), np.nan, np.float32), DataError, "NaN or infinite"),
        (np.full((32, 32), 1.5, np.float32), DataError, r"values in \[1\.5, 1\.5\]; float images must lie in \[0, 1\]"),
        (np.zeros((32, 32), np.int64), DataError, "dtype int64; images must be uint8, or float in"),
        (np.zeros((32, 32), np.uint16), DataError, "dtype uint16"),
        (np.zeros((32,), np.uint8), DataError, r"shape \(32,\)"),
        (torch.zeros(3, 32, 32), DataError, "got a Tensor; pass a path, a PIL image"),
        ("/nonexistent/image.png", DataNotFoundError, "'/nonexistent/image.png', which is not a file"),
    ],
)
def test_bad_inputs_are_one_line_errors(value: object, error: type, match: str) -> None:
    with pytest.raises(error, match=match) as caught:
        load_batch(value, 32, 3)
    assert "\n" not in str(caught.value)


def test_per_category_and_prediction_errors(
    tiny_run_with_hvq: Path, exports: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    inferencer = Inferencer.from_export(exports["pixel_gaussian", "onnx"])
    assert inferencer.categories == ["fabric", "mesh", "nut"]
    image = np.zeros((32, 32, 3), np.uint8)
    with pytest.raises(DataError, match=r"category None is not one of its classes \['fabric', 'mesh', 'nut'\]"):
        inferencer.predict(image)
    with pytest.raises(DataError, match="category 'tire' is not one"):
        inferencer.predict(image, category="tire")
    with pytest.raises(DataError, match="2 values of category for 1 images"):
        inferencer.predict([image], category=["nut", "mesh"])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot decode image"):
        inferencer.predict(tmp_path / "broken.png", category="nut")
    with pytest.raises(ConfigError, match=r"backend='torch' cannot run a onnx export; use one of \['onnxruntime'"):
        Inferencer.from_export(exports["ae", "onnx"], backend="torch")
    with pytest.raises(DataNotFoundError, match=r"is not an lsgs export: metadata\.json is missing"):
        Inferencer.from_export(tmp_path)


# ------------------------------------------------------------------------------------------- the export folder
def test_an_export_is_relocatable_and_records_the_calibration(
    tiny_run_with_hvq: Path, exports: dict[tuple[str, str], Path], tmp_path: Path
) -> None:
    """metadata.json carries the stage's calibration, the scoring options and the versions, names no absolute
    path (nor does any graph file), and a copy of the folder elsewhere predicts the same."""
    source = exports["lsgs", "onnx"]
    metadata = json.loads((source / "metadata.json").read_text())
    calibration = json.loads((tiny_run_with_hvq / "scoring" / "calibration.json").read_text())
    assert metadata["thresholds"] == {"pixel": calibration["val_threshold"], "image": calibration["image_threshold"],
                                      "image_score_std": calibration["image_score_std"],
                                      "nll": calibration["nll_threshold"]}  # fmt: skip
    assert metadata["calibration"] == calibration
    assert (metadata["method"], metadata["kind"], metadata["runtime"], metadata["format"]) == (
        "lsgs", "method", "restoration", "onnx")  # fmt: skip
    assert metadata["onnx_exporter"] == "dynamo"  # whose per-node stack traces (this installation's paths) are dropped
    assert metadata["input"]["size"] == metadata["evaluation_size"] == 32 and metadata["input"]["channels"] == 3
    assert {"num_restorations": 3, "softmax_k": 3.0, "map_reference": "reconstruction", "smoothing": True,
            "image_score": "max", "seed": 0}.items() <= metadata["scoring"].items()  # fmt: skip
    assert "1000003" in metadata["seed_rule"] and metadata["versions"]["torch"] == torch.__version__
    assert metadata["versions"]["onnxruntime"] and metadata["categories"] is None
    for fmt in ("onnx", "torchscript"):
        for path in exports["lsgs", fmt].iterdir():
            content = path.read_bytes()
            assert str(tiny_run_with_hvq).encode() not in content and str(REPO).encode() not in content, path
    copy = shutil.copytree(source, tmp_path / "elsewhere")
    image = np.random.default_rng(4).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    np.testing.assert_array_equal(Inferencer.from_export(copy).predict(image).anomaly_map,
                                  Inferencer.from_export(source).predict(image).anomaly_map)  # fmt: skip


def test_an_export_runs_without_lightning_or_the_harness(exports: dict[tuple[str, str], Path]) -> None:
    """``from lsgs import Inferencer`` + ``from_export`` + ``predict`` in a process where importing Lightning or
    the harness (lsgs.evaluation, lsgs.methods, lsgs.modules) fails, with the same score as here."""
    blocked = ("lightning", "pytorch_lightning", "lightning_fabric", "lsgs.evaluation", "lsgs.methods", "lsgs.modules")
    script = f"""
import sys
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r} or name.startswith({blocked!r}):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Blocker())
import numpy as np
from lsgs import Inferencer
image = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)
print(repr(Inferencer.from_export({str(exports["lsgs", "onnx"])!r}).predict(image).score))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    image = np.random.default_rng(5).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert float(proc.stdout.strip().splitlines()[-1]) == Inferencer.from_export(exports["lsgs", "onnx"]).predict(
        image).score  # fmt: skip


def test_the_export_command_and_its_errors(
    tiny_run_with_hvq: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``lsgs export`` writes into ``<run>/exports/<method>-<format>`` by default; an unknown format, a missing
    OpenVINO and an unfinished method are one-line errors."""
    from lsgs.cli import main as lsgs_main

    run_dir = shutil.copytree(tiny_run_with_hvq, tmp_path / "run")
    lsgs_main(["export", f"--run_dir={run_dir}", "--method=intensity", "--format=torchscript"])
    assert (run_dir / "exports" / "intensity-torchscript" / "map.pt").is_file()
    assert "intensity exported (torchscript) to" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"--format 'tflite' is not one of \['onnx', 'openvino', 'torchscript'\]"):
        export_method(run_dir, "ae", "tflite")
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(ConfigError, match=r"--format openvino needs OpenVINO, which is not installed: pip install"):
        export_method(run_dir, "ae", "openvino")
    with pytest.raises(SystemExit) as stop:
        lsgs_main(["export", f"--run_dir={run_dir}", "--method=padim"])  # not a method of this run
    assert stop.value.code == 2 and "--method padim:" in capsys.readouterr().err
