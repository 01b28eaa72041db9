"""Triton kernels, registered as ops with ``torch.library.triton_op``.

Imported lazily (importing triton costs about a second).  Each kernel module defines
its ops under the ``enat_kernels::triton_<name>`` names and lists them in ``OPS``,
a dict from the op's generic name (``sc_attn_fwd``, ``gather_rows``, ...) to the op.
On a machine without a GPU the kernels run on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, set before triton is imported; float32/float16 only).
"""

from __future__ import annotations

import contextlib
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
    except Exception as e:  # a broken install must not break the other backends
        return f"importing triton failed: {type(e).__name__}: {e}"
    if not hasattr(torch.library, "triton_op"):
        return f"torch {torch.__version__} has no torch.library.triton_op"
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is visible"
    if device_type == "cpu":
        return _interpreter_error() if interpreting() else "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
    return f"Triton kernels do not run on {device_type} tensors"


# kernel module name -> why importing it failed (so the failure is reported, not retried)
_LOAD_ERRORS: dict[str, str] = {}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("+")[0].split(".")[:2] if p.isdigit())


def _interpreter_error() -> str | None:
    """The interpreter of Triton before 3.8 converts loop bounds (1-element arrays) with
    int(), which numpy 2.4 refuses ("only 0-dimensional arrays can be converted to Python
    scalars"); Triton 3.8 squeezes them first.  A Triton bug, not a kernel one: on a GPU
    the kernels compile and run with any numpy."""
    import numpy
    import triton

    if _version(triton.__version__) < (3, 8) and _version(numpy.__version__) >= (2, 4):
        return (f"the interpreter of Triton {triton.__version__} fails with numpy {numpy.__version__} "
                "(int() of 1-element arrays); use numpy<2.4 or Triton>=3.8 to run Triton kernels on CPU tensors")
    return None


def device_guard(device: torch.device):
    """Makes the tensors' CUDA device current: Triton launches on the current device and
    stream, which need not be the tensors' (tensors on cuda:1 while cuda:0 is current)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _launcher(kernel):
    """What launches `kernel`: ``wrap_triton``'s wrapper, which torch.compile sees through;
    under the interpreter the kernel itself, which runs eagerly on real memory (there the
    ops are opaque to the compiler anyway, and torch < 2.14's wrap_triton refuses it)."""
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    return torch.library.wrap_triton(kernel)


def launch(kernel, grid: tuple, device: torch.device, /, **kwargs) -> None:
    """Launch a Triton kernel on `device`.  Every kernel of this package launches here,
    so none runs on the wrong GPU."""
    with device_guard(device):
        _launcher(kernel)[grid](**kwargs)


def _module(op: str):
    """The loaded kernel module defining `op`, or None (not written, or failed to load).

    Any exception while loading (an old torch rejecting the op registration, a Triton
    that cannot compile, a missing dependency) is recorded for `op_error` instead of
    raised: a broken Triton backend must never break another backend or auto-selection.
    """
    name = _MODULES.get(op)
    if name is None or name in _LOAD_ERRORS:
        return None
    loaded = sys.modules.get(f"{__name__}.{name}")
    if loaded is not None:  # no importlib call: torch.compile traces this path without a graph break
        return loaded
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except Exception as e:
        if isinstance(e, ModuleNotFoundError) and e.name == f"{__name__}.{name}":  # no Triton module for this op
            return None
        _LOAD_ERRORS[name] = f"loading {__name__}.{name} failed: {type(e).__name__}: {e}"
    return None


def op_error(op: str) -> str | None:
    """None when the Triton op `op` is registered, else why not."""
    mod = _module(op)
    if mod is not None and op in getattr(mod, "OPS", {}):
        return None
    name = _MODULES.get(op)
    return _LOAD_ERRORS.get(name) or f"the triton backend has no {op} kernel"


@torch.compiler.assume_constant_result  # torch.compile runs it at trace time (it imports)
def has_op(op: str) -> bool:
    return op_error(op) is None


def op(name: str):
    """The Triton op for a generic op name (raises KeyError if it does not exist)."""
    mod = _module(name)
    if mod is None:
        raise KeyError(f"no Triton kernel for {name}")
    return mod.OPS[name]
