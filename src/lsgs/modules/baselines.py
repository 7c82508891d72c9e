"""Simple baselines evaluated by the same harness as LSGS (``AnomalyMapModule``): same data modules, same ROI
masking and MinPool/AvgPool smoothing (``smoothing`` flag), same calibration on validation normals, same metrics
and output files. A method that does not beat these floors is not worth its complexity (GitHub issue 6).

- ``IntensityBaseline`` (``intensity``): the image itself, standardised with training statistics; on BraTS FLAIR
  this is the known hyperintensity floor.
- ``PixelGaussianBaseline`` (``pixel_gaussian``): a per-pixel Gaussian of the training images.
- ``AutoencoderBaseline`` (``ae`` / ``vae``): reconstruction error of a conv autoencoder / VAE with the VQ-VAE's
  encoder/decoder shape (paper Table 1, AE and VAE columns).

The statistical baselines learn in a ``"train"`` calibration pass of ``trainer.test`` (the whole training split,
in order, without augmentation); the autoencoders are fitted with ``trainer.fit`` first. Everything learned is
kept in buffers, so a Lightning checkpoint of a fitted baseline holds it, and ``init_from`` reloads it (which is
how a baseline is scored later without recomputing, e.g. by ``lsgs detect`` with a saved ``calibration``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from typing_extensions import override

from lsgs.checkpoints import checkpoint_metadata, load_checkpoint
from lsgs.errors import CheckpointError, ConfigError, DataError, TrainingDivergedError
from lsgs.modules.scoring import AnomalyMapModule
from lsgs.nn.autoencoder import ConvAutoencoder, kl_per_image_element
from lsgs.nn.restoration import reconstruction_error_map
from lsgs.nn.vqvae import VQVAEConfig

BASELINE_KIND = "baseline"
STATISTICS_PHASE = "statistics"
_VQVAE_DEFAULTS = VQVAEConfig()


# ----------------------------------------------------------------------------------------------- pure maths
def mean_and_variance(count: Tensor, total: Tensor, total_sq: Tensor) -> tuple[Tensor, Tensor]:
    """Population mean and variance (ddof 0) from a count, a sum and a sum of squares.

    One-pass sums rather than Welford's update because sums all-reduce by plain summation under DDP; in float64,
    on image values of order 1, the cancellation in ``E[x²] - E[x]²`` costs about 1e-16 x count relative, far
    below anything the maps can show.

    Args:
        count: ``[*]`` or scalar number of values summed (float64).
        total: ``[*]`` sum of the values (float64).
        total_sq: ``[*]`` sum of their squares (float64).

    Returns:
        ``mean`` and ``variance`` (clamped at 0), broadcast shape of the inputs.
    """
    mean = total / count
    return mean, (total_sq / count - mean.square()).clamp_min(0.0)


def standardised_intensity(images: Tensor, mean: Tensor, scale: Tensor) -> Tensor:
    """Intensity anomaly map: signed z-score for one channel, distance from the mean colour for several.

    Args:
        images: ``[B, C, H, W]``.
        mean: ``[C]`` (or ``[B, C]``, one row per image) mean intensity of the training ROI pixels.
        scale: scalar (or ``[B]``) ``sigma``: the standard deviation (C = 1) or the RMS distance to the mean
            colour (C > 1).

    Returns:
        ``[B, 1, H, W]``: ``(x - mu) / sigma`` if C = 1 (signed: hyperintense scores high), else
        ``||x - mu||_2 / sigma``.
    """
    mean = mean.to(images.device, torch.float32)
    centred = images.float() - mean.reshape(-1 if mean.dim() == 2 else 1, images.shape[1], 1, 1)
    scale = scale.to(images.device, torch.float32).reshape(-1, 1, 1, 1)
    if images.shape[1] == 1:
        return centred / scale
    return torch.linalg.vector_norm(centred, dim=1, keepdim=True) / scale


def pixel_gaussian_map(images: Tensor, mean: Tensor, std: Tensor, eps: Tensor | float) -> Tensor:
    """Per-pixel Gaussian anomaly map ``max_c |x - mu| / (sigma + eps)``.

    Args:
        images: ``[B, C, H, W]``.
        mean: ``[C, H, W]`` (or ``[B, C, H, W]``, one per image) per-pixel mean of the training images.
        std: same shape, per-pixel standard deviation.
        eps: scalar (or ``[B]``) added to ``std`` so pixels that never vary in training do not divide by ~0.

    Returns:
        ``[B, 1, H, W]``.
    """
    device = images.device
    mean, std = mean.to(device, torch.float32), std.to(device, torch.float32)
    eps = torch.as_tensor(eps, dtype=torch.float32, device=device).reshape(-1, 1, 1, 1)
    return ((images.float() - mean).abs() / (std + eps)).amax(dim=1, keepdim=True)


# ----------------------------------------------------------------------------------------------- shared base
class BaselineModule(AnomalyMapModule):
    """What every baseline shares on top of the harness: the channel check, ``fitted`` state, checkpoints.

    Args:
        in_channels: image channels the baseline is for (3 MVTec, 1 BraTS); checked against the data module in
            ``setup`` and used by ``lsgs detect`` (``num_image_channels``).
        init_from: a checkpoint of the same fitted baseline (Lightning checkpoint written while or after it was
            fitted) whose learned state (statistics or weights) is loaded, so it is not fitted again.
        **kwargs: the harness arguments of ``AnomalyMapModule`` (output_dir, smoothing, metric_region, ...).
    """

    _fit_hint = "fit it first"
    requires_fit = False  # the pipeline runs trainer.fit before trainer.test when True

    def __init__(self, in_channels: int = 3, init_from: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ConfigError(f"model.in_channels must be a positive int, got {in_channels!r}")
        self.in_channels = in_channels
        self.init_from = init_from
        # Persistent, so checkpoints say whether the learned state is real (guards against scoring garbage).
        self.register_buffer("fitted", torch.tensor(False))

    @property
    def num_image_channels(self) -> int:
        return self.in_channels

    @override
    def setup(self, stage: str) -> None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        channels = getattr(datamodule, "num_channels", None)
        if channels is not None and channels != self.in_channels:
            raise ConfigError(
                f"model.in_channels={self.in_channels} but {type(datamodule).__name__} yields "
                f"{channels}-channel images"
            )

    def _check_fitted(self) -> None:
        if not bool(self.fitted):
            raise ConfigError(
                f"the {self.method_name} baseline has no learned state: {self._fit_hint}, or pass "
                f"model.init_from=<a checkpoint of a fitted {self.method_name} baseline>"
            )

    def _check_images(self, images: Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise DataError(
                f"{self.method_name} baseline: expected images [B, {self.in_channels}, H, W], got shape "
                f"{tuple(images.shape)}"
            )

    def _load_init_from(self) -> None:
        """Load the learned state of ``init_from`` (call at the end of a subclass ``__init__``)."""
        if self.init_from is None:
            return
        path = self.init_from
        checkpoint = load_checkpoint(path, BASELINE_KIND, "model.init_from")
        method = checkpoint["lsgs"].get("method")
        if method != self.method_name:
            raise CheckpointError(
                f"model.init_from '{path}' holds a '{method}' baseline; expected '{self.method_name}'"
            )
        saved_channels = checkpoint.get("hyper_parameters", {}).get("in_channels")
        if saved_channels != self.in_channels:
            raise CheckpointError(
                f"model.init_from '{path}' is for in_channels={saved_channels}, not {self.in_channels}"
            )
        expected = set(self.state_dict())
        state = {key: value for key, value in checkpoint["state_dict"].items() if key in expected}
        missing = sorted(expected - set(state))
        if missing:
            raise CheckpointError(f"model.init_from '{path}' lacks {missing}")
        try:
            self.load_state_dict(state, strict=True)
        except RuntimeError as error:  # shape mismatches: another architecture
            raise CheckpointError(
                f"model.init_from '{path}' does not match the configured model: {error}"
            ) from error
        if not bool(self.fitted):
            raise CheckpointError(f"model.init_from '{path}' was saved before the baseline was fitted")

    def _sum_over_ranks(self, tensor: Tensor) -> Tensor:
        """All-reduce a sum over DDP ranks (identity on one device)."""
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lsgs"] = checkpoint_metadata(BASELINE_KIND, method=self.method_name)
        # The checkpoint holds the learned state itself: rebuilding from it must not need the init_from file.
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"]["init_from"] = None


class _StatisticsBaseline(BaselineModule):
    """A baseline whose state is a few statistics of the training images, computed in the train pass.

    With ``per_category`` (default) the statistics are kept per category, as the data module's
    ``test_categories`` name them: MVTec is evaluated per category, and a per-pixel Gaussian (or a mean colour)
    of a mixture of carpets and screws describes neither. The statistic buffers then have a leading category
    dimension; an image is scored with the statistics of its ``category``.

    Subclasses list their statistic buffers in ``_statistics``; those start empty (their shapes depend on the
    data) and are resized to the stored shapes when a state dict is loaded.

    Args:
        per_category: one set of statistics per category (False: one set for all training images).
        **kwargs: see ``BaselineModule`` and ``AnomalyMapModule``.
    """

    _statistics: tuple[str, ...] = ()
    _counted = "values"  # what the count of ``_batch_sums`` counts, for messages
    # With model.calibration given the harness skips every calibration pass, statistics included.
    _fit_hint = "let trainer.test compute its statistics (without model.calibration)"
    _ALL = "*"  # the single "category" when statistics are not per category

    def __init__(self, per_category: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.per_category = bool(per_category)
        self.categories: list[str] = []

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        for name in self._statistics:
            if name in state_dict:
                # Assigning a tensor to a buffer name replaces the buffer (nn.Module.__setattr__).
                setattr(self, name, torch.empty_like(state_dict[name], device=self.fitted.device))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @override
    def _load_init_from(self) -> None:
        if self.init_from is not None:
            meta = load_checkpoint(self.init_from, BASELINE_KIND, "model.init_from")["lsgs"]
            self.categories = list(meta.get("categories", []))
        super()._load_init_from()

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["lsgs"]["categories"] = list(self.categories)

    @override
    def calibration_phases(self) -> list[tuple[str, str]]:
        # Statistics loaded with init_from are kept; otherwise they come from the training split.
        if bool(self.fitted):
            return []
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        categories = list(getattr(datamodule, "test_categories", None) or [])
        self.categories = categories if self.per_category and categories else [self._ALL]
        return [(STATISTICS_PHASE, "train")]

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.categories = list(checkpoint.get("lsgs", {}).get("categories", []))

    def category_indices(self, batch: dict[str, Any], device: torch.device) -> Tensor:
        """``[B]`` row of each image's statistics, from ``batch["category"]`` (all 0 without ``per_category``)."""
        if self.categories == [self._ALL]:
            return torch.zeros(batch["image"].shape[0], dtype=torch.long, device=device)
        categories = list(batch["category"])
        index = {name: i for i, name in enumerate(self.categories)}
        unknown = sorted(set(categories) - set(index))
        if unknown:
            raise DataError(
                f"{self.method_name} baseline: no statistics for categor{'y' if len(unknown) == 1 else 'ies'} "
                f"{unknown}; it was fitted on {self.categories}"
            )
        return torch.tensor([index[c] for c in categories], dtype=torch.long, device=device)

    @override
    def calibrate_step(self, phase: str, batch: dict[str, Any]) -> None:
        assert phase == STATISTICS_PHASE, phase
        images = batch["image"]
        self._check_images(images)
        roi = batch["roi"].to(images.device) > 0.5
        rows = self.category_indices(batch, images.device)
        sums = self._empty_sums().to(images.device).repeat(len(self.categories), 1)  # [n_categories, L]
        for row in rows.unique().tolist():
            selected = rows == row
            sums[row] = self._batch_sums(images[selected].double(), roi[selected])
        self._sums = sums if getattr(self, "_sums", None) is None else self._sums + sums

    @override
    def finish_calibration(self, phase: str) -> None:
        assert phase == STATISTICS_PHASE, phase
        sums, self._sums = getattr(self, "_sums", None), None
        if sums is None:  # this rank's shard is empty; it must still join the all-reduce
            sums = self._empty_sums().to(self.fitted.device).repeat(len(self.categories), 1)
        sums = self._sum_over_ranks(sums)
        empty = [name for name, row in zip(self.categories, sums) if row[0] <= 0]
        if empty:
            raise DataError(
                f"{self.method_name} baseline: no training {self._counted} to take statistics of for "
                f"{empty if self.categories != [self._ALL] else 'the training split'} (empty split or empty ROI)"
            )
        self._set_statistics(sums)
        self.fitted.fill_(True)

    def _empty_sums(self) -> Tensor:
        """All-zero sums of the layout ``_batch_sums`` returns."""
        raise NotImplementedError

    def _batch_sums(self, images: Tensor, roi: Tensor) -> Tensor:
        """Flat float64 sums of some images of one category ([count, sums, sums of squares])."""
        raise NotImplementedError

    def _set_statistics(self, sums: Tensor) -> None:
        """Turn the all-reduced sums ``[n_categories, L]`` of the training split into the statistic buffers."""
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------- intensity
class IntensityBaseline(_StatisticsBaseline):
    """Anomaly map = the image intensity, standardised with statistics of the training ROI pixels.

    One channel (BraTS FLAIR): the data module has already normalised each volume (e.g. per-volume percentile
    scaling over brain voxels), so the map is that per-volume normalised intensity, z-scored with the mean and
    standard deviation of all training ROI pixels: ``(x - mu) / sigma``, signed, so hyperintense tumours score
    high. It is not a per-volume z-score of the test volume: slices are scored one at a time and a slice does not
    see its volume. Thresholding FLAIR intensity like this rivals many published unsupervised methods.

    By default only hyperintensity counts (``signed=False``: the z-score clipped at 0), as FLAIR lesions are
    bright: a signed map puts dark structures (ventricles, sulci) below the zero background outside the ROI, and
    the MinPool/AvgPool smoothing then mixes their strongly negative scores into nearby tumour pixels (on 32 px
    demo slices: pixel AUROC 0.66 signed vs 0.91 clipped; at 128 px the two agree to 0.001). ``signed=True``
    keeps the plain z-score.

    Several channels (MVTec RGB): the documented analogue is the distance from the mean colour,
    ``||x(p) - mu_rgb||_2 / sigma``, with ``mu_rgb`` the mean colour and ``sigma`` the RMS of that distance over
    the training ROI pixels.

    Args:
        signed: one channel only: keep negative z-scores (default False: clip at 0, hyperintensity only).
        in_channels, init_from, **kwargs: see ``BaselineModule`` and ``AnomalyMapModule``.
    """

    method_name = "intensity"
    _statistics = ("channel_mean", "scale")
    _counted = "ROI pixels"

    def __init__(
        self,
        signed: bool = False,
        per_category: bool = True,
        in_channels: int = 3,
        init_from: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(per_category=per_category, in_channels=in_channels, init_from=init_from, **kwargs)
        self.save_hyperparameters()
        self.signed = signed
        self.register_buffer("channel_mean", torch.zeros(0))  # [n_categories, C] once fitted
        self.register_buffer("scale", torch.zeros(0))  # [n_categories] once fitted
        self._load_init_from()

    @override
    def _batch_sums(self, images: Tensor, roi: Tensor) -> Tensor:
        inside = roi.to(images.dtype)  # [B, 1, H, W]
        count = inside.sum().reshape(1)
        total = (images * inside).sum(dim=(0, 2, 3))  # [C]
        total_sq = (images.square() * inside).sum(dim=(0, 2, 3))  # [C]
        return torch.cat([count, total, total_sq])

    @override
    def _empty_sums(self) -> Tensor:
        return torch.zeros(1 + 2 * self.in_channels, dtype=torch.float64)

    @override
    def _set_statistics(self, sums: Tensor) -> None:
        c = self.in_channels
        count, total, total_sq = sums[:, :1], sums[:, 1 : 1 + c], sums[:, 1 + c :]
        mean, variance = mean_and_variance(count, total, total_sq)  # [n, C]
        # C = 1: the standard deviation; C > 1: sqrt(E||x - mu||^2) = sqrt(sum of per-channel variances).
        scale = variance.sum(dim=1).sqrt()  # [n]
        for name, n, m, sc in zip(self.categories, count[:, 0], mean, scale):
            if sc <= 0:
                raise DataError(
                    f"intensity baseline: all {int(n)} training ROI pixels of '{name}' have the same intensity "
                    f"{m.tolist()}; a z-score is undefined"
                )
        self.channel_mean = mean.float()
        self.scale = scale.float()

    @torch.no_grad()
    @override
    def raw_anomaly_map(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        self._check_fitted()
        images = batch["image"]
        self._check_images(images)
        rows = self.category_indices(batch, self.channel_mean.device)
        anomaly = standardised_intensity(images, self.channel_mean[rows], self.scale[rows])
        if images.shape[1] == 1 and not self.signed:
            anomaly = anomaly.clamp_min(0.0)
        return anomaly, {}

    @override
    def method_info(self) -> dict[str, Any]:
        if not bool(self.fitted):
            return {}
        statistic = "z-score" + (" (signed)" if self.signed else " clipped at 0 (hyperintensity)")
        return {"statistic": statistic if self.in_channels == 1 else "distance from the mean colour",
                "categories": self.categories, "mean": self.channel_mean.tolist(), "scale": self.scale.tolist()}


# ----------------------------------------------------------------------------------------------- pixel Gaussian
class PixelGaussianBaseline(_StatisticsBaseline):
    """Anomaly map = ``max_c |x - mu| / (sigma + eps)`` with a per-pixel Gaussian of the training images.

    ``mu`` and ``sigma`` ``[C, H, W]`` are the per-pixel mean and population standard deviation of all training
    images (every pixel; the ROI is applied to the map afterwards, as for every method), from one pass of sums and
    sums of squares in float64, all-reduced over DDP ranks. A strong floor on aligned objects.

    ``eps = eps_fraction * mean(sigma)``: relative, so it works whatever the intensity scale (BraTS "zscore"
    normalisation is not in [0, 1]). It stops pixels that never vary in training (constant background) from
    exploding: with an absolute 1e-3, one grey level (1/255) on a constant pixel would score 3.9, more than most
    real defects on textured pixels.

    Args:
        eps_fraction: ``eps`` as a fraction of the mean per-pixel standard deviation; > 0.
        in_channels, init_from, **kwargs: see ``BaselineModule`` and ``AnomalyMapModule``.
    """

    method_name = "pixel_gaussian"
    _statistics = ("pixel_mean", "pixel_std", "eps")
    _counted = "images"

    def __init__(
        self,
        eps_fraction: float = 0.1,
        per_category: bool = True,
        in_channels: int = 3,
        init_from: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(per_category=per_category, in_channels=in_channels, init_from=init_from, **kwargs)
        if not (isinstance(eps_fraction, (int, float)) and 0.0 < eps_fraction < math.inf):
            raise ConfigError(f"model.eps_fraction must be a positive finite number, got {eps_fraction!r}")
        self.eps_fraction = float(eps_fraction)
        self.save_hyperparameters()
        self.register_buffer("pixel_mean", torch.zeros(0))  # [n_categories, C, H, W] once fitted
        self.register_buffer("pixel_std", torch.zeros(0))  # [n_categories, C, H, W] once fitted
        self.register_buffer("eps", torch.zeros(0))  # [n_categories] once fitted
        self._image_shape: tuple[int, ...] | None = None
        self._load_init_from()

    @override
    def _batch_sums(self, images: Tensor, roi: Tensor) -> Tensor:
        count = torch.tensor([images.shape[0]], dtype=images.dtype, device=images.device)
        return torch.cat([count, images.sum(dim=0).flatten(), images.square().sum(dim=0).flatten()])

    @override
    def _set_statistics(self, sums: Tensor) -> None:
        count, rest = sums[:, :1], sums[:, 1:]
        total, total_sq = rest.chunk(2, dim=1)
        mean, variance = mean_and_variance(count, total, total_sq)  # [n, C*H*W]
        std = variance.sqrt()
        for name, n, row in zip(self.categories, count[:, 0], std):
            if row.mean() <= 0:
                raise DataError(
                    f"pixel_gaussian baseline: the {int(n)} training images of '{name}' are identical; a per-pixel "
                    "standard deviation needs at least two different images"
                )
        shape = (len(self.categories), *self._image_shape)
        self.pixel_mean = mean.float().reshape(shape)
        self.pixel_std = std.float().reshape(shape)
        self.eps = (self.eps_fraction * std.mean(dim=1)).float()

    @override
    def calibration_phases(self) -> list[tuple[str, str]]:
        self._image_shape = self._datamodule_image_shape()
        return super().calibration_phases()

    def _datamodule_image_shape(self) -> tuple[int, int, int] | None:
        size = getattr(getattr(self._trainer, "datamodule", None), "image_size", None)
        return (self.in_channels, int(size), int(size)) if size is not None else None

    @override
    def calibrate_step(self, phase: str, batch: dict[str, Any]) -> None:
        shape = tuple(batch["image"].shape[1:])
        if self._image_shape is None:
            self._image_shape = shape
        elif shape != self._image_shape:
            raise DataError(
                f"pixel_gaussian baseline: training images of shape {list(shape)} where {list(self._image_shape)}"
                " was expected; a per-pixel Gaussian needs one image size"
            )
        super().calibrate_step(phase, batch)

    @override
    def _empty_sums(self) -> Tensor:
        if self._image_shape is None:
            raise DataError("pixel_gaussian baseline: no training image and no data-module image_size")
        return torch.zeros(1 + 2 * math.prod(self._image_shape), dtype=torch.float64)

    @torch.no_grad()
    @override
    def raw_anomaly_map(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        self._check_fitted()
        images = batch["image"]
        self._check_images(images)
        if tuple(images.shape[1:]) != tuple(self.pixel_mean.shape[1:]):
            raise DataError(
                f"pixel_gaussian baseline: images of shape {list(images.shape[1:])} but the per-pixel statistics "
                f"are for {list(self.pixel_mean.shape[1:])}; score at the training image_size"
            )
        rows = self.category_indices(batch, self.pixel_mean.device)
        mean = self.pixel_mean[rows]  # [B, C, H, W]: each image's category
        anomaly = pixel_gaussian_map(images, mean, self.pixel_std[rows], self.eps[rows])
        # The mean image is the model's "expected normal image": shown in the panels' reconstruction column.
        return anomaly, {"reconstruction": mean.to(images.device)}

    @override
    def method_info(self) -> dict[str, Any]:
        if not bool(self.fitted):
            return {"eps_fraction": self.eps_fraction}
        return {"eps_fraction": self.eps_fraction, "categories": self.categories, "eps": self.eps.tolist(),
                "mean_std": self.pixel_std.mean(dim=(1, 2, 3)).tolist()}


# ----------------------------------------------------------------------------------------------- autoencoders
class AutoencoderBaseline(BaselineModule):
    """Reconstruction-error baseline: a conv autoencoder (``ae``) or VAE (``vae``) without the quantiser.

    The net is :class:`lsgs.nn.autoencoder.ConvAutoencoder` with the VQ-VAE's encoder/decoder shape; defaults are
    the CPU-sized ``VQVAEConfig`` defaults. Fit with ``trainer.fit`` (L1 reconstruction loss as the VQ-VAE, plus
    ``kl_weight * KL`` for the VAE, KL per image element, see ``kl_per_image_element``), then score with
    ``trainer.test`` on the same module: map = mean over channels of ``|x - x_hat|``, with ``x_hat`` decoded from
    the posterior mean (deterministic) for the VAE.

    Args:
        variational: VAE (Gaussian latent, ``method_name`` "vae") instead of AE ("ae").
        in_channels: image channels (3 MVTec, 1 BraTS); checked against the data module.
        channels: widths of the stride-2 stages (downsampling ``2 ** len(channels)``).
        num_res_blocks: residual blocks in the encoder and decoder stacks.
        res_channels: hidden width of the residual blocks.
        code_dim: latent channels ``D`` per position.
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        kl_weight: weight of the KL term (VAE only); with the KL per image element it is the scale ``b`` of the
            Laplace likelihood the L1 loss stands for (see ``kl_per_image_element``), so it should be of the order
            of the reconstruction error; 0 gives an AE with a noisy latent.
        init_from: a checkpoint of a fitted baseline of the same kind and shape to start from.
        **kwargs: the harness arguments of ``AnomalyMapModule``.
    """

    method_name = "ae"
    _fit_hint = "run trainer.fit first"
    requires_fit = True

    def __init__(
        self,
        variational: bool = False,
        in_channels: int = 3,
        channels: tuple[int, ...] = _VQVAE_DEFAULTS.channels,
        num_res_blocks: int = _VQVAE_DEFAULTS.num_res_blocks,
        res_channels: int = _VQVAE_DEFAULTS.res_channels,
        code_dim: int = _VQVAE_DEFAULTS.code_dim,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        kl_weight: float = 0.01,
        init_from: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(in_channels=in_channels, init_from=init_from, **kwargs)
        for name, value, zero_ok in (("lr", lr, False), ("weight_decay", weight_decay, True),
                                     ("kl_weight", kl_weight, True)):
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and math.isfinite(value) and (value >= 0.0 if zero_ok else value > 0.0)):
                bound = ">= 0" if zero_ok else "> 0"
                raise ConfigError(f"model.{name} must be a finite number {bound}, got {value!r}")
        self.method_name = "vae" if variational else "ae"
        self.save_hyperparameters()
        config = VQVAEConfig(in_channels=in_channels, channels=tuple(channels), num_res_blocks=num_res_blocks,
                             res_channels=res_channels, code_dim=code_dim)
        self.net = ConvAutoencoder(config, variational=variational)
        self._load_init_from()

    def forward(self, images: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> reconstruction ``[B, C, H, W]`` (sampled latent in training mode for the VAE)."""
        return self.net(images).reconstruction

    def compute_losses(self, images: Tensor) -> dict[str, Tensor]:
        """``loss = l1 + kl_weight * kl`` (``kl`` only for the VAE); the latent is sampled in training mode."""
        out = self.net(images)
        l1 = F.l1_loss(out.reconstruction.float(), images.float())
        losses = {"loss": l1, "l1": l1}
        if out.logvar is not None:
            kl = kl_per_image_element(out.mean, out.logvar, images[0].numel())
            losses["kl"] = kl
            losses["loss"] = l1 + self.hparams.kl_weight * kl
        return losses

    @override
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses = self.compute_losses(batch["image"])
        if not torch.isfinite(losses["loss"]):
            details = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
            raise TrainingDivergedError(
                f"{self.method_name} baseline loss is not finite at epoch {self.current_epoch}, step "
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
        self._check_fitted()
        images = batch["image"]
        self._check_images(images)
        reconstruction = self.net(images, sample=False).reconstruction
        return reconstruction_error_map(images.float(), reconstruction.float()), {"reconstruction": reconstruction}

    @override
    def method_info(self) -> dict[str, Any]:
        info = {"variational": self.net.variational, "channels": list(self.net.config.channels),
                "code_dim": self.net.config.code_dim}
        if self.net.variational:
            info["kl_weight"] = self.hparams.kl_weight
        return info
