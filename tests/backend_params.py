"""Which device each backend's tests run on, and skipping a backend that cannot run.

The SC-Attention helpers are those of the shared suite (tests/test_sc_attention.py);
routing gets the matching one, so every reliability suite covers a backend as soon
as its kernels land.
"""

import pytest

import enat_kernels as ek

from test_sc_attention import device_for, skip_unless_runs  # noqa: F401  (re-exported)


def skip_unless_routes(backend: str) -> None:
    err = ek.supports("gather_tokens", device=device_for(backend), backend=backend).reason
    if err:
        pytest.skip(err)
