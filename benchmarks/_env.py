"""Where the suite runs and how it times: device, dtype, threads, clocks, peaks, the runner.

Timing rules (also in benchmarks/README.md, "Timing"):

- GPU: each pytest-benchmark round is timed with CUDA events recorded on the current
  stream (`cuda_event_clock`), so the number is device time, not host time.  Inside a
  round the calls are issued back to back without synchronizing, as
  `triton.testing.do_bench` does, so launch latency is hidden the way it is in a model.
- CPU: pytest-benchmark's own timer (time.perf_counter), torch.set_num_threads fixed
  once per session (ENAT_BENCH_THREADS, default torch's choice) and recorded.
- Both: one warm-up pass (compilation, autotuning, allocator), then rounds of several
  iterations; each iteration runs on the next of several preallocated input copies,
  enough of them to exceed the last-level cache several times over, so no call finds
  its inputs in cache from the previous one.  Reports use the median round.
- Under --benchmark-disable (the CI smoke mode) every case runs once on one copy and
  no peaks are measured.
"""

from __future__ import annotations

import itertools
import math
import os
import platform
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

DEVICE_ENV = "ENAT_BENCH_DEVICE"  # "cpu" or "cuda": benchmark that device even if another exists
THREADS_ENV = "ENAT_BENCH_THREADS"  # CPU threads (torch.set_num_threads); default: torch's choice

ROTATE_CACHE_MULTIPLE = 4  # input copies together span this many times the last-level cache
MIN_COPIES, MAX_COPIES = 2, 8
MIN_ROUND_S = 0.01  # a round lasts at least this long (amortizes the clock's own cost)
MAX_ROUNDS = 1000


def pick_device() -> torch.device:
    want = os.environ.get(DEVICE_ENV, "").strip().lower()
    if want:
        if want not in ("cpu", "cuda"):
            raise ValueError(f"{DEVICE_ENV} must be 'cpu' or 'cuda', got {want!r}")
        if want == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"{DEVICE_ENV}=cuda but no CUDA device is visible")
        return torch.device(want)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --benchmark-disable (CI smoke mode), set by conftest.py before the bench modules are
# imported: they then parametrize over the reduced shape set (_cases.active).
SMOKE = False

# Decided at import: the shape lists of the bench modules depend on it.
DEVICE = pick_device()
ON_GPU = DEVICE.type == "cuda"
# The dtype the model runs in on each device: bf16 on GPU, float32 on CPU.
DTYPE = torch.bfloat16 if ON_GPU else torch.float32


def device_name(device: torch.device = DEVICE) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def last_level_cache_bytes(device: torch.device = DEVICE) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    text = f.read().strip()
            except OSError:
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
    except OSError:
        pass
    return best or 32 << 20


def cuda_event_clock_for(device: torch.device) -> Callable[[], float]:
    """A clock reading device time, in seconds, from events on the current stream.

    pytest-benchmark calls the clock before and after each round; the difference is
    the device time between two events.  Each reading records an event and waits for
    it, so the start event waits for earlier work (setup), which is not counted.  The
    reading accumulates event-to-event intervals in a Python float: CUDA reports
    elapsed times as float32 milliseconds, precise for short intervals only.
    """
    last = torch.cuda.Event(enable_timing=True)
    last.record()
    last.synchronize()
    state = {"event": last, "seconds": 0.0}

    def cuda_event_clock() -> float:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        ev.synchronize()
        state["seconds"] += state["event"].elapsed_time(ev) * 1e-3
        state["event"] = ev
        return state["seconds"]

    return cuda_event_clock


@dataclass
class BenchEnv:
    """Session facts recorded with every case (see `record`)."""

    device: torch.device
    dtype: torch.dtype
    device_name: str
    threads: int
    smoke: bool  # --benchmark-disable: run each case once, measure nothing
    cache_bytes: int
    clock: Callable[[], float] | None  # None: pytest-benchmark's own timer
    clock_name: str
    max_time: float
    min_rounds: int
    peaks: dict = field(default_factory=dict)

    def copies_for(self, bytes_per_copy: int) -> int:
        """How many input copies to rotate through so that caches do not flatter."""
        if self.smoke:
            return 1
        want = math.ceil(ROTATE_CACHE_MULTIPLE * self.cache_bytes / max(bytes_per_copy, 1))
        return int(min(MAX_COPIES, max(MIN_COPIES, want)))

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


_SESSION: BenchEnv | None = None


def configure_threads() -> int:
    """Fix torch's CPU thread count for the session (ENAT_BENCH_THREADS or torch's default)."""
    n = os.environ.get(THREADS_ENV)
    threads = int(n) if n else torch.get_num_threads()
    torch.set_num_threads(threads)
    return threads


