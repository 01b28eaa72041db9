#!/usr/bin/env python3
"""Run the GPU tests under NVIDIA compute-sanitizer and write a report: clean or not.

For a machine with a CUDA GPU and the CUDA toolkit's compute-sanitizer.  Each tool
(memcheck and racecheck by default; synccheck and initcheck on request) runs the test
selection once, with PyTorch's caching allocator off so memcheck sees every
allocation's real bounds.  The report (Markdown) gives each tool's verdict, the
exact commands, the versions of the driver, GPU, sanitizer, torch, triton and the
extension build, and the sanitizer's own error lines.

    python scripts/sanitize.py                          # memcheck + racecheck, default tests
    python scripts/sanitize.py --tools memcheck,racecheck,synccheck,initcheck
    python scripts/sanitize.py --report out.md -- tests/kernels/test_sc_attention.py -k cuda
    python scripts/sanitize.py --dry-run                # print the commands, run nothing

Exit status: 0 all clean, 1 errors found (or a test failed), 2 cannot run (no GPU,
no compute-sanitizer, bad arguments).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
DEFAULT_TOOLS = ("memcheck", "racecheck")
# The kernels this project writes run under the "cuda" and "triton" backends; the
# compile and 2**31-element tests add little here and take long under a sanitizer.
DEFAULT_PYTEST_ARGS = (
    "tests", "-k", "cuda or triton", "-p", "no:cacheprovider", "-q",
    "--ignore=tests/kernels/test_compile.py", "--ignore=tests/kernels/test_large_index.py",
)
# No --leak-check: PyTorch keeps library workspaces until exit, which it reports as leaks.
TOOL_FLAGS = {
    "memcheck": [],
    "racecheck": ["--racecheck-report", "all"],
    "synccheck": [],
    "initcheck": [],
}
ERROR_EXIT = 97  # what compute-sanitizer returns when it found errors (--error-exitcode)
EXIT_CLEAN, EXIT_ERRORS, EXIT_CANNOT_RUN = 0, 1, 2


class CannotRun(Exception):
    """No GPU, no compute-sanitizer: the run is impossible here (exit status 2)."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="sanitize.py",
        description="Run the CUDA/Triton tests under compute-sanitizer and report whether they are clean.",
        epilog="Arguments after `--` replace the default pytest selection: " + " ".join(DEFAULT_PYTEST_ARGS),
    )
    p.add_argument("--tools", default=",".join(DEFAULT_TOOLS), help=f"comma-separated, from {', '.join(TOOLS)} (default: %(default)s)")
    p.add_argument("--report", type=Path, default=ROOT / "sanitize-report.md", help="Markdown report to write (default: %(default)s)")
    p.add_argument("--log-dir", type=Path, default=None, help="where the sanitizer logs go (default: next to the report)")
    p.add_argument("--sanitizer", default=None, help="compute-sanitizer executable (default: on PATH, else $CUDA_HOME/bin)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per tool before the run is stopped (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the commands and exit; checks nothing")
    p.add_argument("pytest_args", nargs="*", help="pytest arguments (after --)")
    args = p.parse_args(argv)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    bad = [t for t in tools if t not in TOOLS]
    if bad or not tools:
        p.error(f"--tools: unknown tool(s) {bad}; choose from {', '.join(TOOLS)}" if bad else "--tools: give at least one tool")
    if len(set(tools)) != len(tools):
        p.error(f"--tools: a tool is repeated in {tools}")
    if args.timeout <= 0:
        p.error("--timeout must be positive")
    args.tools = tools
    args.pytest_args = list(args.pytest_args) or list(DEFAULT_PYTEST_ARGS)
    args.log_dir = args.log_dir or args.report.resolve().parent / "sanitize-logs"
    return args


