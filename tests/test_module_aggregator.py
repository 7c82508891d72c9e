"""Stage 2 LightningModule ``CodebookAggregator``: k-means codebook on demo data, its checkpoint and report, the
sub-sampling rule, user errors, and 2-process DDP (ddp_spawn) against the single-process result."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from test_module_vqvae import brute_force_codes, make_trainer, mvtec_datamodule

from data_modules import MVTecDataModule
from lsgs.distributed import spawn_teardown_callback
from lsgs.errors import ConfigError
from lsgs.kmeans import faiss_gpu_available, kmeans
from lsgs.layout import StageLayout
from lsgs.modules import VQVAE, CodebookAggregator

TRAIN_VECTORS = 42 * 8 * 8  # 42 training images, 8x8 codes each
K = 32
REPORT_KEYS = {
    "kmeans",
    "train_vectors",
    "effective_size_before",
    "effective_size_after",
    "perplexity_before",
    "perplexity_after",
    "quantisation_mse_before",
    "quantisation_mse_after",
    "val_l1_before",
    "val_l1_after",
    "num_clusters",
    "learned_codebook_size",
}
KMEANS_KEYS = {"backend", "seconds", "inertia", "iterations", "num_points"}


@pytest.fixture(scope="module")
def datamodule(demo_mvtec_root: Path, data_cache_dir: Path) -> MVTecDataModule:
    return mvtec_datamodule(demo_mvtec_root, data_cache_dir)


@pytest.fixture(scope="module")
def stage1(tiny_vqvae: tuple[Path, VQVAE]) -> tuple[Path, VQVAE]:
    """The session's tiny stage-1 VQ-VAE (``fit_vqvae``, 2 epochs): checkpoint and module (read-only)."""
    return tiny_vqvae


@pytest.fixture(scope="module")
def train_vectors(
    stage1: tuple[Path, VQVAE], datamodule: MVTecDataModule
) -> tuple[torch.Tensor, torch.Tensor]:
    """All training encodings ``[N, D]`` in dataset order (raster order within an image), and their indices."""
    model = VQVAE.from_checkpoint(str(stage1[0]))
    vectors, owners = [], []
    with torch.no_grad():
        for batch in datamodule.train_eval_dataloader():
            z_e = model.net.encode(batch["image"])  # [B, D, h, w]
            vectors.append(z_e.permute(0, 2, 3, 1).reshape(-1, z_e.shape[1]))  # [B*h*w, D]
            owners.append(batch["index"].repeat_interleave(z_e.shape[2] * z_e.shape[3]))
    return torch.cat(vectors), torch.cat(owners)


def aggregate(
    checkpoint: Path, datamodule: Any, output_dir: Path | None = None, **kwargs: Any
) -> CodebookAggregator:
    module = CodebookAggregator(str(checkpoint), output_dir=str(output_dir) if output_dir else None, **kwargs)
    make_trainer(output_dir).predict(module, datamodule=datamodule, return_predictions=False)
    return module


@pytest.fixture(scope="module")
def aggregated(
    tmp_path_factory: pytest.TempPathFactory, stage1: tuple[Path, VQVAE], datamodule: MVTecDataModule
) -> tuple[Path, CodebookAggregator]:
    out = tmp_path_factory.mktemp("aggregated")
    return out, aggregate(stage1[0], datamodule, out, niter=20, seed=0)


