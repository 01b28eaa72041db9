"""Every repository path that a comment, docstring or document names exists.

A path counts when it starts at the repository root with one of the top-level folders
(``csrc/``, ``tests/``, ``docs/``, ...) and either ends with a file extension or with
``/`` (a folder).  Globs and placeholders (``tests/test_*.py``, ``results/<date>.md``)
stop the match: only the folder before them is checked; nor are output paths
given to ``--out`` or a shell redirection.  Python files are read for comments and
docstrings only (their string literals may name files that tests create); other text
files are read whole.  ``benchmarks/results/`` holds dated records and is skipped, as are
build outputs, hidden folders (but ``.ci/``) and virtual environments.
"""

from __future__ import annotations

import io
import os
import re
import tokenize

from support.paths import REPO

ROOT = str(REPO)
TOP_LEVEL = ("csrc", "tests", "docs", "benchmarks", "scripts", "enat", "enat_kernels", "build_backend", ".ci")
# Not preceded by a path character: "/site-packages/enat/x.py" or "../docs/a.md" do not start at the root.
PATH = re.compile(r"(?<![\w./~$-])((?:" + "|".join(re.escape(p) for p in TOP_LEVEL) + r")/[\w./-]*)")
OUTPUT_BEFORE = re.compile(r"(--out[= ]|>\s*)$")
TEXT_SUFFIXES = (".py", ".h", ".cuh", ".cu", ".cpp", ".md", ".sh", ".toml", ".in", ".cfg", ".txt")
SKIP_DIRS = {"build", "dist", "__pycache__"}


def _python_prose(source: str) -> str:
    """Comments and triple-quoted strings (docstrings) of a Python source, one per line."""
    parts = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            parts.append(tok.string)
        elif tok.type == tokenize.STRING and re.match(r"^[rRbBuU]*('''|\"\"\")", tok.string):
            parts.append(tok.string)
    return "\n".join(parts)


def referenced_paths(text: str) -> list[str]:
    """Repository paths named in `text` (see the module docstring for what counts)."""
    found = []
    for m in PATH.finditer(text):
        if OUTPUT_BEFORE.search(text[: m.start()]):
            continue
        path = m.group(1).rstrip(".")
        last = path.rsplit("/", 1)[-1]
        if path.endswith("/") or re.search(r"\.[A-Za-z0-9]+$", last):
            found.append(path)
    return found


def _text_files():
    for dirpath, dirnames, filenames in os.walk(ROOT):
        rel = os.path.relpath(dirpath, ROOT).replace(os.sep, "/")
        dirnames[:] = sorted(
            d for d in dirnames
            if (not d.startswith(".") or d == ".ci") and d not in SKIP_DIRS and not d.endswith(".egg-info")
            and os.path.normpath(os.path.join(rel, d)) != os.path.join("benchmarks", "results")
            and not os.path.exists(os.path.join(dirpath, d, "pyvenv.cfg"))  # a virtual environment
        )
        for name in sorted(filenames):
            if name.endswith(TEXT_SUFFIXES) or rel == ".ci":
                yield os.path.join(dirpath, name)


def missing_paths() -> list[str]:
    missing = []
    for path in _text_files():
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if path.endswith(".py"):
            try:
                text = _python_prose(text)
            except (tokenize.TokenError, SyntaxError):
                pass  # not valid Python (a template): read it whole
        for ref in referenced_paths(text):
            if not os.path.exists(os.path.join(ROOT, ref)):
                missing.append(f"{os.path.relpath(path, ROOT)}: {ref}")
    return missing


def test_referenced_repository_paths_exist():
    assert missing_paths() == []


def test_the_scan_finds_paths_and_skips_placeholders():
    """The scanner itself: a named file and folder count; globs, outputs and foreign roots do not."""
    text = (
        "see tests/kernels/test_sc_attention.py and docs/, then csrc/cuda/NOTES.md.\n"
        "glob tests/test_*.py, placeholder benchmarks/results/<date>.md, module enat.model,\n"
        "--out benchmarks/results/new.md, > docs/out.md, /usr/lib/enat/x.py, ../docs/a.md\n"
    )
    assert referenced_paths(text) == ["tests/kernels/test_sc_attention.py", "docs/", "csrc/cuda/NOTES.md", "benchmarks/results/"]
    prose = _python_prose('"""Module doc: docs/ERRORS.md."""\nx = "tests/made_up.py"  # see enat/model.py\n')
    assert referenced_paths(prose) == ["docs/ERRORS.md", "enat/model.py"]