def find_sanitizer(explicit: str | None) -> str:
    """Path of compute-sanitizer, or CannotRun saying where it was looked for."""
    if explicit:
        path = shutil.which(explicit)
        if path is None:
            raise CannotRun(f"compute-sanitizer not found at {explicit!r}")
        return path
    path = shutil.which("compute-sanitizer")
    if path:
        return path
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            cand = Path(home) / "bin" / "compute-sanitizer"
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
    raise CannotRun(
        "compute-sanitizer not found on PATH, in $CUDA_HOME/bin or in /usr/local/cuda/bin; install the CUDA toolkit or pass --sanitizer"
    )


def gpu_error() -> str | None:
    """None when a CUDA GPU is usable from torch, else why not."""
    code = "import torch, sys; sys.exit(0 if torch.cuda.is_available() and torch.cuda.device_count() > 0 else 3)"
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"could not ask torch for a GPU: {e}"
    if r.returncode == 3:
        return "no CUDA GPU is visible to torch (torch.cuda.is_available() is False)"
    if r.returncode != 0:
        return f"could not ask torch for a GPU: {r.stderr.strip()[-500:]}"
    return None


# `python -P` (3.11+): the working directory (the repository) is not put first on
# sys.path, so the installed enat_kernels, with its compiled extensions, is the one
# tested, not the uncompiled ./enat_kernels (whose CUDA tests would all skip: "clean").
PYTHON = [sys.executable, "-P"] if sys.version_info >= (3, 11) else [sys.executable]


def tool_command(sanitizer: str, tool: str, log_file: Path, pytest_args: list[str]) -> list[str]:
    return [
        sanitizer,
        "--tool",
        tool,
        *TOOL_FLAGS[tool],
        "--target-processes",
        "all",  # pytest may start helper processes
        "--error-exitcode",
        str(ERROR_EXIT),
        "--log-file",
        str(log_file),
        *PYTHON,
        "-m",
        "pytest",
        *pytest_args,
    ]


def tool_env() -> dict:
    env = dict(os.environ)
    env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"  # real allocation bounds for memcheck
    env.pop("TRITON_INTERPRET", None)  # the Triton kernels must run on the GPU
    env["ENAT_KERNELS_VALUE_CHECKS"] = env.get("ENAT_KERNELS_VALUE_CHECKS", "1")
    return env


@dataclass
class ToolResult:
    tool: str
    command: list
    returncode: int | None
    errors: int | None  # from the log's ERROR SUMMARY lines; None if none found
    error_lines: list
    seconds: float
    note: str = ""

    @property
    def clean(self) -> bool:
        return self.returncode == 0 and (self.errors or 0) == 0


_SUMMARY = re.compile(r"ERROR SUMMARY:\s*(\d+)\s+error")


def read_logs(paths) -> tuple[int | None, list]:
    """(total of the ERROR SUMMARY counts, the first error lines) of sanitizer logs."""
    counts, lines = [], []
    for path in sorted(paths):
        text = Path(path).read_text(errors="replace")
        counts += [int(m) for m in _SUMMARY.findall(text)]
        lines += [ln for ln in text.splitlines() if ln.startswith("=========") and "ERROR SUMMARY" not in ln]
    return (sum(counts) if counts else None), lines[:60]


def log_pattern(log_dir: Path, tool: str) -> Path:
    return log_dir / f"{tool}.%p.log"  # one log per process (%p: its pid)