def test_aggregation_raises_the_effective_size_and_writes_a_vqvae_checkpoint(
    aggregated: tuple[Path, CodebookAggregator],
    stage1: tuple[Path, VQVAE],
    train_vectors: tuple[torch.Tensor, torch.Tensor],
    datamodule: MVTecDataModule,
) -> None:
    out, module = aggregated
    layout = StageLayout.of(out)
    vectors, _ = train_vectors
    assert vectors.shape == (TRAIN_VECTORS, 8)
    report = json.loads(layout.aggregation_report.read_text())
    assert set(report) == REPORT_KEYS and set(report["kmeans"]) == KMEANS_KEYS
    assert report == json.loads(json.dumps(module.report))

    # Fewer than max_points_per_centroid * K vectors: k-means sees all of them, in dataset order.
    expected = kmeans(vectors, K, niter=20, seed=0, max_points_per_centroid=256, init="random")
    assert torch.equal(module.centroids, expected.centroids)
    loaded = VQVAE.from_checkpoint(str(layout.aggregated_checkpoint))
    assert torch.equal(loaded.net.quantizer.codebook.detach(), expected.centroids)
    source = VQVAE.from_checkpoint(str(stage1[0]))
    for key, value in source.state_dict().items():  # everything but the codebook is the stage-1 model
        if key != "net.quantizer.codebook":
            assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.hparams.input_size == 32 and loaded.codebook_size == K
    meta = torch.load(layout.aggregated_checkpoint, map_location="cpu", weights_only=False)["lsgs"]
    assert meta["kind"] == "vqvae" and meta["aggregated_from"] == str(stage1[0])

    learned = source.net.quantizer.codebook.detach()
    before, after = brute_force_codes(vectors, learned), brute_force_codes(vectors, expected.centroids)
    assert report["effective_size_before"] == len(torch.unique(before))
    assert report["effective_size_after"] == len(torch.unique(after))
    # The demo's 2-epoch model uses few codes; k-means spreads the codes over the encodings.
    assert report["effective_size_after"] > report["effective_size_before"]
    assert report["train_vectors"] == TRAIN_VECTORS
    assert report["num_clusters"] == K and report["learned_codebook_size"] == K
    mse_after = (vectors.double() - expected.centroids.double()[after]).pow(2).sum(1).mean()
    assert report["quantisation_mse_after"] == pytest.approx(float(mse_after), rel=1e-5)
    assert report["quantisation_mse_after"] < report["quantisation_mse_before"]
    assert report["kmeans"]["num_points"] == TRAIN_VECTORS
    assert report["kmeans"]["inertia"] == pytest.approx(expected.inertia, rel=1e-6)
    # Any FAISS build: the stage uses the GPU exactly when this FAISS has one (faiss-gpu in environment.yml).
    assert report["kmeans"]["backend"] == ("faiss-gpu" if faiss_gpu_available() else "faiss-cpu")
    # Before: the stage-1 model's own validation L1 (its fit-end report). After: the aggregated model's.
    assert report["val_l1_before"] == pytest.approx(stage1[1].codebook_report["val_l1"], rel=1e-5)
    images = next(iter(datamodule.val_dataloader()))["image"]
    with torch.no_grad():
        l1_after = float((loaded(images) - images).abs().mean())
    assert report["val_l1_after"] == pytest.approx(l1_after, rel=1e-5)


def test_more_clusters_than_codes_gives_a_larger_working_codebook(
    stage1: tuple[Path, VQVAE], datamodule: MVTecDataModule, tmp_path: Path
) -> None:
    module = aggregate(stage1[0], datamodule, tmp_path, num_clusters=2 * K)
    written = StageLayout.of(tmp_path).aggregated_checkpoint
    checkpoint = torch.load(written, map_location="cpu", weights_only=False)
    assert checkpoint["hyper_parameters"]["codebook_size"] == 2 * K
    assert checkpoint["lsgs"]["config"]["codebook_size"] == 2 * K
    assert module.report["num_clusters"] == 2 * K and module.report["learned_codebook_size"] == K
    loaded = VQVAE.from_checkpoint(str(written))
    assert loaded.codebook_size == 2 * K and loaded.net.quantizer.codebook.shape == (2 * K, 8)
    images = next(iter(datamodule.val_dataloader()))["image"]
    with torch.no_grad():
        out = loaded.net(images)
    assert out.reconstruction.shape == images.shape and int(out.indices.max()) < 2 * K
    assert module.report["effective_size_after"] > K  # codes beyond the learned K are really used


