"""pytest configuration of the benchmark suites (only active for paths under benchmarks/).

- Collects the bench_*.py modules (the repository's `pytest` keeps collecting only
  tests/, see pyproject.toml's testpaths).
- Fixes torch's CPU thread count for the session and records it.
- Under --benchmark-disable (CI smoke mode) the suites run a reduced shape set once
  each, untimed (_cases.active).
- Adds the device, its measured peaks, versions, threads, the command line and why
  each skipped case was skipped to the JSON's machine_info (benchmarks/report.py
  prints them).
"""

from __future__ import annotations

import sys

import pytest

from benchmarks import _env


def pytest_configure(config):
    _env.SMOKE = bool(config.getoption("benchmark_disable", False))


def pytest_collect_file(file_path, parent):
    # Files named on the command line are collected by pytest itself whatever their name.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


_SKIPPED: dict[str, str] = {}  # node id -> reason, for the report


def pytest_runtest_logreport(report):
    if report.skipped and "bench_" in report.nodeid and isinstance(report.longrepr, tuple):
        _SKIPPED[report.nodeid] = str(report.longrepr[2]).removeprefix("Skipped: ")


@pytest.fixture(scope="session")
def bench_env(request) -> _env.BenchEnv:
    env = _env.session_env(request.config)
    _env.measure_peaks(env)  # once per session; nothing under --benchmark-disable
    return env


def pytest_benchmark_update_machine_info(config, machine_info):
    env = _env.current_session()
    if env is None:
        return
    machine_info["enat_bench"] = {
        "device": env.device.type,
        "device_name": env.device_name,
        "dtype": str(env.dtype).replace("torch.", ""),
        "threads": env.threads,
        "timer": env.clock_name,
        "smoke": env.smoke,
        "command": " ".join(["pytest", *config.invocation_params.args]),
        "argv": " ".join(sys.argv),
        "versions": _env.versions(),
        **env.peaks,
        "skipped": dict(_SKIPPED),
    }
