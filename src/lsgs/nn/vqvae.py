"""Pure-torch VQ-VAE (encoder, vector quantiser, decoder) of the local-sensitive stage.

The paper fixes only the downsampling (8: 128x128 -> 16x16 codes), K = 1024 and D = 512. The rest follows van
den Oord et al. (2017) and Naval Marimont & Tarroni (ISBI 2021): stride-2 4x4 convolutions, a residual stack
(ReLU - 3x3 conv - ReLU - 1x1 conv) and a 1x1 projection to the code dimension; the decoder mirrors it with
stride-2 4x4 transposed convolutions and a linear output. There is no BatchNorm on purpose: the output for one
image must not depend on the other images of its batch (DDP, batch-size invariance, test-time batching).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from lsgs.errors import ConfigError
from lsgs.nn.quantizer import QuantizerOutput, VectorQuantizer, validate_codebook_options


@dataclass
class VQVAEConfig:
    """Constructor arguments of :class:`VQVAENet`; ``dataclasses.asdict`` of it rebuilds the net.

    Attributes:
        in_channels: image channels ``C`` (3 for MVTec, 1 for BraTS FLAIR).
        channels: width of each stride-2 stage, first (full resolution) to last; one stage per entry, so the
            downsampling factor is ``2 ** len(channels)``. The last entry is the width of the residual stack.
        num_res_blocks: residual blocks in the encoder stack and again in the decoder stack.
        res_channels: hidden width of the 3x3 conv inside each residual block.
        codebook_size: number of codes ``K``.
        code_dim: code dimension ``D``.
        beta: commitment weight (paper: 1).
        ema_decay: None (off, the paper) or the decay of EMA codebook updates; the codebook loss term is then
            dropped. See :class:`~lsgs.nn.quantizer.VectorQuantizer` for this and the options below.
        dead_code_threshold: 0 (off) or the moving-average usage below which a code is restarted on a random
            encoding of the current batch.
        kmeans_init: initialise the codebook from k-means of the first ``kmeans_init_batches`` training batches.
        kmeans_init_batches: training batches k-means initialisation collects.
        lookup_dim: None (off) or the dimension of a factorised (projected) code lookup; the codebook is then
            ``[codebook_size, lookup_dim]``.
        l2_normalize: cosine-similarity lookup on l2-normalised vectors and codes.
        codebook_seed: seed of dead-code restart picks and of the k-means initialisation.
    """

    in_channels: int = 3
    channels: tuple[int, ...] = (32, 64)
    num_res_blocks: int = 2
    res_channels: int = 32
    codebook_size: int = 128
    code_dim: int = 64
    beta: float = 1.0
    ema_decay: float | None = None
    dead_code_threshold: float = 0.0
    kmeans_init: bool = False
    kmeans_init_batches: int = 1
    lookup_dim: int | None = None
    l2_normalize: bool = False
    codebook_seed: int = 0

    def __post_init__(self) -> None:
        # YAML / asdict round trips give a list; keep the field hashable and comparable.
        self.channels = tuple(self.channels)
        for name in ("in_channels", "res_channels", "codebook_size", "code_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"VQVAEConfig.{name} must be a positive int, got {value!r}")
        if isinstance(self.num_res_blocks, bool) or not isinstance(self.num_res_blocks, int) or (
            self.num_res_blocks < 0
        ):
            raise ConfigError(f"VQVAEConfig.num_res_blocks must be an int >= 0, got {self.num_res_blocks!r}")
        if not self.channels or any(
            isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in self.channels
        ):
            raise ConfigError(
                f"VQVAEConfig.channels must be a non-empty sequence of positive ints, got {self.channels!r}"
            )
        if not self.beta >= 0.0:  # also rejects NaN
            raise ConfigError(f"VQVAEConfig.beta must be >= 0, got {self.beta!r}")
        validate_codebook_options(**self.codebook_options(), prefix="VQVAEConfig.", seed_name="codebook_seed")

    def codebook_options(self) -> dict[str, Any]:
        """The codebook-health keyword arguments of :class:`~lsgs.nn.quantizer.VectorQuantizer`."""
        return {
            "ema_decay": self.ema_decay,
            "dead_code_threshold": self.dead_code_threshold,
            "kmeans_init": self.kmeans_init,
            "kmeans_init_batches": self.kmeans_init_batches,
            "lookup_dim": self.lookup_dim,
            "l2_normalize": self.l2_normalize,
            "seed": self.codebook_seed,
        }

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction ``f`` from image to code map: ``2 ** len(channels)``."""
        return 2 ** len(self.channels)

    @classmethod
    def paper(cls, in_channels: int = 3) -> VQVAEConfig:
        """The paper's model: 128x128 input -> 16x16 codes, K = 1024, D = 512 (6.3 M parameters).

        The paper gives no widths. Chosen: stages (128, 256, 256), 2 residual blocks with 128 hidden channels,
        i.e. the classic van den Oord sizes (256 hidden, residual width half of it) plus the third stage the
        8x downsampling needs, with a narrower full-resolution (64x64) stage because that stage is
        memory-bound and fed by only 3 channels. Every width is a multiple of 64, which oneDNN's blocked fp32
        and bf16 (AMX) convolution kernels use without padding. Measured with
        ``benchmarks/vqvae_throughput.py`` (2-core Xeon, AVX-512 + AMX, batch 16, forward + backward + Adam):
        14.2 GFLOP per image, fp32 channels_last 16.6 images/s = 73% of the fp32 matmul peak (NCHW 65%),
        bf16 autocast 52 images/s. Wider variants ran at similar efficiency but proportionally slower:
        (128, 256, 512)/256 at 25.5 GFLOP/image gave 10 images/s; (64, 128, 256)/128 at 7.6 GFLOP/image
        gave 31 images/s.
        """
        return cls(
            in_channels=in_channels,
            channels=(128, 256, 256),
            num_res_blocks=2,
            res_channels=128,
            codebook_size=1024,
            code_dim=512,
            beta=1.0,
        )

    @classmethod
    def tiny(cls, in_channels: int = 3) -> VQVAEConfig:
        """A few thousand parameters, downsampling 4, for unit tests and CPU smoke runs."""
        return cls(
            in_channels=in_channels,
            channels=(8, 16),
            num_res_blocks=1,
            res_channels=8,
            codebook_size=32,
            code_dim=8,
            beta=1.0,
        )


