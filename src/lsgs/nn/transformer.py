"""Transformer prior over VQ-VAE code maps (pure torch, nanoGPT-style).

The VQ-VAE turns an image into an ``h x w`` map of codebook indices; flattened in raster order it is a
sequence of ``L = h * w`` tokens over a vocabulary of ``K`` codes. ``CodeTransformer`` models their prior:

* ``attention="global"`` (the method, paper §2.2): bidirectional attention over all codes; ``logits[:, i]``
  models ``p(s_i | s)``, trained with tampering (``tamper_codes`` + ``tampering_loss``) so that it models
  ``p(s_i | s_{!=i})`` rather than copying its input.
* ``attention="causal"`` (the paper's ablation, as in Pinaya et al. / Naval Marimont & Tarroni): the input is
  shifted right behind a learned start token, so ``logits[:, i]`` models ``p(s_i | s_<i)``; trained with plain
  next-code cross-entropy. ``decode_step`` + ``KVCache`` decode it one position at a time.

Classes come in dependency order (config, KV cache, attention, MLP, block, model), then the loss helpers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lsgs.errors import ConfigError
from lsgs.nn.tracing import is_tracing

ATTENTION_TYPES = ("global", "causal")


@dataclass
class CodeTransformerConfig:
    """Sizes of a ``CodeTransformer``. The defaults are a CPU-sized model; ``paper()`` gives the paper's.

    ``vocab_size`` and ``seq_len`` must be read from the VQ-VAE (codebook size, ``h * w`` of its code grid),
    never retyped. Invalid values raise ``ConfigError`` (a ``ValueError``) naming the field and the value.
    """

    vocab_size: int  # K, the VQ-VAE codebook size
    seq_len: int = 256  # h * w of the code map: 16 x 16 for 128 x 128 images and downsampling 8
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0  # on embeddings, attention weights and residual branches; the paper gives no value
    attention: str = "global"  # "global" (bidirectional, the method) | "causal" (raster-order autoregressive)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "d_model", "n_layers", "n_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"CodeTransformerConfig.{name} must be a positive int, got {value!r}")
        if self.vocab_size < 2:
            raise ConfigError(f"CodeTransformerConfig.vocab_size must be >= 2 codes, got {self.vocab_size}")
        if self.attention not in ATTENTION_TYPES:
            raise ConfigError(
                f"CodeTransformerConfig.attention must be one of {ATTENTION_TYPES}, got {self.attention!r}"
            )
        if self.d_model % self.n_heads != 0:
            raise ConfigError(
                f"CodeTransformerConfig.d_model ({self.d_model}) must be divisible by n_heads "
                f"({self.n_heads})"
            )
        if not self.mlp_ratio > 0 or round(self.d_model * self.mlp_ratio) < 1:
            raise ConfigError(
                f"CodeTransformerConfig.mlp_ratio must give an MLP width >= 1, got {self.mlp_ratio}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"CodeTransformerConfig.dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def paper(
        cls, vocab_size: int = 1024, seq_len: int = 256, attention: str = "global"
    ) -> CodeTransformerConfig:
        """Paper size (§3.1): 12 layers of width 768; 12 heads of 64 as in GPT-2 small (heads not stated)."""
        return cls(
            vocab_size=vocab_size, seq_len=seq_len, d_model=768, n_layers=12, n_heads=12, attention=attention
        )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def mlp_hidden(self) -> int:
        return round(self.d_model * self.mlp_ratio)


class KVCache:
    """Keys and values of the positions decoded so far, per layer, for incremental causal decoding.

    Buffers of ``[R, n_heads, seq_len, head_dim]`` are allocated on the first write, in the dtype and on the
    device of the keys (so autocast works), and filled one position per ``CodeTransformer.decode_step``.
    Memory: ``2 * n_layers * R * seq_len * d_model`` elements, e.g. 1.1 GB in fp32 for the paper size with
    R = 60 sequences (4 images x 15 restorations).
    """

    def __init__(self, n_layers: int, seq_len: int) -> None:
        self.seq_len = seq_len
        self.length = 0  # positions already decoded
        self.keys: list[Tensor | None] = [None] * n_layers
        self.values: list[Tensor | None] = [None] * n_layers

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k, v`` [R, nh, 1, hs] at position ``length``; return all so far [R, nh, length + 1, hs]."""
        if self.keys[layer] is None:
            shape = (k.shape[0], k.shape[1], self.seq_len, k.shape[3])
            self.keys[layer] = k.new_empty(shape)
            self.values[layer] = v.new_empty(shape)
        keys, values = self.keys[layer], self.values[layer]
        t = self.length
        keys[:, :, t : t + 1] = k
        values[:, :, t : t + 1] = v
        return keys[:, :, : t + 1], values[:, :, : t + 1]


