"""Paired SC-Attention timings: every path once per round, in rotating order.

Why this exists next to the pytest-benchmark suite: the suite times one path after
another, so on a shared machine (a VM whose neighbours take CPU time in bursts) a
burst that lands on one path and not on the other moves their ratio by 2x; seen here.
Here each round runs every path once, back to back, in an order that rotates from
round to round, and the speedup is the median over rounds of the per-round ratio
(anchor time / ours), so a slow stretch of the machine slows both sides of a ratio.

Same shapes, paths, input rotation and sanity check as bench_sc_attention.py (whose
correctness check runs first here too).  From the repository root, after building:

    python -m benchmarks.paired                       # ours vs reference and SDPA(+cat)
    python -m benchmarks.paired --rounds 60 --out benchmarks/results/cpu-paired.md
    python -m benchmarks.paired --paths ours:cpu,reference,sdpa:default+cat,flex+cat
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time

from . import _env
from ._attention_paths import AttnCase, Unsupported, attention_paths
from ._cases import ATTN_SHAPES
from .bench_sc_attention import checked_call

DEFAULT_PATHS = {
    "cpu": "ours:cpu,reference,sdpa:default+cat,sdpa:default",
    "cuda": "ours:cuda,ours:triton,reference,sdpa:flash+cat,sdpa:flash,sdpa:cudnn+cat",
}


def _paired_env(rounds: int) -> _env.BenchEnv:
    threads = _env.configure_threads()
    on_gpu = _env.ON_GPU
    return _env.BenchEnv(
        device=_env.DEVICE, dtype=_env.DTYPE, device_name=_env.device_name(), threads=threads, smoke=False,
        cache_bytes=_env.last_level_cache_bytes(), clock=_env.cuda_event_clock_for(_env.DEVICE) if on_gpu else None,
        clock_name="cuda events (device time)" if on_gpu else "time.perf_counter (host)",
        max_time=0.0, min_rounds=rounds,
    )


def _prepare(path, case: AttnCase, env: _env.BenchEnv, backward: bool):
    """A call(i) over rotated input copies, checked against the reference and warmed up; or a skip reason."""
    reason = path.unavailable(case, backward)
    if reason:
        return None, reason
    with path.context():
        try:
            checked, n = checked_call({"case": case}, path, env, backward)
        except Unsupported as e:
            return None, str(e)

    def call(i: int):
        with path.context():
            return checked(i)

    for i in range(n):  # warm-up: compilation, allocator, first touch
        call(i)
    return call, None


def _time(call, i: int, env: _env.BenchEnv) -> float:
    clock = env.clock or time.perf_counter
    env.sync()
    t0 = clock()
    call(i)
    env.sync()
    return clock() - t0


def run(shapes, path_names: list[str], directions: list[str], rounds: int, env: _env.BenchEnv) -> list[dict]:
    by_name = {p.name: p for p in attention_paths(env.device.type)}
    unknown = [n for n in path_names if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown path(s) {unknown}; this device has {sorted(by_name)}")
    rows = []
    for shape in shapes:
        case = AttnCase(shape, env)
        for direction in directions:
            backward = direction == "fwd+bwd"
            calls, skipped = {}, {}
            for name in path_names:
                call, reason = _prepare(by_name[name], case, env, backward)
                if call is None:
                    skipped[name] = reason
                else:
                    calls[name] = call
            names = list(calls)
            times = {n: [] for n in names}
            for r in range(rounds):
                k = r % len(names)
                for name in names[k:] + names[:k]:  # rotate who goes first
                    times[name].append(_time(calls[name], r, env))
            rows.append({"shape": shape, "direction": direction, "times": times, "skipped": skipped})
            print(
                f"  {shape.id} {direction}: " + ", ".join(f"{n} {statistics.median(t) * 1e3:.2f} ms" for n, t in times.items()),
                file=sys.stderr,
            )
    return rows


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], statistics.median(xs), q[2]


def render(rows: list[dict], env: _env.BenchEnv, rounds: int, command: str) -> str:
    v = _env.versions()
    out = [
        f"# Paired SC-Attention timings: {env.device_name}",
        "",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- Device: {env.device_name} ({env.device.type}), dtype {str(env.dtype).replace('torch.', '')}, {env.threads} threads",
        f"- Command: `{command}`",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- Method: {rounds} rounds; each round runs every path once, in an order rotating per round, on "
        "rotated input copies; median time per path; **ratio** = median over rounds of (path time / "
        "ours time in the same round), with its quartiles. Clock: " + env.clock_name + ".",
        "",
    ]
    for row in rows:
        times, shape = row["times"], row["shape"]
        ours = next((n for n in times if n.startswith("ours:")), None)
        out += [
            f"## {row['direction']} | {shape.label}",
            "",
            "| path | median | ratio vs " + (ours or "-") + " (q1, q3) |",
            "|---|---:|---:|",
        ]
        for name, ts in sorted(times.items(), key=lambda kv: statistics.median(kv[1])):
            ratio = "-"
            if ours and name != ours:
                q1, med, q3 = _quartiles([a / b for a, b in zip(ts, times[ours])])
                ratio = f"{med:.2f}x ({q1:.2f}, {q3:.2f})"
            out.append(f"| {name} | {statistics.median(ts) * 1e3:.2f} ms | {ratio} |")
        for name, reason in row["skipped"].items():
            out.append(f"| {name} | skipped: {reason} | |")
        out.append("")
    return "\n".join(out)


def emit(text: str, out: str | None) -> None:
    """Write the table to `out`, or print it when no file is given."""
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
        print(f"wrote {out}", file=sys.stderr)
    else:
        print(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paths", default=None, help="comma-separated path names (default: ours and the main anchors)")
    ap.add_argument("--shapes", default=None, help="comma-separated shape names (default: all of this device's)")
    ap.add_argument("--directions", default="fwd,fwd+bwd")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--out", default=None, help="write the Markdown table here (default: stdout)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    env = _paired_env(args.rounds)
    shapes = ATTN_SHAPES if args.shapes is None else [s for s in ATTN_SHAPES if s.name in args.shapes.split(",")]
    if not shapes:
        ap.error(f"no shape among {[s.name for s in ATTN_SHAPES]}")
    paths = (args.paths or DEFAULT_PATHS[env.device.type]).split(",")
    rows = run(shapes, paths, args.directions.split(","), args.rounds, env)
    text = render(rows, env, args.rounds, "python -m benchmarks.paired " + " ".join(argv if argv is not None else sys.argv[1:]))
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
