"""benchmarks/inference_methods.py on the tiny run with HVQ-Trans: one row per method and runtime, and every
runtime's maps agree with eager torch (the benchmark's own check column)."""

from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_rows_per_method_and_runtime_agree_with_eager(tiny_run_with_hvq: Path, capsys: pytest.CaptureFixture) -> None:
    benchmark = load_benchmark("inference_methods")
    threads = torch.get_num_threads()
    try:
        benchmark.main(["--run_dir", str(tiny_run_with_hvq), "--methods", "lsgs", "patchcore", "hvq_trans",
                        "--runtimes", "eager", "onnxruntime", "--count", "4", "--repeats", "1", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    rows = [line.strip("|").split("|") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| ") and not line.startswith("| method")]  # fmt: skip
    cells = {(r[0].strip(), r[1].strip()): r for r in rows}
    assert set(cells) == {(m, r) for m in ("lsgs", "patchcore", "hvq_trans") for r in ("eager", "onnxruntime")}
    for (method, runtime), row in cells.items():
        assert float(row[3]) > 0, (method, runtime)
        assert float(row[5]) <= 1e-3, (method, runtime, row)  # the runtimes compute the same maps
    assert cells["hvq_trans", "eager"][2].strip() == "64" and cells["lsgs", "eager"][2].strip() == "32"


def test_an_unknown_method_stops_with_one_line(tiny_run_with_methods: Path) -> None:
    benchmark = load_benchmark("inference_methods")
    threads = torch.get_num_threads()
    with pytest.raises(SystemExit, match=r"--methods \['padim'\]: not evaluated in"):
        benchmark.main(["--run_dir", str(tiny_run_with_methods), "--methods", "padim"])
    assert torch.get_num_threads() == threads  # refused before it sets anything