def run_tool(sanitizer: str, tool: str, log_dir: Path, pytest_args: list, timeout: float) -> ToolResult:
    for old in log_dir.glob(f"{tool}.*.log"):
        old.unlink()
    cmd = tool_command(sanitizer, tool, log_pattern(log_dir, tool), pytest_args)
    print(f"== {tool}: {shlex.join(cmd)}", flush=True)
    start = datetime.datetime.now()
    note = ""
    try:
        rc = subprocess.run(cmd, cwd=ROOT, env=tool_env(), timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc, note = None, f"stopped after {timeout:.0f} s"
    seconds = (datetime.datetime.now() - start).total_seconds()
    errors, lines = read_logs(log_dir.glob(f"{tool}.*.log"))
    if rc == ERROR_EXIT:
        note = note or "the sanitizer reported errors"
    elif rc not in (0, None):
        note = note or f"exit status {rc}: a test failed or the run broke (see the pytest output)"
    return ToolResult(tool, cmd, rc, errors, lines, seconds, note)


def _out(cmd) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        return (r.stdout or r.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"


def versions(sanitizer: str) -> dict:
    code = (
        "import json, torch, enat_kernels as ek\n"
        "try:\n import triton; tv = triton.__version__\nexcept Exception as e: tv = f'unavailable ({e})'\n"
        "print(json.dumps({'torch': torch.__version__, 'torch CUDA': torch.version.cuda, 'triton': tv,"
        " 'GPU': torch.cuda.get_device_name(0), 'capability': '.'.join(map(str, torch.cuda.get_device_capability(0))),"
        " 'enat_kernels build': ek.build_info(), 'backends': {k: repr(v) for k, v in ek.backends().items()}}))"
    )
    info = {"compute-sanitizer": (_out([sanitizer, "--version"]).splitlines() or ["?"])[-1]}
    info["driver"] = _out(["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"])
    info["python"] = platform.python_version()
    info["host"] = platform.node()
    r = subprocess.run([*PYTHON, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600, env=tool_env())
    if r.returncode == 0:
        import json

        info.update(json.loads(r.stdout.strip().splitlines()[-1]))
    else:
        info["torch"] = f"could not query: {r.stderr.strip()[-300:]}"
    return info


def write_report(path: Path, results: list, info: dict, pytest_args: list) -> None:
    clean = all(r.clean for r in results)
    lines = [
        "# compute-sanitizer report",
        "",
        f"**Verdict: {'CLEAN' if clean else 'NOT CLEAN'}**",
        "",
        f"Date: {datetime.datetime.now().isoformat(timespec='seconds')}. Tests: `pytest {shlex.join(pytest_args)}`.",
        "Environment: `PYTORCH_NO_CUDA_MEMORY_CACHING=1` (allocations at their real size), `TRITON_INTERPRET` unset.",
        "",
        "| tool | verdict | errors (log summary) | exit status | time | note |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r.tool} | {'clean' if r.clean else 'NOT clean'} | {'-' if r.errors is None else r.errors} | "
            f"{'-' if r.returncode is None else r.returncode} | {r.seconds:.0f} s | {r.note} |"
        )
    lines += ["", "## Commands", ""]
    lines += [f"- {r.tool}: `{shlex.join(r.command)}`" for r in results]
    lines += ["", "## Versions", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    for r in results:
        if r.error_lines:
            lines += ["", f"## {r.tool}: first error lines", "", "```", *r.error_lines, "```"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse: bad arguments (2) or --help (0)
        return int(e.code or 0)
    if args.dry_run:
        sanitizer = args.sanitizer or "compute-sanitizer"
        for tool in args.tools:
            print(shlex.join(tool_command(sanitizer, tool, log_pattern(args.log_dir, tool), args.pytest_args)))
        return EXIT_CLEAN
    reasons = []
    try:
        sanitizer = find_sanitizer(args.sanitizer)
    except CannotRun as e:
        reasons.append(str(e))
    err = gpu_error()
    if err is not None:
        reasons.append(err)
    if reasons:
        print("sanitize.py: cannot run: " + "; ".join(reasons), file=sys.stderr)
        return EXIT_CANNOT_RUN
    args.log_dir.mkdir(parents=True, exist_ok=True)
    info = versions(sanitizer)
    results = [run_tool(sanitizer, tool, args.log_dir, args.pytest_args, args.timeout) for tool in args.tools]
    write_report(args.report, results, info, args.pytest_args)
    clean = all(r.clean for r in results)
    print(f"sanitize.py: {'CLEAN' if clean else 'NOT CLEAN'}; report: {args.report}")
    return EXIT_CLEAN if clean else EXIT_ERRORS


if __name__ == "__main__":
    sys.exit(main())
