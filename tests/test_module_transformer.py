"""Stage 4 LightningModules ``GlobalTransformer`` and ``CausalTransformer``: checkpoints without the frozen VQ-VAE,
resuming, sizes read from the VQ-VAE checkpoint, user errors, each class's attention, per-image tampering, logged
metrics, divergence."""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from test_module_vqvae import fit_vqvae, make_trainer, mvtec_datamodule

from data_modules import MVTecDataModule
from lsgs.checkpoints import state_fingerprint
from lsgs.errors import CheckpointError, ConfigError, TrainingDivergedError
from lsgs.modules import VQVAE, CausalTransformer, CodeTransformerModule, GlobalTransformer
from lsgs.modules.transformer import load_code_transformer

TRANSFORMERS = {"global": GlobalTransformer, "causal": CausalTransformer}
SMALL = {"d_model": 16, "n_layers": 1, "n_heads": 2, "dropout": 0.0, "lr": 3e-3, "warmup_steps": 2}
STEPS_PER_EPOCH = math.ceil(42 / 8)


@pytest.fixture(scope="module")
def datamodule(demo_mvtec_root: Path, data_cache_dir: Path) -> MVTecDataModule:
    return mvtec_datamodule(demo_mvtec_root, data_cache_dir)


@pytest.fixture(scope="module")
def vqvae_checkpoint(tiny_vqvae: tuple[Path, Any]) -> Path:
    """The session's tiny stage-1 VQ-VAE checkpoint (``fit_vqvae``, 2 epochs)."""
    return tiny_vqvae[0]


