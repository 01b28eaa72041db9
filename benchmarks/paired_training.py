"""Paired training-step timings: fused path against the torch path, interleaved rounds.

Each round runs one training step (forward + backward + AdamW + EMA, as enat-train
does) on each path, in an order alternating per round; the speedup is the median over
rounds of the per-round ratio (torch time / fused time), so a slow stretch of a shared
machine slows both sides of a ratio (same method as benchmarks/paired.py).  Both paths
start from the same weights and draw the same masks; their first losses must agree.

Peak memory: on a GPU, torch.cuda.max_memory_allocated over a step above what was
allocated before it; on a CPU, the peak resident size of a fresh process over three
steps above its size once model, EMA and data exist (optimizer state and gradients
included), one process per path.

    python -m benchmarks.paired_training                         # CPU: e4d2-c256h4-l256, B=8
    python -m benchmarks.paired_training --rounds 12 --out benchmarks/results/cpu-amd-epyc-training.md
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import statistics
import sys
import time

import torch

from enat.backends import fused_backend_for

from . import _env
from ._training_paths import CPU_SHAPES, GPU_SHAPES, TrainShape, cpu_peak_rss_step, cuda_peak, make_trainer
from .paired import _paired_env, _quartiles, emit


def _cpu_peak_in_child(shape: TrainShape, backend: str, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    queue.put(cpu_peak_rss_step(shape, backend))


def cpu_peak(shape: TrainShape, backend: str, threads: int) -> dict:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_cpu_peak_in_child, args=(shape, backend, threads, queue))
    proc.start()
    result = queue.get(timeout=1800)
    proc.join()
    return result


def run(shapes: list[TrainShape], rounds: int, env: _env.BenchEnv, memory: bool) -> list[dict]:
    device = env.device
    precision = "bf16" if device.type == "cuda" else "fp32"
    fused = fused_backend_for(device)
    rows = []
    for shape in shapes:
        paths = {name: make_trainer(shape, be, device, precision) for name, be in (("fused", fused), ("torch", "torch"))}
        first = {}
        for name, tr in paths.items():
            torch.manual_seed(0)  # the same dropout masks on both paths
            first[name] = tr.train_step().item()
        if abs(first["fused"] - first["torch"]) > (2e-2 if precision == "bf16" else 1e-3) * abs(first["torch"]):
            raise SystemExit(f"{shape.id}: fused and torch first-step losses differ: {first}")
        for tr in paths.values():  # warm-up: allocator, optimizer state
            tr.train_step()
        names = list(paths)
        times = {n: [] for n in names}
        for r in range(rounds):
            order = names if r % 2 == 0 else names[::-1]
            for n in order:
                env.sync()
                t0 = time.perf_counter()
                paths[n].train_step().item()  # the loss read back: the step is done
                times[n].append(time.perf_counter() - t0)
        peaks = {}
        if memory:
            for n, tr in paths.items():
                if device.type == "cuda":
                    with cuda_peak(device) as peak:
                        tr.train_step().item()
                    peaks[n] = peak
                else:
                    peaks[n] = cpu_peak(shape, tr.model.backend, env.threads)
        del paths
        rows.append({"shape": shape, "times": times, "peaks": peaks, "first_loss": first, "backend": fused})
        print(f"  {shape.id}: " + ", ".join(f"{n} {statistics.median(t) * 1e3:.0f} ms" for n, t in times.items()), file=sys.stderr)
    return rows


def render(rows: list[dict], env: _env.BenchEnv, rounds: int, command: str) -> str:
    v = _env.versions()
    gpu = env.device.type == "cuda"
    out = [
        f"# Paired training-step timings: {env.device_name}",
        "",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- Device: {env.device_name} ({env.device.type}), {'bf16 autocast' if gpu else 'float32'}, {env.threads} threads",
        f"- Command: `{command}`",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        f"- Method: {rounds} rounds; each round runs one training step per path (forward + backward + AdamW + EMA "
        "update, the loss read back), order alternating per round, after two warm-up steps; median step time per "
        "path; **ratio** = median over rounds of (torch time / fused time in the same round), with its quartiles.",
        "- Peak memory: " + ("max_memory_allocated over one step, above the memory allocated before it"
                             if gpu else "peak resident size (VmHWM, reset before the steps) over three steps in a fresh "
                             "process per path, above its size with model, EMA and data built (optimizer state and "
                             "gradients included)") + ".",
        "",
    ]
    for row in rows:
        shape, times, peaks = row["shape"], row["times"], row["peaks"]
        q1, med, q3 = _quartiles([a / b for a, b in zip(times["torch"], times["fused"])])
        out += [f"## {shape.label}", "",
                f"First-step loss: fused {row['first_loss']['fused']:.6f}, torch {row['first_loss']['torch']:.6f}.", "",
                "| path | median step | ratio torch / fused (q1, q3) | peak memory |", "|---|---:|---:|---:|"]
        for name in ("fused", "torch"):
            label = f"fused ({row['backend']})" if name == "fused" else "torch (reference)"
            ratio = f"{med:.2f}x ({q1:.2f}, {q3:.2f})" if name == "torch" else "-"
            mem = f"{peaks[name]['peak_bytes'] / 2**20:.0f} MiB" if name in peaks else "not measured"
            out.append(f"| {label} | {statistics.median(times[name]) * 1e3:.0f} ms | {ratio} | {mem} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--shapes", default=None, help="comma-separated shape ids (default: all of this device's)")
    ap.add_argument("--config", default=None, help="time this configuration instead (with --batch), reuse on and off")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--out", default=None, help="write the Markdown table here (default: stdout)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    env = _paired_env(args.rounds)
    shapes = GPU_SHAPES if env.device.type == "cuda" else CPU_SHAPES
    if args.config:
        shapes = [TrainShape(args.config, args.batch, reuse=True), TrainShape(args.config, args.batch, reuse=False)]
    if args.shapes:
        shapes = [s for s in shapes if s.id in args.shapes.split(",")]
        if not shapes:
            ap.error("no shape of this device matches --shapes")
    rows = run(shapes, args.rounds, env, memory=not args.no_memory)
    text = render(rows, env, args.rounds, "python -m benchmarks.paired_training " + " ".join(argv if argv is not None else sys.argv[1:]))
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
