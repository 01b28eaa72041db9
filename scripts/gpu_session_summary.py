#!/usr/bin/env python3
"""The summary of a scripts/gpu_session.sh run: one screen, plus files in $OUT.

Reads the session's working directory (phases.tsv, commands.txt, tests.xml, the
benchmark JSON files bench-*.json) and writes into the output directory:

- summary.md: date, device, versions, the commands run, each phase's verdict and time,
  the test counts, and the compact tables below;
- summary.json: the same facts, machine-readable;
- bench-report.md / .png: the full benchmark tables of benchmarks/report.py over all
  benchmark JSON files of the session, merged.

The compact tables (screen and summary.md):

- attention, per ENAT shape and direction: TFLOP/s of ours (cuda, triton) and of the
  anchors, and the ratio anchor time / best-of-ours time (above 1: ours is faster),
  for SDPA on concatenated K/V with the concatenation counted (+cat) and not, the
  reference ENAT attention, FlexAttention and xformers where they ran;
- routing: ours in TB/s, as a fraction of the measured copy bandwidth, and against the
  best index-based anchor;
- sampling: seconds per sampling run, fused backends against the torch path.

No GPU and no torch import are needed (``--dry-run`` writes the summary of a dry run),
so the summary is tested on any machine.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # benchmarks/ (report.py), never ahead of the installed packages
from benchmarks import report  # noqa: E402  (stdlib + matplotlib only)

BENCH_FILES = ("bench-attn.json", "bench-anchors.json", "bench-routing.json", "bench-sampling.json")
ATTN_ANCHORS = ("sdpa+cat", "sdpa", "reference", "flex+cat", "flex", "xformers+cat", "xformers")


# ----------------------------------------------------------------------------- facts


def _cmd(args: list[str]) -> str | None:
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(probe_device: bool) -> dict:
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        **{name: _version(name) for name in ("torch", "triton", "numpy", "enat_kernels", "xformers")},
    }
    if probe_device:
        env["gpu"] = _cmd(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
        nvcc = _cmd(["nvcc", "--version"])
        env["nvcc"] = nvcc.splitlines()[-1] if nvcc else None
        sanitizer = _cmd(["compute-sanitizer", "--version"])
        env["compute_sanitizer"] = sanitizer.splitlines()[-1] if sanitizer else None
    return env


def read_phases(work: Path) -> list[dict]:
    path = work / "phases.tsv"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, line.split("\t"))) for line in lines[1:] if line.strip()]


def read_tests(work: Path) -> dict | None:
    """Counts from the JUnit XML of the tests phase."""
    path = work / "tests.xml"
    if not path.exists():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"error": f"unreadable {path.name}: {e}"}
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_ids"] = [
        f"{c.get('classname')}::{c.get('name')}"
        for s in suites
        for c in s.iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None
    ]
    return counts


def merge_benchmarks(work: Path) -> dict | None:
    """All benchmark JSON of the session as one pytest-benchmark document (for report.py)."""
    merged = None
    for name in BENCH_FILES:
        path = work / name
        if not path.exists():
            continue
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        if merged is None:
            merged = data
        else:
            merged["benchmarks"] += data.get("benchmarks", [])
            skipped = data.get("machine_info", {}).get("enat_bench", {}).get("skipped", {})
            merged.setdefault("machine_info", {}).setdefault("enat_bench", {}).setdefault("skipped", {}).update(skipped)
    return merged


# ----------------------------------------------------------------------------- tables


def _family_key(path: str) -> str:
    """sdpa:flash+cat -> sdpa+cat: the SDPA kernels compete as one anchor, its best."""
    if path.startswith("sdpa:"):
        return "sdpa+cat" if path.endswith("+cat") else "sdpa"
    return path


def attention_table(rows: list[report.Row]) -> list[dict]:
    out = []
    groups: dict = {}
    for r in rows:
        if r.op.startswith("sc_attention"):
            groups.setdefault((r.op, r.case), []).append(r)
    for (op, case), members in groups.items():
        ours = {r.path: r for r in members if r.role == report.OURS and r.path in ("ours:cuda", "ours:triton")}
        anchors: dict[str, report.Row] = {}
        for r in members:
            if r.role == report.ANCHOR:
                key = _family_key(r.path)
                if key not in anchors or r.median < anchors[key].median:
                    anchors[key] = r
        best = min(ours.values(), key=lambda r: r.median) if ours else None
        out.append(
            {
                "op": op,
                "case": case,
                "tflops": {p: r.tflops for p, r in ours.items()} | {k: anchors[k].tflops for k in anchors},
                "best_ours": best.path if best else None,
                "ratios": {k: anchors[k].median / best.median for k in ATTN_ANCHORS if k in anchors and best},
                "anchor_paths": {k: anchors[k].path for k in anchors},
            }
        )
    return out


def routing_table(rows: list[report.Row]) -> list[dict]:
    out = []
    for (op, case), members in report.group_rows([r for r in rows if r.op.startswith("routing:")]).items():
        ours = {r.path: r for r in members if r.role == report.OURS and r.path in ("ours:cuda", "ours:triton")}
        if not ours:
            continue
        best = min(ours.values(), key=lambda r: r.median)
        out.append(
            {
                "op": op,
                "case": case,
                "tbps": {p: r.tbps for p, r in ours.items()},
                "best_ours": best.path,
                "copy_fraction": best.tbps / best.peak_tbps if best.tbps and best.peak_tbps else None,
                "speedup": best.speedup,
                "best_anchor": best.best_anchor,
            }
        )
    return out


def sampling_table(rows: list[report.Row]) -> list[dict]:
    out = []
    for (_, case), members in report.group_rows([r for r in rows if r.op == "sampling"]).items():
        torch_row = next((r for r in members if r.path.endswith(":torch")), None)
        for r in members:
            if r is not torch_row:
                out.append(
                    {
                        "case": case,
                        "path": r.path,
                        "seconds": r.median,
                        "torch_seconds": torch_row.median if torch_row else None,
                        "speedup": torch_row.median / r.median if torch_row else None,
                    }
                )
    return out


def _f(x, fmt="{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def render_tables(attn: list[dict], route: list[dict], samp: list[dict]) -> list[str]:
    lines = []
    if attn:
        present = [k for k in ATTN_ANCHORS if any(k in a["ratios"] for a in attn)]
        lines += ["Attention (TFLOP/s; ratio = anchor time / best of ours, >1: ours faster)", ""]
        lines += ["| direction | shape | triton | cuda | best | " + " | ".join(f"vs {k}" for k in present) + " |"]
        lines += ["|---|---|---:|---:|---|" + "---:|" * len(present)]
        for a in attn:
            cells = [_f(a["ratios"].get(k), "{:.2f}x") for k in present]
            lines.append(
                f"| {a['op'].removeprefix('sc_attention ')} | {a['case'].split(' H=')[0]} | {_f(a['tflops'].get('ours:triton'))} | "
                f"{_f(a['tflops'].get('ours:cuda'))} | {(a['best_ours'] or '-').removeprefix('ours:')} | " + " | ".join(cells) + " |"
            )
        lines.append("")
    if route:
        lines += ["Routing (TB/s; best of ours as % of the measured copy bandwidth, and vs the best anchor)", ""]
        lines += ["| op | shape | triton | cuda | % copy | vs anchor |", "|---|---|---:|---:|---:|---:|"]
        for r in route:
            frac = r["copy_fraction"]
            lines.append(
                f"| {r['op'].removeprefix('routing:')} | {r['case'].split(':')[0]} | {_f(r['tbps'].get('ours:triton'), '{:.2f}')} | "
                f"{_f(r['tbps'].get('ours:cuda'), '{:.2f}')} | {_f(frac and 100 * frac, '{:.0f}%')} | {_f(r['speedup'], '{:.2f}x')} |"
            )
        lines.append("")
    if samp:
        lines += ["Sampling (seconds per run; speedup vs the torch path)", ""]
        lines += ["| config | path | s | torch s | speedup |", "|---|---|---:|---:|---:|"]
        for s in samp:
            lines.append(
                f"| {s['case']} | {s['path']} | {_f(s['seconds'], '{:.3f}')} | {_f(s['torch_seconds'], '{:.3f}')} "
                f"| {_f(s['speedup'], '{:.2f}x')} |"
            )
        lines.append("")
    return lines


# ----------------------------------------------------------------------------- main


def summarize(work: Path, out: Path, dry_run: bool = False) -> tuple[dict, str]:
    phases = read_phases(work)
    tests = read_tests(work)
    bench = merge_benchmarks(work)
    rows = report.load_rows(bench) if bench else []
    attn, route, samp = attention_table(rows), routing_table(rows), sampling_table(rows)
    env = environment(probe_device=not dry_run)
    commands = (work / "commands.txt").read_text().splitlines() if (work / "commands.txt").exists() else []
    if bench:
        (work / "bench.json").write_text(json.dumps(bench))
        report.write_report(str(work / "bench.json"), str(out), name="bench-report", command="scripts/gpu_session.sh (bench phases)")

    verdict = "DRY RUN" if dry_run else ("PASS" if phases and all(p["status"] == "PASS" for p in phases) else "FAIL")
    head = [f"enat_kernels GPU session: {verdict}", ""]
    head.append(f"date {env['date']}; device {env.get('gpu') or 'none'}; {env['cpus']} CPUs")
    head.append(
        "versions: " + ", ".join(f"{k} {env[k]}" for k in ("python", "torch", "triton", "numpy", "nvcc", "compute_sanitizer") if env.get(k))
    )
    head.append("")
    head += ["| phase | status | seconds | budget |", "|---|---|---:|---:|"]
    head += [f"| {p['phase']} | {p['status']} | {p['seconds']} | {p['budget']} |" for p in phases]
    head.append("")
    if tests is None and any(p["phase"] == "tests" and p["status"] not in ("DRY-RUN", "SKIPPED") for p in phases):
        head += ["tests: no JUnit XML (the phase stopped before pytest wrote it; see tests.log)", ""]
    if tests:
        if "error" in tests:
            head.append(f"tests: {tests['error']}")
        else:
            head.append(f"tests: {tests['passed']} passed, {tests['failures'] + tests['errors']} failed, {tests['skipped']} skipped")
            head += [f"  FAILED {t}" for t in tests["failed_ids"][:8]]
        head.append("")
    screen = head + render_tables(attn, route, samp)
    md = screen + ["## Commands", "", "```", *commands, "```", ""]
    if bench:
        md.append("Full benchmark tables: bench-report.md; every log and JSON: artifacts.tar.gz.")

    facts = {
        "verdict": verdict,
        "environment": env,
        "phases": phases,
        "tests": tests,
        "attention": attn,
        "routing": route,
        "sampling": samp,
        "commands": commands,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text("\n".join(md) + "\n")
    (out / "summary.json").write_text(json.dumps(facts, indent=1, default=str) + "\n")
    return facts, "\n".join(screen)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="the session's working directory")
    ap.add_argument("--out", type=Path, required=True, help="where summary.md, summary.json and bench-report.* go")
    ap.add_argument("--dry-run", action="store_true", help="a dry run's summary: no device facts")
    args = ap.parse_args(argv)
    facts, screen = summarize(args.work, args.out, args.dry_run)
    print(screen)
    return 0 if facts["verdict"] != "FAIL" else 1


if __name__ == "__main__":
    sys.exit(main())
