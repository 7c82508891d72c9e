"""Shared test set-up: offline W&B, no network, small thread count; demo data built once per session."""

import os
import tempfile

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_DIR", tempfile.mkdtemp(prefix="lsgs-wandb-"))
os.environ.setdefault("WANDB_SILENT", "true")

from collections.abc import Iterator
from pathlib import Path

import pytest

# Small demo sets: big enough for every code path (3 MVTec categories incl. a grayscale one, 4 defect types,
# HGG + LGG cases with healthy and tumour slices), small enough to build in a few seconds.
DEMO_MVTEC_KWARGS = {"seed": 0, "n_train": 16, "n_test_good": 2, "n_test_per_defect": 2, "size": 128}
DEMO_BRATS_KWARGS = {"seed": 0, "n_hgg": 6, "n_lgg": 2, "shape": (96, 96, 48)}
DEMO_MVTEC3D_KWARGS = {
    "seed": 0, "categories": ("fabric", "nut"), "n_train": 8, "n_val": 3, "n_test_good": 2,
    "n_test_per_defect": 2, "size": 128,
}  # fmt: skip


@pytest.fixture(scope="session")
def demo_mvtec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MVTec-layout demo data (fabric, nut, mesh [grayscale]; 16 train + 10 test images each, 128 px).

    Read-only: tests that need to alter files copy it first.
    """
    from data_modules.synthetic import write_mvtec_demo

    return write_mvtec_demo(tmp_path_factory.mktemp("demo") / "mvtec", **DEMO_MVTEC_KWARGS)


@pytest.fixture(scope="session")
def demo_brats_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BraTS2018-layout demo data (6 HGG + 2 LGG cases, 96x96x48 volumes). Read-only."""
    from data_modules.synthetic import write_brats_demo

    return write_brats_demo(tmp_path_factory.mktemp("demo") / "brats", **DEMO_BRATS_KWARGS)


@pytest.fixture(scope="session")
def demo_mvtec3d_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MVTec 3D-AD-layout demo data (fabric, nut; 8 train + 3 validation + 10 test images each, 128x96 px,
    masks storing 252-255). Read-only: tests that need to alter files copy it first.
    """
    from data_modules.synthetic import write_mvtec3d_demo

    return write_mvtec3d_demo(tmp_path_factory.mktemp("demo") / "mvtec3d", **DEMO_MVTEC3D_KWARGS)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, demo_mvtec_root: Path, data_cache_dir: Path) -> Path:
    """A finished tiny pipeline run of the demo MVTec data (test_pipeline.TINY, in-process), built once per
    session and shared by the pipeline and study tests. Read-only: copy it before changing anything."""
    from test_pipeline import tiny_args

    from lsgs.pipeline import main as pipeline_main

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    pipeline_main(tiny_args(demo_mvtec_root, data_cache_dir, run_dir))
    return run_dir


@pytest.fixture(scope="session")
def tiny_run_with_methods(
    tiny_run: Path, tmp_path_factory: pytest.TempPathFactory, demo_mvtec_root: Path, data_cache_dir: Path
) -> Path:
    """A copy of ``tiny_run`` whose four built-in methods also ran (AE/VAE shrunk: test_pipeline.TINY_METHODS):
    the default command with the methods on, so the finished LSGS stages are skipped. Read-only."""
    import shutil

    from test_pipeline import TINY_METHODS, tiny_args

    from lsgs.pipeline import main as pipeline_main

    run_dir = tmp_path_factory.mktemp("runs") / "tiny-methods"
    shutil.copytree(tiny_run, run_dir)
    pipeline_main(tiny_args(demo_mvtec_root, data_cache_dir, run_dir, "--run_methods=true", *TINY_METHODS))
    return run_dir


@pytest.fixture(scope="session")
def tiny_run_with_hvq(
    tiny_run_with_methods: Path, tmp_path_factory: pytest.TempPathFactory, demo_mvtec_root: Path, data_cache_dir: Path
) -> Path:
    """A copy of ``tiny_run_with_methods`` plus HVQ-Trans (``tiny_feature_methods.TINY_HVQ``) on the command line:
    the default command with one more method, so only HVQ-Trans runs. Read-only."""
    from test_pipeline import TINY_METHODS, copy_run, tiny_args
    from tiny_feature_methods import TINY_HVQ

    from lsgs.pipeline import main as pipeline_main

    run_dir = copy_run(tiny_run_with_methods, tmp_path_factory.mktemp("hvq"))
    pipeline_main(tiny_args(demo_mvtec_root, data_cache_dir, run_dir, "--run_methods=true", *TINY_METHODS, *TINY_HVQ))
    return run_dir


@pytest.fixture(scope="session")
def tiny_vqvae(tmp_path_factory: pytest.TempPathFactory, demo_mvtec_root: Path, data_cache_dir: Path) -> tuple:
    """The tiny stage-1 VQ-VAE of the module tests (test_module_vqvae.TINY, 2 epochs, seed 0, demo MVTec data at
    32 px): ``(checkpoint path, fitted VQVAE module)``, trained once per session. Read-only."""
    from test_module_vqvae import fit_vqvae, mvtec_datamodule

    path = tmp_path_factory.mktemp("tiny-vqvae") / "vqvae.ckpt"
    return path, fit_vqvae(path, mvtec_datamodule(demo_mvtec_root, data_cache_dir))


@pytest.fixture(scope="session")
def data_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session-wide decoded-array cache directory (pass as `cache_dir=` to the data modules)."""
    return tmp_path_factory.mktemp("lsgs-cache")


def pytest_configure(config: pytest.Config) -> None:
    # One thread per process: tiny models gain nothing from a second thread, OpenMP spin-waiting makes them
    # 10-100x slower when another process holds the other core, and 2-process tests get one core each.
    # Subprocesses inherit the setting through the environment.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Every test starts with the session's one torch thread (pytest_configure), whatever a test before it set
    (benchmark entry points set their own thread count): the in-process pipeline tests compare their stages'
    recorded thread count and numbers with subprocesses that inherit OMP_NUM_THREADS=1."""
    import torch

    torch.set_num_threads(1)
    yield
