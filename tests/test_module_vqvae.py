"""Stage 1/3 LightningModule ``VQVAE``: checkpoints, user errors, divergence, bf16, logging, init_from, and the
codebook report, on the tiny demo configuration (32 px images, 8x8 codes, K = 32, D = 8)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything

import lsgs.modules.vqvae as vqvae_module
import lsgs.nn.quantizer as quantizer_module
from data_modules import BraTSDataModule, MVTecDataModule
from lsgs.errors import CheckpointError, ConfigError, TrainingDivergedError
from lsgs.modules import VQVAE, GlobalTransformer
from lsgs.reports.figures import to_uint8_image

# The brief's tiny sizes: channels [8, 16] (downsampling 4: 32 px -> 8x8 codes), D = 8, K = 32.
TINY = {
    "in_channels": 3,
    "channels": [8, 16],
    "num_res_blocks": 1,
    "res_channels": 8,
    "codebook_size": 32,
    "code_dim": 8,
    "lr": 1e-3,
}
IMAGE_SIZE = 32
TRAIN_IMAGES = 42  # demo MVTec: 3 categories x 16 train/good, 2 per category held back for validation
VAL_IMAGES = 6


def make_trainer(root: Path | None = None, **kwargs: Any) -> Trainer:
    """A quiet single-process CPU trainer (no logger, no checkpoint callback, no sanity validation)."""
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": str(root) if root is not None else None,
    }
    options.update(kwargs)
    return Trainer(**options)


def mvtec_datamodule(root: Path, cache: Path, cls: type = MVTecDataModule, **kwargs: Any) -> MVTecDataModule:
    return cls(
        str(root), image_size=IMAGE_SIZE, batch_size=8, eval_batch_size=8, cache_dir=str(cache), **kwargs
    )


def fit_vqvae(path: Path, datamodule: Any, max_epochs: int = 2, seed: int = 0, **kwargs: Any) -> VQVAE:
    """Fit a tiny VQ-VAE and save it as the pipeline does (``save_checkpoint(weights_only=True)``)."""
    seed_everything(seed, verbose=False)
    model = VQVAE(**{**TINY, **kwargs})
    trainer = make_trainer(path.parent, max_epochs=max_epochs)
    trainer.fit(model, datamodule=datamodule)
    trainer.save_checkpoint(path, weights_only=True)
    return model


def fit_transformer(path: Path, vqvae_checkpoint: Path, datamodule: Any, **kwargs: Any) -> GlobalTransformer:
    """A one-step stage-4 transformer checkpoint (the 'wrong kind' for VQ-VAE arguments)."""
    seed_everything(0, verbose=False)
    model = GlobalTransformer(
        str(vqvae_checkpoint), d_model=16, n_layers=1, n_heads=2, dropout=0.0, warmup_steps=1, **kwargs
    )
    trainer = make_trainer(path.parent, max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(model, datamodule=datamodule)
    trainer.save_checkpoint(path, weights_only=True)
    return model


def brute_force_codes(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``[N, D]``, ``[K, D]`` -> ``[N]`` nearest-code indices from explicit float64 differences."""
    diff = vectors.double()[:, None, :] - codebook.double()[None, :, :]  # [N, K, D]
    return diff.pow(2).sum(-1).argmin(1)


@pytest.fixture(scope="module")
def datamodule(demo_mvtec_root: Path, data_cache_dir: Path) -> MVTecDataModule:
    return mvtec_datamodule(demo_mvtec_root, data_cache_dir)


@pytest.fixture(scope="module")
def stage1(tiny_vqvae: tuple[Path, VQVAE]) -> tuple[Path, VQVAE]:
    """A VQ-VAE fitted for 2 epochs (``fit_vqvae``; the session's ``tiny_vqvae``): checkpoint and module (read-only)."""
    return tiny_vqvae


@pytest.fixture(scope="module")
def transformer_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, stage1: tuple[Path, VQVAE], datamodule: MVTecDataModule
) -> Path:
    path = tmp_path_factory.mktemp("transformer") / "transformer.ckpt"
    fit_transformer(path, stage1[0], datamodule)
    return path


