"""Stage 2: the aggregated codebook (paper §2.1).

Encode the whole training set with the trained VQ-VAE, cluster the pre-quantisation encodings z_e with FAISS
k-means, and write a VQ-VAE checkpoint whose codebook holds the cluster centres. Everything happens in one
``trainer.predict`` call, so it shards over DDP ranks like any other Lightning loop:

1. every rank encodes its shard of the training set, counts code usage under the learned codebook, and keeps a
   seeded random subset of its vectors for k-means (the subset is chosen per *dataset index*, so it does not depend
   on how samples are spread over ranks);
2. the subsets are gathered, sorted by dataset index, clustered once on rank 0, and the centres broadcast, so every
   rank ends with the identical codebook (and equal to a single-process run);
3. every rank re-assigns its own vectors to the centres (usage and quantisation error after aggregation) and
   measures validation L1 before/after; the sums are all-reduced;
4. rank 0 writes ``aggregated.ckpt`` (a normal VQ-VAE checkpoint) and ``aggregation.json`` atomically.

Codebook options of the VQ-VAE (:class:`~lsgs.nn.quantizer.VectorQuantizer`): k-means runs in the space the
nearest-code search uses, so the centres are valid codes there. With ``lookup_dim`` the clustered vectors are the
projected encodings (``[N, lookup_dim]``) and the centres replace the ``[K, lookup_dim]`` codebook (the projections
are kept); with ``l2_normalize`` they are the l2-normalised (projected) encodings, clustered by Euclidean k-means
(on unit vectors this ranks like cosine k-means), and the learned codebook / centres are normalised at use, exactly
as the quantizer does. ``quantisation_mse_*`` in the report are therefore measured in that space. The EMA
statistics (``ema_decay``), usage averages (``dead_code_threshold``) and the k-means-init flag (``kmeans_init``)
of the written checkpoint restart from the new codebook (:meth:`VectorQuantizer.replace_codebook`).
"""

from __future__ import annotations

import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lsgs.checkpoints import VQVAE_KIND, checkpoint_metadata, load_checkpoint, require_checkpoint
from lsgs.errors import ConfigError
from lsgs.io import atomic_torch_save, atomic_write_json
from lsgs.kmeans import kmeans
from lsgs.layout import StageLayout
from lsgs.metrics.codebook import usage_statistics
from lsgs.modules.vqvae import VQVAE
from lsgs.nn.nearest import nearest_codes
from lsgs.nn.quantizer import VectorQuantizer
from lsgs.progress import progress

KMEANS_INITS = ("random", "kmeans++", "codebook")


class _NoPredictionsExpected(Callback):
    """Silences Lightning's "predict returned None" warning while the aggregator's predict loop runs.

    The aggregator's ``predict_step`` returns nothing on purpose (it accumulates encodings). The filter lives in a
    ``warnings.catch_warnings()`` opened when the loop starts and closed when it ends or fails, so other modules'
    predict loops still get the warning.
    """

    def __init__(self) -> None:
        self._scope = ExitStack()

    @override
    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._scope.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", message="predict returned None")

    @override
    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._scope.close()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._scope.close()


