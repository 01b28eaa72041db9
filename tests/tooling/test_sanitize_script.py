"""scripts/sanitize.py: argument handling, preflight and report, without a GPU.

The sanitizer runs themselves need a CUDA GPU and compute-sanitizer; here a fake
sanitizer (a shell script that writes a log) stands in for it.
"""

import importlib.util
import stat
import sys

import pytest

from support.paths import REPO

SCRIPT = REPO / "scripts" / "sanitize.py"
_spec = importlib.util.spec_from_file_location("sanitize_script", SCRIPT)
sanitize = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = sanitize  # dataclasses look their module up while it loads
_spec.loader.exec_module(sanitize)


def test_defaults():
    args = sanitize.parse_args([])
    assert args.tools == ["memcheck", "racecheck"]
    assert args.pytest_args == list(sanitize.DEFAULT_PYTEST_ARGS)
    assert args.report.name == "sanitize-report.md" and args.log_dir.name == "sanitize-logs"


def test_tools_and_pytest_arguments_pass_through(tmp_path):
    args = sanitize.parse_args(["--tools", "initcheck, synccheck", "--report", str(tmp_path / "r.md"), "--", "tests/x.py", "-k", "cuda"])
    assert args.tools == ["initcheck", "synccheck"]
    assert args.pytest_args == ["tests/x.py", "-k", "cuda"]
    assert args.log_dir == tmp_path / "sanitize-logs"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tools", "memcheck,leakcheck"], "unknown tool(s) ['leakcheck']"),
        (["--tools", ","], "give at least one tool"),
        (["--tools", "memcheck,memcheck"], "a tool is repeated"),
        (["--timeout", "0"], "--timeout must be positive"),
        (["--timeout", "soon"], "invalid float value"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    assert sanitize.main(argv) == sanitize.EXIT_CANNOT_RUN
    assert message in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert sanitize.main(["--help"]) == 0
    assert "compute-sanitizer" in capsys.readouterr().out


def test_dry_run_prints_one_command_per_tool(capsys, tmp_path):
    assert sanitize.main(["--dry-run", "--tools", "memcheck,racecheck", "--log-dir", str(tmp_path), "--", "tests/a.py"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert "--tool memcheck" in lines[0] and "--tool racecheck --racecheck-report all" in lines[1]
    for line in lines:
        assert f"--error-exitcode {sanitize.ERROR_EXIT}" in line and "--target-processes all" in line
        assert line.endswith("-m pytest tests/a.py") and str(tmp_path) in line


def test_no_sanitizer_and_no_gpu_say_so(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sanitize.shutil, "which", lambda name: None)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(sanitize, "gpu_error", lambda: "no CUDA GPU is visible to torch")
    monkeypatch.setattr(sanitize.Path, "is_file", lambda self: False)  # hide /usr/local/cuda too
    assert sanitize.main(["--report", str(tmp_path / "r.md")]) == sanitize.EXIT_CANNOT_RUN
    err = capsys.readouterr().err
    assert "compute-sanitizer not found" in err and "no CUDA GPU" in err
    assert not (tmp_path / "r.md").exists()


def test_explicit_sanitizer_path_must_exist():
    with pytest.raises(sanitize.CannotRun, match="not found at '/nonexistent/compute-sanitizer'"):
        sanitize.find_sanitizer("/nonexistent/compute-sanitizer")


def test_environment_of_the_runs(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    env = sanitize.tool_env()
    assert env["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1" and "TRITON_INTERPRET" not in env


def _fake_sanitizer(tmp_path, errors: int, exit_code: int) -> str:
    """A stand-in for compute-sanitizer: writes a log at --log-file, exits with exit_code."""
    path = tmp_path / "fake-sanitizer"
    path.write_text(
        "#!/bin/sh\n"
        'while [ "$1" != "--log-file" ]; do shift; done\n'
        'log=$(echo "$2" | sed "s/%p/123/")\n'
        f'printf "========= Invalid __global__ read of size 4\\n========= ERROR SUMMARY: {errors} errors\\n" > "$log"\n'
        f"exit {exit_code}\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.mark.parametrize("errors, exit_code, clean", [(0, 0, True), (2, sanitize.ERROR_EXIT, False), (0, 1, False)])
def test_run_tool_reads_the_verdict_and_writes_the_report(tmp_path, errors, exit_code, clean):
    fake = _fake_sanitizer(tmp_path, errors, exit_code)
    result = sanitize.run_tool(fake, "memcheck", tmp_path, ["tests/none.py"], timeout=60)
    assert result.errors == errors and result.returncode == exit_code and result.clean is clean
    report = tmp_path / "report.md"
    sanitize.write_report(report, [result], {"torch": "x"}, ["tests/none.py"])
    text = report.read_text()
    assert ("**Verdict: CLEAN**" in text) is clean and ("NOT CLEAN" in text) is not clean
    assert "--tool memcheck" in text and "- torch: x" in text
    if errors:
        assert "Invalid __global__ read" in text
