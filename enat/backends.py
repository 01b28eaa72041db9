"""One switch for the model: which enat_kernels backend runs routing and which runs attention.

``backend=None`` lets enat_kernels choose per op (its automatic order, with its own
warnings).  A named backend is used for every op it implements; an op family it does
not run (no kernel for it, a dtype or head_dim it does not support) falls back to ``torch`` with one warning that says why, so a slow path is
never silent.  ``torch`` is the reference math everywhere.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from enat_kernels import BACKENDS, _dispatch


class ResolvedBackends(NamedTuple):
    requested: str | None
    routing: str | None  # None: enat_kernels chooses
    attention: str | None

    def describe(self) -> str:
        if self.requested is None:
            return "auto (enat_kernels chooses per op)"
        if self.routing == self.attention:
            return self.routing
        return f"{self.requested} (routing: {self.routing}, attention: {self.attention})"


_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def check_backend_name(backend: str | None) -> str | None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None (automatic), got {backend!r}")
    return backend


def resolve(backend: str | None, device: torch.device, dtype: torch.dtype, head_dim: int) -> ResolvedBackends:
    """The backends the model's routing and attention calls use for these inputs."""
    check_backend_name(backend)
    if backend is None or backend == "torch":
        return ResolvedBackends(backend, backend, backend)
    dt = device.type
    err = _dispatch.backend_error(backend, dt)
    if err is not None:
        raise ValueError(f"backend={backend!r} cannot run on {dt} tensors here: {err}")
    routing = backend
    err = _dispatch.routing_error(backend, dt)
    if err is not None:
        _warn_once(f"enat: backend={backend!r} has no token routing kernels here ({err}); routing uses the torch reference")
        routing = "torch"
    attention = backend
    err = _dispatch.attention_error(backend, dt, dtype, head_dim)
    if err is not None:
        _warn_once(f"enat: backend={backend!r} cannot run SC-Attention here ({err}); attention uses the torch reference")
        attention = "torch"
    return ResolvedBackends(backend, routing, attention)


def fused_backend_for(device: torch.device) -> str:
    """The fused backend a device would use: 'cpu' on CPUs, the GPU backend enat_kernels
    prefers on GPUs; 'torch', with a warning saying why, when none runs here (say, the
    compiled extension could not be loaded)."""
    names = ("cpu",) if device.type == "cpu" else ("triton", "cuda") if device.type == "cuda" else ()
    reasons = []
    for name in names:
        err = _dispatch.backend_error(name, device)
        if err is None:
            return name
        reasons.append(f"{name}: {err}")
    if reasons:
        _warn_once(f"enat: no fused backend runs on {device} here ({'; '.join(reasons)}); using the torch reference")
    return "torch"
