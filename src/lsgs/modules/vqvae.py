"""Stage 1 and stage 3: the VQ-VAE LightningModule (training, logging, checkpoints) around ``VQVAENet``."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from typing_extensions import override

from lsgs.checkpoints import VQVAE_KIND, checkpoint_metadata, load_checkpoint
from lsgs.contracts import channels_of, image_size_of, trainer_data
from lsgs.errors import CheckpointError, ConfigError, TrainingDivergedError
from lsgs.metrics.codebook import CodebookUsage, usage_statistics
from lsgs.nn.quantizer import validate_codebook_options
from lsgs.nn.vqvae import VQVAEConfig, VQVAENet
from lsgs.progress import progress
from lsgs.reports.figures import image_grid, log_image

# Architecture arguments: taken from `init_from` when they are left at None, and checked against it otherwise.
# lookup_dim and l2_normalize define the space the codebook lives in, so they belong here too (a checkpoint without
# them has them off: `_source_value`).
ARCHITECTURE_KEYS = (
    "in_channels", "channels", "num_res_blocks", "res_channels", "codebook_size", "code_dim", "lookup_dim",
    "l2_normalize",
)
# Quantizer buffers that exist only when a codebook option is on (see lsgs.nn.quantizer.VectorQuantizer).
OPTIONAL_QUANTIZER_BUFFERS = ("quantizer.cluster_size", "quantizer.embed_sum", "quantizer.initialised")
_DEFAULTS = VQVAEConfig()


class VQVAE(LightningModule):
    """VQ-VAE trained with L1 reconstruction + ||sg[z_e] - e||² + β·||sg[e] - z_e||² (paper Eq. 2-4).

    Stage 3 (fine-tuning after codebook aggregation) is this same module with ``init_from`` pointing at the
    aggregator's checkpoint: weights and the k-means codebook are loaded, the optimiser starts fresh.

    Args:
        in_channels: image channels (3 for MVTec, 1 for BraTS). None: from ``init_from``, else 3.
        input_size: side of the square images the model is trained on; recorded so the transformer can derive
            its sequence length. None: from ``init_from``, else the data module's ``image_size`` at fit time.
        channels: widths of the stride-2 stages (their number sets the downsampling factor 2**len).
        num_res_blocks: residual blocks at the lowest resolution, in encoder and decoder.
        res_channels: hidden width of the residual blocks.
        codebook_size: K, the number of codes.
        code_dim: D, the dimension of a code.
        beta: weight of the commitment term (paper: 1).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        init_from: a VQ-VAE checkpoint (e.g. the aggregator's output) to start from.
        freeze_codebook: keep the codebook fixed (only encoder/decoder train); off by default as in the paper.
        num_logged_images: images in the input/reconstruction grid logged every validation epoch.
        ema_decay: codebook health, off by default (the paper). None, or the decay in (0, 1) of EMA codebook
            updates (VQ-VAE-2 / Sonnet ``VectorQuantizerEMA``, Laplace-smoothed cluster sizes; 0.99 is usual).
            The codebook then gets no gradient and the loss drops the codebook term: ``L1 + beta * commitment``
            (``val/codebook_loss`` is still logged, as a diagnostic). Statistics are all-reduced under DDP.
        dead_code_threshold: 0 (off), or restart codes whose moving-average usage (vectors assigned per training
            step over all ranks; the EMA cluster size with ``ema_decay``, otherwise an average with decay 0.99)
            falls below this number: they are replaced by random encodings of the current batch (seeded by
            ``codebook_seed``, drawn on rank 0 and broadcast). ``train/codes_restarted`` counts them per epoch.
        kmeans_init: initialise the codebook from k-means (FAISS) of the encodings of the first
            ``kmeans_init_batches`` training batches. Does nothing with ``init_from`` (the codebook comes from the
            checkpoint).
        kmeans_init_batches: training batches collected for ``kmeans_init``.
        lookup_dim: None (off) or the dimension of a factorised lookup (ViT-VQGAN): ``z_e`` is projected
            ``code_dim -> lookup_dim`` for the nearest-code search, the codebook is ``[codebook_size,
            lookup_dim]``, and the chosen code is projected back. Part of the architecture: with ``init_from``
            it comes from the checkpoint (a different non-None value is an error).
        l2_normalize: cosine-similarity lookup (l2-normalised vectors and codes; ViT-VQGAN). None: from
            ``init_from``, else off. Combines with ``lookup_dim`` (normalised after the projection).
        codebook_seed: seed of the dead-code restart picks and of the k-means initialisation.

    ``ema_decay``, ``dead_code_threshold`` and ``kmeans_init`` are training choices: with ``init_from`` (stage 3)
    they come from this module's own arguments, like ``lr`` and ``beta``, not from the checkpoint.
    """

    def __init__(
        self,
        in_channels: int | None = None,
        input_size: int | None = None,
        channels: tuple[int, ...] | None = None,
        num_res_blocks: int | None = None,
        res_channels: int | None = None,
        codebook_size: int | None = None,
        code_dim: int | None = None,
        beta: float = 1.0,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        init_from: str | None = None,
        freeze_codebook: bool = False,
        num_logged_images: int = 8,
        ema_decay: float | None = None,
        dead_code_threshold: float = 0.0,
        kmeans_init: bool = False,
        kmeans_init_batches: int = 1,
        lookup_dim: int | None = None,
        l2_normalize: bool | None = None,
        codebook_seed: int = 0,
    ) -> None:
        super().__init__()
        training_options = {
            "ema_decay": ema_decay,
            "dead_code_threshold": dead_code_threshold,
            "kmeans_init": kmeans_init,
            "kmeans_init_batches": kmeans_init_batches,
            "codebook_seed": codebook_seed,
        }
        _validate_training_options(
            **training_options, lookup_dim=lookup_dim, l2_normalize=l2_normalize, freeze_codebook=freeze_codebook
        )
        requested = {
            "in_channels": in_channels,
            "channels": tuple(channels) if channels is not None else None,
            "num_res_blocks": num_res_blocks,
            "res_channels": res_channels,
            "codebook_size": codebook_size,
            "code_dim": code_dim,
            "lookup_dim": lookup_dim,
            "l2_normalize": l2_normalize,
        }
        init = None
        if init_from is not None:
            init = _read_init_source(init_from, requested)
            requested = init.architecture
            input_size = input_size if input_size is not None else init.input_size
        resolved = _with_defaults(requested)
        # Recording the resolved values (not the Nones) makes every checkpoint self-describing.
        self.save_hyperparameters(
            {
                **resolved,
                "input_size": input_size,
                "beta": beta,
                "lr": lr,
                "weight_decay": weight_decay,
                "init_from": init_from,
                "freeze_codebook": freeze_codebook,
                "num_logged_images": num_logged_images,
                **training_options,
            }
        )
        self.net = VQVAENet(VQVAEConfig(**resolved, beta=beta, **training_options))
        if init is not None:
            self._load_init_state(init.state, init_from)
        self._prepare_net(freeze_codebook)
        self.train_usage = CodebookUsage(resolved["codebook_size"])
        self.val_usage = CodebookUsage(resolved["codebook_size"])
        self._image_batch: torch.Tensor | None = None

    def _prepare_net(self, freeze_codebook: bool) -> None:
        """Put the built (and loaded) net in its training layout, and freeze the codebook if asked."""
        # oneDNN's convolutions are ~13% faster on CPU in channels_last (benchmarks/vqvae_throughput.py).
        self.net.to(memory_format=torch.channels_last)
        if freeze_codebook:
            self.net.quantizer.codebook.requires_grad_(False)

    def _load_init_state(self, state: dict[str, torch.Tensor], init_from: str) -> None:
        """Load ``init_from``'s weights. The optional quantizer buffers may differ when the training options
        differ between the stages (e.g. stage 1 without EMA, stage 3 with it): buffers this net lacks are
        dropped, and if any it has are missing, its statistics restart from the loaded codebook."""
        own = self.net.state_dict().keys()
        state = {k: v for k, v in state.items() if k in own or k not in OPTIONAL_QUANTIZER_BUFFERS}
        result = self.net.load_state_dict(state, strict=False)
        unexpected = list(result.unexpected_keys)
        missing = [k for k in result.missing_keys if k not in OPTIONAL_QUANTIZER_BUFFERS]
        if unexpected or missing:
            raise CheckpointError(
                f"model.init_from '{init_from}' does not fit this VQ-VAE: missing {missing}, unexpected {unexpected}"
            )
        if result.missing_keys:
            self.net.quantizer.reset_codebook_statistics()

    @classmethod
    def from_checkpoint(cls, path: str, argument: str = "vqvae_checkpoint") -> VQVAE:
        """Load a trained VQ-VAE for use by a later stage (eval mode), with checks that name ``argument``."""
        checkpoint = load_checkpoint(path, VQVAE_KIND, argument)
        hparams = {
            k: v
            for k, v in checkpoint["hyper_parameters"].items()
            if k != "init_from" and not k.startswith("_")
        }
        module = cls(**hparams)
        module.load_state_dict(checkpoint["state_dict"], strict=True)
        return module.eval()

    @property
    def codebook_size(self) -> int:
        return self.hparams.codebook_size

    @property
    def code_grid(self) -> tuple[int, int]:
        """``(h, w)`` of the code map for this model's image size."""
        if self.hparams.input_size is None:
            raise ConfigError("this VQ-VAE has no input_size recorded; it was never fitted")
        side = self.hparams.input_size // self.net.config.downsample_factor
        return side, side

    @override
    def setup(self, stage: str) -> None:
        datamodule = trainer_data(self.trainer)
        if datamodule is None:
            return
        channels, size = channels_of(datamodule), image_size_of(datamodule)
        if channels is not None and channels != self.hparams.in_channels:
            raise ConfigError(
                f"model.in_channels={self.hparams.in_channels} but {type(datamodule).__name__} yields "
                f"{channels}-channel images"
            )
        if size is not None:
            if self.hparams.input_size is None:
                self.hparams.input_size = size
            elif size != self.hparams.input_size:
                raise ConfigError(
                    f"data.image_size={size} but this VQ-VAE was set up for input_size={self.hparams.input_size}"
                )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> reconstruction ``[B, C, H, W]``."""
        return self.net(images).reconstruction

    def _losses(self, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], Any]:
        out = self.net(images.contiguous(memory_format=torch.channels_last))
        l1 = F.l1_loss(out.reconstruction.float(), images.float())
        # codebook_loss + beta * commitment_loss (eq. 4); without the codebook term under EMA updates.
        vq = self.net.quantizer.loss(out)
        losses = {
            "loss": l1 + vq,
            "l1": l1,
            "codebook_loss": out.codebook_loss,
            "commitment_loss": out.commitment_loss,
        }
        return losses, out

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses, out = self._losses(batch["image"])
        if not torch.isfinite(losses["loss"]):
            details = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            raise TrainingDivergedError(
                f"VQ-VAE loss is not finite at epoch {self.current_epoch}, step {self.global_step} ({details}); "
                f"lower model.lr (now {self.hparams.lr}) or check the input data"
            )
        self.train_usage.update(out.indices)
        batch_size = batch["image"].shape[0]
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=name == "l1", batch_size=batch_size)
        return losses["loss"]

    @override
    def on_train_epoch_end(self) -> None:
        stats = self.train_usage.compute()
        if self.hparams.dead_code_threshold > 0:
            # Identical on every rank: restarts are decided on all-reduced usage.
            stats["codes_restarted"] = float(self.net.quantizer.num_restarts)
            self.net.quantizer.num_restarts = 0
        self.log_dict({f"train/{k}": v for k, v in stats.items()}, sync_dist=False)
        self.train_usage.reset()

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        losses, out = self._losses(batch["image"])
        self.val_usage.update(out.indices)
        self.log_dict(
            {f"val/{k}": v for k, v in losses.items()}, sync_dist=True, batch_size=batch["image"].shape[0]
        )
        if batch_idx == 0 and self._image_batch is None:
            count = self.hparams.num_logged_images
            self._image_batch = torch.stack(
                [batch["image"][:count].detach().float(), out.reconstruction[:count].detach().float()]
            ).cpu()

    @override
    def on_validation_epoch_end(self) -> None:
        stats = self.val_usage.compute()
        self.log_dict({f"val/{k}": v for k, v in stats.items()}, sync_dist=False)
        self.val_usage.reset()
        if (
            self._image_batch is not None
            and self.trainer.is_global_zero
            and self.hparams.num_logged_images > 0
        ):
            grid = image_grid(list(self._image_batch))
            log_image(
                self.loggers, "val/reconstructions", grid, self.global_step, "top: input, bottom: output"
            )
        self._image_batch = None

    @override
    def on_fit_end(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "train_eval_dataloader"):
            self.codebook_report = self.compute_codebook_report(datamodule)

    @torch.no_grad()
    def compute_codebook_report(self, datamodule: Any) -> dict[str, float]:
        """Effective codebook size over the whole training set and L1 on the validation normals (Table 3).

        Runs on every rank over its shard (the data module shards evaluation loaders); sums are all-reduced.
        """
        was_training = self.training
        self.eval()
        counts = torch.zeros(self.codebook_size, dtype=torch.int64, device=self.device)
        show = self.trainer.is_global_zero
        for batch in progress(datamodule.train_eval_dataloader(), "codebook usage (train)", show):
            indices = self.net.encode_indices(batch["image"].to(self.device))
            counts += torch.bincount(indices.reshape(-1), minlength=self.codebook_size)
        l1 = torch.zeros(2, dtype=torch.float64, device=self.device)  # sum of |x - x_hat|, element count
        for batch in progress(datamodule.val_dataloader(), "reconstruction L1 (val)", show):
            images = batch["image"].to(self.device)
            l1[0] += (self.net(images).reconstruction.float() - images).abs().sum().double()
            l1[1] += images.numel()
        counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
        l1 = self.trainer.strategy.reduce(l1, reduce_op="sum")
        self.train(was_training)
        usage = usage_statistics(counts)
        return {
            "codebook_size": self.codebook_size,
            "effective_size": int(usage["codes_used"]),
            "train_perplexity": usage["perplexity"],
            "val_l1": float(l1[0] / l1[1]) if l1[1] > 0 else float("nan"),
        }

    def stage_summary(self) -> dict[str, Any]:
        """What the pipeline records about this stage in ``done.json``."""
        return dict(getattr(self, "codebook_report", {}))

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lsgs"] = checkpoint_metadata(VQVAE_KIND, config=dataclasses.asdict(self.net.config))
        # LightningCLI (`lsgs validate --ckpt_path ...`) rebuilds the model from this in subclass mode.
        checkpoint["hyper_parameters"]["_class_path"] = f"{VQVAE.__module__}.{VQVAE.__qualname__}"


def _validate_training_options(
    *,
    ema_decay: float | None,
    dead_code_threshold: float,
    kmeans_init: bool,
    kmeans_init_batches: int,
    codebook_seed: int,
    lookup_dim: int | None,
    l2_normalize: bool | None,
    freeze_codebook: bool,
) -> None:
    """Check the codebook options before any checkpoint is read, with the names the user wrote.

    Raises:
        ConfigError: an option out of range, or ``freeze_codebook`` with an option that moves the codebook.
    """
    validate_codebook_options(
        ema_decay=ema_decay,
        dead_code_threshold=dead_code_threshold,
        kmeans_init=kmeans_init,
        kmeans_init_batches=kmeans_init_batches,
        lookup_dim=lookup_dim,
        l2_normalize=False if l2_normalize is None else l2_normalize,
        seed=codebook_seed,
        prefix="model.",
        seed_name="codebook_seed",
    )
    if not freeze_codebook:
        return
    moving = [
        f"{name}={value!r}"
        for name, value, off in (
            ("ema_decay", ema_decay, None), ("dead_code_threshold", dead_code_threshold, 0.0),
            ("kmeans_init", kmeans_init, False),
        )
        if value != off
    ]
    if moving:
        raise ConfigError(
            f"model.freeze_codebook=True contradicts model.{moving[0]} (it moves the codebook); turn "
            f"one of them off"
        )


@dataclasses.dataclass(frozen=True)
class _InitSource:
    """What a VQ-VAE started from ``init_from`` takes from that checkpoint.

    Attributes:
        architecture: every ``ARCHITECTURE_KEYS`` value of the checkpoint.
        input_size: the checkpoint's recorded input size (None if it was never fitted).
        state: the ``VQVAENet`` weights and buffers (``net.`` prefix removed).
    """

    architecture: dict[str, Any]
    input_size: int | None
    state: dict[str, torch.Tensor]


def _read_init_source(init_from: str, requested: dict[str, Any]) -> _InitSource:
    """Load ``init_from`` and check the architecture values that were given (not None) against it.

    Raises:
        CheckpointError: the file is not a VQ-VAE checkpoint, or a given value differs from the checkpoint's.
    """
    checkpoint = load_checkpoint(init_from, VQVAE_KIND, "model.init_from")
    source = checkpoint["hyper_parameters"]
    conflicts = [
        f"{key}={value!r} (checkpoint has {_source_value(source, key)!r})"
        for key, value in requested.items()
        if value is not None and _normalise(value) != _source_value(source, key)
    ]
    if conflicts:
        raise CheckpointError(
            f"model.init_from '{init_from}' does not match the configured architecture: "
            + ", ".join(conflicts)
            + "; leave these unset to take them from the checkpoint"
        )
    return _InitSource(
        architecture={key: _source_value(source, key) for key in ARCHITECTURE_KEYS},
        input_size=source.get("input_size"),
        state={k[len("net.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")},
    )


def _with_defaults(architecture: dict[str, Any]) -> dict[str, Any]:
    """The architecture values with each None replaced by ``VQVAEConfig``'s default."""
    return {key: getattr(_DEFAULTS, key) if value is None else value for key, value in architecture.items()}


def _normalise(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _source_value(hparams: dict[str, Any], key: str) -> Any:
    """An architecture value of a checkpoint; a key the checkpoint lacks takes its (off) default."""
    return _normalise(hparams[key] if key in hparams else getattr(_DEFAULTS, key))
