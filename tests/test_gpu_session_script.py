"""scripts/gpu_session.sh (the GPU-machine runbook) in dry-run mode: each phase prints
the commands it would run, and the ones that test or time import the installed package."""

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_session.sh")


def _run(*args, out):
    env = dict(os.environ, OUT=str(out))
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=env, timeout=120)


def test_dry_run_lists_every_phase(tmp_path):
    res = _run("--dry-run", "all", out=tmp_path)
    assert res.returncode == 0, res.stderr
    commands = [line[2:] for line in res.stdout.splitlines() if line.startswith("+ ")]
    assert any("pip install --no-build-isolation" in c for c in commands)
    tests = next(c for c in commands if "tests/test_cuda_sc_attention.py" in c)
    bench = next(c for c in commands if "pytest benchmarks/" in c)
    for c in (tests, bench):
        assert " -P -m pytest" in c, c  # not the uncompiled source tree
    assert any("benchmarks.paired" in c for c in commands)
    assert any("scripts/sanitize.py" in c for c in commands)
    files = [t for t in tests.split() if t.startswith("tests/")]
    assert {"tests/test_sc_attention.py", "tests/test_triton_sc_attention.py", "tests/test_routing.py"} <= set(files)
    for name in files:  # a renamed test file must not silently drop out of the GPU run
        assert os.path.exists(os.path.join(ROOT, name)), name


@pytest.mark.parametrize("args", [(), ("nonsense",)])
def test_refuses_missing_or_unknown_phase(tmp_path, args):
    res = _run(*args, out=tmp_path)
    assert res.returncode == 2