class CodebookAggregator(LightningModule):
    """Replace a trained VQ-VAE's codebook by k-means centres of its training encodings.

    Args:
        vqvae_checkpoint: the stage-1 VQ-VAE checkpoint.
        num_clusters: size of the aggregated codebook; None keeps the learned size K.
        niter: k-means iterations.
        seed: seed of the vector sub-sampling and of k-means.
        max_points_per_centroid: FAISS' cap on training points per centre; the encodings are sub-sampled to
            about ``max_points_per_centroid * num_clusters`` vectors before clustering, as FAISS would.
        init: ``random`` (FAISS default: random training vectors), ``kmeans++``, or ``codebook`` (start from the
            learned codebook; requires ``num_clusters`` = K).
        use_gpu: FAISS on GPU; None picks the GPU when the installed faiss has one.
        output_dir: where ``aggregated.ckpt`` and ``aggregation.json`` go; None writes nothing.
    """

    # Tells the data module to serve the training split (not the test split) to `trainer.predict`.
    predict_split = "train"

    def __init__(
        self,
        vqvae_checkpoint: str | None = None,
        num_clusters: int | None = None,
        niter: int = 20,
        seed: int = 0,
        max_points_per_centroid: int = 256,
        init: str = "random",
        use_gpu: bool | None = None,
        output_dir: str | None = None,
    ) -> None:
        super().__init__()
        require_checkpoint(vqvae_checkpoint, "model.vqvae_checkpoint")
        if init not in KMEANS_INITS:
            raise ConfigError(f"model.init={init!r} is not one of {KMEANS_INITS}")
        self.save_hyperparameters()
        self.vqvae = VQVAE.from_checkpoint(vqvae_checkpoint, "model.vqvae_checkpoint")
        self.vqvae.requires_grad_(False)
        self.num_clusters = num_clusters or self.vqvae.codebook_size
        if init == "codebook" and self.num_clusters != self.vqvae.codebook_size:
            raise ConfigError(
                f"model.init='codebook' needs num_clusters = K = {self.vqvae.codebook_size}, got {num_clusters}"
            )
        self.centroids: torch.Tensor | None = None
        self.report: dict[str, Any] = {}
        self._reset_buffers()

    def _reset_buffers(self) -> None:
        self._vectors: list[torch.Tensor] = []  # this rank's encodings, [B*h*w, D] per batch, CPU fp32
        self._sample_indices: list[torch.Tensor] = []
        self._samples: list[torch.Tensor] = []

    @property
    def quantizer(self) -> VectorQuantizer:
        return self.vqvae.net.quantizer

    @property
    def codebook(self) -> torch.Tensor:
        """The learned raw codebook ``[K, C]`` (``C = lookup_dim or D``)."""
        return self.quantizer.codebook

    @override
    def configure_callbacks(self) -> list[Callback]:
        return [_NoPredictionsExpected()]

    @override
    def on_predict_start(self) -> None:
        self.vqvae.eval()
        self._reset_buffers()
        dataset = self.trainer.predict_dataloaders.dataset
        grid = self.vqvae.code_grid
        self._total_vectors = len(dataset) * grid[0] * grid[1]
        cap = self.hparams.max_points_per_centroid * self.num_clusters
        if self._total_vectors < self.num_clusters:
            raise ConfigError(
                f"the training set gives {self._total_vectors} encodings ({len(dataset)} images x {grid[0]}x"
                f"{grid[1]} codes) but k-means needs at least num_clusters={self.num_clusters}; use a smaller "
                f"codebook (e.g. model.num_clusters={max(1, self._total_vectors // 4)})"
            )
        self._keep_probability = min(1.0, cap / self._total_vectors)

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        z_e = self.vqvae.net.encode(batch["image"]).float()  # [B, D, h, w]
        vectors = z_e.permute(0, 2, 3, 1).reshape(z_e.shape[0], -1, z_e.shape[1])  # [B, h*w, D]
        # The space of the nearest-code search: [B, h*w, C]; the identity unless lookup_dim / l2_normalize.
        vectors = self.quantizer.to_lookup_space(vectors).float()
        # Kept per batch, not per image: the re-assignment then multiplies [B*h*w, D] blocks by the codebooks,
        # not [h*w, D] ones (2 CPU cores, K = 1024, D = 512: 179 vs 134 GFLOP/s for 8192 vs 256 rows).
        self._vectors.append(vectors.reshape(-1, vectors.shape[-1]).cpu())
        for sample_vectors, index in zip(vectors, batch["index"]):
            index = int(index)
            keep = self._subsample_mask(index, sample_vectors.shape[0])
            self._sample_indices.append(torch.full((int(keep.sum()),), index, dtype=torch.int64))
            self._samples.append(sample_vectors[keep.to(sample_vectors.device)].cpu())

    def _subsample_mask(self, index: int, count: int) -> torch.Tensor:
        """The vectors of dataset item ``index`` that go to k-means, seeded by (seed, index) only."""
        if self._keep_probability >= 1.0:
            return torch.ones(count, dtype=torch.bool)
        generator = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + index)
        return torch.rand(count, generator=generator) < self._keep_probability

    @override
    def on_predict_epoch_end(self) -> None:
        strategy = self.trainer.strategy
        samples = self._gather_samples()
        result = None
        if self.trainer.is_global_zero:
            init: str | torch.Tensor = self.hparams.init
            if init == "codebook":
                init = self.quantizer.effective_codebook().detach().float().cpu()
            rank_zero_info(
                f"k-means: {samples.shape[0]} of {self._total_vectors} encodings into {self.num_clusters} centres"
            )
            result = kmeans(
                samples,
                self.num_clusters,
                niter=self.hparams.niter,
                seed=self.hparams.seed,
                max_points_per_centroid=self.hparams.max_points_per_centroid,
                init=init,
                use_gpu=self.hparams.use_gpu,
            )
            rank_zero_info(
                f"k-means on {result.backend}: {result.seconds:.2f} s, inertia {result.inertia:.5g}"
            )
            summary = {
                "backend": result.backend,
                "seconds": result.seconds,
                "inertia": result.inertia,
                "iterations": result.iterations,
                "num_points": int(samples.shape[0]),
            }
            payload = (result.centroids, summary)
        else:
            payload = None
        centroids, summary = strategy.broadcast(payload, src=0)
        self.centroids = centroids.to(self.device)
        self.report = {"kmeans": summary, **self._assignment_statistics(), **self._validation_l1()}
        self.report["num_clusters"] = self.num_clusters
        self.report["learned_codebook_size"] = self.vqvae.codebook_size
        self._reset_buffers()
        if self.trainer.is_global_zero and self.hparams.output_dir is not None:
            self.save_outputs(self.hparams.output_dir)

    def _gather_samples(self) -> torch.Tensor:
        """All ranks' k-means samples, ordered by dataset index (so the order is rank-independent)."""
        local_indices = (
            torch.cat(self._sample_indices) if self._sample_indices else torch.empty(0, dtype=torch.int64)
        )
        local_samples = torch.cat(self._samples) if self._samples else torch.empty(0, self.codebook.shape[1])
        if self.trainer.world_size > 1:
            gathered = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, (local_indices, local_samples))
            local_indices = torch.cat([g[0] for g in gathered])
            local_samples = torch.cat([g[1] for g in gathered])
        order = torch.sort(local_indices, stable=True).indices
        return local_samples[order].contiguous()

    def _assignment_statistics(self) -> dict[str, Any]:
        """Usage and mean squared quantisation error of all training encodings, learned vs aggregated codebook."""
        learned = self.quantizer.effective_codebook().detach().float()
        centroids = self.quantizer.effective_codebook(self.centroids).float()
        counts_before = torch.zeros(learned.shape[0], dtype=torch.int64, device=self.device)
        counts_after = torch.zeros(self.num_clusters, dtype=torch.int64, device=self.device)
        error_before = torch.zeros((), dtype=torch.float64, device=self.device)
        error_after = torch.zeros((), dtype=torch.float64, device=self.device)
        num = torch.zeros((), dtype=torch.float64, device=self.device)
        for vectors in self._vectors:
            vectors = vectors.to(self.device)
            idx_before, dist_before = nearest_codes(vectors, learned)
            idx_after, dist_after = nearest_codes(vectors, centroids)
            counts_before += torch.bincount(idx_before, minlength=learned.shape[0])
            counts_after += torch.bincount(idx_after, minlength=self.num_clusters)
            error_before += dist_before.double().sum()
            error_after += dist_after.double().sum()
            num += vectors.shape[0]
        reduce = self.trainer.strategy.reduce
        counts_before, counts_after = (
            reduce(counts_before, reduce_op="sum"),
            reduce(counts_after, reduce_op="sum"),
        )
        error_before, error_after, num = (
            reduce(t, reduce_op="sum") for t in (error_before, error_after, num)
        )
        before, after = usage_statistics(counts_before), usage_statistics(counts_after)
        return {
            "train_vectors": int(num.item()),
            "effective_size_before": int(before["codes_used"]),
            "effective_size_after": int(after["codes_used"]),
            "perplexity_before": before["perplexity"],
            "perplexity_after": after["perplexity"],
            "quantisation_mse_before": float(error_before / num.clamp_min(1)),
            "quantisation_mse_after": float(error_after / num.clamp_min(1)),
        }

    @torch.no_grad()
    def _validation_l1(self) -> dict[str, float]:
        """L1 reconstruction loss on the validation normals with the learned and with the aggregated codebook."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "val_dataloader"):
            return {}
        learned = self.codebook.detach().float()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # l1 before, l1 after, element count
        for batch in progress(datamodule.val_dataloader(), "validation L1 before/after", self.trainer.is_global_zero):
            images = batch["image"].to(self.device)
            z_e = self.vqvae.net.encode(images).float()
            for slot, codebook in ((0, learned), (1, self.centroids)):
                reconstruction = self.vqvae.net.decode(_quantize(self.quantizer, z_e, codebook))
                sums[slot] += F.l1_loss(reconstruction.float(), images.float(), reduction="sum").double()
            sums[2] += images.numel()
        sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        if sums[2] == 0:
            return {}
        return {"val_l1_before": float(sums[0] / sums[2]), "val_l1_after": float(sums[1] / sums[2])}

    def aggregated_checkpoint(self) -> dict[str, Any]:
        """The stage-1 checkpoint with its codebook replaced by the centres (and K set to ``num_clusters``)."""
        if self.centroids is None:
            raise RuntimeError("aggregated_checkpoint() called before k-means ran (trainer.predict)")
        source = load_checkpoint(self.hparams.vqvae_checkpoint, VQVAE_KIND, "model.vqvae_checkpoint")
        state_dict = dict(source["state_dict"])
        # The quantizer's whole state for the new codebook: codes, projections, restarted statistics (buffers
        # of the options that are on); for the default quantizer that is just the codebook.
        quantizer = self.quantizer.with_codebook(self.centroids.detach())
        for key in [k for k in state_dict if k.startswith("net.quantizer.")]:
            del state_dict[key]
        for key, value in quantizer.state_dict().items():
            state_dict[f"net.quantizer.{key}"] = value.detach().cpu()
        hparams = dict(source["hyper_parameters"])
        hparams["codebook_size"] = self.num_clusters
        hparams["init_from"] = None
        config = dict(source["lsgs"].get("config", {}))
        config["codebook_size"] = self.num_clusters
        return {
            "state_dict": state_dict,
            "hyper_parameters": hparams,
            "pytorch-lightning_version": source.get("pytorch-lightning_version"),
            "epoch": source.get("epoch"),
            "global_step": source.get("global_step"),
            "lsgs": checkpoint_metadata(
                VQVAE_KIND,
                config=config,
                aggregation=self.report,
                aggregated_from=str(self.hparams.vqvae_checkpoint),
            ),
        }

    def save_outputs(self, output_dir: str | Path) -> Path:
        layout = StageLayout.of(output_dir)
        path = atomic_torch_save(self.aggregated_checkpoint(), layout.aggregated_checkpoint)
        atomic_write_json(layout.aggregation_report, self.report)
        rank_zero_info(f"aggregated codebook written to {path}")
        return path

    @override
    def configure_optimizers(self) -> None:
        return None


def _quantize(quantizer: VectorQuantizer, z_e: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``[B, D, h, w]`` encodings -> their nearest codes of ``codebook`` (raw ``[K, C]``, in the quantizer's lookup
    space), as the decoder's input ``[B, D, h, w]``: searched and projected back as ``quantizer`` does."""
    batch, dim, height, width = z_e.shape
    flat = quantizer.to_lookup_space(z_e.permute(0, 2, 3, 1).reshape(-1, dim))  # [N, C]
    codes = quantizer.effective_codebook(codebook)  # [K, C]
    indices, _ = nearest_codes(flat, codes)
    chosen = quantizer.from_lookup_space(codes[indices])  # [N, D]
    return chosen.reshape(batch, height, width, dim).permute(0, 3, 1, 2)
