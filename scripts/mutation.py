#!/usr/bin/env python3
"""Mutation testing of the Python modules, with mutmut 2 (docs/MUTATION.md).

The tests import the installed package, whose compiled extension lives inside it, so
mutating the source tree would change nothing they run.  This script therefore works
in a scratch copy of the checkout (tracked and untracked, not ignored, files) into
which the compiled extension of the installed package is copied (or built in place
with --build); pytest is started there as ``python -m pytest``, which puts the copy
first on sys.path, so the tests run the mutated sources.

Each module gets its own test selection (MODULES), small enough that a run stays
practical on a 2-core machine.  mutmut keeps its results in the copy's
``.mutmut-cache``: a run stopped by --budget continues where it stopped next time.

    pip install "mutmut==2.5.1"
    python scripts/mutation.py --module sampler --budget 1800   # one module, 30 min at most
    python scripts/mutation.py                                  # every module, no limit
    python scripts/mutation.py --named                          # the hand-written mutants only
    python scripts/mutation.py --report                         # results so far, as markdown

Runs under ``nice -n 10``.  The scratch copy defaults to $TMPDIR/enat-mutation.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTEST = "python -m pytest -x -q -p no:cacheprovider -W ignore"

# module -> (source path, test selections: each one pytest invocation, all must pass)
MODULES = {
    "validation": ("enat_kernels/_validation.py", ["tests/test_errors.py tests/test_boundaries.py"]),
    "dispatch": ("enat_kernels/_dispatch.py", ["tests/test_boundaries.py tests/test_errors.py tests/test_foundation.py"]),
    "routing": ("enat_kernels/routing.py", [
        "tests/test_routing.py -k 'torch or cpu' tests/test_boundaries.py tests/test_errors.py"]),
    "reference": ("enat_kernels/reference.py", [
        "tests/test_reference.py -k 'not gradcheck or ragged'",
        "tests/test_sc_attention.py -k 'torch and (float32 or float16) and not head_dim'",
        "tests/test_routing.py -k torch"]),
    "attention": ("enat_kernels/attention.py", [
        "tests/test_errors.py tests/test_boundaries.py",
        "tests/test_sc_attention.py -k 'cpu and (float32 or float16) and not head_dim'"]),
    "model": ("enat/model.py", ["tests/test_enat_model.py", "tests/test_enat_backends.py -k cpu"]),
    "sampler": ("enat/sampler.py", ["tests/test_sampler_decisions.py",
                                    "tests/test_enat_sampler.py -k 'not no_host_reads'"]),
}

# Hand-written mutants: (name, file, original text, mutated text, test selection).
# The six that once survived the whole suite, plus a few more of the same kind.
NAMED = [
    ("guidance off by one (fused)", "enat/sampler.py", "torch.lerp(uncond.float(), cond.float(), 1 + g)",
     "torch.lerp(uncond.float(), cond.float(), g)", "tests/test_sampler_decisions.py"),
    ("guidance sign (reference)", "enat/sampler.py", "cond.float() + g * (cond.float() - uncond.float())",
     "cond.float() - g * (cond.float() - uncond.float())", "tests/test_sampler_decisions.py"),
    ("masking noise sign flipped", "enat/sampler.py", "confidence = pick_logp + self.mask_temp",
     "confidence = pick_logp - self.mask_temp", "tests/test_sampler_decisions.py"),
    ("visible tokens lose +inf confidence", "enat/sampler.py",
     "conf_full = torch.where(masking, conf_full, torch.full_like(conf_full, math.inf))", "pass",
     "tests/test_sampler_decisions.py"),
    ("duplicate index 0 accepted", "enat_kernels/_validation.py", "(s[:, 1:] >= 0)", "(s[:, 1:] > 0)",
     "tests/test_boundaries.py"),
    ("cu_seqlens drop of 1 accepted", "enat_kernels/_validation.py", "if lo < 0:", "if lo < -1:",
     "tests/test_boundaries.py"),
    ("auto selection skips cpu", "enat_kernels/_dispatch.py",
     'order = ("cuda", "triton") if dt == "cuda" else ("cpu",) if dt == "cpu" else ()',
     'order = ("cuda", "triton") if dt == "cuda" else ()', "tests/test_boundaries.py"),
    ("auto attention selection skips cpu", "enat_kernels/_dispatch.py",
     'else ("cpu",) if dt == "cpu" else ()\n    for name in order:\n        err = attention_error',
     'else ()\n    for name in order:\n        err = attention_error', "tests/test_boundaries.py"),
    ("attention scale D^-1", "enat_kernels/reference.py", "scale = D**-0.5", "scale = D**-1.0",
     "tests/test_reference.py -k 'matches_formula and basic'"),
    ("shift and scale swapped", "enat/model.py",
     "shift_msa, scale_msa, shift_msa_, scale_msa_, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod",
     "scale_msa, shift_msa, shift_msa_, scale_msa_, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod",
     "tests/test_enat_model.py -k without_reuse"),
    ("head GELU tanh instead of erf", "enat/model.py", "self.gelu = nn.GELU()", 'self.gelu = nn.GELU(approximate="tanh")',
     "tests/test_enat_model.py -k without_reuse"),
]


def sh(cmd: str, cwd: Path, timeout: float | None = None, quiet: bool = True) -> int:
    """Run `cmd` under nice -n 10; the return code (124 on timeout)."""
    out = subprocess.DEVNULL if quiet else None
    try:
        return subprocess.run(["nice", "-n", "10", "bash", "-c", cmd], cwd=cwd, timeout=timeout, stdout=out, stderr=out).returncode
    except subprocess.TimeoutExpired:
        return 124


def installed_package_dir() -> Path:
    """Where the installed enat_kernels lives (imported from outside the source tree)."""
    code = "import os, enat_kernels; print(os.path.dirname(enat_kernels.__file__))"
    out = subprocess.run([sys.executable, "-P", "-c", code], cwd=tempfile.gettempdir(), capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def prepare(work: Path, build: bool) -> None:
    """The scratch copy, with the compiled extension next to the sources it mutates."""
    if (work / ".mutmut-cache").exists():
        keep = (work / ".mutmut-cache").read_bytes()
    else:
        keep = None
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        src, dst = ROOT / f, work / f
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    if keep is not None:
        (work / ".mutmut-cache").write_bytes(keep)
    if build:
        env = "ENAT_KERNELS_SKIP_CUDA=1 MAX_JOBS=2"
        if sh(f"{env} {sys.executable} setup.py build_ext --inplace", work, quiet=False):
            sys.exit("build_ext --inplace failed")
    else:
        pkg = installed_package_dir()
        if pkg.resolve() == (ROOT / "enat_kernels").resolve():
            sys.exit("enat_kernels is imported from the source tree; install it (pip install .) or pass --build")
        found = glob.glob(str(pkg / "_C*.so")) + [str(pkg / "_build_info.py")]
        for f in found:
            shutil.copy2(f, work / "enat_kernels" / os.path.basename(f))
    check = ("import enat_kernels, os; from enat_kernels import _extension; "
             "assert os.path.dirname(enat_kernels.__file__) == os.path.join(os.getcwd(), 'enat_kernels'), enat_kernels.__file__; "
             "assert _extension.cpu_extension_error() is None, _extension.cpu_extension_error()")
    if subprocess.run([sys.executable, "-c", check], cwd=work).returncode:
        sys.exit("the scratch copy does not import its own enat_kernels with the compiled extension")


def runner(selections: list[str]) -> str:
    env = "HYPOTHESIS_PROFILE=ci TRITON_INTERPRET=1"
    return " && ".join(f"{env} {PYTEST} {sel}" for sel in selections)


def run_module(work: Path, name: str, budget: float | None) -> None:
    path, selections = MODULES[name]
    cmd = (f"mutmut run --paths-to-mutate {path} --tests-dir tests --disable-mutation-types fstring "
           f"--no-progress --simple-output --runner \"{runner(selections)}\"")
    print(f"== {name}: {path}", flush=True)
    rc = sh(cmd, work, timeout=budget, quiet=False)
    if rc == 124:
        print(f"   stopped after the {budget:.0f} s budget; the next run continues", flush=True)


def run_named(work: Path) -> int:
    """Apply each hand-written mutant to the scratch copy; its tests must fail."""
    survived = 0
    for name, f, old, new, sel in NAMED:
        p = work / f
        text = p.read_text()
        if text.count(old) != 1:
            print(f"SKIP  {name}: the original text is not found once in {f}")
            survived += 1
            continue
        p.write_text(text.replace(old, new))
        try:
            t = time.time()
            rc = sh(runner([sel]), work)
        finally:
            p.write_text(text)
        verdict = "killed" if rc not in (0, 124) else "SURVIVED"
        survived += verdict != "killed"
        print(f"{verdict:8s} {name}  ({sel}, {time.time() - t:.0f} s)", flush=True)
    return survived


def report(work: Path) -> str:
    """Counts per module and the survivors' diffs, from mutmut's cache."""
    import sqlite3

    db = sqlite3.connect(work / ".mutmut-cache")
    rows = db.execute(
        "SELECT SourceFile.filename, Mutant.status, Mutant.id FROM Mutant "
        "JOIN Line ON Mutant.line = Line.id JOIN SourceFile ON Line.sourcefile = SourceFile.id").fetchall()
    counts: dict[str, dict[str, int]] = {}
    survivors: dict[str, list[int]] = {}
    for fname, status, mid in rows:
        counts.setdefault(fname, {}).setdefault(status, 0)
        counts[fname][status] += 1
        if status in ("bad_survived", "bad_timeout", "ok_suspicious"):
            survivors.setdefault(fname, []).append(mid)
    lines = ["| module | mutants | killed | survived | timeout/suspicious | untested |", "| --- | --- | --- | --- | --- | --- |"]
    for fname, c in sorted(counts.items()):
        total = sum(c.values())
        lines.append(f"| {fname} | {total} | {c.get('ok_killed', 0)} | {c.get('bad_survived', 0)} | "
                     f"{c.get('bad_timeout', 0) + c.get('ok_suspicious', 0)} | {c.get('untested', 0)} |")
    for fname, ids in sorted(survivors.items()):
        lines += ["", f"### Survivors in {fname}", ""]
        for mid in ids:
            diff = subprocess.run(["mutmut", "show", str(mid)], cwd=work, capture_output=True, text=True).stdout
            body = [ln for ln in diff.splitlines() if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]
            lines.append(f"- {mid}: `{' / '.join(b.strip() for b in body)}`")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--module", action="append", choices=sorted(MODULES), help="module(s) to mutate (default: all)")
    ap.add_argument("--budget", type=float, help="seconds per module before stopping (the next run continues)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "enat-mutation")
    ap.add_argument("--build", action="store_true", help="build the extension in the copy instead of copying it")
    ap.add_argument("--named", action="store_true", help="only the hand-written mutants")
    ap.add_argument("--report", action="store_true", help="only print the results so far")
    args = ap.parse_args()
    work = args.workdir.resolve()
    if args.report:
        print(report(work))
        return 0
    work.mkdir(parents=True, exist_ok=True)
    prepare(work, args.build)
    if args.named:
        return 1 if run_named(work) else 0
    for name in args.module or sorted(MODULES):
        run_module(work, name, args.budget)
    print(report(work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
