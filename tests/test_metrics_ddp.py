"""Two CPU processes (gloo): every metric synced over ranks equals the single-process value exactly."""

from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_metrics_collection import CATEGORIES, NB, make_test_set

from lsgs.distributed import process_group_teardown
from lsgs.metrics import AUPRO, AnomalyMetrics, ImageAUROC, PixelMetrics, ScoreQuantile

SPLIT = 8  # rank 0 gets images [0, 8), rank 1 gets [8, 15): an odd-sized split


def dataset():
    maps, masks, labels, _, valid = make_test_set(seed=5, n=15)
    # "screw" only appears on rank 0: rank 1 must still join its all-reduce.
    categories = [CATEGORIES[i % 3] if i < SPLIT else CATEGORIES[i % 2] for i in range(15)]
    threshold = float(np.quantile(maps.numpy(), 0.8, method="lower"))
    return maps, masks, labels, categories, valid, threshold


def run_all(maps, masks, labels, categories, valid, threshold) -> dict:
    """Update every metric in batches of 3 and return all computed values (collectives in a fixed order)."""
    pixel, aupro, image = PixelMetrics(NB), AUPRO(num_bits=NB), ImageAUROC()
    quantile = ScoreQuantile(q=0.9, num_bits=NB)
    collection = AnomalyMetrics(CATEGORIES, num_bits=NB, val_threshold=threshold)
    for start in range(0, len(maps), 3):
        part = slice(start, start + 3)
        pixel.update(maps[part], masks[part], valid[part])
        aupro.update(maps[part], masks[part])
        image.update(maps[part].flatten(1).amax(1), labels[part])
        quantile.update(maps[part], valid[part])
        collection.update(maps[part], masks[part], labels[part], categories[part], valid[part])
    scores, flags = image.values()
    return {
        "pixel": pixel.compute(),
        "dice_at": pixel.dice_at(threshold),
        "curves": pixel.curves(max_points=64),
        "histogram": pixel.histogram(),
        "aupro": aupro.compute(),
        "quantile": quantile.compute(),
        "quantile_0.5": quantile.quantile(0.5),
        "image_auroc": image.compute(),
        "image_values": (torch.sort(scores).values.numpy(), int(flags.sum())),
        "collection": collection.compute(),
    }


def worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=120),
    )
    with process_group_teardown():  # barrier + destroy_process_group (no barrier if this rank fails)
        maps, masks, labels, categories, valid, threshold = dataset()
        part = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
        results = run_all(maps[part], masks[part], labels[part], categories[part], valid[part], threshold)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def test_two_process_sync_equals_single_process(tmp_path):
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = run_all(*dataset())
    assert not dist.is_initialized()
    for rank in (0, 1):
        synced = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert torch.equal(synced.pop("histogram"), single["histogram"])
        np.testing.assert_equal(
            synced, {k: v for k, v in single.items() if k != "histogram"}
        )  # exact, nan == nan
    # The shard on one rank alone differs: the comparison above is not vacuous.
    maps, masks, _, _, valid, _ = dataset()
    local = PixelMetrics(NB)
    local.update(maps[:SPLIT], masks[:SPLIT], valid[:SPLIT])
    assert local.compute() != single["pixel"]