# ----------------------------------------------------------------------------------------------- checkpoints
def test_fit_writes_a_checkpoint_that_rebuilds_the_model(
    stage1: tuple[Path, VQVAE], datamodule: MVTecDataModule
) -> None:
    path, model = stage1
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert checkpoint["lsgs"]["kind"] == "vqvae"
    hparams = checkpoint["hyper_parameters"]
    # Not passed to the constructor: taken from the data module at fit time.
    assert hparams["input_size"] == datamodule.image_size == IMAGE_SIZE
    for key in ("in_channels", "num_res_blocks", "res_channels", "codebook_size", "code_dim"):
        assert hparams[key] == TINY[key], key
    assert tuple(hparams["channels"]) == tuple(TINY["channels"])
    assert checkpoint["lsgs"]["config"]["codebook_size"] == TINY["codebook_size"]

    loaded = VQVAE.from_checkpoint(str(path))
    assert not loaded.training
    assert loaded.code_grid == (8, 8)
    assert loaded.hparams.input_size == IMAGE_SIZE
    images = next(iter(datamodule.val_dataloader()))["image"]
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
        assert torch.equal(loaded.net.encode_indices(images), model.net.encode_indices(images))
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_an_unfitted_model_has_no_code_grid() -> None:
    with pytest.raises(ConfigError, match="no input_size recorded"):
        _ = VQVAE(**TINY).code_grid


def test_a_transformer_checkpoint_is_not_a_vqvae(transformer_checkpoint: Path) -> None:
    path = str(transformer_checkpoint)
    for call, argument in (
        (lambda: VQVAE(init_from=path), "model.init_from"),
        (lambda: VQVAE.from_checkpoint(path), "vqvae_checkpoint"),
    ):
        with pytest.raises(CheckpointError) as error:
            call()
        message = str(error.value)
        assert path in message and argument in message
        assert "'transformer'" in message and "'vqvae'" in message


def test_init_from_with_a_conflicting_architecture_names_key_and_values(stage1: tuple[Path, VQVAE]) -> None:
    path = str(stage1[0])
    with pytest.raises(CheckpointError) as error:
        VQVAE(init_from=path, code_dim=4, codebook_size=32)
    message = str(error.value)
    assert path in message
    assert "code_dim=4 (checkpoint has 8)" in message
    assert "codebook_size" not in message  # agreeing values are not reported as conflicts
    # Agreeing values (a list where the checkpoint has a tuple, too) are accepted.
    model = VQVAE(init_from=path, channels=[8, 16], code_dim=8)
    assert model.hparams.code_dim == 8 and model.hparams.input_size == IMAGE_SIZE


def test_missing_truncated_and_foreign_checkpoint_files(stage1: tuple[Path, VQVAE], tmp_path: Path) -> None:
    missing = tmp_path / "nothing.ckpt"
    with pytest.raises(CheckpointError, match="does not exist") as error:
        VQVAE(init_from=str(missing))
    assert str(missing) in str(error.value)

    truncated = tmp_path / "truncated.ckpt"
    data = stage1[0].read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    for call in (lambda: VQVAE(init_from=str(truncated)), lambda: VQVAE.from_checkpoint(str(truncated))):
        with pytest.raises(CheckpointError, match="cannot read checkpoint") as error:
            call()
        assert str(truncated) in str(error.value)

    not_lightning = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, not_lightning)
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        VQVAE.from_checkpoint(str(not_lightning))

    no_kind = tmp_path / "plain.ckpt"
    checkpoint = torch.load(stage1[0], map_location="cpu", weights_only=False)
    del checkpoint["lsgs"]
    torch.save(checkpoint, no_kind)
    with pytest.raises(CheckpointError, match="not an LSGS checkpoint"):
        VQVAE.from_checkpoint(str(no_kind))


# ----------------------------------------------------------------------------------------------- set-up checks
def test_in_channels_mismatch_fails_before_training(
    demo_brats_root: Path, data_cache_dir: Path, tmp_path: Path
) -> None:
    datamodule = BraTSDataModule(
        str(demo_brats_root), image_size=IMAGE_SIZE, batch_size=8, cache_dir=str(data_cache_dir)
    )
    model = VQVAE(**TINY)  # in_channels=3; BraTS FLAIR slices have 1 channel
    steps: list[int] = []
    model.training_step = lambda *args, **kwargs: steps.append(1)  # must never run
    trainer = make_trainer(tmp_path, max_epochs=1)
    with pytest.raises(ConfigError) as error:
        trainer.fit(model, datamodule=datamodule)
    message = str(error.value)
    assert "in_channels=3" in message and "BraTSDataModule" in message and "1-channel" in message
    assert steps == [] and trainer.global_step == 0


def test_input_size_mismatch_fails_before_training(datamodule: MVTecDataModule, tmp_path: Path) -> None:
    model = VQVAE(**TINY, input_size=64)
    trainer = make_trainer(tmp_path, max_epochs=1)
    with pytest.raises(ConfigError, match=r"data.image_size=32 .*input_size=64"):
        trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == 0


