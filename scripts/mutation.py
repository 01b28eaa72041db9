#!/usr/bin/env python3
"""Mutation testing of the Python modules, with mutmut 2 (docs/MUTATION.md).

The tests import the installed package, whose compiled extension lives inside it, so
mutating the source tree would change nothing they run.  This script therefore works
in a scratch copy of the checkout (tracked and untracked, not ignored, files) into
which the compiled extension of the installed package is copied (or built in place
with --build); pytest is started there as ``python -m pytest``, which puts the copy
first on sys.path, so the tests run the mutated sources.

mutmut generates the mutants (its engine, not its runner: mutmut 2's result cache
fails on files with repeated identical lines); this script applies each one to the
copy, runs that module's test selection (MODULES, small enough that a run stays
practical on a 2-core machine) and records the outcome in the copy's
``mutation-results.json``.  Mutants are tested in a fixed random order, so a run
stopped by --budget has sampled the whole module; the next run continues.

    pip install "mutmut==2.5.1"
    python scripts/mutation.py --module sampler --budget 1800   # one module, 30 min at most
    python scripts/mutation.py                                  # every module, no limit
    python scripts/mutation.py --retest --module sampler        # its survivors again, after new tests
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

# module -> (source path, test selections: each one pytest invocation, all must pass)
MODULES = {
    "validation": ("enat_kernels/_validation.py", ["tests/kernels/test_errors.py tests/kernels/test_boundaries.py"]),
    "dispatch": (
        "enat_kernels/_dispatch.py",
        [
            "tests/kernels/test_boundaries.py tests/kernels/test_errors.py "
            "tests/package/test_extension_loading.py tests/package/test_backend_selection.py"
        ],
    ),
    "routing": (
        "enat_kernels/routing.py",
        ["tests/kernels/test_routing.py -k 'torch or cpu' tests/kernels/test_boundaries.py tests/kernels/test_errors.py"],
    ),
    "reference": (
        "enat_kernels/reference.py",
        [
            "tests/kernels/test_reference.py -k 'not gradcheck or ragged'",
            "tests/kernels/test_errors.py -k unchecked",
            "tests/kernels/test_sc_attention.py -k 'torch and (float32 or float16) and not head_dim'",
            "tests/kernels/test_routing.py -k torch",
        ],
    ),
    "attention": (
        "enat_kernels/attention.py",
        [
            "tests/kernels/test_errors.py tests/kernels/test_boundaries.py",
            "tests/kernels/test_sc_attention.py -k 'cpu and not head_dim and not bfloat16 and not float64'",
        ],
    ),
    "model": ("enat/model.py", ["tests/enat/test_enat_model.py", "tests/enat/test_enat_backends.py -k cpu"]),
    "sampler": (
        "enat/sampler.py",
        ["tests/enat/test_sampler_decisions.py", "tests/enat/test_enat_sampler.py -k 'schedule or visible or guidance or per_row'"],
    ),
}

# Hand-written mutants: (name, file, original text, mutated text, test selection).
# The six that once survived the whole suite, plus a few more of the same kind.
NAMED = [
    (
        "guidance off by one (fused)",
        "enat/sampler.py",
        "torch.lerp(uncond.float(), cond.float(), 1 + g)",
        "torch.lerp(uncond.float(), cond.float(), g)",
        "tests/enat/test_sampler_decisions.py",
    ),
    (
        "guidance sign (reference)",
        "enat/sampler.py",
        "cond.float() + g * (cond.float() - uncond.float())",
        "cond.float() - g * (cond.float() - uncond.float())",
        "tests/enat/test_sampler_decisions.py",
    ),
    (
        "masking noise sign flipped",
        "enat/sampler.py",
        "confidence = pick_logp + self.mask_temp",
        "confidence = pick_logp - self.mask_temp",
        "tests/enat/test_sampler_decisions.py",
    ),
    (
        "visible tokens lose +inf confidence",
        "enat/sampler.py",
        "conf_full = torch.where(masking, conf_full, torch.full_like(conf_full, math.inf))",
        "pass",
        "tests/enat/test_sampler_decisions.py",
    ),
    ("duplicate index 0 accepted", "enat_kernels/_validation.py", "(s[:, 1:] >= 0)", "(s[:, 1:] > 0)", "tests/kernels/test_boundaries.py"),
    ("cu_seqlens drop of 1 accepted", "enat_kernels/_validation.py", "if lo < 0:", "if lo < -1:", "tests/kernels/test_boundaries.py"),
    (
        "auto selection skips cpu",
        "enat_kernels/_dispatch.py",
        '("cpu", "routing"): ("cpu",),',
        '("cpu", "routing"): (),',
        "tests/kernels/test_boundaries.py",
    ),
    (
        "auto attention selection skips cpu",
        "enat_kernels/_dispatch.py",
        '("cpu", "sc_attention"): ("cpu",),',
        '("cpu", "sc_attention"): (),',
        "tests/kernels/test_boundaries.py",
    ),
    (
        "attention scale D^-1",
        "enat_kernels/reference.py",
        "scale = D**-0.5",
        "scale = D**-1.0",
        "tests/kernels/test_reference.py -k 'matches_formula and basic'",
    ),
    (
        "shift and scale swapped",
        "enat/model.py",
        "shift_msa, scale_msa, shift_msa_, scale_msa_, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod",
        "scale_msa, shift_msa, shift_msa_, scale_msa_, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod",
        "tests/enat/test_enat_model.py -k without_reuse",
    ),
    (
        "head GELU tanh instead of erf",
        "enat/model.py",
        "self.gelu = nn.GELU()",
        'self.gelu = nn.GELU(approximate="tanh")',
        "tests/enat/test_enat_model.py -k without_reuse",
    ),
]


def sh(cmd: str, cwd: Path, timeout: float | None = None, quiet: bool = True) -> int:
    """Run `cmd` under nice -n 10; the return code (124 on timeout)."""
    out = subprocess.DEVNULL if quiet else None
    try:
        return subprocess.run(["nice", "-n", "10", "bash", "-c", cmd], cwd=cwd, timeout=timeout, stdout=out, stderr=out).returncode
    except subprocess.TimeoutExpired:
        return 124


def forked_tests(work: Path, selections: list[str], timeout: float, preload: tuple = ()) -> int:
    """Run the selections with pytest in a child forked from this process, which has
    imported torch and pytest once (not enat_kernels: the child imports the mutated
    sources itself).  0 when every selection passes, 124 on timeout."""
    import importlib
    import shlex
    import signal

    import hypothesis  # noqa: F401  (imported before the fork, so each child starts warm)
    import pytest  # noqa: F401
    import torch  # noqa: F401

    if preload:  # modules that the mutant does not touch, from the copy
        if str(work) not in sys.path:
            sys.path.insert(0, str(work))
        for name in preload:
            importlib.import_module(name)

    pid = os.fork()
    if pid == 0:  # child
        try:
            os.chdir(work)
            sys.path[:0] = [str(work), str(work / "tests")]
            os.environ.update(HYPOTHESIS_PROFILE="ci", TRITON_INTERPRET="1")
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1), os.dup2(null, 2)
            import pytest as pt

            for sel in selections:
                rc = pt.main(["-x", "-q", "-p", "no:cacheprovider", "-W", "ignore", *shlex.split(sel)])
                if rc != 0:
                    os._exit(int(rc) or 1)
            os._exit(0)
        except BaseException:
            os._exit(3)
    deadline = time.time() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return 124
        time.sleep(0.05)


def installed_package_dir() -> Path:
    """Where the installed enat_kernels lives (imported from outside the source tree)."""
    code = "import os, enat_kernels; print(os.path.dirname(enat_kernels.__file__))"
    out = subprocess.run([sys.executable, "-P", "-c", code], cwd=tempfile.gettempdir(), capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def prepare(work: Path, build: bool) -> None:
    """The scratch copy, with the compiled extension next to the sources it mutates."""
    results = work / "mutation-results.json"
    keep = results.read_bytes() if results.exists() else None
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for f in files:
        src, dst = ROOT / f, work / f
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    if keep is not None:
        results.write_bytes(keep)
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
    check = (
        "import enat_kernels, os; from enat_kernels import _extension; "
        "assert os.path.dirname(enat_kernels.__file__) == os.path.join(os.getcwd(), 'enat_kernels'), enat_kernels.__file__; "
        "assert _extension.cpu_extension_error() is None, _extension.cpu_extension_error()"
    )
    if subprocess.run([sys.executable, "-c", check], cwd=work).returncode:
        sys.exit("the scratch copy does not import its own enat_kernels with the compiled extension")


def mutants(path: Path) -> list:
    """mutmut's mutants of one file: (id, mutated source, original line, mutated line).

    Mutants that only change the text of a string (mutmut's "XX" wrapping: messages,
    log lines) are left out: they change no decision.
    """
    from mutmut import Context, list_mutations, mutate

    source = path.read_text()
    lines = source.splitlines()
    out = []
    for mid in list_mutations(Context(source=source, filename=str(path))):
        mutated, _ = mutate(Context(source=source, mutation_id=mid, filename=str(path)))
        new = mutated.splitlines()
        changed = [i for i, (a, b) in enumerate(zip(lines, new)) if a != b] or [mid.line_number]
        old_line, new_line = lines[changed[0]], new[changed[0]] if changed[0] < len(new) else ""
        if new_line.replace("XX", "") == old_line:
            continue
        key = f"{mid.line_number + 1}:{mid.index}"
        out.append((key, mutated, old_line.strip(), new_line.strip()))
    return out


def run_module(work: Path, name: str, budget: float | None, retest: bool = False, seed: int = 0) -> None:
    """Test every mutant of the module (in a fixed random order, so a run stopped by the
    budget has sampled the whole file); results go to mutation-results.json."""
    import json
    import random

    path, selections = MODULES[name]
    results_file = work / "mutation-results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    done = results.setdefault(path, {})
    target = work / path
    source = target.read_text()
    if retest:  # the survivors again (after the tests changed)
        todo = [m for m in mutants(target) if m[0] in done and done[m[0]]["status"] != "killed"]
    else:
        todo = [m for m in mutants(target) if m[0] not in done]
    random.Random(seed).shuffle(todo)
    # Mutating enat/: enat_kernels is loaded once, before the forks (it cannot be: it
    # registers torch.library ops, which a process can do once).
    preload = ("enat_kernels",) if path.startswith("enat/") else ()
    t = time.time()
    if forked_tests(work, selections, 3600, preload):
        print(f"{name}: the tests fail without any mutation: {selections}", flush=True)
        return
    limit = max(60.0, 5 * (time.time() - t))
    print(f"== {name}: {path}, {len(todo)} mutants to test ({len(done)} done), baseline {time.time() - t:.0f} s", flush=True)
    start = time.time()
    for key, mutated, old, new in todo:
        if budget is not None and time.time() - start > budget:
            print(f"   stopped after the {budget:.0f} s budget; the next run continues", flush=True)
            break
        target.write_text(mutated)
        try:
            rc = forked_tests(work, selections, limit, preload)
        finally:
            target.write_text(source)
        status = "timeout" if rc == 124 else "survived" if rc == 0 else "killed"
        done[key] = {"status": status, "old": old, "new": new}
        results_file.write_text(json.dumps(results, indent=1, sort_keys=True))
        print(f"   {status:8s} line {key}: {new}", flush=True)


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
            rc = forked_tests(work, [sel], 3600)
        finally:
            p.write_text(text)
        verdict = "killed" if rc not in (0, 124) else "SURVIVED"
        survived += verdict != "killed"
        print(f"{verdict:8s} {name}  ({sel}, {time.time() - t:.0f} s)", flush=True)
    return survived


def report(work: Path) -> str:
    """Counts per module and every survivor, as markdown."""
    import json

    results = json.loads((work / "mutation-results.json").read_text())
    lines = ["| module | mutants | tested | killed | survived | timeout |", "| --- | --- | --- | --- | --- | --- |"]
    surv = []
    for name, (path, _) in MODULES.items():
        done = results.get(path, {})
        total = len(mutants(work / path))
        c = {k: sum(1 for v in done.values() if v["status"] == k) for k in ("killed", "survived", "timeout")}
        lines.append(f"| {path} | {total} | {len(done)} | {c['killed']} | {c['survived']} | {c['timeout']} |")
        surv += [f"- `{path}` line {k}: `{v['old']}` -> `{v['new']}`" for k, v in sorted(done.items()) if v["status"] != "killed"]
    return "\n".join(lines + ["", "Survivors:", ""] + surv) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--module", action="append", choices=sorted(MODULES), help="module(s) to mutate (default: all)")
    ap.add_argument("--budget", type=float, help="seconds per module before stopping (the next run continues)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "enat-mutation")
    ap.add_argument("--build", action="store_true", help="build the extension in the copy instead of copying it")
    ap.add_argument("--retest", action="store_true", help="test the survivors again (after the tests changed)")
    ap.add_argument("--named", action="store_true", help="only the hand-written mutants")
    ap.add_argument("--report", action="store_true", help="only print the results so far")
    args = ap.parse_args()
    os.nice(10)
    work = args.workdir.resolve()
    if args.report:
        print(report(work))
        return 0
    work.mkdir(parents=True, exist_ok=True)
    prepare(work, args.build)
    if args.named:
        return 1 if run_named(work) else 0
    for name in args.module or sorted(MODULES):
        # One process per module: what it imports before forking its test runs (see
        # forked_tests) must not leak into the next module's runs.
        pid = os.fork()
        if pid == 0:
            run_module(work, name, args.budget, args.retest)
            sys.stdout.flush()
            os._exit(0)
        os.waitpid(pid, 0)
    print(report(work))
    return 0


if __name__ == "__main__":
    sys.exit(main())
