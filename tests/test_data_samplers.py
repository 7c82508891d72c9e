"""EvalDistributedSampler: exact partition without padding, and Lightning keeps it under DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils.data import DistributedSampler

from data_modules import EvalDistributedSampler, MVTecDataModule
from lsgs.errors import ConfigError


@pytest.mark.parametrize("n", [0, 1, 2, 7, 10, 11, 101])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_partition_is_exact(n: int, world: int) -> None:
    data = list(range(n))
    shards = [list(EvalDistributedSampler(data, num_replicas=world, rank=r)) for r in range(world)]
    # brute force: rank r gets r, r + world, ...
    assert shards == [[i for i in range(n) if i % world == r] for r in range(world)]
    # every index exactly once: no padding, no duplicates
    assert sorted(i for shard in shards for i in shard) == data
    for r in range(world):
        sampler = EvalDistributedSampler(data, num_replicas=world, rank=r)
        assert len(sampler) == len(shards[r])
        sampler.set_epoch(5)  # the Lightning loop calls this; order must not change
        assert list(sampler) == shards[r]


def test_torch_sampler_would_pad() -> None:
    # why the subclass exists: the stock sampler repeats samples on odd sizes
    data = list(range(7))
    stock = [i for r in range(2) for i in DistributedSampler(data, num_replicas=2, rank=r, shuffle=False)]
    assert len(stock) == 8
    ours = [i for r in range(2) for i in EvalDistributedSampler(data, num_replicas=2, rank=r)]
    assert len(ours) == 7


DDP_SCRIPT = """
import json, sys
import torch
import lightning.pytorch as pl
from data_modules import MVTecDataModule
from lsgs.distributed import process_group_teardown


class Collect(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = {"val": [], "test": [], "predict": []}
        self.samplers = {}

    def training_step(self, batch, i):
        self.samplers["train"] = type(self.trainer.train_dataloader.sampler).__name__
        return (self.w * batch["image"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def validation_step(self, batch, i):
        self.seen["val"] += batch["index"].tolist()
        self.samplers["val"] = type(self.trainer.val_dataloaders.sampler).__name__

    def test_step(self, batch, i):
        self.seen["test"] += batch["index"].tolist()
        self.samplers["test"] = type(self.trainer.test_dataloaders.sampler).__name__

    def predict_step(self, batch, i):
        self.seen["predict"] += batch["index"].tolist()
        return batch["index"]

    def on_predict_epoch_end(self):
        out = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(out, (self.seen, self.samplers))
        if self.global_rank == 0:
            json.dump(out, open(sys.argv[3], "w"))


dm = MVTecDataModule(sys.argv[1], cache_dir=sys.argv[2], image_size=16, batch_size=4, eval_batch_size=3,
                     category="nut", val_fraction=0.2)
trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=1,
                     num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False)
model = Collect()
# The fix under test: without a barrier + destroy_process_group, gloo's threads die in interpreter shutdown
# and a rank may abort ("terminate called without an active exception", exit -6) after its work is done.
with process_group_teardown():
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    trainer.predict(model, datamodule=dm, return_predictions=False)
rank = trainer.global_rank
assert not torch.distributed.is_initialized()
if rank == 0:
    # Lightning started rank 1 as a child process of this one: its exit status is ours to check.
    codes = [proc.wait(timeout=120) for proc in trainer.strategy.launcher.procs]
    json.dump(codes, open(sys.argv[3] + ".children", "w"))
open(f"{sys.argv[3]}.rank{rank}", "w").write("finished")  # the last thing each rank does
"""


def test_lightning_keeps_the_sampler_under_real_ddp(
    demo_mvtec_root: Path, data_cache_dir: Path, tmp_path: Path
) -> None:
    """Two CPU processes (gloo): every val/test/predict item is seen exactly once, train uses Lightning's
    DistributedSampler."""
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "seen.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(script), str(demo_mvtec_root), str(data_cache_dir), str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]  # rank 0 (the launched script)
    assert json.loads(Path(f"{out}.children").read_text()) == [0], proc.stderr[-3000:]  # rank 1
    assert [Path(f"{out}.rank{r}").read_text() for r in (0, 1)] == ["finished"] * 2
    assert "terminate called" not in proc.stderr
    ranks = json.loads(out.read_text())
    assert len(ranks) == 2
    dm = MVTecDataModule(
        str(demo_mvtec_root), cache_dir=str(data_cache_dir), category="nut", val_fraction=0.2
    )
    sizes = {
        "val": len(dm.dataset("val")),
        "test": len(dm.dataset("test")),
        "predict": len(dm.dataset("test")),
    }
    for split, n in sizes.items():
        seen = ranks[0][0][split] + ranks[1][0][split]
        assert sorted(seen) == list(range(n)), split
        assert ranks[0][0][split] == list(range(0, n, 2)) and ranks[1][0][split] == list(range(1, n, 2))
    for _, samplers in ranks:
        assert samplers["val"] == samplers["test"] == "EvalDistributedSampler"
        assert samplers["train"] == "DistributedSampler"


@pytest.mark.parametrize(("world", "rank"), [(0, 0), (2, 2), (2, -1)])
def test_bad_rank_or_world(world: int, rank: int) -> None:
    with pytest.raises(ConfigError, match="EvalDistributedSampler"):
        EvalDistributedSampler([1, 2, 3], num_replicas=world, rank=rank)
