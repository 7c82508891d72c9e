"""Stage 5: LSGS scoring, the restoration-based scorer (``ScoringModule``) on the evaluation harness.

``ScoringModule`` is the LSGS method: it subclasses ``lsgs.evaluation.AnomalyMapModule``, which does the
calibration, metrics and output files for every method alike. ``ScoringCache`` memoises what its scoring options
do not change (``lsgs study scoring``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from typing_extensions import override

from lsgs.checkpoints import require_checkpoint, state_fingerprint
from lsgs.contracts import categories_of
from lsgs.errors import CheckpointError, ConfigError
from lsgs.evaluation import AnomalyMapModule
from lsgs.metrics import ScoreQuantile
from lsgs.modules.transformer import load_code_transformer
from lsgs.modules.vqvae import VQVAE
from lsgs.nn.export import (
    CODES,
    DECODED,
    EXAMPLE_BATCH,
    IMAGES,
    LOGITS,
    MAP,
    RUNTIME_MAP,
    RUNTIME_RESTORATION,
    ExportGraph,
    MethodExport,
    VQVAEDecoderGraph,
    VQVAEEncoderGraph,
    VQVAEReconstructionMapGraph,
)
from lsgs.nn.restoration import (
    MAP_REFERENCES,
    code_nll,
    image_noise_seeds,
    per_image_uniforms,
    reconstruction_error_map,
    restoration_score_map,
    restore_causal,
    restore_global,
)
from lsgs.options import Check, check_options, fraction, integer, number, one_of

NLL_THRESHOLD_SCOPES = ("all", "category")
# The checks of ScoringModule's own options (its harness options are AnomalyMapModule's); with those, the keys of
# an ``lsgs study scoring`` grid.
SCORING_OPTIONS: dict[str, Check] = {
    "map_reference": one_of(MAP_REFERENCES),
    "reconstruction_weight": number(0.0),
    "nll_quantile": fraction(),
    "nll_threshold": number(0.0, unit="nats", null="the nll_quantile of validation normals"),
    "nll_threshold_scope": one_of(NLL_THRESHOLD_SCOPES),
    "num_restorations": integer(minimum=1),
    "softmax_k": number(0.0, strict=True),
    "temperature": number(0.0, strict=True),
    "seed": integer(),
}
# The options the decoded restorations depend on (``ScoringCache`` shares them between settings that agree on these).
RESTORATION_OPTIONS = ("nll_threshold", "nll_quantile", "nll_threshold_scope", "num_restorations", "temperature",
                       "seed")  # fmt: skip


class ScoringCache:
    """Memo of the parts of ``ScoringModule``'s maps that its scoring options do not change.

    ``lsgs study scoring`` re-scores one run under many settings; with a cache attached (``module.cache``), the
    codes, transformer logits and ``X_hat`` of a batch are computed once for all settings, and the decoded
    restorations once per restoration setting (thresholds, n, temperature, seed). Entries are keyed by the batch's
    image paths and slice indices, so they are only reused for the very same batch; the values are what the
    module would compute, so a cached run gives exactly the uncached numbers.

    Memory: ``N * (L * K + C * H * W) * 4`` bytes for the base entries of N images (always kept), plus at most
    ``max_restoration_bytes`` of decoded restorations (oldest evicted first; ``N * n * C * H * W * 4`` bytes
    per restoration setting).
    """

    def __init__(self, max_restoration_bytes: int = 2 * 2**30) -> None:
        self.max_restoration_bytes = max_restoration_bytes
        self.base: dict[Any, Any] = {}
        self.restorations: OrderedDict[Any, torch.Tensor] = OrderedDict()
        self.restoration_bytes = 0
        self.hits = 0

    def get_base(self, key: Any, compute: Callable[[], Any]) -> Any:
        if key not in self.base:
            self.base[key] = compute()
        else:
            self.hits += 1
        return self.base[key]

    def get_restorations(self, key: Any, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key in self.restorations:
            self.hits += 1
            return self.restorations[key]
        value = compute()
        size = value.numel() * value.element_size()
        while self.restorations and self.restoration_bytes + size > self.max_restoration_bytes:
            _, old = self.restorations.popitem(last=False)
            self.restoration_bytes -= old.numel() * old.element_size()
        if size <= self.max_restoration_bytes:
            self.restorations[key] = value
            self.restoration_bytes += size
        return value


class ScoringModule(AnomalyMapModule):
    """LSGS scoring: restoration of implausible codes by the transformer, restoration error as anomaly map.

    For a test image X with codes s: the transformer gives -log p(s_i | context) per position; positions above the
    NLL threshold are resampled ``num_restorations`` times; ``X_hat`` (the decoded original codes) and the
    restorations ``Y_1..Y_n`` are decoded; the map is ``AS = Σ_i w_i |R - Y_i| + λ |X - X_hat|`` (means over
    channels), ``w = softmax_i(k / mean|R - Y_i|)``, with the reference ``R = X_hat`` (paper Eq. 7) or ``R = X``.
    Without a transformer (``transformer_checkpoint=None``, the "w/o" row of Table 4) the map is the VQ-VAE
    reconstruction error ``|X - X_hat|`` and ``map_reference`` / ``reconstruction_weight`` have no effect.

    Args:
        vqvae_checkpoint: the (fine-tuned) VQ-VAE.
        transformer_checkpoint: the transformer trained on that VQ-VAE's codes; None = no transformer.
        num_restorations: n >= 1 (default 15).
        nll_quantile: quantile of validation-normal code NLLs used as the resampling threshold (default 0.9);
            used when ``nll_threshold`` is None.
        nll_threshold: a fixed resampling threshold in nats (>= 0; ``inf`` resamples nothing) instead of the
            validation quantile; then no NLL calibration pass runs and ``nll_threshold_scope`` has no effect.
        nll_threshold_scope: ``all``: one quantile over the validation normals of every category pooled;
            ``category``: each test image uses the quantile of its own category's validation normals (a test
            category without validation normals is a ``ConfigError``).
        map_reference: ``reconstruction`` (``|X_hat - Y_i|``, paper Eq. 7, default) or ``input``
            (``|X - Y_i|``, as Naval Marimont & Tarroni's code); the softmax weights use the same reference:
            ``k / mean|X - Y_i|`` for ``input``, as in that code.
        reconstruction_weight: λ >= 0, weight of the VQ-VAE reconstruction error ``|X - X_hat|`` added to the
            map (default 0: the paper's map).
        softmax_k: k > 0 of the restoration weights (default 3).
        temperature: sampling temperature (> 0) of the resampling distribution.
        seed: seed of the resampling (per image, from its dataset index, so DDP sharding does not matter).
        **kwargs: the harness arguments of ``AnomalyMapModule``.
    """

    method_name = "lsgs"
    option_checks: ClassVar[dict[str, Check]] = {**SCORING_OPTIONS, **AnomalyMapModule.option_checks}

    def __init__(
        self,
        vqvae_checkpoint: str | None = None,
        transformer_checkpoint: str | None = None,
        num_restorations: int = 15,
        nll_quantile: float = 0.9,
        nll_threshold: float | None = None,
        nll_threshold_scope: str = "all",
        map_reference: str = "reconstruction",
        reconstruction_weight: float = 0.0,
        softmax_k: float = 3.0,
        temperature: float = 1.0,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        require_checkpoint(vqvae_checkpoint, "model.vqvae_checkpoint")
        check_options(SCORING_OPTIONS, locals())
        self.save_hyperparameters()
        self.cache: ScoringCache | None = None  # set by `lsgs study scoring`
        self.vqvae = VQVAE.from_checkpoint(vqvae_checkpoint, "model.vqvae_checkpoint")
        self.vqvae.requires_grad_(False)
        self.transformer = None
        self.attention = "none"
        if transformer_checkpoint is not None:
            self.transformer, meta = load_code_transformer(
                transformer_checkpoint, "model.transformer_checkpoint"
            )
            self.transformer.requires_grad_(False)
            fingerprint = state_fingerprint(self.vqvae.state_dict())
            if meta.get("vqvae_fingerprint") != fingerprint:
                raise CheckpointError(
                    f"model.transformer_checkpoint '{transformer_checkpoint}' was trained on the codes of another "
                    f"VQ-VAE ({meta.get('vqvae_checkpoint')}) than model.vqvae_checkpoint '{vqvae_checkpoint}'"
                )
            self.attention = self.transformer.config.attention
        self.method_name = {"none": "vqvae-reconstruction", "causal": "lsgs-causal", "global": "lsgs"}[
            self.attention
        ]

    @property
    def num_image_channels(self) -> int:
        return int(self.vqvae.hparams.in_channels)

    # ------------------------------------------------------------------------------------------- NLL threshold
    @override
    def calibration_phases(self) -> list[tuple[str, str]]:
        if self.transformer is None:
            return []
        if self.hparams.nll_threshold is not None:  # a fixed threshold needs no pass over the normals
            self.calibration["nll_threshold"] = float(self.hparams.nll_threshold)
            return []
        return [("nll", "val")]

    def _nll_categories(self) -> list[str]:
        """Categories that get their own NLL quantile: the evaluated ones (the same list on every DDP rank)."""
        datamodule = self.trainer.datamodule
        return categories_of(datamodule)

    def _new_nll_quantiles(self) -> dict[str, ScoreQuantile]:
        names = ["all"] if self.hparams.nll_threshold_scope == "all" else self._nll_categories()
        return {name: ScoreQuantile(num_bits=self.metric_bits).to(self.device) for name in names}

    @override
    def calibrate_step(self, phase: str, batch: dict[str, Any]) -> None:
        if not hasattr(self, "_nll_quantiles"):
            self._nll_quantiles = self._new_nll_quantiles()
        flat, logits, _ = self.encode_batch(batch)
        nll = code_nll(logits, flat)  # [B, L]
        if self.hparams.nll_threshold_scope == "all":
            self._nll_quantiles["all"].update(nll)
            return
        categories = list(batch["category"])
        for name, quantile in self._nll_quantiles.items():
            rows = [i for i, category in enumerate(categories) if category == name]
            if rows:
                quantile.update(nll[rows])

    @override
    def finish_calibration(self, phase: str) -> None:
        if not hasattr(self, "_nll_quantiles"):  # this DDP rank got no validation image; it must still sync
            self._nll_quantiles = self._new_nll_quantiles()
        q = self.hparams.nll_quantile
        thresholds = {
            name: quantile.quantile(q) for name, quantile in self._nll_quantiles.items()
        }  # collective
        del self._nll_quantiles
        self.calibration["nll_quantile"] = q
        if self.hparams.nll_threshold_scope == "all":
            self.calibration["nll_threshold"] = thresholds["all"]
            return
        missing = [name for name, value in thresholds.items() if math.isnan(value)]
        if missing:
            raise ConfigError(
                f"model.nll_threshold_scope=category: test categor{'y' if len(missing) == 1 else 'ies'} "
                f"{missing} ha{'s' if len(missing) == 1 else 've'} no validation normals to set its NLL threshold"
                " from; use nll_threshold_scope=all"
            )
        self.calibration["nll_thresholds"] = thresholds

    def nll_thresholds(self, batch: dict[str, Any]) -> torch.Tensor:
        """``[B]`` resampling threshold of each image of ``batch`` (its category's under scope ``category``).

        With per-category thresholds, an image of a category that has none (e.g. ``lsgs detect`` on a folder of a
        single-category run) uses the only one there is; with several, that is a ``ConfigError``.
        """
        size = len(batch["image"])
        if "nll_thresholds" not in self.calibration:
            return torch.full((size,), float(self.calibration["nll_threshold"]), device=self.device)
        table = self.calibration["nll_thresholds"]
        if len(table) == 1:
            return torch.full((size,), float(next(iter(table.values()))), device=self.device)
        unknown = sorted({c for c in batch["category"] if c not in table})
        if unknown:
            raise ConfigError(
                f"model.nll_threshold_scope=category: no NLL threshold for categor{'y' if len(unknown) == 1 else 'ies'}"
                f" {unknown} (calibrated: {sorted(table)})"
            )
        return torch.tensor([float(table[c]) for c in batch["category"]], device=self.device)

    # ------------------------------------------------------------------------------------------- maps
    def encode_batch(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """What no scoring option changes: codes ``[B, L]``, transformer logits ``[B, L, K]`` (None without a
        transformer) and ``X_hat`` ``[B, C, H, W]``; memoised in ``self.cache`` when one is attached."""

        def compute() -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
            codes = self.vqvae.net.encode_indices(batch["image"])  # [B, h, w]
            flat = codes.flatten(1)  # [B, L]
            logits = self.transformer(flat) if self.transformer is not None else None  # [B, L, K]
            return flat, logits, self.vqvae.net.decode_indices(codes)

        if self.cache is None:
            return compute()
        return self.cache.get_base(("base", *_batch_key(batch)), compute)

    def decode_restorations(
        self, batch: dict[str, Any], flat: torch.Tensor, logits: torch.Tensor | None
    ) -> torch.Tensor:
        """Resample the codes above the NLL threshold n times and decode them: ``[B, n, C, H, W]``."""
        n = self.hparams.num_restorations
        thresholds = self.nll_thresholds(batch)  # [B]

        def compute() -> torch.Tensor:
            batch_size, length = flat.shape
            # Noise seeded per image (by dataset index): results do not depend on batching or DDP sharding.
            seeds = image_noise_seeds(self.hparams.seed, batch["index"].tolist())
            noise = per_image_uniforms(seeds, n, length, self.device)
            temperature = self.hparams.temperature
            if self.attention == "global":
                restored = restore_global(
                    logits, flat, thresholds, n, temperature=temperature, uniforms=noise
                )
            else:
                restored = restore_causal(
                    self.transformer, flat, thresholds, n, temperature=temperature, uniforms=noise
                )
            height, width = self.vqvae.code_grid
            # All n restorations of the batch through the decoder in one call: [B * n, C, H, W].
            decoded = self.vqvae.net.decode_indices(restored.reshape(batch_size * n, height, width))
            return decoded.reshape(batch_size, n, *decoded.shape[1:])

        if self.cache is None:
            return compute()
        key = (
            "restorations",
            *_batch_key(batch),
            tuple(thresholds.tolist()),
            n,
            self.hparams.temperature,
            self.hparams.seed,
        )
        return self.cache.get_restorations(key, compute)

    @torch.no_grad()
    @override
    def raw_anomaly_map(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images = batch["image"]
        flat, logits, reconstruction = self.encode_batch(batch)
        if self.transformer is None:
            return reconstruction_error_map(images, reconstruction), {"reconstruction": reconstruction}
        restorations = self.decode_restorations(batch, flat, logits)  # [B, n, C, H, W]
        anomaly = restoration_score_map(
            images,
            reconstruction,
            restorations,
            self.hparams.map_reference,
            self.hparams.softmax_k,
            self.hparams.reconstruction_weight,
        )  # [B, 1, H, W]
        return anomaly, {"reconstruction": reconstruction, "restoration": restorations[:, 0]}

    @override
    def export_graphs(self, input_size: int) -> MethodExport:
        """Without a transformer, one ``map`` graph (the VQ-VAE reconstruction error); with the global
        transformer, the ``restoration`` runtime's ``encoder``, ``transformer`` and ``decoder``. The causal
        ablation restores position by position with a KV cache and is not exported (``ConfigError``)."""
        net = self.vqvae.net.eval()
        images = torch.rand(EXAMPLE_BATCH, self.num_image_channels, input_size, input_size)
        if self.transformer is None:
            return MethodExport(RUNTIME_MAP, {"map": ExportGraph(VQVAEReconstructionMapGraph(net), {IMAGES: images},
                                                                 (MAP,))})  # fmt: skip
        if self.attention != "global":
            raise ConfigError(
                f"the {self.method_name} method (attention={self.attention!r}) cannot be exported: its restoration "
                "runs position by position; export a run with the global transformer"
            )
        grid = tuple(self.vqvae.code_grid)
        if input_size != grid[0] * net.config.downsample_factor:
            raise ConfigError(
                f"input_size={input_size} but the VQ-VAE was fitted at {grid[0] * net.config.downsample_factor} px"
            )
        codes = torch.randint(self.transformer.config.vocab_size, (EXAMPLE_BATCH, grid[0] * grid[1]))
        graphs = {
            "encoder": ExportGraph(VQVAEEncoderGraph(net), {IMAGES: images}, (CODES,)),
            "transformer": ExportGraph(self.transformer.eval(), {CODES: codes}, (LOGITS,)),
            "decoder": ExportGraph(VQVAEDecoderGraph(net, grid), {CODES: codes}, (DECODED,)),
        }
        options = {
            name: self.hparams[name]
            for name in ("num_restorations", "softmax_k", "temperature", "map_reference", "reconstruction_weight",
                         "seed")
        }  # fmt: skip
        return MethodExport(RUNTIME_RESTORATION, graphs, {**options, "code_grid": list(grid)})

    @override
    def method_info(self) -> dict[str, Any]:
        return {
            "attention": self.attention,
            "num_restorations": self.hparams.num_restorations,
            "softmax_k": self.hparams.softmax_k,
            "nll_quantile": self.hparams.nll_quantile,
            "nll_threshold": self.hparams.nll_threshold,
            "nll_threshold_scope": self.hparams.nll_threshold_scope,
            "map_reference": self.hparams.map_reference,
            "reconstruction_weight": self.hparams.reconstruction_weight,
        }


def _batch_key(batch: dict[str, Any]) -> tuple[Any, ...]:
    """Identity of a batch's images (paths and slice indices), for ``ScoringCache``."""
    return tuple(batch["path"]), tuple(int(i) for i in batch["slice_index"])
