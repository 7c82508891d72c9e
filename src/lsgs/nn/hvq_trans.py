"""HVQ-Trans: hierarchical vector-quantised transformer for multi-class anomaly detection (Lu et al., NeurIPS 2023).

A frozen backbone's feature maps are aligned to one token grid (the neck), projected to ``hidden_dim`` tokens,
encoded by a transformer whose every intermediate output is kept, vector-quantised level by level with the
codebooks of the sample's class, decoded by a hierarchical transformer decoder (one quantised level per layer)
and projected back to the backbone features by the class's output projection. The anomaly map is the per-token
L2 reconstruction error plus 80 x the prototype-transport score of the lowest level.

What the paper leaves open is decided by the official code (github.com/RuiyingLu/HVQ-Trans). Its README says
the paper's numbers come from ``models/HVQ_TR_switch_OT.py``: ``models/HVQ_TR_switch.py`` plus the transport
score at test time. ``tools/train_val.py`` builds the model as ``HVQ_TR_switch(channel=272, embed_dim=256)``,
i.e. WITHOUT the ``net:`` section of ``experiments/MVTec-AD/config.yaml``, which is a leftover of UniAD; only
the dataset, optimiser and evaluator sections of that config are read. Choices, each with its source:

- neck: backbone maps at strides 2/4/8/16 (EfficientNet-B4 blocks 1, 5, 9, 21: 24 + 32 + 56 + 160 = 272
  channels) resized to the stride-16 grid by bilinear interpolation with ``align_corners=True`` and
  concatenated; no learned layer. Source: ``HVQ_TR_switch_OT.extract_feature`` (``nn.UpsamplingBilinear2d``
  with scale factors 1/8, 1/4, 1/2, 1; that module uses ``align_corners=True``) and ``models/necks/mfcn.py``.
  Here the grid is ``image_size / token_stride`` and each map is resized to that size, which equals the scale
  factor form whenever the maps are the backbone's (tested).
- projection to tokens: a 1x1 ``Conv2d(272, 256)``. Source: ``quantize_conv_t`` (``input_proj`` is unused).
- position embedding: learned, separate row and column tables of ``hidden_dim / 2`` each, initialised
  ``U(0, 1)``, token = ``[column embedding, row embedding]``; added to queries and keys only. Source:
  ``models/transformer.py``, ``PositionEmbeddingLearned``, ``TransformerEncoderLayer.forward_post``.
- encoder: 4 post-norm layers (``nn.MultiheadAttention``, 8 heads, FFN 1024 with ReLU, dropout 0.1), no final
  norm; it returns the projected input tokens and the output of every layer (5 tensors). Source:
  ``TransformerEncoder(return_intermediate=True, return_src=True)``.
- hierarchy: level 0 (top) quantises the last encoder output alone (dimension 256); each lower level quantises
  ``concat(encoder output j, quantised top)`` (dimension 512) for j = 3, 2, 1 and j = 0 (the projected input
  tokens), in that order. The concatenated top is the straight-through output (value = codes, gradient to the
  encoder). Source: ``HVQ_TR_switch_OT.encode``.
- quantiser: 512 codes per codebook, EMA decay 0.99, Laplace epsilon 1e-5, codes initialised ``N(0, 1)`` with
  zero EMA counts and EMA sums equal to the codes; nearest code by squared Euclidean distance; straight-through
  estimator; commitment term ``mean ||sg[e] - z||^2``. Source: ``Quantize``. (With EMA sums starting at the
  codes and counts at 0, the first steps put the codes far from their clusters' means; the transient fades
  over about ``1 / (1 - decay)`` = 100 updates of a class, and a code unused in its class's first update has
  a tiny smoothed size and a huge norm, i.e. stays dead.)
- EMA granularity (deviation, ours): one EMA step per class per training forward on the statistics of all of
  that class's vectors in the batch of all ranks. The official code loops over the samples and makes one step
  per sample (so a class with ``n`` samples in a batch decays by 0.99^n, and its later samples are quantised
  with codebooks already moved by the earlier ones); the two are identical when each class appears at most
  once per batch (tested). Under DDP the official code all-reduces each sample's statistics with the samples of
  the same position on the other ranks whatever their class, mixing classes; here the statistics are
  all-reduced per class.
- switch: one codebook set (5 quantisers) and one output projection ``Linear(512, 272)`` per class, chosen by
  the class index of each sample. Source: ``quantize_list_1..5`` and ``output_proj_list`` (15 each). In
  training mode the projection runs once per class present, so the projections of absent classes get no
  gradient (``None``, as the official per-sample loop leaves them, so AdamW does not move them by momentum);
  in eval mode all projections are stacked and gathered (no data-dependent control flow, exportable).
- decoder: width ``2 * hidden_dim`` = 512, 4 post-norm layers; layer i takes the previous output (layer 0:
  memory 0) for self-attention and memory i for cross-attention, memories = the quantised lower levels in the
  order above; position embedding ``concat(pos, pos)``; a final LayerNorm. No learned queries. Source:
  ``Org_TransformerDecoderLayer``, ``TransformerDecoder_hierachy``.
- neighbour-masked attention and feature jitter (UniAD): listed in the official config (``neighbor_mask
  [7, 7], mask [True, True, True]``; ``feature_jitter scale 20, prob 1``) but NOT used by the official model
  (no mask is passed, no jitter is added), so both are off by default and available as options with UniAD's
  semantics (``zhiyuanyou/UniAD models/reconstructions/uniad.py``): the mask forbids each token to attend to
  its ``7 x 7`` neighbourhood (itself included), in [encoder self-attention, decoder self-attention, decoder
  cross-attention]; the jitter adds ``N(0, 1) * ||x|| / C * scale`` to each token of the neck features with
  probability ``prob`` per batch, in training only, and the clean features stay the target.
- loss: ``MSE(reconstruction, features) + 0.25 * sum over the 5 levels of the commitment term``. Source:
  ``forward`` (``latent_loss_weight``; ``diff`` of ``encode``: per-sample means averaged over the batch, which
  equals the mean over the batch). No other term: the configured ``FeatureMSELoss`` criterion is only used
  for the validation loss, and no transport loss is trained.
- anomaly map: ``sqrt(sum_c (rec - feat)^2)`` per token + 80 x the transport score of the LOWEST level's
  quantiser input (``concat(projected tokens, quantised top)``) against its class codebook (the other levels'
  scores are commented out), bilinearly upsampled (``align_corners=True``) to the image size. Source:
  ``forward`` (``80.0 * ot_score``, ``self.upsample``) and ``OT`` / ``conditional_distribution``; see
  :func:`lsgs.nn.hvq_quantizer.prototype_transport_score` (no Sinkhorn and no EMD are involved). The official
  code computes the score in eval mode only; here every forward returns it (detached; a few percent of the
  cost), so the output has one type in both modes.
- image score: the maximum of the map after a 16 x 16 average pool with stride 1 and no padding. Source:
  ``utils/eval_helper.py``, ``EvalImageMax`` with ``avgpool_size: [16, 16]``.
- initialisation: PyTorch defaults (the config's ``initializer: xavier_uniform`` is never applied to this
  model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lsgs.errors import ConfigError, DataError
from lsgs.nn.hvq_quantizer import SwitchedEMAQuantizer, prototype_transport_score

# Attention sites the neighbour mask can apply to, in the order of ``HVQTransConfig.neighbor_mask`` (UniAD's).
MASK_SITES = ("encoder self-attention", "decoder self-attention", "decoder cross-attention")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class HVQTransConfig:
    """Constructor arguments of :class:`HVQTransNet`; ``dataclasses.asdict`` of it rebuilds the net.

    The defaults are the official model (MVTec AD, 15 classes, EfficientNet-B4 features at 224 x 224).

    Attributes:
        feature_channels: channels of each backbone map, finest first (EfficientNet-B4 blocks 1, 5, 9, 21).
        image_size: ``(H, W)`` of the input images; the anomaly map has this size.
        token_stride: backbone stride of the token grid (the coarsest map's): the grid is
            ``image_size / token_stride`` (14 x 14 for 224 / 16).
        num_classes: number of codebook sets and output projections (one per class).
        hidden_dim: encoder width; the decoder is ``2 * hidden_dim`` wide.
        nhead: attention heads of every layer.
        num_encoder_layers: encoder layers; there are ``num_encoder_layers + 1`` quantised levels.
        num_decoder_layers: decoder layers; must equal ``num_encoder_layers`` (one memory per layer).
        dim_feedforward: FFN hidden width of every layer.
        dropout: dropout of attention weights and residual branches.
        codebook_size: codes per codebook ``K``.
        ema_decay: EMA decay of the codebooks.
        ema_epsilon: Laplace-smoothing constant of the EMA cluster sizes.
        commitment_weight: weight of the summed commitment terms in :func:`hvq_trans_loss`.
        ot_weight: weight of the prototype-transport score in the anomaly map (0 = reconstruction error only).
        feature_jitter_scale: 0 (off, the official model) or UniAD's jitter scale (20 in UniAD's config).
        feature_jitter_prob: probability per training batch of jittering it.
        neighbor_size: ``(h, w)`` neighbourhood each token may not attend to, where masking is on.
        neighbor_mask: masking on/off at each of ``MASK_SITES`` (all off in the official model).
    """

    feature_channels: tuple[int, ...] = (24, 32, 56, 160)
    image_size: tuple[int, int] = (224, 224)
    token_stride: int = 16
    num_classes: int = 15  # MVTec AD categories
    hidden_dim: int = 256
    nhead: int = 8
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    dim_feedforward: int = 1024
    dropout: float = 0.1
    codebook_size: int = 512
    ema_decay: float = 0.99
    ema_epsilon: float = 1e-5
    commitment_weight: float = 0.25
    ot_weight: float = 80.0
    feature_jitter_scale: float = 0.0
    feature_jitter_prob: float = 1.0
    neighbor_size: tuple[int, int] = (7, 7)
    neighbor_mask: tuple[bool, bool, bool] = (False, False, False)

    def __post_init__(self) -> None:
        # YAML / asdict round trips give lists; keep the fields hashable and comparable.
        self.feature_channels = tuple(self.feature_channels)
        self.image_size = tuple(self.image_size)  # type: ignore[assignment]
        self.neighbor_size = tuple(self.neighbor_size)  # type: ignore[assignment]
        self.neighbor_mask = tuple(self.neighbor_mask)  # type: ignore[assignment]
        name = "HVQTransConfig"
        for field in (
            "token_stride", "num_classes", "hidden_dim", "nhead", "num_encoder_layers", "num_decoder_layers",
            "dim_feedforward", "codebook_size",
        ):
            if not _positive_int(getattr(self, field)):
                raise ConfigError(f"{name}.{field} must be a positive int, got {getattr(self, field)!r}")
        for field, length in (("feature_channels", None), ("image_size", 2), ("neighbor_size", 2)):
            value = getattr(self, field)
            if not value or (length is not None and len(value) != length) or not all(map(_positive_int, value)):
                size = "a non-empty sequence" if length is None else f"{length}"
                raise ConfigError(f"{name}.{field} must be {size} positive ints, got {value!r}")
        if len(self.neighbor_mask) != 3 or not all(isinstance(m, bool) for m in self.neighbor_mask):
            raise ConfigError(f"{name}.neighbor_mask must be 3 booleans {MASK_SITES}, got {self.neighbor_mask!r}")
        if any(s % self.token_stride for s in self.image_size):
            raise ConfigError(
                f"{name}.image_size {self.image_size} must be a multiple of token_stride={self.token_stride}"
            )
        if self.hidden_dim % 2:
            raise ConfigError(
                f"{name}.hidden_dim={self.hidden_dim} must be even (row and column position embeddings of half each)"
            )
        if self.hidden_dim % self.nhead:
            raise ConfigError(f"{name}.hidden_dim={self.hidden_dim} must be divisible by nhead={self.nhead}")
        if self.num_decoder_layers != self.num_encoder_layers:
            raise ConfigError(
                f"{name}.num_decoder_layers={self.num_decoder_layers} must equal num_encoder_layers="
                f"{self.num_encoder_layers} (decoder layer i attends to quantised level i)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{name}.dropout must be in [0, 1), got {self.dropout!r}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"{name}.ema_decay must be in (0, 1), got {self.ema_decay!r}")
        if not self.ema_epsilon > 0.0:
            raise ConfigError(f"{name}.ema_epsilon must be > 0, got {self.ema_epsilon!r}")
        for field in ("commitment_weight", "ot_weight", "feature_jitter_scale"):
            if not getattr(self, field) >= 0.0:  # also rejects NaN
                raise ConfigError(f"{name}.{field} must be >= 0, got {getattr(self, field)!r}")
        if not 0.0 <= self.feature_jitter_prob <= 1.0:
            raise ConfigError(f"{name}.feature_jitter_prob must be in [0, 1], got {self.feature_jitter_prob!r}")
        if any(self.neighbor_mask) and bool(neighbor_attention_mask(self.token_grid, self.neighbor_size).all()):
            raise ConfigError(
                f"{name}.neighbor_size {self.neighbor_size} masks the whole {self.token_grid} token grid for some "
                "token; use a smaller neighbourhood or neighbor_mask all false"
            )

    @property
    def token_grid(self) -> tuple[int, int]:
        """``(h, w)`` of the token grid: ``image_size / token_stride``."""
        return (self.image_size[0] // self.token_stride, self.image_size[1] // self.token_stride)

    @property
    def feature_dim(self) -> int:
        """``C``: channels of the aligned (concatenated) features, the reconstruction target."""
        return sum(self.feature_channels)

    @classmethod
    def tiny(cls) -> HVQTransConfig:
        """Two 8-channel maps (8 x 8 and 4 x 4) of a 16 x 16 image, 4 x 4 tokens, 8 codes, 2 classes, no dropout."""
        return cls(
            feature_channels=(8, 8),
            image_size=(16, 16),
            token_stride=4,
            num_classes=2,
            hidden_dim=16,
            nhead=2,
            num_encoder_layers=2,
            num_decoder_layers=2,
            dim_feedforward=32,
            dropout=0.0,
            codebook_size=8,
            neighbor_size=(3, 3),
        )


@dataclass
class HVQTransOutput:
    """Result of :meth:`HVQTransNet.forward`.

    Attributes:
        reconstruction: ``[B, C, h, w]`` reconstructed aligned features.
        features: ``[B, C, h, w]`` aligned backbone features (the neck output, the reconstruction target).
        quant_loss: scalar, the commitment terms ``mean ||sg[e] - z||^2`` summed over the levels (unweighted).
        indices: one ``[B, h, w]`` int64 code map per level: ``indices[0]`` the top level, ``indices[1 + i]``
            the memory of decoder layer ``i``; the last is the lowest level (input tokens + top).
        ot_score: ``[B, h, w]`` prototype-transport score of the lowest level (no gradient).
    """

    reconstruction: Tensor
    features: Tensor
    quant_loss: Tensor
    indices: tuple[Tensor, ...]
    ot_score: Tensor


# A pytree node, so that torch.export (and the ONNX exporter built on it) can return it from ``forward``.
torch.export.register_dataclass(HVQTransOutput)


def align_features(features: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
    """The neck: resize every map to ``size`` (bilinear, ``align_corners=True``) and concatenate the channels.

    Args:
        features: maps ``[B, C_i, H_i, W_i]``.
        size: ``(h, w)`` of the token grid.

    Returns:
        ``[B, sum C_i, h, w]``.
    """
    return torch.cat(
        [f if tuple(f.shape[-2:]) == tuple(size) else F.interpolate(
            f, size=size, mode="bilinear", align_corners=True) for f in features],
        dim=1,
    )


def neighbor_attention_mask(grid: tuple[int, int], neighbor_size: tuple[int, int]) -> Tensor:
    """UniAD's neighbour mask: token ``(i, j)`` may not attend to ``(i', j')`` when ``|i - i'| <= nh // 2`` and
    ``|j - j'| <= nw // 2`` (its neighbourhood, itself included).

    Args:
        grid: ``(h, w)`` token grid.
        neighbor_size: ``(nh, nw)``.

    Returns:
        ``[h * w, h * w]`` bool, True = masked (``nn.MultiheadAttention``'s convention); raster token order.
    """
    h, w = grid
    rows = torch.arange(h).repeat_interleave(w)  # [L] row of each token
    cols = torch.arange(w).repeat(h)  # [L] column of each token
    near_rows = (rows[:, None] - rows[None, :]).abs() <= neighbor_size[0] // 2
    near_cols = (cols[:, None] - cols[None, :]).abs() <= neighbor_size[1] // 2
    return near_rows & near_cols


def add_feature_jitter(features: Tensor, scale: float, prob: float) -> Tensor:
    """UniAD's feature jitter: with probability ``prob`` (one draw per batch) add ``N(0, 1) * ||x|| / C * scale``
    to every token ``x`` (``C`` channels); otherwise return the features unchanged. Uses the global RNG.

    Args:
        features: ``[B, C, h, w]``.
        scale: jitter scale.
        prob: probability of jittering this batch.

    Returns:
        ``[B, C, h, w]``.
    """
    if float(torch.rand(())) > prob:
        return features
    norms = features.norm(dim=1, keepdim=True) / features.shape[1]  # [B, 1, h, w]
    return features + torch.randn_like(features) * norms * scale


class LearnedPositionEmbedding(nn.Module):
    """Learned row and column embeddings of ``dim / 2`` each; token ``(i, j)`` gets ``[col[j], row[i]]``.

    Args:
        grid: ``(h, w)`` token grid.
        dim: embedding width (even).
    """

    def __init__(self, grid: tuple[int, int], dim: int) -> None:
        super().__init__()
        self.grid = grid
        self.row_embed = nn.Embedding(grid[0], dim // 2)
        self.col_embed = nn.Embedding(grid[1], dim // 2)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self) -> Tensor:
        """``[h * w, dim]`` embeddings in raster order."""
        h, w = self.grid
        cols = self.col_embed.weight.unsqueeze(0).expand(h, w, -1)  # [h, w, dim / 2]
        rows = self.row_embed.weight.unsqueeze(1).expand(h, w, -1)  # [h, w, dim / 2]
        return torch.cat([cols, rows], dim=2).reshape(h * w, -1)  # [h, w, dim] -> [L, dim]


class EncoderLayer(nn.Module):
    """Post-norm self-attention layer; the position embedding is added to queries and keys, not values.

    Args:
        dim: width; nhead, dim_feedforward, dropout: as in :class:`HVQTransConfig`.
    """

    def __init__(self, dim: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: Tensor, pos: Tensor, mask: Tensor | None = None) -> Tensor:
        """``[B, L, D] -> [B, L, D]``; ``pos`` ``[L, D]``; ``mask`` ``[L, L]`` bool (True = masked) or None."""
        qk = x + pos
        x = self.norm1(x + self.dropout1(self.self_attn(qk, qk, x, attn_mask=mask, need_weights=False)[0]))
        return self.norm2(x + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class DecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention on ``x``, cross-attention to ``memory``, FFN.

    Args:
        dim: width; nhead, dim_feedforward, dropout: as in :class:`HVQTransConfig`.
    """

    def __init__(self, dim: int, nhead: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, nhead, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        memory: Tensor,
        pos: Tensor,
        self_mask: Tensor | None = None,
        cross_mask: Tensor | None = None,
    ) -> Tensor:
        """``x`` and ``memory`` ``[B, L, D]`` -> ``[B, L, D]``; ``pos`` ``[L, D]``; masks ``[L, L]`` or None."""
        qk = x + pos
        x = self.norm1(x + self.dropout1(self.self_attn(qk, qk, x, attn_mask=self_mask, need_weights=False)[0]))
        attended = self.cross_attn(x + pos, memory + pos, memory, attn_mask=cross_mask, need_weights=False)[0]
        x = self.norm2(x + self.dropout2(attended))
        return self.norm3(x + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class HVQTransNet(nn.Module):
    """HVQ-Trans on backbone feature maps: ``forward(features, class_index)`` -> :class:`HVQTransOutput`.

    Args:
        config: sizes and options; ``HVQTransConfig()`` is the official model.

    Attributes:
        input_proj: 1x1 conv ``C -> hidden_dim``.
        pos_embed: :class:`LearnedPositionEmbedding` of ``hidden_dim``.
        encoder_layers: ``num_encoder_layers`` :class:`EncoderLayer`.
        quantizers: ``num_encoder_layers + 1`` :class:`SwitchedEMAQuantizer`; ``[0]`` the top level
            (``hidden_dim``), ``[1 + i]`` the memory of decoder layer ``i`` (``2 * hidden_dim``).
        decoder_layers: ``num_decoder_layers`` :class:`DecoderLayer` of ``2 * hidden_dim``.
        decoder_norm: final LayerNorm of the decoder.
        output_projections: ``num_classes`` ``Linear(2 * hidden_dim, C)``.
    """

    def __init__(self, config: HVQTransConfig) -> None:
        super().__init__()
        self.config = config
        hidden, wide = config.hidden_dim, 2 * config.hidden_dim
        self.input_proj = nn.Conv2d(config.feature_dim, hidden, kernel_size=1)
        self.pos_embed = LearnedPositionEmbedding(config.token_grid, hidden)
        self.encoder_layers = nn.ModuleList(
            EncoderLayer(hidden, config.nhead, config.dim_feedforward, config.dropout)
            for _ in range(config.num_encoder_layers)
        )
        self.quantizers = nn.ModuleList(
            SwitchedEMAQuantizer(
                config.num_classes, config.codebook_size, hidden if level == 0 else wide,
                config.ema_decay, config.ema_epsilon,
            )
            for level in range(config.num_encoder_layers + 1)
        )
        self.decoder_layers = nn.ModuleList(
            DecoderLayer(wide, config.nhead, config.dim_feedforward, config.dropout)
            for _ in range(config.num_decoder_layers)
        )
        self.decoder_norm = nn.LayerNorm(wide)
        self.output_projections = nn.ModuleList(
            nn.Linear(wide, config.feature_dim) for _ in range(config.num_classes)
        )
        # Non-persistent: derived from the config, so checkpoints do not depend on whether masking is on.
        self.register_buffer(
            "attention_mask", neighbor_attention_mask(config.token_grid, config.neighbor_size), persistent=False
        )

    # ------------------------------------------------------------------------------------------ pieces
    def _mask(self, site: int) -> Tensor | None:
        return self.attention_mask if self.config.neighbor_mask[site] else None

    def check_inputs(self, features: Sequence[Tensor], class_index: Tensor) -> Tensor:
        """Validate the inputs (skipped while tracing or exporting) and return ``class_index`` as int64.

        Raises:
            DataError: wrong number, channels or grid of the maps; ``class_index`` not ``[B]`` integers in
                ``[0, num_classes)``.
        """
        exporting = getattr(torch.compiler, "is_exporting", lambda: False)()  # torch >= 2.6
        if torch.jit.is_tracing() or exporting or torch.onnx.is_in_onnx_export():
            return class_index.long()
        cfg = self.config
        channels = tuple(f.shape[1] for f in features)
        if channels != cfg.feature_channels:
            raise DataError(
                f"HVQ-Trans got backbone maps with channels {channels} but HVQTransConfig.feature_channels is "
                f"{cfg.feature_channels}; set it to the backbone's"
            )
        if tuple(features[-1].shape[-2:]) != cfg.token_grid:
            raise DataError(
                f"HVQ-Trans: the coarsest backbone map is {tuple(features[-1].shape[-2:])} but image_size "
                f"{cfg.image_size} / token_stride {cfg.token_stride} gives a {cfg.token_grid} token grid; set "
                "HVQTransConfig.image_size to the input size"
            )
        batch = features[0].shape[0]
        if class_index.shape != (batch,) or class_index.dtype.is_floating_point or class_index.dtype == torch.bool:
            raise DataError(
                f"class_index must be a [B] = [{batch}] integer tensor, got shape {tuple(class_index.shape)} "
                f"dtype {class_index.dtype}"
            )
        if batch and not (int(class_index.min()) >= 0 and int(class_index.max()) < cfg.num_classes):
            raise DataError(
                f"class_index holds values in [{int(class_index.min())}, {int(class_index.max())}] but "
                f"HVQTransConfig.num_classes={cfg.num_classes}; set num_classes to the number of categories"
            )
        return class_index.long()

    def encode(self, tokens: Tensor) -> list[Tensor]:
        """Encoder outputs, input first.

        Args:
            tokens: ``[B, L, hidden_dim]`` projected tokens.

        Returns:
            ``num_encoder_layers + 1`` tensors ``[B, L, hidden_dim]``: the tokens, then each layer's output.
        """
        pos = self.pos_embed()
        outputs = [tokens]
        for layer in self.encoder_layers:
            outputs.append(layer(outputs[-1], pos, self._mask(0)))
        return outputs

    def quantize(
        self, encoded: list[Tensor], class_index: Tensor
    ) -> tuple[list[Tensor], list[Tensor], Tensor, Tensor]:
        """Hierarchical quantisation with each sample's class codebooks.

        Args:
            encoded: output of :meth:`encode`.
            class_index: ``[B]`` int64.

        Returns:
            ``(memories, indices, quant_loss, ot_score)``: ``num_encoder_layers`` memories ``[B, L, 2 *
            hidden_dim]`` (decoder order: ``concat(encoded[-2 - i], top)`` for memory ``i``), one ``[B, L]`` index
            map per level (top first), the summed commitment terms, and the ``[B, L]`` transport score of the
            last (lowest) level.
        """
        top = self.quantizers[0](encoded[-1], class_index)
        memories, indices, loss = [], [top.indices], top.commitment_loss
        lowest_input, lowest = encoded[-1], top  # replaced in the loop (at least one encoder layer)
        for i, quantizer in enumerate(self.quantizers[1:]):
            lowest_input = torch.cat([encoded[-2 - i], top.quantized], dim=2)  # [B, L, 2 * hidden_dim]
            lowest = quantizer(lowest_input, class_index)
            memories.append(lowest.quantized)
            indices.append(lowest.indices)
            loss = loss + lowest.commitment_loss
        return memories, indices, loss, prototype_transport_score(lowest_input, lowest.codebooks)

    def decode(self, memories: list[Tensor]) -> Tensor:
        """Hierarchical decoder: layer ``i`` attends to itself and to ``memories[i]``; starts from ``memories[0]``.

        Args:
            memories: ``num_decoder_layers`` tensors ``[B, L, 2 * hidden_dim]``.

        Returns:
            ``[B, L, 2 * hidden_dim]`` (after the final LayerNorm).
        """
        pos = self.pos_embed()
        pos = torch.cat([pos, pos], dim=1)  # [L, 2 * hidden_dim]
        x = memories[0]
        for layer, memory in zip(self.decoder_layers, memories, strict=True):
            x = layer(x, memory, pos, self._mask(1), self._mask(2))
        return self.decoder_norm(x)

    def project(self, decoded: Tensor, class_index: Tensor) -> Tensor:
        """Each sample's class output projection.

        Args:
            decoded: ``[B, L, 2 * hidden_dim]``.
            class_index: ``[B]`` int64.

        Returns:
            ``[B, L, C]``.
        """
        if self.training:
            # One call per class present, so absent classes' projections get no gradient at all (grad None:
            # the optimiser leaves them alone, as with the official per-sample loop).
            parts, rows = [], []
            for c in class_index.unique().tolist():
                rows.append((class_index == c).nonzero().flatten())
                parts.append(self.output_projections[c](decoded[rows[-1]]))  # [B_c, L, C]
            return torch.cat(parts)[torch.argsort(torch.cat(rows))]  # grouped by class -> batch order
        weight = torch.stack([p.weight for p in self.output_projections])[class_index]  # [B, C, 2 * hidden_dim]
        bias = torch.stack([p.bias for p in self.output_projections])[class_index]  # [B, C]
        return torch.baddbmm(bias.unsqueeze(1), decoded, weight.transpose(1, 2))  # [B, L, C]

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, features: Sequence[Tensor], class_index: Tensor) -> HVQTransOutput:
        """Reconstruct the aligned backbone features of each sample with its class's codebooks and projection.

        In training mode the codebooks of the classes in the batch take one EMA step (all-reduced under DDP).

        Args:
            features: backbone maps ``[B, C_i, H_i, W_i]``, finest first; channels ``feature_channels``, the
                last (coarsest) at the token grid ``image_size / token_stride``.
            class_index: ``[B]`` integer class of each sample in ``[0, num_classes)``.

        Returns:
            :class:`HVQTransOutput`.

        Raises:
            DataError: see :meth:`check_inputs`.
        """
        class_index = self.check_inputs(features, class_index)
        cfg = self.config
        h, w = cfg.token_grid
        aligned = align_features(features, (h, w))  # [B, C, h, w]
        jittered = aligned
        if self.training and cfg.feature_jitter_scale > 0:
            jittered = add_feature_jitter(aligned, cfg.feature_jitter_scale, cfg.feature_jitter_prob)
        tokens = self.input_proj(jittered).flatten(2).transpose(1, 2)  # [B, hidden, h, w] -> [B, L, hidden]
        memories, indices, quant_loss, ot_score = self.quantize(self.encode(tokens), class_index)
        rec_tokens = self.project(self.decode(memories), class_index)  # [B, L, C]
        batch = aligned.shape[0]
        reconstruction = rec_tokens.transpose(1, 2).reshape(batch, -1, h, w)  # [B, L, C] -> [B, C, h, w]
        return HVQTransOutput(
            reconstruction=reconstruction,
            features=aligned,
            quant_loss=quant_loss,
            indices=tuple(i.reshape(batch, h, w) for i in indices),  # [B, L] -> [B, h, w]
            ot_score=ot_score.reshape(batch, h, w),  # [B, L] -> [B, h, w]
        )

    def loss(self, output: HVQTransOutput) -> Tensor:
        """:func:`hvq_trans_loss` with this net's ``commitment_weight``."""
        return hvq_trans_loss(output, self.config.commitment_weight)

    def anomaly_map(self, output: HVQTransOutput) -> Tensor:
        """:func:`hvq_anomaly_map` at this net's ``image_size`` with its ``ot_weight``: ``[B, 1, H, W]``."""
        return hvq_anomaly_map(output, self.config.image_size, self.config.ot_weight)


def hvq_trans_loss(output: HVQTransOutput, commitment_weight: float = 0.25) -> Tensor:
    """Training loss: ``MSE(reconstruction, features) + commitment_weight * quant_loss``.

    Args:
        output: :class:`HVQTransOutput` of a training forward.
        commitment_weight: weight of the summed commitment terms (official: 0.25).

    Returns:
        Scalar tensor.
    """
    return F.mse_loss(output.reconstruction, output.features) + commitment_weight * output.quant_loss


def hvq_anomaly_map(output: HVQTransOutput, image_size: tuple[int, int], ot_weight: float = 80.0) -> Tensor:
    """Anomaly map: per-token ``||rec - feat||_2`` over channels + ``ot_weight`` x transport score, upsampled.

    Args:
        output: :class:`HVQTransOutput`.
        image_size: ``(H, W)`` of the map.
        ot_weight: weight of :attr:`HVQTransOutput.ot_score` (official: 80; 0 = reconstruction error only).

    Returns:
        ``[B, 1, H, W]`` fp32, bilinear with ``align_corners=True`` from the ``[B, 1, h, w]`` token map.
    """
    diff = output.reconstruction.float() - output.features.float()  # fp32 also after bf16 autocast
    score = diff.pow(2).sum(dim=1, keepdim=True).sqrt() + ot_weight * output.ot_score.unsqueeze(1)  # [B, 1, h, w]
    return F.interpolate(score, size=tuple(image_size), mode="bilinear", align_corners=True)


def hvq_image_score(maps: Tensor, avgpool_size: tuple[int, int] = (16, 16)) -> Tensor:
    """Image score of the official evaluator (``max`` with ``avgpool_size``): the maximum of the map after an
    average pool of ``avgpool_size`` with stride 1 and no padding.

    Args:
        maps: ``[B, 1, H, W]`` anomaly maps.
        avgpool_size: pooling window ``(kh, kw)``, at most ``(H, W)``.

    Returns:
        ``[B]`` scores.

    Raises:
        ConfigError: when the window is larger than the map.
    """
    if avgpool_size[0] > maps.shape[-2] or avgpool_size[1] > maps.shape[-1]:
        raise ConfigError(
            f"avgpool_size {tuple(avgpool_size)} is larger than the {tuple(maps.shape[-2:])} anomaly map; use a "
            "window of at most the map size"
        )
    return F.avg_pool2d(maps, kernel_size=tuple(avgpool_size), stride=1).flatten(1).amax(dim=1)
