"""Pure-torch convolutional autoencoder and VAE baseline methods with the VQ-VAE's encoder/decoder shape.

The encoder and decoder are :class:`lsgs.nn.vqvae.Encoder` / :class:`lsgs.nn.vqvae.Decoder` built from the same
:class:`lsgs.nn.vqvae.VQVAEConfig`, so the two differ from the VQ-VAE only by the bottleneck: a continuous
latent ``[B, D, H/f, W/f]`` (AE), or a diagonal Gaussian over it (VAE), instead of the quantiser. The AE is the
"AE" column and the VAE the "VAE" column of the paper's Table 1 (after Baur et al., 2021, "Autoencoders for
unsupervised anomaly segmentation in brain MR images: a comparative study").

Caveat worth knowing when reading their numbers: with ``D >= C * f**2`` values per latent position the
continuous bottleneck is no narrower than the image and an AE can learn something close to the identity,
reconstructing anomalies too. That is the known weakness of reconstruction-error baseline methods (it is what the
VQ-VAE's discrete codes address), not a bug; choose ``code_dim`` accordingly to ask a different question.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lsgs.nn.vqvae import Decoder, Encoder, VQVAEConfig

# exp(logvar) overflows float32 above ~88; clamping the encoder's log-variance keeps the KL and the sampling
# finite while a diverging run is caught by the loss check rather than by an inf here (as diffusers does).
LOGVAR_RANGE = (-30.0, 20.0)


@dataclass
class AutoencoderOutput:
    """Result of :meth:`ConvAutoencoder.forward`.

    Attributes:
        reconstruction: ``[B, C, H, W]`` decoded image (linear output, same range as the input).
        latent: ``[B, D, H/f, W/f]`` the latent that was decoded (a posterior sample for a VAE in sampling
            mode, the posterior mean otherwise).
        mean: ``[B, D, H/f, W/f]`` posterior mean (the AE's deterministic code).
        logvar: ``[B, D, H/f, W/f]`` posterior log-variance (clamped to ``LOGVAR_RANGE``); None for the AE.
    """

    reconstruction: Tensor
    latent: Tensor
    mean: Tensor
    logvar: Tensor | None


def gaussian_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """Elementwise ``KL(N(mean, exp(logvar)) || N(0, 1)) = 0.5 * (mean² + exp(logvar) - 1 - logvar)``.

    Args:
        mean: ``[*]`` posterior means.
        logvar: ``[*]`` posterior log-variances, same shape.

    Returns:
        ``[*]`` float32 KL in nats, >= 0.
    """
    mean, logvar = mean.float(), logvar.float()
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)


def kl_per_image_element(mean: Tensor, logvar: Tensor, image_elements: int) -> Tensor:
    """The VAE's KL term on the scale of a per-element L1 mean.

    The KL of each image is summed over its latent elements and divided by the number of image elements
    ``C * H * W``, then averaged over the batch. With an L1 loss read as a Laplace likelihood of scale ``b``,
    ``L1_mean + b * kl_per_image_element`` is ``b`` times the negative ELBO per image element (up to a
    constant), so the KL weight of the loss is that scale ``b``.

    Args:
        mean: ``[B, D, h, w]`` posterior means.
        logvar: ``[B, D, h, w]`` posterior log-variances.
        image_elements: ``C * H * W`` of the images.

    Returns:
        scalar float32.
    """
    return gaussian_kl(mean, logvar).flatten(1).sum(dim=1).mean() / image_elements


def per_image_normal(seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu") -> Tensor:
    """Standard normal noise drawn from one generator per image, e.g. the VAE's latent noise seeded by each image's
    dataset index: the noise of an image does not depend on how the data is batched or split over DDP ranks.

    Args:
        seeds: one seed per image.
        shape: the shape of one image's noise, e.g. ``[D, h, w]``.
        device: where the result goes (drawn on the CPU, so the numbers are the same on every device).

    Returns:
        ``[B, *shape]`` float32.
    """
    noise = [torch.randn(*shape, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds]
    return torch.stack(noise).to(device)


class ConvAutoencoder(nn.Module):
    """Convolutional autoencoder (``variational=False``) or VAE (``variational=True``), no quantiser.

    The VAE's encoder outputs ``2 * D`` channels per latent position: the posterior mean and log-variance.
    ``forward`` draws ``z = mean + exp(logvar / 2) * eps`` (reparameterisation) when sampling and decodes the
    mean otherwise; by default it samples in training mode only, so scoring (eval mode) is deterministic.

    Args:
        config: encoder/decoder shape; ``codebook_size`` and ``beta`` are unused (no quantiser).
        variational: Gaussian latent (VAE) instead of a deterministic one (AE).
    """

    def __init__(self, config: VQVAEConfig, variational: bool = False) -> None:
        super().__init__()
        self.config = config
        self.variational = bool(variational)
        encoder_config = dataclasses.replace(config, code_dim=2 * config.code_dim) if variational else config
        self.encoder = Encoder(encoder_config)
        self.decoder = Decoder(config)

    def _check_image(self, x: Tensor) -> None:
        f, c = self.config.downsample_factor, self.config.in_channels
        if x.dim() != 4 or x.shape[1] != c:
            raise ValueError(f"expected images [B, {c}, H, W], got shape {tuple(x.shape)}")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"image height and width must be divisible by the downsampling factor {f}, "
                f"got shape {tuple(x.shape)}"
            )

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Posterior of the latent.

        Args:
            x: ``[B, C, H, W]`` with ``H`` and ``W`` divisible by ``f = config.downsample_factor``.

        Returns:
            ``mean`` ``[B, D, H/f, W/f]`` and ``logvar`` of the same shape (None for the AE).

        Raises:
            ValueError: on a wrong channel count, a non-4-D input or ``H``/``W`` not divisible by ``f``.
        """
        self._check_image(x)
        h = self.encoder(x)
        if not self.variational:
            return h, None
        mean, logvar = h.chunk(2, dim=1)  # [B, 2D, h, w] -> 2 x [B, D, h, w]
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: Tensor) -> Tensor:
        """Decode a latent map.

        Args:
            z: ``[B, D, h, w]``.

        Returns:
            ``[B, C, h*f, w*f]`` reconstruction.

        Raises:
            ValueError: if ``z`` is not 4-D with ``D`` channels.
        """
        if z.dim() != 4 or z.shape[1] != self.config.code_dim:
            raise ValueError(f"z must be [B, {self.config.code_dim}, h, w], got shape {tuple(z.shape)}")
        return self.decoder(z)

    def forward(self, x: Tensor, sample: bool | None = None, noise: Tensor | None = None) -> AutoencoderOutput:
        """Encode, (sample,) decode.

        Args:
            x: ``[B, C, H, W]`` with ``H`` and ``W`` divisible by ``config.downsample_factor``.
            sample: VAE only: decode a posterior sample (True) or the mean (False); None = ``self.training``.
            noise: VAE only: the ``[B, D, H/f, W/f]`` standard normal ``eps`` of the sample
                (``per_image_normal``); None draws it from the global generator.

        Returns:
            :class:`AutoencoderOutput`; ``reconstruction`` ``[B, C, H, W]``, the latents ``[B, D, H/f, W/f]``.

        Raises:
            ValueError: if ``noise`` is not the shape of the latent.
        """
        mean, logvar = self.encode(x)
        sample = self.training if sample is None else sample
        latent = mean
        if logvar is not None and sample:
            if noise is not None and noise.shape != mean.shape:
                raise ValueError(f"noise must be the latent's shape {tuple(mean.shape)}, got {tuple(noise.shape)}")
            eps = torch.randn_like(mean) if noise is None else noise.to(mean)
            latent = mean + torch.exp(0.5 * logvar) * eps
        return AutoencoderOutput(reconstruction=self.decode(latent), latent=latent, mean=mean, logvar=logvar)
