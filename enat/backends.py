"""One switch for the model: which enat_kernels backend runs routing and which runs attention.

``backend=None`` lets enat_kernels choose per op (its automatic order, with its own
warnings).  A named backend is used for every op it implements; an op family it does
not run (no kernel for it, a dtype or head_dim it does not support) falls back to
``torch`` with one warning that says why, so a slow path is never silent.  ``torch`` is the reference math everywhere.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

import enat_kernels as ek
from enat_kernels import BACKENDS


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
    routing = ek.supports("gather_tokens", device=device, backend=backend)
    attention = ek.supports("sc_attention", device=device, dtype=dtype, head_dim=head_dim, backend=backend)
    if not routing and not attention:
        why = "; ".join(dict.fromkeys((routing.reason, attention.reason)))
        raise ValueError(f"backend={backend!r} cannot run on {device.type} tensors here: {why}")
    if not routing:
        _warn_once(f"enat: backend={backend!r} has no token routing kernels here ({routing.reason}); routing uses the torch reference")
    if not attention:
        _warn_once(f"enat: backend={backend!r} cannot run SC-Attention here ({attention.reason}); attention uses the torch reference")
    return ResolvedBackends(backend, routing.backend or "torch", attention.backend or "torch")


def fused_backend_for(device: torch.device) -> str:
    """The fused backend a device would use: the first that runs SC-Attention there in
    enat_kernels' automatic order ('cpu' on CPUs); 'torch', with a warning saying why,
    when none does (say, the compiled extension could not be loaded)."""
    choice = ek.supports("sc_attention", device=device)
    if choice.backend in (None, "torch") and choice.reason:
        _warn_once(f"enat: no fused backend runs on {device} here ({choice.reason}); using the torch reference")
    return choice.backend or "torch"
