"""By hand, not in the suite: the tiny pipeline with every method on, PatchCore and HVQ-Trans included
(``tiny_feature_methods.TINY_HVQ``), run by 1 process and by 2 processes (torchrun, gloo, half the per-process
batch); every method's metrics and calibration must agree to 1e-4. This is what the 2-process equality test of
``test_pipeline.py`` checks once the feature methods join it::

    python tests/check_ddp_feature_methods.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # as the test suite (conftest): one core per process

from test_pipeline import TINY_METHODS, assert_close, run_cli, tiny_args  # noqa: E402
from tiny_feature_methods import TINY_HVQ, TINY_HVQ_DDP_STRATEGY  # noqa: E402

CHECKED = ("lsgs", "patchcore", "hvq_trans")  # the other methods' DDP equality is test_pipeline's


def metrics(run_dir: Path) -> dict:
    """LSGS's and every other method's metrics and calibration of a run."""
    files = {"lsgs": run_dir / "scoring" / "results.json"}
    files.update({p.parent.name: p for p in sorted((run_dir / "methods").glob("*/results.json"))})
    found = {}
    for name, path in files.items():
        values = json.loads(path.read_text())
        found[name] = {key: values[key] for key in ("per_category", "pooled", "calibration")}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, default=None, help="work folder to keep (default: a temporary one)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="ddp-feature-methods-"))
    work.mkdir(parents=True, exist_ok=True)
    from conftest import DEMO_MVTEC_KWARGS

    from data_modules.synthetic import write_mvtec_demo

    root = work / "demo" / "mvtec"
    if not root.is_dir():
        write_mvtec_demo(root, **DEMO_MVTEC_KWARGS)
    cache = work / "cache"
    extra = ["--run_methods=true", *TINY_METHODS, *TINY_HVQ]
    single = work / "single"
    run_cli(["pipeline", *tiny_args(root, cache, single, *extra)])
    ddp = work / "ddp"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--log-dir={work / 'logs'}",
                "--tee=3", "-m"]  # fmt: skip
    ddp_args = tiny_args(root, cache, ddp, *extra, "--data.batch_size=4", TINY_HVQ_DDP_STRATEGY, "--trainer.devices=2")
    run_cli(["pipeline", *ddp_args], launcher=launcher)
    one, two = metrics(single), metrics(ddp)
    assert set(CHECKED) <= set(one) and one.keys() == two.keys(), (one.keys(), two.keys())
    world = json.loads((ddp / "methods" / "hvq_trans" / "done.json").read_text())["environment"]["world_size"]
    assert world == 2, world
    for name in sorted(one):
        print(f"{name}: largest difference 1 vs 2 processes {max_difference(two[name], one[name]):.2e}")
    for name in CHECKED:
        assert_close(two[name], one[name], tol=1e-4, path=name)
    print(f"1 vs 2 processes: {list(CHECKED)} agree to 1e-4; runs in {work}")
    for name in ("patchcore", "hvq_trans"):
        auroc = [run[name]["pooled"]["pixel_auroc"] for run in (one, two)]
        threshold = [run[name]["calibration"]["image_threshold"] for run in (one, two)]
        print(f"  {name}: pixel AUROC {auroc[0]:.6f} vs {auroc[1]:.6f}, image threshold {threshold[0]:.6f} vs "
              f"{threshold[1]:.6f}")


def max_difference(a: object, b: object) -> float:
    if isinstance(a, dict):
        return max([max_difference(a[k], b[k]) for k in a] or [0.0])
    if isinstance(a, float) and isinstance(b, float) and a == a and b == b:
        return abs(a - b)
    return 0.0


if __name__ == "__main__":
    main()