@dataclass
class VQVAEOutput:
    """Result of :meth:`VQVAENet.forward`.

    Attributes:
        reconstruction: ``[B, C, H, W]`` decoded image (linear output, same range as the input).
        z_e: ``[B, D, h, w]`` encodings before quantisation (``h = H / f``, ``w = W / f``).
        indices: ``[B, h, w]`` int64 code indices.
        codebook_loss: scalar ``mean ||sg[z_e] - e||^2``.
        commitment_loss: scalar ``mean ||sg[e] - z_e||^2`` (unweighted; ``beta`` is applied by the loss).
    """

    reconstruction: Tensor
    z_e: Tensor
    indices: Tensor
    codebook_loss: Tensor
    commitment_loss: Tensor


class ResidualBlock(nn.Module):
    """``x + conv1x1(relu(conv3x3(relu(x))))``; ``[B, C, h, w] -> [B, C, h, w]``."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, hidden, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, kernel_size=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


def _residual_stack(channels: int, hidden: int, num_blocks: int) -> list[nn.Module]:
    # The stack ends with a ReLU (as in the reference implementation) because each block leaves its sum
    # un-activated.
    return [*(ResidualBlock(channels, hidden) for _ in range(num_blocks)), nn.ReLU()]


class Encoder(nn.Sequential):
    """``[B, C, H, W] -> [B, D, H/f, W/f]``: stride-2 4x4 convs, residual stack, 1x1 conv to ``D``."""

    def __init__(self, config: VQVAEConfig) -> None:
        layers: list[nn.Module] = []
        prev = config.in_channels
        for i, width in enumerate(config.channels):
            layers.append(nn.Conv2d(prev, width, kernel_size=4, stride=2, padding=1))
            # No ReLU after the last stage: the residual stack starts with one, and its skip path should see
            # the signed conv output (as in the reference implementation).
            if i < len(config.channels) - 1:
                layers.append(nn.ReLU())
            prev = width
        layers += _residual_stack(prev, config.res_channels, config.num_res_blocks)
        layers.append(nn.Conv2d(prev, config.code_dim, kernel_size=1))
        super().__init__(*layers)


class Decoder(nn.Sequential):
    """``[B, D, h, w] -> [B, C, h*f, w*f]``: 3x3 conv from ``D``, residual stack, stride-2 4x4 transposed
    convs, linear output."""

    def __init__(self, config: VQVAEConfig) -> None:
        widths = config.channels[::-1]  # last stage first
        layers: list[nn.Module] = [nn.Conv2d(config.code_dim, widths[0], kernel_size=3, padding=1)]
        layers += _residual_stack(widths[0], config.res_channels, config.num_res_blocks)
        outs = [*widths[1:], config.in_channels]
        for i, (width, out) in enumerate(zip(widths, outs)):
            layers.append(nn.ConvTranspose2d(width, out, kernel_size=4, stride=2, padding=1))
            if i < len(outs) - 1:  # linear output layer
                layers.append(nn.ReLU())
        super().__init__(*layers)


class VQVAENet(nn.Module):
    """VQ-VAE: encoder, :class:`~lsgs.nn.quantizer.VectorQuantizer`, decoder.

    ``encode`` / ``quantize`` / ``decode`` are separate so the later stages can call them: the aggregator
    collects ``z_e``, the transformer trains on ``encode_indices``, scoring decodes restored index maps with
    ``decode_indices``.

    Args:
        config: architecture; stored as ``self.config`` so a checkpoint can rebuild the net from
            ``dataclasses.asdict(config)``.
    """

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quantizer = VectorQuantizer(
            config.codebook_size, config.code_dim, beta=config.beta, **config.codebook_options()
        )
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

    def encode(self, x: Tensor) -> Tensor:
        """Encode images.

        Args:
            x: ``[B, C, H, W]`` with ``H`` and ``W`` divisible by ``f = config.downsample_factor``.

        Returns:
            ``z_e`` ``[B, D, H/f, W/f]``.

        Raises:
            ValueError: on a wrong channel count, a non-4-D input or ``H``/``W`` not divisible by ``f``.
        """
        self._check_image(x)
        return self.encoder(x)

    def quantize(self, z_e: Tensor) -> QuantizerOutput:
        """Quantise encodings: ``[B, D, h, w]`` -> :class:`QuantizerOutput` (``quantized`` ``[B, D, h, w]``,
        ``indices`` ``[B, h, w]``)."""
        return self.quantizer(z_e)

    def decode(self, z_q: Tensor) -> Tensor:
        """Decode a (quantised) code map.

        Args:
            z_q: ``[B, D, h, w]``.

        Returns:
            ``[B, C, h*f, w*f]`` reconstruction.

        Raises:
            ValueError: if ``z_q`` is not 4-D with ``D`` channels.
        """
        if z_q.dim() != 4 or z_q.shape[1] != self.config.code_dim:
            raise ValueError(f"z_q must be [B, {self.config.code_dim}, h, w], got shape {tuple(z_q.shape)}")
        return self.decoder(z_q)

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Decode an index map: ``[B, h, w]`` int -> ``[B, C, h*f, w*f]`` (``decode(lookup(indices))``)."""
        return self.decode(self.quantizer.lookup(indices))

    def encode_indices(self, x: Tensor) -> Tensor:
        """Code indices of images: ``[B, C, H, W]`` -> ``[B, H/f, W/f]`` int64."""
        return self.quantizer(self.encode(x)).indices

    def forward(self, x: Tensor) -> VQVAEOutput:
        """Encode, quantise and decode.

        Args:
            x: ``[B, C, H, W]`` with ``H`` and ``W`` divisible by ``config.downsample_factor``.

        Returns:
            :class:`VQVAEOutput`; ``reconstruction`` ``[B, C, H, W]``, ``z_e`` ``[B, D, H/f, W/f]``,
            ``indices`` ``[B, H/f, W/f]``.
        """
        z_e = self.encode(x)
        q = self.quantizer(z_e)
        return VQVAEOutput(
            reconstruction=self.decode(q.quantized),
            z_e=z_e,
            indices=q.indices,
            codebook_loss=q.codebook_loss,
            commitment_loss=q.commitment_loss,
        )
