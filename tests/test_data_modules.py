"""Contract tests shared by every data module (anomalib style): one base class, one subclass per module."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data_modules import BraTSDataModule, EvalDistributedSampler, MVTecDataModule
from data_modules.base import AnomalyDataModule
from data_modules.cache import IMAGES

IMAGE_SIZE = 32
KEYS = {"image", "mask", "label", "roi", "category", "path", "slice_index", "index", "has_mask"}


class DataModuleContract:
    """Every data module honours the batch contract and the split rules. Subclasses provide `make`."""

    num_channels: int
    max_empty_anomalous: float  # allowed fraction of label-1 items whose resized mask is empty
    decoders: tuple[str, ...]  # functions that decode source files; must not run on a cache hit

    def make(self, root: Path, cache: Path, **kwargs) -> AnomalyDataModule:
        raise NotImplementedError

    @pytest.fixture
    def dm(self, root: Path, data_cache_dir: Path) -> AnomalyDataModule:
        dm = self.make(root, data_cache_dir)
        dm.prepare_data()
        dm.setup("fit")
        return dm

    def test_batch_contract(self, dm: AnomalyDataModule) -> None:
        assert dm.num_channels == self.num_channels
        for loader in (
            dm.train_dataloader(),
            dm.val_dataloader(),
            dm.test_dataloader(),
            dm.predict_dataloader(),
        ):
            batch = next(iter(loader))
            assert set(batch) == KEYS
            b = batch["image"].shape[0]
            assert batch["image"].shape == (b, self.num_channels, IMAGE_SIZE, IMAGE_SIZE)
            assert batch["image"].dtype == torch.float32
            assert batch["image"].min() >= 0.0 and batch["image"].max() <= 1.0
            for key in ("mask", "roi"):
                assert batch[key].shape == (b, 1, IMAGE_SIZE, IMAGE_SIZE)
                assert batch[key].dtype == torch.float32
                assert set(batch[key].unique().tolist()) <= {0.0, 1.0}
            assert batch["label"].shape == (b,) and batch["label"].dtype == torch.int64
            assert all(isinstance(c, str) for c in batch["category"])
            assert all(Path(p).is_file() for p in batch["path"])
            assert batch["slice_index"].dtype == torch.int64 and batch["index"].dtype == torch.int64
            assert batch["has_mask"].dtype == torch.bool and batch["has_mask"].shape == (b,)

    def test_labels_consistent_with_masks(self, dm: AnomalyDataModule) -> None:
        for split in ("train", "val"):
            for item in dm.dataset(split):
                assert item["label"] == 0 and item["mask"].sum() == 0
        labels, empty_anomalous = [], 0
        for item in dm.dataset("test"):
            if item["label"] == 0:
                assert item["mask"].sum() == 0
            # MVTec labels come from the defect folder: a thin defect may vanish when its mask is shrunk
            empty_anomalous += int(item["label"] == 1 and item["mask"].sum() == 0)
            assert item["category"] in dm.test_categories
            labels.append(int(item["label"]))
        assert 1 in labels
        assert empty_anomalous <= self.max_empty_anomalous * labels.count(1)

    def test_roi_covers_mask(self, dm: AnomalyDataModule) -> None:
        for item in dm.dataset("test"):
            assert item["roi"].sum() > 0
            # anomalies are scored inside the region of interest
            assert (item["mask"] * (1 - item["roi"])).sum() == 0

    def test_index_is_position(self, dm: AnomalyDataModule) -> None:
        for split in ("train", "train_eval", "val", "test"):
            data = dm.dataset(split)
            assert [data[i]["index"] for i in range(len(data))] == list(range(len(data)))

    def test_val_from_train_only_and_disjoint(self, dm: AnomalyDataModule) -> None:
        train = {(i.path, i.slice_index) for i in dm.dataset("train").items}
        val = {(i.path, i.slice_index) for i in dm.dataset("val").items}
        test = {(i.path, i.slice_index) for i in dm.dataset("test").items}
        assert val and train and not (train & val) and not (val & test) and not (train & test)
        assert dm.train_size == len(train)

    def test_train_eval_is_whole_train_split_in_order(self, dm: AnomalyDataModule) -> None:
        loader = dm.train_eval_dataloader()
        assert isinstance(loader.sampler, torch.utils.data.SequentialSampler)
        seen = torch.cat([b["index"] for b in loader]).tolist()
        assert seen == list(range(dm.train_size))
        assert dm.dataset("train_eval").items == dm.dataset("train").items

    def test_splits_deterministic_for_seed(self, root: Path, data_cache_dir: Path) -> None:
        def splits(seed: int) -> tuple:
            dm = self.make(root, data_cache_dir, seed=seed)
            return tuple(tuple(dm.dataset(s).items) for s in ("train", "val", "test"))

        assert splits(0) == splits(0)
        assert splits(0)[:2] != splits(7)[:2]

    def test_train_loader_shuffles_reproducibly(self, root: Path, data_cache_dir: Path) -> None:
        def order(seed: int, epoch: int, torch_seed: int = 0) -> list[int]:
            torch.manual_seed(torch_seed)  # the order must not depend on the global RNG
            loader = self.make(root, data_cache_dir, seed=seed).train_dataloader()
            loader.sampler.set_epoch(epoch)  # Lightning does this at every epoch start
            return torch.cat([b["index"] for b in loader]).tolist()

        assert order(1, 0) == order(1, 0, torch_seed=5)
        assert order(1, 0) != order(1, 1)
        assert order(1, 0) != order(2, 0)
        assert sorted(order(1, 0)) == list(range(self.make(root, data_cache_dir, seed=1).train_size))

    def test_cache_reused_without_decoding(
        self, root: Path, data_cache_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        first = self.make(root, data_cache_dir)
        first.setup()
        expected = first.dataset("test")[0]

        def no_decoding(*args, **kwargs):
            raise AssertionError("the cache should have been reused")

        for target in self.decoders:
            monkeypatch.setattr(target, no_decoding)
        second = self.make(root, data_cache_dir)
        second.prepare_data()
        second.setup()
        got = second.dataset("test")[0]
        assert torch.equal(got["image"], expected["image"]) and torch.equal(got["mask"], expected["mask"])
        assert isinstance(second.dataset("test")._entry_arrays(0)[IMAGES], np.memmap)

    @pytest.mark.parametrize("world", [2, 3])
    def test_eval_loaders_partition_under_ddp(self, dm: AnomalyDataModule, world: int) -> None:
        for name in ("val_dataloader", "test_dataloader", "predict_dataloader", "train_eval_dataloader"):
            seen = []
            for rank in range(world):
                dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
                loader = getattr(dm, name)()
                assert isinstance(loader.sampler, EvalDistributedSampler)
                seen += torch.cat([b["index"] for b in loader]).tolist()
            dm.trainer = None
            n = len(getattr(dm, name)().dataset)
            assert sorted(seen) == list(range(n)), name  # every item exactly once, no padding

    def test_dataloader_workers_match_main_process(self, root: Path, data_cache_dir: Path) -> None:
        dm = self.make(root, data_cache_dir, num_workers=2, eval_batch_size=5)
        a = [b["image"] for b in dm.test_dataloader()]
        dm0 = self.make(root, data_cache_dir, num_workers=0, eval_batch_size=5)
        b = [b["image"] for b in dm0.test_dataloader()]
        assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)

    def test_setup_without_prepare_and_hparams(self, root: Path, data_cache_dir: Path) -> None:
        dm = self.make(root, data_cache_dir, batch_size=3)
        assert dm.trainer is None
        assert dm.hparams["batch_size"] == 3 and dm.hparams["image_size"] == IMAGE_SIZE
        dm.setup("test")
        assert len(dm.dataset("test")) > 0
        dm.setup("test")  # no-op
        assert next(iter(dm.val_dataloader()))["image"].shape[0] == 3  # eval_batch_size None -> batch_size


class TestMVTecContract(DataModuleContract):
    num_channels = 3
    max_empty_anomalous = 0.1
    decoders = ("data_modules.mvtec.decode_sample", "data_modules.image_io.open_image")

    @pytest.fixture
    def root(self, demo_mvtec_root: Path) -> Path:
        return demo_mvtec_root

    def make(self, root: Path, cache: Path, **kwargs) -> MVTecDataModule:
        kwargs = {"image_size": IMAGE_SIZE, "batch_size": 8, "val_fraction": 0.25, **kwargs}
        return MVTecDataModule(str(root), cache_dir=str(cache), **kwargs)

    def test_hparams_include_subclass_args(self, root: Path, data_cache_dir: Path) -> None:
        dm = self.make(root, data_cache_dir, category=["nut"])
        assert dm.hparams["category"] == ["nut"]


class TestMVTec3DContract(DataModuleContract):
    num_channels = 3
    max_empty_anomalous = 0.1
    decoders = ("data_modules.mvtec3d.decode_sample_3d", "data_modules.image_io.open_image")

    @pytest.fixture
    def root(self, demo_mvtec3d_root: Path) -> Path:
        return demo_mvtec3d_root

    def make(self, root: Path, cache: Path, **kwargs) -> AnomalyDataModule:
        from data_modules import MVTec3DDataModule

        kwargs = {"image_size": IMAGE_SIZE, "batch_size": 8, **kwargs}
        return MVTec3DDataModule(str(root), cache_dir=str(cache), **kwargs)

    def test_splits_deterministic_for_seed(self, root: Path, data_cache_dir: Path) -> None:
        # Overrides the base test: validation is the official validation/good, so no split depends on the seed.
        def splits(seed: int) -> tuple:
            dm = self.make(root, data_cache_dir, seed=seed)
            return tuple(tuple(dm.dataset(s).items) for s in ("train", "val", "test"))

        assert splits(0) == splits(7)
        assert all("/validation/good/rgb/" in item.path for item in splits(0)[1])


class TestBraTSContract(DataModuleContract):
    num_channels = 1
    max_empty_anomalous = 0.0  # BraTS labels are defined by the resized mask
    decoders = ("data_modules.brats.preprocess_case", "data_modules.brats.read_volume")

    @pytest.fixture
    def root(self, demo_brats_root: Path) -> Path:
        return demo_brats_root

    def make(self, root: Path, cache: Path, **kwargs) -> BraTSDataModule:
        kwargs = {
            "image_size": IMAGE_SIZE,
            "batch_size": 8,
            "val_fraction": 0.2,
            "test_fraction": 0.25,
            **kwargs,
        }
        return BraTSDataModule(str(root), cache_dir=str(cache), **kwargs)

    def test_patients_never_in_two_splits(self, dm: BraTSDataModule) -> None:
        patients = {
            s: {Path(i.path).parent.name for i in dm.dataset(s).items} for s in ("train", "val", "test")
        }
        assert patients["train"] and patients["val"] and patients["test"]
        assert not (patients["train"] & patients["val"])
        assert not (patients["train"] & patients["test"])
        assert not (patients["val"] & patients["test"])

    def test_hparams_include_subclass_args(self, root: Path, data_cache_dir: Path) -> None:
        dm = self.make(root, data_cache_dir, include_healthy_in_test=True)
        assert dm.hparams["include_healthy_in_test"] is True and dm.hparams["test_fraction"] == 0.25


def test_signatures_parse_with_lightning_cli_parser() -> None:
    """LightningCLI parses these signatures with jsonargparse: every argument must be typed and parseable."""
    from jsonargparse import ArgumentError, ArgumentParser

    from data_modules import ImageFolderDataModule

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(MVTecDataModule, "mvtec")
    parser.add_class_arguments(BraTSDataModule, "brats")
    parser.add_class_arguments(ImageFolderDataModule, "folder")
    cfg = parser.parse_args(
        [
            "--mvtec.root=/data/mvtec",
            "--mvtec.category=[bottle, cable]",
            '--mvtec.train_transforms=[{"name": "HorizontalFlip", "p": 0.5}]',
            "--brats.root=/data/brats",
            "--brats.case_dirs=[]",
            "--brats.normalization=zscore",
            "--folder.root=/data/inbox",
        ]
    )
    assert cfg.mvtec.category == ["bottle", "cable"] and cfg.mvtec.image_size == 128
    assert cfg.mvtec.train_transforms == [{"name": "HorizontalFlip", "p": 0.5}]
    assert list(cfg.brats.case_dirs) == [] and cfg.brats.normalization == "zscore"
    assert list(parser.get_defaults().brats.case_dirs) == ["HGG", "LGG"]
    with pytest.raises(ArgumentError, match="minmax"):
        parser.parse_args(
            ["--mvtec.root=a", "--brats.root=b", "--folder.root=c", "--brats.normalization=minmax"]
        )


def test_data_arguments_through_kwargs_are_parsed_and_listed() -> None:
    """The subclasses take the shared arguments through `**kwargs`: jsonargparse follows them to
    `AnomalyDataModule`, leaves out the ones a subclass sets itself (MVTec 3D-AD's `val_fraction`), and the
    one-line error for an unknown argument lists them."""
    from lsgs.errors import ConfigError
    from lsgs.stage_cli import validate_stage_config

    def data(cls: str, **init_args: object) -> dict:
        return {
            "model": {"class_path": "lightning.pytorch.demos.boring_classes.BoringModel"},
            "data": {"class_path": f"data_modules.{cls}", "init_args": {"root": "r", **init_args}},
        }

    validate_stage_config("fit", data("MVTec3DDataModule", batch_size=3, model_input_size=224))
    validate_stage_config("fit", data("FolderDataModule", seed=2, val_fraction=0.3, mask_suffix="_mask"))
    with pytest.raises(ConfigError, match=r"no argument 'val_fraction'; valid: root, category, image_size, batch"):
        validate_stage_config("fit", data("MVTec3DDataModule", val_fraction=0.2))
    with pytest.raises(ConfigError, match=r"no argument 'bach_size'; valid: root, test_fraction, .*, batch_size"):
        validate_stage_config("fit", data("BraTSDataModule", bach_size=2))
