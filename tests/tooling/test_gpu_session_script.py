"""scripts/gpu_session.sh (the one GPU-machine command) and its summary, without a GPU:
the dry run, the budgets, the per-phase timeout and deadline, a failing phase that does
not stop the run, and the summary tables computed from benchmark JSON."""

import json
import os
import re
import stat
import subprocess
import sys

import pytest

from support.paths import REPO

ROOT = str(REPO)
SCRIPT = os.path.join(ROOT, "scripts", "gpu_session.sh")
SUMMARY = os.path.join(ROOT, "scripts", "gpu_session_summary.py")
PHASES = ["build", "check", "tests", "sanitize", "bench-attn", "bench-anchors", "bench-routing", "sampling"]


def _run(*args, out, work, timeout=120, **env):
    full = dict(os.environ, OUT=str(out), ENAT_GPU_WORK=str(work), PYTHON=sys.executable)
    full.update(env)
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=full, timeout=timeout)


def _phases(work):
    lines = (work / "phases.tsv").read_text().splitlines()[1:]
    return {row.split("\t")[0]: row.split("\t")[1] for row in lines}


def test_dry_run_lists_every_phase_in_order(tmp_path):
    res = _run("--dry-run", out=tmp_path / "out", work=tmp_path / "work")
    assert res.returncode == 0, res.stderr
    headers = re.findall(r"^== (\S+) \(budget (\d+) s", res.stdout, re.M)
    assert [h[0] for h in headers] == PHASES
    commands = [line[2:] for line in res.stdout.splitlines() if line.startswith("+ ")]
    assert "pip install --no-build-isolation" in commands[0] and "TORCH_CUDA_ARCH_LIST=" in commands[0]
    tests = next(c for c in commands if "tests/kernels/test_cuda_sc_attention.py" in c)
    for c in [tests] + [c for c in commands if "benchmarks/bench_" in c]:
        assert " -P -m pytest" in c, c  # the installed package, not the uncompiled source tree
    files = [t for t in tests.split() if t.startswith("tests/")]
    assert {"tests/kernels/test_sc_attention.py", "tests/kernels/test_triton_sc_attention.py", "tests/kernels/test_routing.py"} <= set(
        files
    )
    bench = " ".join(c for c in commands if "benchmarks/" in c)
    for name in files + ["benchmarks/bench_sc_attention.py", "benchmarks/bench_routing.py", "benchmarks/bench_sampling.py"]:
        assert os.path.exists(os.path.join(ROOT, name)), name  # a renamed file must not drop out silently
        assert name in tests or name in bench
    assert any("scripts/sanitize.py" in c for c in commands)
    # The dry run still writes the summary, from what it recorded.
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "DRY RUN" in summary and all(f"| {p} | DRY-RUN |" in summary for p in PHASES)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["verdict"] == "DRY RUN"


def test_budgets_fit_eight_minutes():
    text = open(SCRIPT).read()
    phases = dict(p.split(":") for p in re.search(r"^PHASES=\(([^)]*)\)", text, re.M).group(1).split())
    assert list(phases) == PHASES
    summary = int(re.search(r"^SUMMARY_BUDGET=(\d+)", text, re.M).group(1))
    deadline = int(re.search(r"ENAT_GPU_DEADLINE_S:-(\d+)", text).group(1))
    assert sum(map(int, phases.values())) <= deadline
    assert deadline + summary + 5 < 8 * 60  # + 5: the kill grace of the last timeout


@pytest.mark.parametrize("args", [("nonsense",), ("--dry-run", "tests", "nonsense")])
def test_refuses_unknown_phase(tmp_path, args):
    res = _run(*args, out=tmp_path / "out", work=tmp_path / "work")
    assert res.returncode == 2 and "unknown phase 'nonsense'" in res.stderr


def _slow_python(tmp_path):
    """A python3 that hangs when a phase runs (`python -P ...`) and works for the summary."""
    path = tmp_path / "python3"
    path.write_text(f'#!/bin/sh\n[ "$1" = -P ] && exec sleep 60\nexec {sys.executable} "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_phase_over_budget_is_stopped_and_the_run_goes_on(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    res = _run(
        "check",
        "bench-routing",
        out=out,
        work=work,
        timeout=60,
        PYTHON=_slow_python(tmp_path),
        ENAT_GPU_BUDGET_check="2",
        ENAT_GPU_BUDGET_bench_routing="2",
    )
    assert res.returncode == 1, res.stdout + res.stderr
    assert _phases(work) == {"check": "TIMEOUT", "bench-routing": "TIMEOUT"}
    summary = (out / "summary.md").read_text()
    assert "FAIL" in summary and "| check | TIMEOUT |" in summary
    assert (out / "artifacts.tar.gz").exists() and (out / "console.log").exists()
    assert res.stdout.rstrip().splitlines()[-1].startswith("| bench-routing | TIMEOUT")  # the summary ends the screen


