"""benchmarks/paired_training.py end to end on a tiny configuration: both paths agree on
the first loss, the table has the per-round ratio, and the CPU peak memory is measured
in a fresh process."""

from support.paired_scripts import run_paired_script

TINY = "e2d1-c32h2-l16-v64-k10"


def test_paired_training_table(tmp_path):
    args = ["--config", TINY, "--batch", "2", "--rounds", "2", "--shapes", TINY + "-B2-reuse"]
    text = run_paired_script("paired_training", args, tmp_path)
    assert "Method: 2 rounds" in text and f"## {TINY}: B=2, reuse pass on" in text
    fused = next(line for line in text.splitlines() if line.startswith("| fused (cpu)"))
    torch_row = next(line for line in text.splitlines() if line.startswith("| torch (reference)"))
    ratio = torch_row.split("|")[3].strip()
    assert ratio.endswith(")") and "x (" in ratio and float(ratio.split("x")[0]) > 0, torch_row
    for row in (fused, torch_row):
        assert row.split("|")[4].strip().endswith("MiB"), row  # peak memory measured for both paths
    first = next(line for line in text.splitlines() if line.startswith("First-step loss"))
    a, b = (float(part.split()[-1].rstrip(".,")) for part in first.split(",")[:2])
    assert abs(a - b) < 1e-3 * abs(b)
