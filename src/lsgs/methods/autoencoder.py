"""``ae`` / ``vae``: reconstruction error of a conv autoencoder / VAE with the VQ-VAE's encoder/decoder shape
(paper Table 1, AE and VAE columns)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from lsgs.errors import ConfigError, TrainingDivergedError
from lsgs.methods.base import MethodModule
from lsgs.nn.autoencoder import ConvAutoencoder, kl_per_image_element, per_image_normal
from lsgs.nn.export import (
    EXAMPLE_BATCH,
    IMAGES,
    MAP,
    RUNTIME_MAP,
    AutoencoderMapGraph,
    ExportGraph,
    MethodExport,
)
from lsgs.nn.restoration import reconstruction_error_map
from lsgs.nn.vqvae import VQVAEConfig

_VQVAE_DEFAULTS = VQVAEConfig()
_DEFAULT_LR = 1e-3


class AutoencoderBaseline(MethodModule):
    """Reconstruction-error baseline: a conv autoencoder (``ae``) or VAE (``vae``) without the quantiser.

    The net is :class:`lsgs.nn.autoencoder.ConvAutoencoder` with the VQ-VAE's encoder/decoder shape. The paper's
    AE/VAE rows are the VQ-VAE without its quantiser, so in a pipeline the shape, the learning rate and the epochs
    left unset (None) are the run's stage-1 VQ-VAE's (``pipeline_defaults``); built alone they are the CPU-sized
    ``VQVAEConfig`` defaults and a learning rate of 1e-3. Fit with ``trainer.fit`` (L1 reconstruction loss as the
    VQ-VAE, plus ``kl_weight * KL`` for the VAE, KL per image element, see ``kl_per_image_element``), then score
    with ``trainer.test`` on the same module: map = mean over channels of ``|x - x_hat|``, with ``x_hat`` decoded from
    the posterior mean (deterministic) for the VAE.

    Args:
        variational: VAE (Gaussian latent, ``method_name`` "vae") instead of AE ("ae").
        in_channels: image channels (3 MVTec, 1 BraTS); the pipeline sets the data module's.
        channels: widths of the stride-2 stages (downsampling ``2 ** len(channels)``); None: see above.
        num_res_blocks: residual blocks in the encoder and decoder stacks; None: see above.
        res_channels: hidden width of the residual blocks; None: see above.
        code_dim: latent channels ``D`` per position; None: see above.
        lr: Adam learning rate; None: see above.
        weight_decay: Adam weight decay.
        kl_weight: weight of the KL term (VAE only); with the KL per image element it is the scale ``b`` of the
            Laplace likelihood the L1 loss stands for (see ``kl_per_image_element``), so it should be of the order
            of the reconstruction error; 0 gives an AE with a noisy latent.
        init_from: a checkpoint of a fitted AE/VAE of the same kind and shape to start from.
        seed: seed of the VAE's latent noise, drawn per image from (seed, epoch, dataset index) so that a DDP run
            draws the noise of a single-process run.
        **kwargs: the harness arguments of ``AnomalyMapModule``.
    """

    method_name = "ae"
    kind = "baseline"
    _fit_hint = "run trainer.fit first"
    requires_fit = True
    pipeline_defaults: ClassVar[dict[str, str]] = {
        **{f"model.init_args.{name}": f"vqvae.model.init_args.{name}"
           for name in ("channels", "num_res_blocks", "res_channels", "code_dim", "lr")},
        "trainer.max_epochs": "vqvae.trainer.max_epochs",
    }  # fmt: skip

    def __init__(
        self,
        variational: bool = False,
        in_channels: int = 3,
        channels: tuple[int, ...] | None = None,
        num_res_blocks: int | None = None,
        res_channels: int | None = None,
        code_dim: int | None = None,
        lr: float | None = None,
        weight_decay: float = 0.0,
        kl_weight: float = 0.01,
        init_from: str | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(in_channels=in_channels, init_from=init_from, **kwargs)
        lr = _DEFAULT_LR if lr is None else lr
        for name, value, zero_ok in (("lr", lr, False), ("weight_decay", weight_decay, True),
                                     ("kl_weight", kl_weight, True)):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and (value >= 0.0 if zero_ok else value > 0.0)):
                bound = ">= 0" if zero_ok else "> 0"
                raise ConfigError(f"model.{name} must be a finite number {bound}, got {value!r}")
        self.method_name = "vae" if variational else "ae"
        self.save_hyperparameters()
        config = VQVAEConfig(
            in_channels=in_channels,
            channels=tuple(_VQVAE_DEFAULTS.channels if channels is None else channels),
            num_res_blocks=_VQVAE_DEFAULTS.num_res_blocks if num_res_blocks is None else num_res_blocks,
            res_channels=_VQVAE_DEFAULTS.res_channels if res_channels is None else res_channels,
            code_dim=_VQVAE_DEFAULTS.code_dim if code_dim is None else code_dim,
        )
        self.net = ConvAutoencoder(config, variational=variational)
        self._load_init_from()

    def forward(self, images: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> reconstruction ``[B, C, H, W]`` (sampled latent in training mode for the VAE)."""
        return self.net(images).reconstruction

    def latent_noise(self, indices: Tensor, image_size: Sequence[int]) -> Tensor:
        """``[B, D, H/f, W/f]`` noise of the VAE's latent sample for the images of dataset ``indices`` ``[B]`` and
        size ``[H, W]``: one generator per image, seeded by (seed, epoch, index) as the transformer's tampering."""
        f = self.net.config.downsample_factor
        shape = (self.net.config.code_dim, image_size[0] // f, image_size[1] // f)
        # Distinct for every (seed, epoch, index) with index < 1e9 and epoch < 1e6.
        base = (self.hparams.seed * 1_000_003 + self.current_epoch + 1) * 1_000_000_007
        return per_image_normal([(base + int(i)) % 2**63 for i in indices.tolist()], shape, self.device)

    def compute_losses(self, images: Tensor, indices: Tensor | None = None) -> dict[str, Tensor]:
        """``loss = l1 + kl_weight * kl`` (``kl`` only for the VAE); the latent is sampled in training mode, with
        noise seeded per image by the images' dataset ``indices`` ``[B]`` when given (``latent_noise``)."""
        sampling = self.net.variational and self.training and indices is not None
        noise = self.latent_noise(indices, images.shape[-2:]) if sampling else None
        out = self.net(images, noise=noise)
        l1 = F.l1_loss(out.reconstruction.float(), images.float())
        losses = {"loss": l1, "l1": l1}
        if out.logvar is not None:
            kl = kl_per_image_element(out.mean, out.logvar, images[0].numel())
            losses["kl"] = kl
            losses["loss"] = l1 + self.hparams.kl_weight * kl
        return losses

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self.compute_losses(batch["image"], batch["index"])
        if not torch.isfinite(losses["loss"]):
            details = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            raise TrainingDivergedError(
                f"{self.method_name} loss is not finite at epoch {self.current_epoch}, step "
                f"{self.global_step} ({details}); lower model.lr (now {self.hparams.lr}) or check the input data"
            )
        batch_size = batch["image"].shape[0]
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=name == "l1", batch_size=batch_size)
        return losses["loss"]

    @override
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        losses = self.compute_losses(batch["image"])
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, sync_dist=True,
                      batch_size=batch["image"].shape[0])

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After every optimiser step, not at the end of fit: epoch checkpoints (ModelCheckpoint's last.ckpt,
        # what init_from and resumed runs load) must already say the weights are trained.
        self.fitted.fill_(True)

    @override
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    @torch.no_grad()
    @override
    def raw_anomaly_map(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        images = self.fitted_input(batch)
        reconstruction = self.net(images, sample=False).reconstruction
        return reconstruction_error_map(images.float(), reconstruction.float()), {"reconstruction": reconstruction}

    @override
    def export_graphs(self, input_size: int) -> MethodExport:
        self._check_fitted()
        images = torch.rand(EXAMPLE_BATCH, self.in_channels, input_size, input_size)
        graph = AutoencoderMapGraph(self.net.eval())
        return MethodExport(RUNTIME_MAP, {"map": ExportGraph(graph, {IMAGES: images}, (MAP,))})

    @override
    def method_info(self) -> dict[str, Any]:
        info = {"variational": self.net.variational, "channels": list(self.net.config.channels),
                "code_dim": self.net.config.code_dim}
        if self.net.variational:
            info["kl_weight"] = self.hparams.kl_weight
        return info
