"""Which device each backend's tests run on, and skipping a backend that cannot run.

Every suite that runs one test per backend (torch, cpu, triton, cuda) uses these, so a
backend is covered as soon as its kernels load, and skips with its own reason otherwise.
"""

import pytest
import torch

import enat_kernels as ek

HAS_CUDA = torch.cuda.is_available()


def device_for(backend: str) -> str:
    """The device a backend's tests use here: its GPU when there is one, else the CPU
    (Triton under the interpreter, the torch reference on CPU tensors)."""
    return "cuda" if backend == "cuda" or (backend in ("triton", "torch") and HAS_CUDA) else "cpu"


def skip_unless_runs(backend: str, dtype, head_dim: int) -> None:
    """Skip the test unless `backend` runs SC-Attention for this dtype and head_dim here."""
    err = ek.supports("sc_attention", device=device_for(backend), dtype=dtype, head_dim=head_dim, backend=backend).reason
    if err:
        pytest.skip(err)


def skip_unless_routes(backend: str) -> str:
    """The device `backend` runs the routing ops on here; skips the test with its reason if none."""
    dev = device_for(backend)
    err = ek.supports("gather_tokens", device=dev, backend=backend).reason
    if err:
        pytest.skip(err)
    return dev
