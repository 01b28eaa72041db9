#!/usr/bin/env python
"""Turn the suites' pytest-benchmark JSON into a readable table and a plot.

    pytest benchmarks/ --benchmark-only --benchmark-json=results.json
    python benchmarks/report.py results.json            # -> benchmarks/results/<device>.md, .png

Definitions used in the report (each case's `role` is recorded by the suite):

- ours: this library's paths: enat_kernels.sc_attention and the routing ops on each
  backend (cpu, triton, cuda, and torch, the library's plain-PyTorch fallback), and
  the ENAT sampler running on the fused backends.
- anchors: what the library is measured against.  SC-Attention: the reference ENAT
  attention (concatenate, matmul, softmax, matmul), SDPA on concatenated K/V with each
  kernel, FlexAttention, xformers and flash-attn, each with the concatenation counted
  ("+cat") and not counted.  Routing: boolean-mask indexing as the published ENAT code
  does it, index_select/index_copy_ and gather/scatter_.  Sampling: the sampler on the
  torch backend.
- speedup: median time of the best (fastest) anchor of the group / median time of the
  row; above 1 the row beats every anchor, including those given their
  concatenation for free.
- TFLOP/s, TB/s: the operation's useful work (benchmarks/_costs.py, the same for every
  path of a group) over the median time.  % of peak: the larger of TFLOP/s over the
  measured matmul peak and TB/s over the measured copy peak, i.e. how close the row
  comes to the roofline bound it is nearest to.

Only the standard library and matplotlib: the report renders anywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass

OURS, ANCHOR = "ours", "anchor"
# Sections in this order (operations not listed follow, in the order they ran).
OP_ORDER = ("sc_attention fwd", "sc_attention fwd+bwd", "routing:split", "routing:gather", "routing:restore", "routing:merge", "sampling")
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass
class Row:
    op: str  # "sc_attention fwd", "routing:split", "sampling"
    case: str  # shape label
    path: str
    role: str
    median: float  # seconds
    flops: float | None
    bytes: float | None
    peak_tflops: float | None
    peak_tbps: float | None
    speedup: float | None = None  # best anchor median / median
    best_anchor: str | None = None

    @property
    def tflops(self) -> float | None:
        return self.flops / self.median / 1e12 if self.flops else None

    @property
    def tbps(self) -> float | None:
        return self.bytes / self.median / 1e12 if self.bytes else None

    @property
    def peak_fraction(self) -> tuple[float, str] | None:
        """(fraction, "compute" | "memory"): the larger of the two roofline fractions."""
        parts = []
        if self.tflops and self.peak_tflops:
            parts.append((self.tflops / self.peak_tflops, "compute"))
        if self.tbps and self.peak_tbps:
            parts.append((self.tbps / self.peak_tbps, "memory"))
        return max(parts) if parts else None


def load_rows(data: dict) -> list[Row]:
    rows = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        op = info.get("op", b.get("group") or "?")
        if info.get("direction"):
            op = f"{op} {info['direction']}"
        rows.append(
            Row(
                op=op,
                case=info.get("case_label") or info.get("case") or b.get("group") or "?",
                path=info.get("path") or b.get("name"),
                role=info.get("role", OURS),
                median=float(b["stats"]["median"]),
                flops=info.get("flops"),
                bytes=info.get("bytes"),
                peak_tflops=info.get("peak_tflops"),
                peak_tbps=info.get("peak_tbps"),
            )
        )
    return rows


def group_rows(rows: list[Row]) -> "OrderedDict[tuple[str, str], list[Row]]":
    """Rows by (op, case), ops in OP_ORDER, cases as they ran; speedups filled in, fastest first."""
    by_key: OrderedDict = OrderedDict()
    for r in rows:
        by_key.setdefault((r.op, r.case), []).append(r)

    def op_rank(op: str) -> int:
        return OP_ORDER.index(op) if op in OP_ORDER else len(OP_ORDER)

    keys = list(by_key)
    order = sorted(range(len(keys)), key=lambda i: (op_rank(keys[i][0]), i))
    groups: OrderedDict = OrderedDict((keys[i], by_key[keys[i]]) for i in order)
    for members in groups.values():
        anchors = [r for r in members if r.role == ANCHOR]
        best = min(anchors, key=lambda r: r.median) if anchors else None
        for r in members:
            if best is not None and r.median > 0:
                r.speedup = best.median / r.median
                r.best_anchor = best.path
        members.sort(key=lambda r: r.median)
    return groups


# ----------------------------------------------------------------------------- formatting


def fmt_time(s: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def fmt_num(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def fmt_speedup(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def fmt_peak(p: tuple[float, str] | None) -> str:
    return "-" if p is None else f"{100 * p[0]:.0f}% ({p[1]})"


def device_slug(data: dict) -> str:
    info = data.get("machine_info", {}).get("enat_bench", {})
    name = info.get("device_name") or data.get("machine_info", {}).get("cpu", {}).get("brand_raw") or "unknown"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"
    return slug if info.get("device") == "cuda" else f"cpu-{slug}"


def header(data: dict, command: str | None) -> list[str]:
    mi = data.get("machine_info", {})
    info = mi.get("enat_bench", {})
    v = info.get("versions", {})
    commit = data.get("commit_info") or {}
    lines = [
        f"# enat_kernels benchmarks: {info.get('device_name', '?')}",
        "",
        f"- Date: {data.get('datetime', '?')}",
        f"- Device: {info.get('device_name', '?')} ({info.get('device', '?')}), dtype {info.get('dtype', '?')}, "
        f"{info.get('threads', '?')} CPU threads (torch.set_num_threads)",
        f"- Command: `{command or info.get('command', '?')}`",
        "- Versions: " + ", ".join(f"{k} {v[k]}" for k in ("python", "torch", "triton", "enat_kernels", "cuda") if v.get(k)),
        f"- Timer: {info.get('timer', '?')}; medians of rounds, inputs rotated over several copies",
    ]
    if info.get("peak_tflops"):
        lines.append(
            f"- Measured peaks: {info['peak_tflops']:.3g} TFLOP/s, {info['peak_tbps']:.3g} TB/s ({info.get('peak_method', '')})"
        )
    if commit.get("id"):
        lines.append(f"- Commit: {commit['id'][:12]}{' (dirty)' if commit.get('dirty') else ''} on {commit.get('branch', '?')}")
    if info.get("smoke"):
        lines.append("- **Smoke run (--benchmark-disable): nothing was timed.**")
    lines += [
        "",
        "**ours**: this library (enat_kernels on each backend; `ours:torch` is its plain-PyTorch fallback). "
        "**anchors**: the reference ENAT attention, SDPA per kernel, FlexAttention, xformers, flash-attn "
        "(`+cat`: K/V concatenation, or varlen packing, inside the timed call; without it, done beforehand for free); "
        "for routing, boolean-mask indexing (published ENAT), index_select and gather/scatter; for sampling, the torch backend. "
        "**speedup** = median of the group's fastest anchor / median of the row. "
        "**% of peak**: the larger of TFLOP/s / measured matmul peak and TB/s / measured copy peak.",
        "",
    ]
    return lines


def summary_table(groups) -> list[str]:
    lines = [
        "## Summary: best of ours against the best anchor",
        "",
        "| operation | case | best ours | median | best anchor | median | speedup |",
        "|---|---|---|---:|---|---:|---:|",
    ]
    for (op, case), members in groups.items():
        ours = [r for r in members if r.role == OURS]
        anchors = [r for r in members if r.role == ANCHOR]
        o = min(ours, key=lambda r: r.median) if ours else None
        a = min(anchors, key=lambda r: r.median) if anchors else None
        lines.append(
            f"| {op} | {case} | {o.path if o else '-'} | {fmt_time(o.median) if o else '-'} | "
            f"{a.path if a else '-'} | {fmt_time(a.median) if a else '-'} | {fmt_speedup(o.speedup) if o else '-'} |"
        )
    return lines + [""]


def detail_tables(groups) -> list[str]:
    lines = []
    ops: OrderedDict = OrderedDict()
    for (op, case), members in groups.items():
        ops.setdefault(op, []).append((case, members))
    for op, cases in ops.items():
        lines += [
            f"## {op}",
            "",
            "| case | path | role | median | speedup vs best anchor | TFLOP/s | TB/s | % of peak |",
            "|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for case, members in cases:
            for i, r in enumerate(members):
                name = f"**{r.path}**" if r.role == OURS else r.path
                lines.append(
                    f"| {case if i == 0 else ''} | {name} | {r.role} | {fmt_time(r.median)} | {fmt_speedup(r.speedup)} | "
                    f"{fmt_num(r.tflops)} | {fmt_num(r.tbps)} | {fmt_peak(r.peak_fraction)} |"
                )
        lines.append("")
    return lines


def skipped_section(data: dict) -> list[str]:
    skipped = data.get("machine_info", {}).get("enat_bench", {}).get("skipped") or {}
    if not skipped:
        return []
    by_reason: OrderedDict = OrderedDict()
    for nodeid, reason in skipped.items():
        by_reason.setdefault(reason, []).append(nodeid.split("::")[-1])
    lines = ["## Skipped", "", "| reason | cases |", "|---|---:|"]
    for reason, ids in by_reason.items():
        lines.append(f"| {reason.replace('|', '/')} | {len(ids)} |")
    return lines + [""]


def render_markdown(data: dict, command: str | None = None, plot_name: str | None = None) -> str:
    groups = group_rows(load_rows(data))
    lines = header(data, command) + summary_table(groups)
    if plot_name:
        lines += [f"![speedup per shape]({plot_name})", ""]
    lines += detail_tables(groups) + skipped_section(data)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plot


def plot_speedups(data: dict, path: str) -> None:
    """One panel per operation: each of ours' paths' speedup over the best anchor, per shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_rows(load_rows(data))
    ops: OrderedDict = OrderedDict()
    for (op, case), members in groups.items():
        ops.setdefault(op, []).append((case, {r.path: r.speedup for r in members if r.role == OURS}))
    n = max(len(ops), 1)
    fig, axes = plt.subplots(n, 1, figsize=(11, 3.2 * n), squeeze=False)
    for ax, (op, cases) in zip(axes[:, 0], ops.items()):
        paths = sorted({p for _, sp in cases for p in sp})
        width = 0.8 / max(len(paths), 1)
        for j, p in enumerate(paths):
            xs = [i + (j - (len(paths) - 1) / 2) * width for i in range(len(cases))]
            ys = [sp.get(p) or 0.0 for _, sp in cases]
            ax.bar(xs, ys, width, label=p)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xlim(-0.6, max(len(cases), 3) - 0.4)  # a lone shape keeps narrow bars
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([c.split(":")[0] for c, _ in cases], fontsize=8)
        ax.set_ylabel("speedup vs best anchor")
        ax.set_title(op, fontsize=10)
        if paths:
            ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def write_report(json_path: str, out_dir: str = DEFAULT_OUT, name: str | None = None, command: str | None = None) -> tuple[str, str]:
    with open(json_path) as f:
        data = json.load(f)
    name = name or device_slug(data)
    os.makedirs(out_dir, exist_ok=True)
    md_path, png_path = os.path.join(out_dir, f"{name}.md"), os.path.join(out_dir, f"{name}.png")
    plot_speedups(data, png_path)
    with open(md_path, "w") as f:
        f.write(render_markdown(data, command, plot_name=os.path.basename(png_path)))
    return md_path, png_path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", help="pytest-benchmark JSON (--benchmark-json=...)")
    ap.add_argument("--out-dir", default=DEFAULT_OUT, help="where <device>.md and <device>.png go (default: benchmarks/results)")
    ap.add_argument("--name", help="file name stem instead of the device's")
    ap.add_argument("--command", help="the command line to print in the header (default: the one recorded)")
    args = ap.parse_args(argv)
    md, png = write_report(args.json, args.out_dir, args.name, args.command)
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
