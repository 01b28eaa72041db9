"""The repository's folders, wherever pytest was started from."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent


def import_test_module(relpath: str):
    """The test module tests/<relpath>, imported under its file name as pytest imports it
    (so a module pytest has already collected is not run twice)."""
    path = TESTS / relpath
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    module = importlib.import_module(path.stem)
    assert Path(module.__file__).resolve() == path, (module.__file__, path)
    return module
