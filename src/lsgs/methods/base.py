"""What the methods of ``lsgs.methods`` share on top of the evaluation harness (``MethodModule``), and the base of
the baseline methods whose learned state is a few statistics of the training images (``StatisticsBaseline``).

Everything a method learns is kept in parameters and buffers, so a Lightning checkpoint of a fitted method holds it
and ``init_from`` reloads it: ``lsgs.evaluation.load_method`` rebuilds a finished method stage that way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lsgs.checkpoints import METHOD_KIND, checkpoint_metadata, load_checkpoint
from lsgs.contracts import categories_of, channels_of, normals_per_category_of, trainer_data
from lsgs.errors import CheckpointError, ConfigError, DataError
from lsgs.evaluation import AnomalyMapModule
from lsgs.layout import StageLayout
from lsgs.nn.export import CLASS_INDEX, EXAMPLE_BATCH

STATISTICS_PHASE = "statistics"


class MethodModule(AnomalyMapModule):
    """What the methods of ``lsgs.methods`` share on top of the harness: the channel check, ``fitted`` state,
    checkpoints of the learned state.

    Args:
        in_channels: image channels the method is for (3 MVTec, 1 BraTS); the pipeline sets it to the data
            module's. Checked against the data module in ``setup`` and used by ``lsgs detect``
            (``num_image_channels``).
        init_from: a checkpoint of the same fitted method (Lightning checkpoint written while or after it was
            fitted) whose learned state (statistics or weights) is loaded, so it is not fitted again.
        **kwargs: the harness arguments of ``AnomalyMapModule`` (output_dir, smoothing, metric_region, ...).
    """

    _fit_hint = "fit it first"
    requires_fit = False  # the pipeline runs trainer.fit before trainer.test when True
    # True for a method whose learned state comes from the evaluation's own passes (statistics, a memory bank):
    # the harness then writes it as the stage's checkpoint (``learned_state``). A method trained by
    # ``trainer.fit`` has the runner's training checkpoint instead.
    learns_in_evaluation = False

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
        datamodule = trainer_data(self._trainer)
        channels = channels_of(datamodule)
        if channels is not None and channels != self.in_channels:
            raise ConfigError(
                f"model.in_channels={self.in_channels} but {type(datamodule).__name__} yields "
                f"{channels}-channel images"
            )

    def _check_fitted(self) -> None:
        if not bool(self.fitted):
            raise ConfigError(
                f"the {self.method_name} method has no learned state: {self._fit_hint}, or pass "
                f"model.init_from=<a checkpoint of a fitted {self.method_name} method>"
            )

    def _check_images(self, images: Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise DataError(
                f"{self.method_name} method: expected images [B, {self.in_channels}, H, W], got shape "
                f"{tuple(images.shape)}"
            )

    def fitted_input(self, batch: dict[str, Any]) -> Tensor:
        """The batch's images ``[B, C, H, W]``, after checking that the method is fitted and the images fit it."""
        self._check_fitted()
        images = batch["image"]
        self._check_images(images)
        return images

    def _load_init_from(self) -> None:
        """Load the learned state of ``init_from`` (call at the end of a subclass ``__init__``)."""
        if self.init_from is None:
            return
        path = self.init_from
        checkpoint = load_checkpoint(path, METHOD_KIND, "model.init_from")
        method = checkpoint["lsgs"].get("method")
        if method != self.method_name:
            raise CheckpointError(
                f"model.init_from '{path}' holds a '{method}' method; expected '{self.method_name}'"
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
            raise CheckpointError(f"model.init_from '{path}' was saved before the method was fitted")

    def _sum_over_ranks(self, tensor: Tensor) -> Tensor:
        """All-reduce a sum over DDP ranks (identity on one device)."""
        return self.trainer.strategy.reduce(tensor, reduce_op="sum")

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lsgs"] = checkpoint_metadata(METHOD_KIND, method=self.method_name)
        # The checkpoint holds the learned state itself: rebuilding from it must not need the init_from file.
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"]["init_from"] = None

    @override
    def learned_state(self) -> dict[str, Any] | None:
        if not self.learns_in_evaluation or not bool(self.fitted):
            return None
        checkpoint = {
            "state_dict": {key: value.detach().cpu() for key, value in self.state_dict().items()},
            "hyper_parameters": dict(self.hparams),
        }
        self.on_save_checkpoint(checkpoint)
        return checkpoint

    @classmethod
    @override
    def loading_arguments(cls, stage: StageLayout) -> dict[str, Any]:
        # The learned state a finished stage leaves: the statistics its evaluation computed (written by the
        # harness) or the weights its training wrote (the runner's rolling checkpoint), the same file either way.
        if not stage.last_checkpoint.is_file():
            raise ConfigError(
                f"'{stage.folder}' has no learned state ({stage.last_checkpoint} is missing); the stage did not "
                "finish: re-run the pipeline"
            )
        return {"init_from": str(stage.last_checkpoint)}


class StatisticsBaseline(MethodModule):
    """A baseline whose state is a few statistics of the training images, computed in the train pass.

    With ``per_category`` the statistics are kept per category, as the data module's
    ``test_categories`` name them: MVTec is evaluated per category, and a per-pixel Gaussian (or a mean colour)
    of a mixture of carpets and screws describes neither. The statistic buffers then have a leading category
    dimension; an image is scored with the statistics of its ``category``.

    Subclasses list their statistic buffers in ``_statistics``; those start empty (their shapes depend on the
    data) and are resized to the stored shapes when a state dict is loaded.

    Args:
        per_category: one set of statistics per category (False: one set for all training images). None (the
            default): per category when the data module's categories have training normals of their own (MVTec AD,
            MVTec 3D-AD, BraTS), one set when its categories share one population of normals (a folder data set).
        **kwargs: see ``MethodModule`` and ``AnomalyMapModule``.
    """

    kind = "baseline"
    learns_in_evaluation = True
    _statistics: tuple[str, ...] = ()
    _counted = "values"  # what the count of ``_batch_sums`` counts, for messages
    # With model.calibration given the harness skips every calibration pass, statistics included.
    _fit_hint = "let trainer.test compute its statistics (without model.calibration)"
    _ALL = "*"  # the single "category" when statistics are not per category

    def __init__(self, per_category: bool | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.per_category = per_category
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
            meta = load_checkpoint(self.init_from, METHOD_KIND, "model.init_from")["lsgs"]
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
        datamodule = trainer_data(self._trainer)
        categories = categories_of(datamodule)
        per_category = normals_per_category_of(datamodule) if self.per_category is None else self.per_category
        self.categories = categories if per_category and categories else [self._ALL]
        return [(STATISTICS_PHASE, "train")]

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.categories = list(checkpoint.get("lsgs", {}).get("categories", []))

    def category_indices(self, batch: dict[str, Any], device: torch.device) -> Tensor:
        """``[B]`` row of each image's statistics, from ``batch["category"]`` (all 0 without ``per_category``).

        Statistics of a single category serve images of any category (``lsgs detect`` names a folder's images
        after the folder), as LSGS's per-category NLL thresholds do.
        """
        if self.categories == [self._ALL] or len(self.categories) == 1:
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

    def export_categories(self) -> list[str] | None:
        """The ``categories`` of the export: None (the graph takes no class index and uses the only set of
        statistics) with one set, else the category of each row of the statistics."""
        self._check_fitted()
        return None if len(self.categories) <= 1 else list(self.categories)

    def example_class_index(self) -> dict[str, Tensor]:
        """The graph's example ``class_index`` input (none with a single set of statistics)."""
        if self.export_categories() is None:
            return {}
        return {CLASS_INDEX: torch.arange(EXAMPLE_BATCH) % len(self.categories)}

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