def test_global_deadline_caps_a_phase_and_skips_what_does_not_fit(tmp_path):
    """7 s in all: check gets the 7 s (not its 15), then under 5 s are left for tests."""
    out, work = tmp_path / "out", tmp_path / "work"
    res = _run("check", "tests", out=out, work=work, timeout=60, PYTHON=_slow_python(tmp_path), ENAT_GPU_DEADLINE_S="7")
    assert res.returncode == 1
    assert _phases(work) == {"check": "TIMEOUT", "tests": "SKIPPED"}


# ----------------------------------------------------------------------------- the summary


def _bench(path, role, median, op="sc_attention", direction="fwd", case="dec256: B=500 Nq=128 Nc=128 H=16 D=64", flops=1e12, nbytes=None):
    return {
        "name": f"test[{path}]",
        "group": None,
        "stats": {"median": median},
        "extra_info": {
            "op": op,
            "direction": direction,
            "case_label": case,
            "path": path,
            "role": role,
            "flops": flops,
            "bytes": nbytes,
            "peak_tflops": 800.0,
            "peak_tbps": 4.0,
        },
    }


def test_summary_tables_from_benchmark_json(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    (work / "phases.tsv").write_text("phase\tstatus\trc\tseconds\tbudget\nbench-attn\tPASS\t0\t50\t80\n")
    attn = [
        _bench("ours:cuda", "ours", 2e-3),
        _bench("ours:triton", "ours", 4e-3),
        _bench("sdpa:flash+cat", "anchor", 5e-3),
        _bench("sdpa:cudnn+cat", "anchor", 3e-3),
        _bench("sdpa:flash", "anchor", 2.5e-3),
        _bench("reference", "anchor", 8e-3),
    ]
    route = [
        _bench("ours:cuda", "ours", 1e-4, op="routing:gather", direction=None, case="step256: B=500", flops=None, nbytes=2e8),
        _bench("gather", "anchor", 3e-4, op="routing:gather", direction=None, case="step256: B=500", flops=None, nbytes=2e8),
    ]
    samp = [
        _bench("ours:cuda", "ours", 1.0, op="sampling", direction=None, case="enat-l-256: B=250 steps=8", flops=None),
        _bench("reference:torch", "anchor", 1.5, op="sampling", direction=None, case="enat-l-256: B=250 steps=8", flops=None),
    ]
    for name, rows in (("bench-attn.json", attn), ("bench-routing.json", route), ("bench-sampling.json", samp)):
        (work / name).write_text(json.dumps({"machine_info": {}, "benchmarks": rows}))
    res = subprocess.run([sys.executable, SUMMARY, "--work", str(work), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    facts = json.loads((out / "summary.json").read_text())
    (row,) = facts["attention"]
    assert row["best_ours"] == "ours:cuda"
    assert row["tflops"]["ours:cuda"] == pytest.approx(500.0) and row["tflops"]["ours:triton"] == pytest.approx(250.0)
    # SDPA's kernels compete as one anchor (its fastest); the ratio is anchor / best of ours.
    assert row["ratios"] == pytest.approx({"sdpa+cat": 1.5, "sdpa": 1.25, "reference": 4.0})
    (r,) = facts["routing"]
    assert (
        r["tbps"] == pytest.approx({"ours:cuda": 2.0}) and r["copy_fraction"] == pytest.approx(0.5) and r["speedup"] == pytest.approx(3.0)
    )
    (s,) = facts["sampling"]
    assert s["speedup"] == pytest.approx(1.5)
    assert "| fwd | dec256: B=500 Nq=128 Nc=128 | 250.0 | 500.0 | cuda | 1.50x | 1.25x | 4.00x |" in res.stdout
    assert "| gather | step256 | - | 2.00 | 50% | 3.00x |" in res.stdout
    assert (out / "bench-report.md").exists() and "ours:cuda" in (out / "bench-report.md").read_text()
    assert facts["verdict"] == "PASS"
