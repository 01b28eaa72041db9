"""Triton kernels, registered as ops with ``torch.library.triton_op``.

Imported lazily (importing triton costs about a second).  Each kernel module defines
its ops under the ``enat_kernels::triton_<name>`` names and lists them in ``OPS``,
a dict from the op's generic name (``sc_attn_fwd``, ``gather_rows``, ...) to the op.
On a machine without a GPU the kernels run on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, set before triton is imported; float32/float16 only).
"""

from __future__ import annotations

import importlib
import os
import sys

import torch

# generic op name -> module of this package that defines it
_MODULES = {
    "sc_attn_fwd": "sc_attention",
    "sc_attn_bwd": "sc_attention",
    "mask_to_indices": "routing",
    "gather_rows": "routing",
    "scatter_rows": "routing",
}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_error(device_type: str) -> str | None:
    """None when Triton kernels can run on tensors of `device_type`, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    if not hasattr(torch.library, "triton_op"):
        return f"torch {torch.__version__} has no torch.library.triton_op"
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is visible"
    if device_type == "cpu":
        return None if interpreting() else "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
    return f"Triton kernels do not run on {device_type} tensors"


def _module(op: str):
    name = _MODULES.get(op)
    if name is None:
        return None
    loaded = sys.modules.get(f"{__name__}.{name}")
    if loaded is not None:  # no importlib call: torch.compile traces this path without a graph break
        return loaded
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{name}":  # kernel not written yet
            return None
        raise


@torch.compiler.assume_constant_result  # torch.compile runs it at trace time (it imports)
def has_op(op: str) -> bool:
    mod = _module(op)
    return mod is not None and op in getattr(mod, "OPS", {})


def op(name: str):
    """The Triton op for a generic op name (raises KeyError if it does not exist)."""
    mod = _module(name)
    if mod is None:
        raise KeyError(f"no Triton kernel for {name}")
    return mod.OPS[name]