class PoisonedLoader:
    """Yields the batches of ``loader``, with the images of batch ``step`` replaced by NaN."""

    def __init__(self, loader: Any, step: int) -> None:
        self.loader, self.step = loader, step

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.step:
                batch = {**batch, "image": torch.full_like(batch["image"], float("nan"))}
            yield batch


class NaNAtSecondStep(MVTecDataModule):
    def train_dataloader(self) -> PoisonedLoader:
        return PoisonedLoader(super().train_dataloader(), step=1)


def test_a_nan_loss_stops_training(demo_mvtec_root: Path, data_cache_dir: Path, tmp_path: Path) -> None:
    datamodule = mvtec_datamodule(demo_mvtec_root, data_cache_dir, cls=NaNAtSecondStep)
    model = VQVAE(**TINY)
    trainer = make_trainer(tmp_path, max_epochs=1)
    with pytest.raises(TrainingDivergedError) as error:
        trainer.fit(model, datamodule=datamodule)
    message = str(error.value)
    assert "epoch 0, step 1" in message
    assert "model.lr (now 0.001)" in message
    assert "l1=nan" in message
    assert trainer.global_step == 1  # the first (clean) step was taken, the poisoned one was not


# ----------------------------------------------------------------------------------------------- precision
def test_bf16_mixed_fit_keeps_the_nearest_code_search_in_fp32(
    datamodule: MVTecDataModule, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    original = quantizer_module.nearest_codes

    def spy(vectors: torch.Tensor, codebook: torch.Tensor, chunk_size: int = 8192):
        indices, distances = original(vectors, codebook, chunk_size)
        calls.append(
            {
                "autocast": torch.is_autocast_enabled("cpu"),
                "vectors": vectors.detach().clone(),
                "codebook": codebook.detach().clone(),
                "indices": indices,
                "distances": distances,
            }
        )
        return indices, distances

    monkeypatch.setattr(quantizer_module, "nearest_codes", spy)
    losses: list[torch.Tensor] = []
    seed_everything(0, verbose=False)
    model = VQVAE(**TINY)
    model.net.quantizer.register_forward_hook(
        lambda module, args, out: losses.extend([out.codebook_loss, out.commitment_loss])
    )
    trainer = make_trainer(
        tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1, precision="bf16-mixed"
    )
    trainer.fit(model, datamodule=datamodule)

    under_autocast = [c for c in calls if c["autocast"]]
    assert under_autocast, "bf16-mixed did not run the quantizer under autocast: the test would prove nothing"
    assert any(c["vectors"].dtype == torch.bfloat16 for c in under_autocast)
    for call in calls:
        vectors = call["vectors"].double()
        exact = (vectors[:, None, :] - call["codebook"].double()[None]).pow(2).sum(-1)  # [N, K]
        assert call["distances"].dtype == torch.float32
        # fp32 agrees with float64 to ~1e-6 relative; a bf16 matmul would be off by ~1e-2.
        torch.testing.assert_close(
            call["distances"].double(), exact.min(1).values, rtol=1e-5, atol=1e-6 * float(exact.max())
        )
        assert torch.equal(call["indices"], exact.argmin(1))
    assert all(loss.dtype == torch.float32 for loss in losses)
    assert model.net.quantizer.codebook.dtype == torch.float32
    assert math.isfinite(float(trainer.callback_metrics["train/l1"]))


# ----------------------------------------------------------------------------------------------- logging
def test_logs_metrics_and_the_reconstruction_grid(
    datamodule: MVTecDataModule, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    grids: list[tuple[str, np.ndarray, int, str | None]] = []
    monkeypatch.setattr(
        vqvae_module,
        "log_image",
        lambda loggers, key, image, step, caption=None: grids.append((key, image, step, caption)),
    )
    seed_everything(0, verbose=False)
    model = VQVAE(**TINY, num_logged_images=4)
    trainer = make_trainer(tmp_path, max_epochs=2)
    trainer.fit(model, datamodule=datamodule)

    metrics = trainer.callback_metrics
    for key in ("train/l1", "train/loss", "train/codes_used", "train/perplexity", "val/l1", "val/codes_used"):
        assert key in metrics and math.isfinite(float(metrics[key])), key
    assert 1 <= float(metrics["train/codes_used"]) <= TINY["codebook_size"]
    assert 1.0 <= float(metrics["train/perplexity"]) <= float(metrics["train/codes_used"]) + 1e-4

    # The last validation ran with the final weights: recompute its L1 and code count by hand.
    model.eval()
    val = next(iter(datamodule.val_dataloader()))["image"]
    assert val.shape[0] == VAL_IMAGES
    with torch.no_grad():
        out = model.net(val)
    assert float(metrics["val/l1"]) == pytest.approx(float((out.reconstruction - val).abs().mean()), rel=1e-5)
    assert float(metrics["val/codes_used"]) == len(torch.unique(out.indices))

    steps_per_epoch = math.ceil(TRAIN_IMAGES / 8)
    assert [(key, step, caption) for key, _, step, caption in grids] == [
        ("val/reconstructions", steps_per_epoch, "top: input, bottom: output"),
        ("val/reconstructions", 2 * steps_per_epoch, "top: input, bottom: output"),
    ]
    grid = grids[-1][1]
    assert grid.dtype == np.uint8 and grid.shape == (2 * (IMAGE_SIZE + 2) + 2, 4 * (IMAGE_SIZE + 2) + 2, 3)
    # Top-left tile: the first validation image; bottom-left: its reconstruction.
    assert np.array_equal(grid[2 : 2 + IMAGE_SIZE, 2 : 2 + IMAGE_SIZE], to_uint8_image(val[0]))
    bottom = 2 + IMAGE_SIZE + 2
    reconstruction = to_uint8_image(out.reconstruction[0])
    assert (
        np.abs(grid[bottom : bottom + IMAGE_SIZE, 2 : 2 + IMAGE_SIZE].astype(int) - reconstruction).max() <= 1
    )

    grids.clear()
    quiet = VQVAE(**TINY, num_logged_images=0)
    make_trainer(tmp_path, max_epochs=1, limit_train_batches=1).fit(quiet, datamodule=datamodule)
    assert grids == []


# ----------------------------------------------------------------------------------------------- stage 3
def test_init_from_starts_at_the_source_and_freeze_codebook_keeps_it(
    stage1: tuple[Path, VQVAE], datamodule: MVTecDataModule, tmp_path: Path
) -> None:
    path = stage1[0]
    source = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    codebooks = {}
    for freeze in (True, False):
        model = VQVAE(init_from=str(path), lr=1e-2, freeze_codebook=freeze)
        assert model.hparams.codebook_size == TINY["codebook_size"] and model.hparams.input_size == IMAGE_SIZE
        state = model.state_dict()
        assert state.keys() == source.keys()
        for key, value in source.items():
            assert torch.equal(state[key], value), key
        make_trainer(tmp_path, max_epochs=1, limit_train_batches=3).fit(model, datamodule=datamodule)
        assert not torch.equal(model.net.encoder[0].weight, source["net.encoder.0.weight"])  # it trained
        codebooks[freeze] = model.net.quantizer.codebook.detach()
    assert torch.equal(codebooks[True], source["net.quantizer.codebook"])
    assert not torch.equal(codebooks[False], source["net.quantizer.codebook"])  # the check above can fail


# ----------------------------------------------------------------------------------------------- report
def test_codebook_report_equals_a_brute_force_pass(
    stage1: tuple[Path, VQVAE], datamodule: MVTecDataModule
) -> None:
    model = stage1[1]
    report = model.codebook_report
    assert model.stage_summary() == report
    model.eval()
    codebook = model.net.quantizer.codebook.detach()
    train = datamodule.dataset("train_eval")
    assert len(train) == TRAIN_IMAGES
    counts = torch.zeros(codebook.shape[0], dtype=torch.int64)
    with torch.no_grad():
        for i in range(len(train)):  # one image at a time: independent of the report's batching
            z_e = model.net.encode(train[i]["image"][None])  # [1, D, h, w]
            indices = brute_force_codes(z_e.permute(0, 2, 3, 1).reshape(-1, codebook.shape[1]), codebook)
            counts += torch.bincount(indices, minlength=codebook.shape[0])
        val = datamodule.dataset("val")
        l1 = [float(F.l1_loss(model(val[i]["image"][None]), val[i]["image"][None])) for i in range(len(val))]
    assert int(counts.sum()) == TRAIN_IMAGES * 64
    assert report["codebook_size"] == TINY["codebook_size"]
    assert report["effective_size"] == int((counts > 0).sum())
    p = counts[counts > 0].double().numpy() / float(counts.sum())
    assert report["train_perplexity"] == pytest.approx(float(np.exp(-(p * np.log(p)).sum())), rel=1e-9)
    assert report["val_l1"] == pytest.approx(
        float(np.mean(l1)), rel=1e-5
    )  # equal-sized images: mean of means
