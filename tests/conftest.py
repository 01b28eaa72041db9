"""Fixtures and settings for every test folder (shared plain helpers live in tests/support/).

Without a GPU, Triton kernels run under the interpreter on CPU tensors."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

import enat_kernels  # noqa: E402,F401

# Randomized tests (tests/kernels/test_randomized.py): "ci" (default) is short and derandomized,
# so a run is reproducible; "long" explores: HYPOTHESIS_PROFILE=long or
# `pytest --hypothesis-profile=long`.
settings.register_profile("ci", max_examples=8, deadline=None, derandomize=True, database=None, print_blob=True)
settings.register_profile("long", max_examples=400, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def poison():
    """Fill every fresh allocation (torch.empty, at::empty) with NaN / max-int while active.

    Any output element a kernel forgets to write then shows up as NaN.
    """
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.fixture
def gen():
    """A fresh generator per test, seeded from the test's node id (reproducible, not shared)."""
    import zlib

    seed = zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").encode())
    return torch.Generator().manual_seed(seed)
