"""Running benchmarks/paired.py and benchmarks/paired_training.py end to end (tests/tooling)."""

import os
import subprocess
import sys

from support.paths import REPO


def run_paired_script(module: str, args: list[str], tmp_path) -> str:
    """Run benchmarks.<module>.main(args + ['--out', ...]) on the CPU and return its table.

    From outside the source tree, the repository appended to sys.path: the installed
    enat_kernels (with its compiled extension) wins over ./enat_kernels."""
    out = tmp_path / f"{module}.md"
    code = (f"import sys; sys.path.append({str(REPO)!r}); from benchmarks.{module} import main; "
            f"sys.exit(main({args + ['--out', str(out)]!r}))")
    env = dict(os.environ, ENAT_BENCH_DEVICE="cpu", ENAT_BENCH_THREADS="1")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return out.read_text()
