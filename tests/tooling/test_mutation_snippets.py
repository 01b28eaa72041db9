"""scripts/mutation.py stays meaningful when the code it quotes changes.

A hand-written ("named") mutant replaces a snippet of a source file; once a refactor
rewrites that snippet, the mutant changes nothing (mutation.py then reports it as not
found only when run, which is rare).  Likewise a test selection that names a moved
test file makes pytest fail with "file not found", which mutation.py would count as a
killed mutant.  Both are checked here on every run of the suite.
"""

import importlib.util
import shlex

import pytest

from support.paths import REPO

_spec = importlib.util.spec_from_file_location("mutation_script", REPO / "scripts" / "mutation.py")
mutation = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mutation)


def _test_paths(selection: str) -> list:
    """The file paths of one pytest selection (its options and -k expressions left out)."""
    words = shlex.split(selection)
    return [w.split("::")[0] for i, w in enumerate(words) if w.startswith("tests/") and words[i - 1:i] != ["-k"]]


@pytest.mark.parametrize("name, path, original, mutated, selection", mutation.NAMED, ids=[m[0] for m in mutation.NAMED])
def test_named_mutant_finds_its_snippet(name, path, original, mutated, selection):
    text = (REPO / path).read_text()
    assert text.count(original) == 1, (
        f"mutant {name!r}: the original text is found {text.count(original)} times in {path} (must be once); "
        f"update NAMED in scripts/mutation.py to the current code:\n{original}")
    assert original != mutated
    paths = _test_paths(selection)
    assert paths, selection
    for p in paths:
        assert (REPO / p).is_file(), f"mutant {name!r}: test selection names {p}, which does not exist"


@pytest.mark.parametrize("module", sorted(mutation.MODULES))
def test_module_selections_name_existing_files(module):
    path, selections = mutation.MODULES[module]
    assert (REPO / path).is_file(), path
    for selection in selections:
        paths = _test_paths(selection)
        assert paths, selection
        for p in paths:
            assert (REPO / p).is_file(), f"module {module!r}: test selection names {p}, which does not exist"
