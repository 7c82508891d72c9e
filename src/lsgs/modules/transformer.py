"""Stage 4: the global-sensitive transformer (paper §2.2) and its causal ablation, trained on the code maps of a
frozen VQ-VAE."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from typing_extensions import override

from lsgs.checkpoints import (
    TRANSFORMER_KIND,
    checkpoint_metadata,
    load_checkpoint,
    require_checkpoint,
    state_fingerprint,
)
from lsgs.errors import ConfigError, TrainingDivergedError
from lsgs.modules.vqvae import VQVAE
from lsgs.nn.transformer import (
    ATTENTION_TYPES,
    CodeTransformer,
    CodeTransformerConfig,
    check_reduction,
    next_code_loss,
    tamper_codes,
    tampering_loss,
)

# The named model of each attention type of ``ATTENTION_TYPES`` (``lsgs ablate attention`` switches between them).
TRANSFORMER_CLASS_PATHS = {
    "global": "lsgs.modules.GlobalTransformer",
    "causal": "lsgs.modules.CausalTransformer",
}


class CodeTransformerModule(LightningModule):
    """Stage 4: a transformer over the ``h*w`` codes of an image; vocabulary and length come from the VQ-VAE checkpoint.

    The shared LightningModule of the two named models (use those): ``GlobalTransformer`` (the method, paper §2.2)
    and ``CausalTransformer`` (the prior work's model, the ablation of Table 4). ``attention="global"``: full
    attention; a ``tamper_ratio`` of the positions of each code map is replaced by random codes and the model
    learns to predict the originals with the loss ``(1 - beta)·CE(tampered) + beta·CE(untampered)`` (paper Eq. 6).
    ``attention="causal"``: raster-order next-code prediction from a start token, plain cross-entropy.
    An experiment without a transformer (the "w/o" row of Table 4) has no transformer model at all
    (``transformer.model: null``): the pipeline skips this stage and the scoring falls back to the VQ-VAE
    reconstruction error.

    Args:
        vqvae_checkpoint: the (fine-tuned) VQ-VAE whose codes the transformer models; frozen, not saved again.
        attention: one of ``ATTENTION_TYPES`` (``global``, ``causal``); None = the class's own (``ATTENTION``). A
            named class accepts only its own.
        d_model, n_layers, n_heads, mlp_ratio, dropout: transformer size (paper: 768, 12, 12, 4, -).
        tamper_ratio: fraction of positions replaced by random codes (paper: 0.1); global only.
        beta: weight of the untampered positions in the loss (paper: 0.01); global only.
        loss_reduction: ``sum`` (paper Eq. 6: CE summed over the tampered and the untampered positions of each
            image, averaged over the batch) or ``mean`` (mean CE over each set; the untampered term then weighs
            less); see ``tampering_loss``. The causal model's CE uses the same reduction.
        lr: peak AdamW learning rate, reached after ``warmup_steps`` and decayed by cosine to ``lr/10``.
        weight_decay: AdamW weight decay on weight matrices (not on biases, norms, embeddings).
        warmup_steps: linear warm-up steps.
        seed: seed of the tampering; each image's tampering is drawn from (seed, epoch, dataset index), so it
            does not depend on batching or on how the data is sharded over DDP ranks.
    """

    ATTENTION: str | None = None  # the attention a named subclass trains; None: either

    def __init__(
        self,
        vqvae_checkpoint: str | None = None,
        attention: str | None = None,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        tamper_ratio: float = 0.1,
        beta: float = 0.01,
        loss_reduction: str = "mean",
        lr: float = 3e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        seed: int = 0,
    ) -> None:
        super().__init__()
        require_checkpoint(vqvae_checkpoint, "model.vqvae_checkpoint")
        if attention is None:
            attention = self.ATTENTION or "global"
        if attention not in ATTENTION_TYPES:
            raise ConfigError(
                f"model.attention={attention!r} is not one of {ATTENTION_TYPES}; an experiment without a "
                "transformer sets transformer.model to null"
            )
        if self.ATTENTION is not None and attention != self.ATTENTION:
            other = TRANSFORMER_CLASS_PATHS[attention]
            raise ConfigError(
                f"model.attention={attention!r}: {type(self).__name__} trains {self.ATTENTION} attention; "
                f"use model.class_path={other}"
            )
        if not 0.0 < tamper_ratio < 1.0:
            raise ConfigError(f"model.tamper_ratio must be in (0, 1), got {tamper_ratio}")
        try:
            check_reduction(loss_reduction)
        except ConfigError as error:
            raise ConfigError(f"model.{error}") from None
        self.save_hyperparameters()
        self.vqvae = VQVAE.from_checkpoint(vqvae_checkpoint, "model.vqvae_checkpoint")
        self.vqvae.requires_grad_(False)
        self.vqvae_fingerprint = state_fingerprint(self.vqvae.state_dict())
        grid = self.vqvae.code_grid
        self.config = CodeTransformerConfig(
            vocab_size=self.vqvae.codebook_size,
            seq_len=grid[0] * grid[1],
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            attention=attention,
        )
        self.net = CodeTransformer(self.config)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` images -> ``[B, L]`` codes in raster order."""
        self.vqvae.eval()
        return self.vqvae.net.encode_indices(images).flatten(1)

    def _tamper(
        self, codes: torch.Tensor, indices: torch.Tensor, epoch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``tamper_codes`` with one generator per image, seeded by (seed, epoch, dataset index)."""
        rows = []
        for row, index in zip(codes, indices.tolist()):
            # Distinct for every (seed, epoch, index) with index < 1e9 and epoch < 1e6.
            seed = ((self.hparams.seed * 1_000_003 + epoch + 1) * 1_000_000_007 + int(index)) % (2**63)
            generator = torch.Generator(device=codes.device).manual_seed(seed)
            rows.append(tamper_codes(row[None], self.config.vocab_size, self.hparams.tamper_ratio, generator))
        return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        codes = self.encode(batch["image"])
        batch_size = codes.shape[0]
        if self.hparams.attention == "global":
            # Validation tampering is the same every epoch (epoch -1), so its curves compare across epochs.
            epoch = self.current_epoch if stage == "train" else -1
            tampered, mask = self._tamper(codes, batch["index"], epoch)
            logits = self.net(tampered)
            loss = tampering_loss(logits, codes, mask, self.hparams.beta, self.hparams.loss_reduction)
            correct = logits.argmax(-1) == codes
            metrics = {
                "loss": loss,
                "acc_tampered": correct[mask].float().mean(),
                "acc_untampered": correct[~mask].float().mean(),
            }
        else:
            logits = self.net(codes)
            loss = next_code_loss(logits, codes, self.hparams.loss_reduction)
            metrics = {"loss": loss, "acc": (logits.argmax(-1) == codes).float().mean()}
        if stage == "train" and not torch.isfinite(loss):
            raise TrainingDivergedError(
                f"transformer loss is not finite at epoch {self.current_epoch}, step {self.global_step}; "
                f"lower model.lr (now {self.hparams.lr})"
            )
        for name, value in metrics.items():
            self.log(
                f"{stage}/{name}",
                value,
                batch_size=batch_size,
                sync_dist=stage != "train",
                prog_bar=name == "loss",
            )
        if stage == "val":
            # NLL of the untouched code maps of normal images: what the scoring threshold is set from.
            clean_logits = self.net(codes) if self.hparams.attention == "global" else logits
            nll = F.cross_entropy(clean_logits.float().transpose(1, 2), codes, reduction="mean")
            self.log("val/nll", nll, batch_size=batch_size, sync_dist=True)
        return loss

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    @override
    def on_train_epoch_start(self) -> None:
        self.vqvae.eval()

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for name, param in self.net.named_parameters():
            (decay if param.dim() >= 2 and "embed" not in name else no_decay).append(param)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams.lr,
            betas=(0.9, 0.95),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.hparams.warmup_steps, total // 2)

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / max(1, warmup)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The frozen VQ-VAE has its own checkpoint; storing it again would double every transformer checkpoint.
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("vqvae.")
        }
        checkpoint["lsgs"] = checkpoint_metadata(
            TRANSFORMER_KIND,
            config=dataclasses.asdict(self.config),
            vqvae_fingerprint=self.vqvae_fingerprint,
            vqvae_checkpoint=str(self.hparams.vqvae_checkpoint),
        )
        # LightningCLI (`lsgs validate --ckpt_path ...`) rebuilds the model from this in subclass mode.
        checkpoint["hyper_parameters"]["_class_path"] = f"{type(self).__module__}.{type(self).__qualname__}"

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key, value in self.vqvae.state_dict().items():
            state.setdefault(f"vqvae.{key}", value)



class GlobalTransformer(CodeTransformerModule):
    """The method's transformer (paper §2.2, the design card's name): full attention over the code map, trained
    to restore tampered codes (Eq. 6). See ``CodeTransformerModule`` for the arguments."""

    ATTENTION = "global"


class CausalTransformer(CodeTransformerModule):
    """The prior work's autoregressive transformer (Table 4's "vanilla transformer", an ablation): causal
    attention, raster-order next-code prediction. See ``CodeTransformerModule`` for the arguments (the tampering
    ones have no effect)."""

    ATTENTION = "causal"


def load_code_transformer(
    path: str, argument: str = "transformer_checkpoint"
) -> tuple[CodeTransformer, dict]:
    """The trained ``CodeTransformer`` (eval mode) and its ``lsgs`` metadata, without loading its VQ-VAE again."""
    checkpoint = load_checkpoint(path, TRANSFORMER_KIND, argument)
    meta = checkpoint["lsgs"]
    net = CodeTransformer(CodeTransformerConfig(**meta["config"]))
    state = {k[len("net.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state)
    return net.eval(), meta