class SelfAttention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` (fused, no [L, L] tensor)."""

    def __init__(self, config: CodeTransformerConfig, layer: int) -> None:
        super().__init__()
        self.n_heads = config.n_heads
        self.layer = layer
        self.causal = config.attention == "causal"
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """[B, T, C] -> [B, T, C]; with a cache, T == 1 and earlier keys/values come from the cache."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)
        is_causal = self.causal
        if cache is not None:
            # One new query that may see every cached position (all earlier), so no mask is needed.
            assert T == 1, "incremental decoding feeds one position at a time"
            k, v = cache.append(self.layer, k, v)  # (B, nh, t+1, hs)
            is_causal = False
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal)  # (B,nh,T,hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: Linear -> GELU -> Linear."""

    def __init__(self, config: CodeTransformerConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.mlp_hidden)
        self.proj = nn.Linear(config.mlp_hidden, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """[B, T, C] -> [B, T, C]."""
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, config: CodeTransformerConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = SelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """[B, T, C] -> [B, T, C]."""
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class CodeTransformer(nn.Module):
    """Transformer prior over code sequences; see the module docstring for the two attention types.

    Args:
        config: sizes; stored as ``self.config`` so a checkpoint can rebuild the model from
            ``dataclasses.asdict(config)``.
    """

    def __init__(self, config: CodeTransformerConfig) -> None:
        super().__init__()
        self.config = config
        # The causal model has one extra embedding row, index K, for the start token it reads at position 0.
        n_embeddings = config.vocab_size + (1 if config.attention == "causal" else 0)
        self.tok_emb = nn.Embedding(n_embeddings, config.d_model)
        self.pos_emb = nn.Embedding(config.seq_len, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        # Not tied to tok_emb (unlike GPT-2): the causal table has K+1 rows; the head is <1% of parameters.
        self.head = nn.Linear(config.d_model, config.vocab_size)
        self.apply(self._init_weights)
        # GPT-2: residual projections get std 0.02/sqrt(2 * n_layers) so the residual stream's variance does
        # not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def start_token(self) -> int:
        """Embedding index of the causal model's start token (``K``)."""
        return self.config.vocab_size

    def forward(self, codes: Tensor) -> Tensor:
        """Logits of every position.

        Args:
            codes: [B, L] integer codes in ``[0, K)``, ``L == config.seq_len``.

        Returns:
            [B, L, K] logits. Global: ``logits[:, i]`` models ``p(s_i | s)``. Causal: ``p(s_i | s_<i)``.
        """
        self._check_codes(codes, "codes")
        tokens = codes = codes.long()
        if self.config.attention == "causal":
            start = codes.new_full((codes.shape[0], 1), self.start_token)
            tokens = torch.cat([start, codes[:, :-1]], dim=1)  # (B, L): start token, s_0 .. s_{L-2}
        positions = torch.arange(tokens.shape[1], device=codes.device)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(positions))  # (B, L, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # (B, L, K)

    def new_kv_cache(self) -> KVCache:
        """An empty cache for ``decode_step`` (causal models only)."""
        if self.config.attention != "causal":
            raise ValueError(
                "incremental decoding needs a causal CodeTransformer, this one has "
                f"attention={self.config.attention!r}"
            )
        return KVCache(self.config.n_layers, self.config.seq_len)

    def decode_step(self, tokens: Tensor, cache: KVCache) -> Tensor:
        """Logits of position ``t = cache.length`` given the codes before it; advances the cache by one.

        Calling this for t = 0..L-1 gives the same logits as ``forward`` on the finished sequence (up to float
        rounding) at the cost of one forward pass in total, so a sampler may change ``s_t`` before feeding it.

        Args:
            tokens: [R] the input token of position t for each of R sequences: ``start_token`` (K) at t = 0,
                the code ``s_{t-1}`` in ``[0, K)`` afterwards (the same right shift as ``forward``).
            cache: from ``new_kv_cache()``; holds the keys/values of positions < t of the same R sequences.

        Returns:
            [R, K] logits of ``p(s_t | s_<t)``.
        """
        if self.config.attention != "causal":
            raise ValueError(
                f"decode_step needs a causal CodeTransformer, not attention={self.config.attention!r}"
            )
        t = cache.length
        if t >= self.config.seq_len:
            raise ValueError(f"the KV cache is full: all {self.config.seq_len} positions are already decoded")
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be [R], got shape {tuple(tokens.shape)}")
        if t == 0 and not bool((tokens == self.start_token).all()):
            raise ValueError(f"at position 0 every token must be the start token {self.start_token}")
        if t > 0:
            check_code_range(tokens, self.config.vocab_size, f"tokens at position {t}")
        x = self.drop(self.tok_emb(tokens.long()) + self.pos_emb.weight[t]).unsqueeze(1)  # (R, 1, C)
        for block in self.blocks:
            x = block(x, cache)
        cache.length += 1
        return self.head(self.ln_f(x[:, 0]))  # (R, K)

    def _check_codes(self, codes: Tensor, name: str) -> None:
        if codes.dim() != 2 or codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor [B, L], got {codes.dtype} {codes.shape}")
        if codes.shape[1] != self.config.seq_len:
            raise ValueError(
                f"{name} has sequence length {codes.shape[1]}, the model was built for "
                f"seq_len={self.config.seq_len}"
            )
        check_code_range(codes, self.config.vocab_size, name)


def check_code_range(codes: Tensor, vocab_size: int, name: str = "codes") -> None:
    """Raise ``ValueError`` if a code is outside ``[0, vocab_size)`` (``nn.Embedding`` fails obscurely).

    Skipped while a graph is recorded (``lsgs.nn.tracing.is_tracing``): the check reads the codes' values.
    """
    if is_tracing():
        return
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= vocab_size):
        raise ValueError(
            f"{name} must lie in [0, {vocab_size}), got values in [{int(codes.min())}, {int(codes.max())}]"
        )


def tamper_codes(
    codes: Tensor, vocab_size: int, ratio: float = 0.1, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Replace ``round(ratio * L)`` random positions of every sequence by random other codes (paper §2.2).

    The positions are drawn independently per sample, without repetition. Each replacement is drawn uniformly
    from the ``K - 1`` codes different from the original, so every position in the mask really is changed (a
    "replacement" by the same code would be an untampered position counted as tampered).

    Args:
        codes: [B, L] integer codes in ``[0, vocab_size)``.
        vocab_size: K, at least 2.
        ratio: fraction of positions to tamper, in [0, 1]; Python ``round`` (half to even) gives the count.
        generator: for reproducible draws; on the device of ``codes``.

    Returns:
        ``(tampered [B, L] int64, tampered_mask [B, L] bool)``; ``tampered_mask.sum(1) == round(ratio * L)``.
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must be [B, L], got shape {tuple(codes.shape)}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2 to replace a code by a different one, got {vocab_size}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    check_code_range(codes, vocab_size)
    B, L = codes.shape
    n_tampered = round(ratio * L)
    codes = codes.long()
    # A random permutation per row: the first n_tampered entries of argsort(uniform noise).
    noise = torch.rand(B, L, generator=generator, device=codes.device)
    positions = noise.argsort(dim=1)[:, :n_tampered]  # (B, n)
    mask = torch.zeros(B, L, dtype=torch.bool, device=codes.device)
    mask.scatter_(1, positions, True)
    # Uniform over the K-1 other codes: draw from [0, K-1) and skip over the original.
    original = codes.gather(1, positions)
    replacement = torch.randint(0, vocab_size - 1, (B, n_tampered), generator=generator, device=codes.device)
    replacement = replacement + (replacement >= original).long()
    return codes.scatter(1, positions, replacement), mask


LOSS_REDUCTIONS = ("sum", "mean")


def tampering_loss(
    logits: Tensor, targets: Tensor, tampered_mask: Tensor, beta: float = 0.01, reduction: str = "mean"
) -> Tensor:
    """The paper's "abnormally focal" loss (eq. 6): ``(1 - beta) * CE(tampered) + beta * CE(untampered)``.

    ``reduction="sum"`` is Eq. 6 as written: per image, the CE summed over its tampered positions and over its
    untampered positions, ``(1 - beta) * sum_T CE + beta * sum_U CE``; these per-image sums are averaged over the
    batch, so the loss does not grow with the batch size or the number of DDP ranks. No further normaliser is
    needed for a stable learning rate: AdamW divides each gradient by its running RMS, so a constant factor in
    the loss (here about L, the sequence length) does not change the step size. What ``sum`` changes is the
    balance of the two terms: with L = 256, ratio 0.1 and beta = 0.01, the untampered term weighs
    ``0.01 * 230 / (0.99 * 26)`` ~ 9% of the tampered one.
    ``reduction="mean"``: means over the respective positions (pooled over the batch), so each term is an
    average CE and the untampered term weighs ``beta / (1 - beta)`` ~ 1% of the tampered one. A term over an
    empty set of positions (ratio 0 or 1) counts as 0 in both.

    Args:
        logits: [B, L, K] model output on the tampered sequence.
        targets: [B, L] original (untampered) codes.
        tampered_mask: [B, L] bool, True where the input was tampered.
        beta: weight of the untampered term, in [0, 1] (paper: 0.01).
        reduction: ``sum`` (paper Eq. 6, per image, averaged over the batch) or ``mean``.

    Returns:
        Scalar loss (float32).
    """
    if logits.dim() != 3 or targets.shape != logits.shape[:2] or tampered_mask.shape != targets.shape:
        raise ValueError(
            f"expected logits [B, L, K], targets [B, L] and tampered_mask [B, L], got {tuple(logits.shape)}, "
            f"{tuple(targets.shape)} and {tuple(tampered_mask.shape)}"
        )
    if tampered_mask.dtype != torch.bool:
        raise ValueError(f"tampered_mask must be a bool tensor, got {tampered_mask.dtype}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    check_reduction(reduction)
    check_code_range(targets, logits.shape[-1], "targets")
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets.long(), reduction="none")  # (B, L)
    tampered = tampered_mask.to(ce.dtype)
    if reduction == "sum":
        per_image = (1.0 - beta) * (ce * tampered).sum(1) + beta * (ce * (1.0 - tampered)).sum(1)  # (B,)
        return per_image.mean()
    n_tampered = tampered.sum()
    n_clean = tampered.numel() - n_tampered
    ce_tampered = (ce * tampered).sum() / n_tampered.clamp_min(1)
    ce_clean = (ce * (1.0 - tampered)).sum() / n_clean.clamp_min(1)
    return (1.0 - beta) * ce_tampered + beta * ce_clean


def next_code_loss(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """Plain cross-entropy of the causal model: ``sum`` = per-image sum over positions averaged over the batch
    (the same convention as ``tampering_loss``), ``mean`` = mean over all positions.

    Args:
        logits: [B, L, K]; targets: [B, L].

    Returns:
        Scalar loss (float32).
    """
    check_reduction(reduction)
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets.long(), reduction="none")  # (B, L)
    return ce.sum(1).mean() if reduction == "sum" else ce.mean()


def check_reduction(reduction: str) -> None:
    if reduction not in LOSS_REDUCTIONS:
        raise ConfigError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {reduction!r}")