def session_env(config) -> BenchEnv:
    """The one BenchEnv of this pytest session (created on first use)."""
    global _SESSION
    if _SESSION is None:
        threads = configure_threads()
        clock = cuda_event_clock_for(DEVICE) if ON_GPU else None
        _SESSION = BenchEnv(
            device=DEVICE,
            dtype=DTYPE,
            device_name=device_name(),
            threads=threads,
            smoke=SMOKE,
            cache_bytes=last_level_cache_bytes(),
            clock=clock,
            clock_name="cuda events (device time)" if ON_GPU else "time.perf_counter (host)",
            max_time=float(config.getoption("benchmark_max_time", 1.0)),
            min_rounds=int(config.getoption("benchmark_min_rounds", 5)),
        )
    return _SESSION


def current_session() -> BenchEnv | None:
    return _SESSION


# ----------------------------------------------------------------------------- peaks


def _median_seconds(env: BenchEnv, fn: Callable[[], object], reps: int) -> float:
    clock = env.clock or __import__("time").perf_counter
    fn()
    env.sync()
    times = []
    for _ in range(reps):
        env.sync()
        t0 = clock()
        fn()
        env.sync()
        times.append(clock() - t0)
    times.sort()
    return times[len(times) // 2]


def measure_peaks(env: BenchEnv) -> dict:
    """Achievable device peaks, measured once: a large matmul (FLOP/s) and a large copy (B/s).

    GPU: bf16 8192^3 matmul, 1 GiB device-to-device copy.  CPU: float32 2048^3
    matmul, 256 MiB memcpy.  A copy moves its size twice (read + write).
    """
    if env.peaks or env.smoke:
        return env.peaks
    dev = env.device
    if dev.type == "cuda":
        n, mm_dtype, copy_bytes, reps = 8192, torch.bfloat16, 1 << 30, 20
    else:
        n, mm_dtype, copy_bytes, reps = 2048, torch.float32, 256 << 20, 5
    a = torch.randn(n, n, device=dev, dtype=mm_dtype)
    b = torch.randn(n, n, device=dev, dtype=mm_dtype)
    t_mm = _median_seconds(env, lambda: torch.mm(a, b), reps)
    a = b = None  # free them before the copy buffers (not del: the lambda above names them)
    src = torch.empty(copy_bytes // 4, device=dev, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    t_copy = _median_seconds(env, lambda: dst.copy_(src), reps)
    src = dst = None
    env.peaks = {
        "peak_tflops": 2 * n**3 / t_mm / 1e12,
        "peak_tbps": 2 * copy_bytes / t_copy / 1e12,
        "peak_method": f"{str(mm_dtype).replace('torch.', '')} {n}^3 matmul; {copy_bytes >> 20} MiB copy (read+write); medians of {reps}",
    }
    return env.peaks


# ----------------------------------------------------------------------------- the runner


def measure(benchmark, call: Callable[[int], object], n_copies: int, env: BenchEnv) -> dict:
    """Time call(i) (i: which input copy) with pytest-benchmark; return what was done.

    One warm-up pass over all copies, a calibration pass, then `rounds` rounds of
    `iterations` calls, each round a whole number of passes over the copies.
    """
    if env.smoke:
        benchmark.pedantic(call, args=(0,), rounds=1, iterations=1)
        return {"copies": 1, "iterations": 1, "rounds": 1, "timer": "not timed (--benchmark-disable)"}
    clock = env.clock or benchmark._timer
    for i in range(n_copies):  # warm-up
        call(i)
    env.sync()
    t0 = clock()
    for i in range(n_copies):
        call(i)
    env.sync()
    per_call = max((clock() - t0) / n_copies, 1e-7)
    passes = max(1, math.ceil(MIN_ROUND_S / (per_call * n_copies)))
    iterations = passes * n_copies
    rounds = min(MAX_ROUNDS, max(env.min_rounds, math.ceil(env.max_time / (per_call * iterations))))
    counter = itertools.count()

    def target():
        call(next(counter) % n_copies)

    if env.clock is not None:
        # pytest-benchmark reads its clock from this attribute (no public per-fixture
        # option); with CUDA events each round's duration is device time.
        benchmark._timer = env.clock
    benchmark.pedantic(target, rounds=rounds, iterations=iterations, warmup_rounds=1)
    return {"copies": n_copies, "iterations": iterations, "rounds": rounds, "timer": env.clock_name}


def record(benchmark, env: BenchEnv, **info) -> None:
    """Store a case's description, costs and the session facts in benchmark.extra_info."""
    benchmark.extra_info.update(
        {
            "device": env.device.type,
            "device_name": env.device_name,
            "dtype": str(env.dtype).replace("torch.", ""),
            "threads": env.threads,
            **env.peaks,
            **info,
        }
    )


def versions() -> dict:
    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    try:
        import enat_kernels

        out["enat_kernels"] = enat_kernels.__version__
    except ImportError:
        out["enat_kernels"] = None
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out
