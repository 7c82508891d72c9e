"""Two CPU processes (gloo): every metric synced over ranks equals the single-process value exactly."""

import numpy as np
import torch
from test_metrics_collection import CATEGORIES, NB, make_test_set
from two_ranks import on_two_ranks

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


def run_part(part: slice) -> dict:
    maps, masks, labels, categories, valid, threshold = dataset()
    return run_all(maps[part], masks[part], labels[part], categories[part], valid[part], threshold)


def test_two_process_sync_equals_single_process(tmp_path):
    ranks = on_two_ranks(run_part, SPLIT, tmp_path)
    single = run_all(*dataset())
    for synced in ranks:
        assert torch.equal(synced.pop("histogram"), single["histogram"])
        np.testing.assert_equal(
            synced, {k: v for k, v in single.items() if k != "histogram"}
        )  # exact, nan == nan
    # The shard on one rank alone differs: the comparison above is not vacuous.
    maps, masks, _, _, valid, _ = dataset()
    local = PixelMetrics(NB)
    local.update(maps[:SPLIT], masks[:SPLIT], valid[:SPLIT])
    assert local.compute() != single["pixel"]