def fit_transformer(
    out_dir: Path,
    vqvae_checkpoint: Path,
    datamodule: Any,
    max_epochs: int = 1,
    ckpt_path: str | None = None,
    **kwargs: Any,
) -> tuple[GlobalTransformer, Any, Path]:
    """Fit for ``max_epochs`` (resuming from ``ckpt_path``); full checkpoints of every epoch go to ``out_dir``."""
    seed_everything(0, verbose=False)
    model = TRANSFORMERS[kwargs.pop("attention", "global")](str(vqvae_checkpoint), **{**SMALL, **kwargs})
    every_epoch = ModelCheckpoint(dirpath=out_dir, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    trainer = make_trainer(out_dir, max_epochs=max_epochs, enable_checkpointing=True, callbacks=[every_epoch])
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    path = out_dir / "transformer.ckpt"
    trainer.save_checkpoint(path, weights_only=True)  # as the pipeline writes its stage output
    return model, trainer, path


@pytest.fixture(scope="module", params=["global", "causal"])
def fitted(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    vqvae_checkpoint: Path,
    datamodule: MVTecDataModule,
) -> tuple[GlobalTransformer, Any, Path]:
    """A transformer fitted for one epoch (global and causal), its trainer and its checkpoint (read-only)."""
    out = tmp_path_factory.mktemp(f"transformer-{request.param}")
    return fit_transformer(out, vqvae_checkpoint, datamodule, attention=request.param)


def test_checkpoint_excludes_the_vqvae_and_rebuilds_the_net(
    fitted: tuple[GlobalTransformer, Any, Path], vqvae_checkpoint: Path, datamodule: MVTecDataModule
) -> None:
    model, _, path = fitted
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    assert checkpoint["state_dict"] and not [k for k in checkpoint["state_dict"] if k.startswith("vqvae.")]
    assert any(k.startswith("vqvae.") for k in model.state_dict())  # they were there to exclude
    meta = checkpoint["lsgs"]
    assert meta["kind"] == "transformer" and meta["vqvae_checkpoint"] == str(vqvae_checkpoint)
    # LightningCLI rebuilds the named class the checkpoint was trained with.
    assert checkpoint["hyper_parameters"]["_class_path"] == f"lsgs.modules.transformer.{type(model).__name__}"
    assert meta["vqvae_fingerprint"] == state_fingerprint(
        VQVAE.from_checkpoint(str(vqvae_checkpoint)).state_dict()
    )

    net, loaded_meta = load_code_transformer(str(path))
    assert loaded_meta == meta and not net.training
    assert net.config == model.config
    model.eval()
    codes = model.encode(next(iter(datamodule.val_dataloader()))["image"])  # [B, 64]
    with torch.no_grad():
        assert torch.equal(net(codes), model.net(codes))
    for key, value in model.net.state_dict().items():
        assert torch.equal(net.state_dict()[key], value), key


def test_logged_metrics(fitted: tuple[GlobalTransformer, Any, Path], datamodule: MVTecDataModule) -> None:
    model, trainer, _ = fitted
    metrics = trainer.callback_metrics
    if model.hparams.attention == "global":
        expected = ("train/loss", "train/acc_tampered", "train/acc_untampered", "val/loss", "val/nll")
    else:
        expected = ("train/loss", "train/acc", "val/loss", "val/acc", "val/nll")
    for key in expected:
        assert key in metrics and math.isfinite(float(metrics[key])), key
    # val/nll: mean NLL of the clean validation code maps under the final weights (one val batch).
    model.eval()
    codes = model.encode(next(iter(datamodule.val_dataloader()))["image"])
    with torch.no_grad():
        log_probs = F.log_softmax(model.net(codes).double(), dim=-1)
    nll = -log_probs.gather(-1, codes[..., None]).mean()
    assert float(metrics["val/nll"]) == pytest.approx(float(nll), rel=1e-5)


def test_resuming_from_a_full_checkpoint_equals_an_uninterrupted_run(
    tmp_path: Path, vqvae_checkpoint: Path, datamodule: MVTecDataModule
) -> None:
    straight, _, _ = fit_transformer(tmp_path / "straight", vqvae_checkpoint, datamodule, max_epochs=2)
    after_first_epoch = tmp_path / "straight" / "epoch=0.ckpt"
    checkpoint = torch.load(after_first_epoch, map_location="cpu", weights_only=False)
    assert checkpoint["optimizer_states"] and checkpoint["epoch"] == 0
    # Without the VQ-VAE weights, a strict load only works because on_load_checkpoint puts them back.
    assert not [k for k in checkpoint["state_dict"] if k.startswith("vqvae.")]
    resumed, trainer, _ = fit_transformer(
        tmp_path / "resumed", vqvae_checkpoint, datamodule, max_epochs=2, ckpt_path=str(after_first_epoch)
    )
    assert trainer.current_epoch == 2 and trainer.global_step == 2 * STEPS_PER_EPOCH
    for key, value in straight.net.state_dict().items():
        assert torch.equal(resumed.net.state_dict()[key], value), key
    # The frozen VQ-VAE is the one of the checkpoint, untouched by training or resuming.
    source = VQVAE.from_checkpoint(str(vqvae_checkpoint)).state_dict()
    for key, value in resumed.vqvae.state_dict().items():
        assert torch.equal(source[key], value), key


def test_vocabulary_and_length_come_from_the_vqvae_checkpoint(
    tmp_path: Path, vqvae_checkpoint: Path, datamodule: MVTecDataModule
) -> None:
    parameters = inspect.signature(GlobalTransformer).parameters
    assert "vocab_size" not in parameters and "seq_len" not in parameters
    model = GlobalTransformer(str(vqvae_checkpoint), **SMALL)
    assert (model.config.vocab_size, model.config.seq_len) == (32, (32 // 4) ** 2)
    # Another VQ-VAE: downsampling 2 (16x16 codes on 32 px images) and K = 24.
    other = tmp_path / "other.ckpt"
    fit_vqvae(other, datamodule, max_epochs=1, channels=[8], codebook_size=24)
    model = GlobalTransformer(str(other), **SMALL)
    assert (model.config.vocab_size, model.config.seq_len) == (24, 16 * 16)
    assert model.net.head.out_features == 24 and model.net.pos_emb.num_embeddings == 256
    make_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1).fit(
        model, datamodule=datamodule
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attention": "none"}, "attention='none' is not one of .*without a transformer sets transformer.model"),
        ({"attention": "bidirectional"}, "model.attention='bidirectional' is not one of"),
        ({"tamper_ratio": 0.0}, r"tamper_ratio must be in \(0, 1\), got 0.0"),
        ({"tamper_ratio": 1.0}, r"tamper_ratio must be in \(0, 1\), got 1.0"),
        ({"tamper_ratio": -0.1}, r"tamper_ratio must be in \(0, 1\), got -0.1"),
        ({"tamper_ratio": 1.5}, r"tamper_ratio must be in \(0, 1\), got 1.5"),
        ({"loss_reduction": "max"}, r"model.loss_reduction must be one of \('sum', 'mean'\), got 'max'"),
    ],
)
def test_bad_settings_are_config_errors(kwargs: dict[str, Any], match: str, vqvae_checkpoint: Path) -> None:
    with pytest.raises(ConfigError, match=match):
        GlobalTransformer(str(vqvae_checkpoint), **kwargs)


@pytest.mark.parametrize("attention", ["global", "causal"])
def test_each_named_transformer_trains_its_own_attention(attention: str, vqvae_checkpoint: Path) -> None:
    cls, other = TRANSFORMERS[attention], {"global": "causal", "causal": "global"}[attention]
    model = cls(str(vqvae_checkpoint), **SMALL)
    assert model.hparams.attention == attention and model.config.attention == attention
    assert cls(str(vqvae_checkpoint), attention=attention, **SMALL).config.attention == attention
    # The other attention names the class that trains it (what `lsgs ablate attention` switches to).
    with pytest.raises(ConfigError, match=rf"model.attention='{other}': {cls.__name__} trains {attention} "
                       rf"attention; use model.class_path=lsgs.modules.{TRANSFORMERS[other].__name__}"):
        cls(str(vqvae_checkpoint), attention=other, **SMALL)
    # The shared base trains either.
    assert CodeTransformerModule(str(vqvae_checkpoint), attention=other, **SMALL).config.attention == other


def test_the_vqvae_checkpoint_is_required_and_checked(fitted: tuple[GlobalTransformer, Any, Path]) -> None:
    with pytest.raises(ConfigError, match=r"model\.vqvae_checkpoint is required"):
        GlobalTransformer()
    with pytest.raises(CheckpointError, match=r"model.vqvae_checkpoint: .* is a 'transformer' checkpoint"):
        GlobalTransformer(str(fitted[2]))


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_tampering_depends_on_image_and_epoch_only(
    vqvae_checkpoint: Path, datamodule: MVTecDataModule
) -> None:
    model = GlobalTransformer(str(vqvae_checkpoint), **SMALL)
    inputs: list[torch.Tensor] = []
    model.net.register_forward_pre_hook(lambda module, args: inputs.append(args[0].clone()))
    data = datamodule.dataset("train_eval")

    def tampered(indices: list[int]) -> dict[int, torch.Tensor]:
        """What training_step feeds the net for a batch of these dataset items, per item."""
        batch = {
            "image": torch.stack([data[i]["image"] for i in indices]),
            "index": torch.tensor(indices),
        }
        inputs.clear()
        model.training_step(batch, 0)  # no trainer attached: current_epoch is 0
        return dict(zip(indices, inputs[0]))

    full = tampered([0, 5, 9, 17, 30])
    for subset in ([17], [30, 9, 0], [5, 17, 2]):
        for index, row in tampered(subset).items():
            if index in full:
                assert torch.equal(row, full[index]), (subset, index)
    codes = model.encode(torch.stack([data[i]["image"] for i in (0, 5, 9, 17, 30)]))
    for row, index in zip(codes, (0, 5, 9, 17, 30)):
        assert int((full[index] != row).sum()) == round(0.1 * 64)  # every tampered position really changed
    positions = {tuple(torch.nonzero(full[i] != row).flatten().tolist()) for row, i in zip(codes, full)}
    assert len(positions) == len(full)  # and each image has its own positions

    # The epoch enters the seed; validation (epoch -1) tampers identically every epoch.
    indices = torch.tensor([0, 5, 9, 17, 30])
    masks = {epoch: model._tamper(codes, indices, epoch)[1] for epoch in (-1, 0, 1)}
    assert torch.equal(masks[0], tampered_mask(full, codes, indices))
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[-1], masks[0])
    assert torch.equal(model._tamper(codes, indices, -1)[1], masks[-1])


