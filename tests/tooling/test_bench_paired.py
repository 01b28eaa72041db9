"""benchmarks/paired.py end to end on one small CPU case: it checks every path against
the reference, times them in rotation and writes a table with per-round ratios."""

import os
import subprocess
import sys

from support.paired_scripts import run_paired_script
from support.paths import REPO

ROOT = str(REPO)


def test_paired_table(tmp_path):
    text = run_paired_script("paired", ["--rounds", "3", "--shapes", "dec256-ragged", "--paths", "ours:torch,reference"], tmp_path)
    assert "Method: 3 rounds" in text
    for direction in ("fwd", "fwd+bwd"):
        section = text.split(f"## {direction} | dec256-ragged")[1].split("##")[0]
        rows = [line for line in section.splitlines() if line.startswith("| ours:torch") or line.startswith("| reference")]
        assert len(rows) == 2, section
        ref_row = next(r for r in rows if r.startswith("| reference"))
        ratio = ref_row.split("|")[3].strip()
        assert ratio.endswith(")") and "x (" in ratio and float(ratio.split("x")[0]) > 0, ref_row


def test_unknown_path_is_refused(tmp_path):
    code = f"import sys; sys.path.append({ROOT!r}); from benchmarks.paired import main; main(['--paths', 'nope'])"
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, ENAT_BENCH_DEVICE="cpu"))
    assert res.returncode != 0 and "unknown path" in res.stderr
