"""benchmarks/report.py on a small synthetic pytest-benchmark JSON: rows, arithmetic, files."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from support.paths import REPO

ROOT = str(REPO)
REPORT_PY = os.path.join(ROOT, "benchmarks", "report.py")


def _load_report():
    spec = importlib.util.spec_from_file_location("enat_bench_report", REPORT_PY)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while building classes
    spec.loader.exec_module(mod)
    return mod


report = _load_report()

PEAKS = {"peak_tflops": 100.0, "peak_tbps": 2.0, "peak_method": "synthetic"}
ATTN = "dec256: B=500 Nq=128 Nc=128 H=16 D=64"
ROUTE = "step256: B=500 L=256 C=1024"


def _bench(op, direction, case, path, role, median, flops, nbytes):
    return {
        "group": f"{op} {direction or ''} | {case}",
        "name": f"test[{path}]",
        "stats": {"median": median, "mean": median * 1.1, "min": median * 0.9},
        "extra_info": {
            "op": op, "direction": direction, "case_label": case, "path": path, "role": role,
            "flops": flops, "bytes": nbytes, **PEAKS,
        },
    }


def _data():
    return {
        "datetime": "2026-11-23T12:00:00+00:00",
        "version": "5.3.1",
        "commit_info": {"id": "0123456789abcdef", "dirty": True, "branch": "benchmarks"},
        "machine_info": {
            "enat_bench": {
                "device": "cuda", "device_name": "Test GPU 80GB", "dtype": "bfloat16", "threads": 4,
                "timer": "cuda events (device time)", "command": "pytest benchmarks/ --benchmark-only",
                "versions": {"python": "3.11.7", "torch": "2.14.1", "triton": "3.8.0"},
                "skipped": {"benchmarks/bench_x.py::test[flash-attn]": "flash-attn is not installed"},
                **PEAKS,
            }
        },
        "benchmarks": [
            # SC-Attention: ours 1 ms; the best anchor (sdpa:flash) 2 ms, the reference 4 ms.
            _bench("sc_attention", "fwd", ATTN, "ours:cuda", "ours", 1e-3, 50e12 * 1e-3, 0.5e12 * 1e-3),
            _bench("sc_attention", "fwd", ATTN, "reference", "anchor", 4e-3, 50e12 * 1e-3, 0.5e12 * 1e-3),
            _bench("sc_attention", "fwd", ATTN, "sdpa:flash", "anchor", 2e-3, 50e12 * 1e-3, 0.5e12 * 1e-3),
            # Routing: ours 3 ms is slower than bool-mask at 1.5 ms; 3 GB moved -> 1 TB/s.
            _bench("routing:split", None, ROUTE, "ours:torch", "ours", 3e-3, 0.0, 3e9),
            _bench("routing:split", None, ROUTE, "bool-mask", "anchor", 1.5e-3, 0.0, 3e9),
            # A group without anchors: no speedup.
            _bench("sampling", None, "tiny", "ours:cuda", "ours", 0.25, None, None),
        ],
    }


def _table_rows(md: str, section: str) -> list[list[str]]:
    """The cells of the data rows of the table under '## section'."""
    lines = md.split("\n")
    start = lines.index(f"## {section}")
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        if line.startswith("|---"):
            rows.pop()  # that was the header
        elif line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_speedups_are_best_anchor_over_row():
    groups = report.group_rows(report.load_rows(_data()))
    attn = {r.path: r for r in groups[("sc_attention fwd", ATTN)]}
    assert attn["ours:cuda"].speedup == pytest.approx(2.0)
    assert attn["sdpa:flash"].speedup == pytest.approx(1.0)
    assert attn["reference"].speedup == pytest.approx(0.5)
    assert attn["ours:cuda"].best_anchor == "sdpa:flash"
    assert [r.path for r in groups[("sc_attention fwd", ATTN)]] == ["ours:cuda", "sdpa:flash", "reference"]
    route = {r.path: r for r in groups[("routing:split", ROUTE)]}
    assert route["ours:torch"].speedup == pytest.approx(0.5)
    assert groups[("sampling", "tiny")][0].speedup is None


def test_throughput_and_peak_fraction():
    groups = report.group_rows(report.load_rows(_data()))
    ours = groups[("sc_attention fwd", ATTN)][0]
    assert ours.tflops == pytest.approx(50.0)
    assert ours.tbps == pytest.approx(0.5)
    assert ours.peak_fraction == pytest.approx((0.5, "compute"))  # 50/100 beats 0.5/2
    route = {r.path: r for r in groups[("routing:split", ROUTE)]}
    assert route["ours:torch"].tflops is None and route["ours:torch"].tbps == pytest.approx(1.0)
    assert route["ours:torch"].peak_fraction == pytest.approx((0.5, "memory"))
    assert route["bool-mask"].peak_fraction == pytest.approx((1.0, "memory"))


def test_markdown_tables_and_header(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_data()))
    md_path, png_path = report.write_report(str(path), str(tmp_path / "out"))
    assert os.path.basename(md_path) == "test-gpu-80gb.md"
    md = open(md_path).read()

    for needle in ("Test GPU 80GB", "2026-11-23", "`pytest benchmarks/ --benchmark-only`", "torch 2.14.1", "triton 3.8.0",
                   "4 CPU threads", "100 TFLOP/s", "0123456789ab (dirty)"):
        assert needle in md, needle

    attn = _table_rows(md, "sc_attention fwd")
    assert [r[1] for r in attn] == ["**ours:cuda**", "sdpa:flash", "reference"]
    assert attn[0] == [ATTN, "**ours:cuda**", "ours", "1 ms", "2.00x", "50", "0.5", "50% (compute)"]
    assert attn[2][3:5] == ["4 ms", "0.50x"]
    route = _table_rows(md, "routing:split")
    assert route[1] == ["", "**ours:torch**", "ours", "3 ms", "0.50x", "-", "1", "50% (memory)"]
    assert _table_rows(md, "sampling")[0][3:5] == ["250 ms", "-"]

    summary = _table_rows(md, "Summary: best of ours against the best anchor")
    assert ["sc_attention fwd", ATTN, "ours:cuda", "1 ms", "sdpa:flash", "2 ms", "2.00x"] in summary
    assert _table_rows(md, "Skipped") == [["flash-attn is not installed", "1"]]

    with open(png_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_command_line(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(_data()))
    out = tmp_path / "cli"
    res = subprocess.run([sys.executable, REPORT_PY, str(path), "--out-dir", str(out), "--name", "run1"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (out / "run1.md").read_text().startswith("# enat_kernels benchmarks: Test GPU 80GB")
    assert (out / "run1.png").stat().st_size > 1000
