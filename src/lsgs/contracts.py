"""The contract between data modules and stages, as types (foundation layer: imports nothing of the project).

Stages read a few facts off the data module attached to their trainer (``StageData``), and a data module reads
which split a model wants to predict on (``PredictSplit``). Every data module of ``data_modules`` satisfies
``StageData`` (tests/test_contracts.py checks it); the read sites go through the functions below, which keep the
tolerant behaviour the stages always had: a data module (or a test double) without a fact gives ``None`` (or the
documented default), and the stage falls back to what it can see in the batches.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

DEFAULT_PREDICT_SPLIT = "test"


@runtime_checkable
class HasNumChannels(Protocol):
    @property
    def num_channels(self) -> int:
        """Channels C of the ``image`` tensors (3 MVTec RGB, 1 BraTS FLAIR)."""
        ...


@runtime_checkable
class HasTestCategories(Protocol):
    @property
    def test_categories(self) -> list[str]:
        """The evaluated categories, in order (metrics, per-category statistics and thresholds use them)."""
        ...


@runtime_checkable
class HasImageSize(Protocol):
    image_size: int  # side H = W of the square images given to the model, in pixels


@runtime_checkable
class HasValFraction(Protocol):
    val_fraction: float  # fraction of the training normals held back as validation normals (calibration)


@runtime_checkable
class HasNormalsPerCategory(Protocol):
    @property
    def normals_per_category(self) -> bool:
        """True when each category has training normals of its own (MVTec: ``<category>/train/good``); False
        when the categories share one population of training normals (a folder data set's normal folder)."""
        ...


@runtime_checkable
class HasTestSet(Protocol):
    @property
    def has_test_set(self) -> bool:
        """False when the data has no labelled test set (normal images only): an evaluation then calibrates its
        thresholds on the validation normals and reports no metrics."""
        ...


@runtime_checkable
class StageData(HasNumChannels, HasTestCategories, HasImageSize, HasValFraction, Protocol):
    """What the stages read off their data module: ``num_channels``, ``test_categories``, ``image_size``,
    ``val_fraction``."""


@runtime_checkable
class PredictSplit(Protocol):
    predict_split: str  # "test" (the default when a model does not say) or "train" (the codebook aggregator)


def trainer_data(trainer: Any) -> Any | None:
    """The data module attached to ``trainer`` (None without a trainer or a data module)."""
    return getattr(trainer, "datamodule", None) if trainer is not None else None


def channels_of(datamodule: Any) -> int | None:
    """``datamodule.num_channels``, or None when it does not say."""
    return datamodule.num_channels if isinstance(datamodule, HasNumChannels) else None


def categories_of(datamodule: Any) -> list[str]:
    """``datamodule.test_categories`` as a list (empty when it does not say or names none)."""
    return list((datamodule.test_categories if isinstance(datamodule, HasTestCategories) else None) or [])


def normals_per_category_of(datamodule: Any) -> bool:
    """``datamodule.normals_per_category``; True when it does not say (each category's training images are its
    own, as in the MVTec layouts)."""
    return bool(datamodule.normals_per_category) if isinstance(datamodule, HasNormalsPerCategory) else True


def has_test_set_of(datamodule: Any) -> bool:
    """``datamodule.has_test_set``; True when it does not say (every data set with anomalous images has one)."""
    return bool(datamodule.has_test_set) if isinstance(datamodule, HasTestSet) else True


def image_size_of(datamodule: Any) -> int | None:
    """``datamodule.image_size``, or None when it does not say."""
    return datamodule.image_size if isinstance(datamodule, HasImageSize) else None


def val_fraction_of(datamodule: Any) -> float | None:
    """``datamodule.val_fraction``, or None when it does not say."""
    return datamodule.val_fraction if isinstance(datamodule, HasValFraction) else None


def predict_split_of(model: Any) -> str:
    """The split ``model`` predicts on: its ``predict_split``, else ``DEFAULT_PREDICT_SPLIT``."""
    return model.predict_split if isinstance(model, PredictSplit) else DEFAULT_PREDICT_SPLIT