def test_fewer_encodings_than_clusters_suggests_a_smaller_codebook(
    stage1: tuple[Path, VQVAE], datamodule: MVTecDataModule, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as error:
        aggregate(stage1[0], datamodule, tmp_path, num_clusters=TRAIN_VECTORS + 1)
    message = str(error.value)
    assert f"{TRAIN_VECTORS} encodings" in message and f"num_clusters={TRAIN_VECTORS + 1}" in message
    suggested = int(message.split("model.num_clusters=")[1].rstrip(")"))
    assert 1 <= suggested < TRAIN_VECTORS
    assert not StageLayout.of(tmp_path).aggregated_checkpoint.exists()


class ReturnsNothing(LightningModule):
    """A module whose predict_step returns None by mistake: Lightning's warning about it must still show."""

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        return None


def test_only_the_aggregators_own_predict_loop_silences_the_no_predictions_warning(
    stage1: tuple[Path, VQVAE], datamodule: MVTecDataModule
) -> None:
    def no_predictions(caught: list[warnings.WarningMessage]) -> int:
        return sum("predict returned None" in str(w.message) for w in caught)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        aggregate(stage1[0], datamodule, niter=2)
        with pytest.raises(ConfigError):  # a loop that fails restores the filters too
            aggregate(stage1[0], datamodule, num_clusters=TRAIN_VECTORS + 1)
        assert no_predictions(caught) == 0 and warnings.filters == filters
        make_trainer().predict(ReturnsNothing(), dataloaders=[torch.zeros(2, 1)], return_predictions=False)
        assert no_predictions(caught) == 1


def test_constructor_rejects_bad_settings(stage1: tuple[Path, VQVAE]) -> None:
    with pytest.raises(ConfigError, match=r"init='codebook' needs num_clusters = K = 32, got 64"):
        CodebookAggregator(str(stage1[0]), num_clusters=2 * K, init="codebook")
    with pytest.raises(ConfigError, match=r"model.init='kmeans' is not one of"):
        CodebookAggregator(str(stage1[0]), init="kmeans")
    with pytest.raises(ConfigError, match=r"model\.vqvae_checkpoint is required"):
        CodebookAggregator()


@pytest.mark.parametrize("init", ["kmeans++", "codebook"])
def test_other_initialisations(
    init: str,
    stage1: tuple[Path, VQVAE],
    datamodule: MVTecDataModule,
    train_vectors: tuple[torch.Tensor, torch.Tensor],
) -> None:
    module = aggregate(stage1[0], datamodule, init=init, niter=5, seed=1)
    reference_init: Any = init
    if init == "codebook":
        reference_init = VQVAE.from_checkpoint(str(stage1[0])).net.quantizer.codebook.detach()
    expected = kmeans(train_vectors[0], K, niter=5, seed=1, init=reference_init)
    assert torch.equal(module.centroids, expected.centroids)


@pytest.mark.filterwarnings("ignore:kmeans.*fewer than 39 per cluster")
def test_subsampling_keeps_a_seeded_subset_per_image(
    stage1: tuple[Path, VQVAE], datamodule: MVTecDataModule, train_vectors: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """With max_points_per_centroid * K < N, each image keeps its vectors with probability cap / N, drawn from
    a generator seeded by (seed, dataset index) only."""
    vectors, owners = train_vectors
    cap, seed = 16 * K, 5
    module = aggregate(stage1[0], datamodule, max_points_per_centroid=16, seed=seed, niter=10)
    keep = torch.cat(
        [
            torch.rand(64, generator=torch.Generator().manual_seed(seed * 1_000_003 + int(index)))
            < cap / TRAIN_VECTORS
            for index in owners[::64]
        ]
    )
    expected = kmeans(vectors[keep], K, niter=10, seed=seed, max_points_per_centroid=16)
    assert module.report["kmeans"]["num_points"] == min(int(keep.sum()), cap)
    assert abs(int(keep.sum()) - cap) < 4 * math.sqrt(cap)
    assert torch.equal(module.centroids, expected.centroids)
    # Usage statistics still cover every training vector, not only the sub-sample.
    assert module.report["train_vectors"] == TRAIN_VECTORS


class SaveCentroids(Callback):
    """Each rank writes the centroids and report it ended with (ddp_spawn returns nothing else)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        torch.save(
            {"centroids": pl_module.centroids.cpu(), "report": pl_module.report},
            Path(self.out_dir) / f"rank{trainer.global_rank}.pt",
        )


class RecordTeardown(Callback):
    """Runs after the teardown callback: records that this rank's process group is gone before it exits."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        (Path(self.out_dir) / f"rank{trainer.global_rank}.teardown").write_text(
            str(torch.distributed.is_initialized())
        )


def without_timing(report: dict[str, Any]) -> dict[str, Any]:
    return {**report, "kmeans": {k: v for k, v in report["kmeans"].items() if k != "seconds"}}


@pytest.mark.filterwarnings("ignore:kmeans.*fewer than 39 per cluster")
def test_two_process_ddp_equals_the_single_process_result(
    stage1: tuple[Path, VQVAE], demo_mvtec_root: Path, data_cache_dir: Path, tmp_path: Path
) -> None:
    # Sub-sampled (the keep mask must not depend on the rank), seed != 0.
    options = {"max_points_per_centroid": 20, "seed": 3, "niter": 10}
    single = aggregate(
        stage1[0], mvtec_datamodule(demo_mvtec_root, data_cache_dir), tmp_path / "single", **options
    )

    module = CodebookAggregator(str(stage1[0]), output_dir=str(tmp_path / "ddp"), **options)
    callbacks = [SaveCentroids(str(tmp_path)), spawn_teardown_callback(), RecordTeardown(str(tmp_path))]
    trainer = make_trainer(tmp_path, devices=2, strategy="ddp_spawn", callbacks=callbacks)
    # A rank exiting non-zero (e.g. aborting at exit) makes Lightning's join raise here.
    trainer.predict(
        module, datamodule=mvtec_datamodule(demo_mvtec_root, data_cache_dir), return_predictions=False
    )
    assert [(tmp_path / f"rank{r}.teardown").read_text() for r in (0, 1)] == ["False", "False"]

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    # Both ranks end with the very same codebook (rank 0's k-means, broadcast) and report.
    assert torch.equal(ranks[0]["centroids"], ranks[1]["centroids"])
    assert without_timing(ranks[0]["report"]) == without_timing(ranks[1]["report"])
    # Equal to the single-process result: the same vectors reach k-means in the same order. The encodings are
    # computed in other batches on each rank, so a CPU kernel chosen by batch size could in principle change
    # the last bit of a few of them; compare to float tolerance (in practice they are bitwise equal).
    torch.testing.assert_close(ranks[0]["centroids"], single.centroids, rtol=1e-5, atol=1e-6)
    ddp, single_run = StageLayout.of(tmp_path / "ddp"), StageLayout.of(tmp_path / "single")
    ddp_report = json.loads(ddp.aggregation_report.read_text())
    single_report = json.loads(single_run.aggregation_report.read_text())
    exact = ["train_vectors", "effective_size_before", "effective_size_after", "num_clusters",
             "learned_codebook_size"]
    assert {k: ddp_report[k] for k in exact} == {k: single_report[k] for k in exact}
    assert ddp_report["kmeans"]["num_points"] == single_report["kmeans"]["num_points"]
    for key in ("val_l1_before", "val_l1_after", "quantisation_mse_before", "quantisation_mse_after",
                "perplexity_before", "perplexity_after"):
        # Sums over ranks in another order: equal up to float rounding.
        assert ddp_report[key] == pytest.approx(single_report[key], rel=1e-5), key
    assert ddp_report["kmeans"]["inertia"] == pytest.approx(single_report["kmeans"]["inertia"], rel=1e-5)
    codebook = VQVAE.from_checkpoint(str(ddp.aggregated_checkpoint)).net.quantizer.codebook
    assert torch.equal(codebook.detach(), ranks[0]["centroids"])