def tampered_mask(rows: dict[int, torch.Tensor], codes: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return torch.stack([rows[int(i)] != row for row, i in zip(codes, indices)])


def test_a_non_finite_loss_stops_training(
    vqvae_checkpoint: Path, datamodule: MVTecDataModule, tmp_path: Path
) -> None:
    model = GlobalTransformer(str(vqvae_checkpoint), **SMALL)
    # Poison the logits from the second optimiser step on.
    model.net.register_forward_hook(
        lambda module, args, out: out * float("nan") if model.global_step >= 1 else out
    )
    trainer = make_trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    with pytest.raises(TrainingDivergedError, match=r"epoch 0, step 1; lower model.lr \(now 0.003\)"):
        trainer.fit(model, datamodule=datamodule)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("attention", ["global", "causal"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_the_training_loss_follows_loss_reduction(
    attention: str, reduction: str, vqvae_checkpoint: Path, datamodule: MVTecDataModule
) -> None:
    """training_step's loss equals Eq. 6 (or plain CE) computed directly from the net's logits and the tampering."""
    model = TRANSFORMERS[attention](str(vqvae_checkpoint), loss_reduction=reduction, **SMALL)
    model.eval()  # dropout is 0 anyway; eval keeps the forward deterministic
    data = datamodule.dataset("train_eval")
    indices = [0, 3, 8]
    batch = {"image": torch.stack([data[i]["image"] for i in indices]), "index": torch.tensor(indices)}
    loss = model.training_step(batch, 0)
    codes = model.encode(batch["image"])  # [B, L]
    with torch.no_grad():
        if attention == "global":
            tampered, mask = model._tamper(codes, batch["index"], 0)
            ce = F.cross_entropy(
                model.net(tampered).double().transpose(1, 2), codes, reduction="none"
            )  # [B, L]
            beta = model.hparams.beta
            if reduction == "sum":
                expected = ((1 - beta) * (ce * mask).sum(1) + beta * (ce * ~mask).sum(1)).mean()
            else:
                expected = (1 - beta) * ce[mask].mean() + beta * ce[~mask].mean()
        else:
            ce = F.cross_entropy(model.net(codes).double().transpose(1, 2), codes, reduction="none")
            expected = ce.sum(1).mean() if reduction == "sum" else ce.mean()
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)
