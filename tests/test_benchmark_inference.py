"""benchmarks/inference.py --quick runs in seconds and prints one table in which the exact variant matches the plain
decoder path."""

import torch
from benchmark_scripts import load_benchmark

inference = load_benchmark("inference")


def table_rows(text: str) -> dict[str, list[str]]:
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| variant"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells
    return rows


def test_quick_run_prints_the_table_and_the_exact_path_matches_the_plain_one(capsys):
    threads = torch.get_num_threads()
    try:  # one thread: tiny ops on two threads of a busy 2-core machine mostly wait for each other
        inference.main(["--quick", "--no-exports", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert (
        "### tiny" in out and "fp32 matmul peak" in out and "command: `python benchmarks/inference.py" in out
    )
    rows = table_rows(out)
    assert {"plain", "exact", "bf16 autocast", "int8 torch", "plain, resampling seed 1"} <= set(rows)
    exact = rows["exact"]
    # columns: variant, exact, images/s, speed-up, GFLOP/img, GFLOP/s, % peak, codes differing, NLL change,
    # decisions flipped, draws differing, map max rel., map mean rel.
    assert exact[1] == "yes" and float(exact[2]) > 0
    assert exact[7] == exact[9] == exact[10] == "0 (0%)"
    assert float(exact[8]) == 0.0  # the same transformer: identical NLLs
    assert float(exact[11]) < 1e-4
    assert float(rows["plain"][3].rstrip("x")) == 1.0
    assert "one code cell (4 x 4 pixels) can change a 26 x 26 pixel window" in out
    assert "measured by changing the centre code: 26 x 26 pixels changed" in out
