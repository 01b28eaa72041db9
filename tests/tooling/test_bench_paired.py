"""benchmarks/paired.py end to end on one small CPU case: it checks every path against
the reference, times them in rotation and writes a table with per-round ratios."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_paired_script(module: str, args: list[str], tmp_path) -> str:
    """Run benchmarks.<module>.main(args + ['--out', ...]) on the CPU and return its table.

    From outside the source tree, the repository appended to sys.path: the installed
    enat_kernels (with its compiled extension) wins over ./enat_kernels."""
    out = tmp_path / f"{module}.md"
    code = (f"import sys; sys.path.append({ROOT!r}); from benchmarks.{module} import main; "
            f"sys.exit(main({args + ['--out', str(out)]!r}))")
    env = dict(os.environ, ENAT_BENCH_DEVICE="cpu", ENAT_BENCH_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return out.read_text()


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
