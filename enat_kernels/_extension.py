"""Loading the compiled extension modules, never fatally.

``enat_kernels._C`` holds the op schemas and the CPU kernels, ``enat_kernels._C_cuda``
the CUDA kernels.  Either may be missing (a pure-Python install, a failed build, a
build skipped with ENAT_KERNELS_SKIP_CUDA) or built against another torch (the ABI of
torch's C++ API is not stable across releases).  In each case the import of
enat_kernels succeeds, one warning says why, and the backends that need the module
report themselves unavailable with that reason.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

_status: dict[str, str | None] = {}  # module name -> None when loaded, else the reason


def _build_info():
    try:
        from . import _build_info as info
    except ImportError:
        return None
    return info


def _load(name: str) -> str | None:
    info = _build_info()
    if info is None:
        return "enat_kernels was not built (no _build_info.py); install it with `pip install .`"
    if info.TORCH_VERSION != torch.__version__:
        return (
            f"built against torch {info.TORCH_VERSION} but running torch {torch.__version__}; "
            "rebuild with `pip install --no-build-isolation .`"
        )
    if name == "_C_cuda" and not info.CUDA_BUILT:
        return f"the CUDA extension was not built: {info.CUDA_SKIP_REASON}"
    try:
        importlib.import_module(f"enat_kernels.{name}")
    except ImportError as e:  # missing file, or undefined symbols from another torch
        hint = ""
        if isinstance(e, ModuleNotFoundError):
            # The usual cause: Python was started in the source checkout, whose uncompiled
            # ./enat_kernels shadows the installed package.
            here = os.path.dirname(os.path.abspath(__file__))
            hint = (f" (enat_kernels was imported from {here}; if that is the source checkout, run from another "
                    "directory so the installed, compiled package is imported)")
        return f"could not import enat_kernels.{name}: {e}{hint}"
    return None


def load() -> None:
    """Load both modules once; warn once per module that could not be loaded."""
    if _status:
        return
    for name in ("_C", "_C_cuda"):
        reason = _load(name)
        if name == "_C_cuda" and reason is not None and _status.get("_C") is not None:
            reason = "enat_kernels._C (which defines the op schemas) is not loaded"
        _status[name] = reason
        # A CUDA build absent on a machine without CUDA is expected, not worth a warning.
        quiet = name == "_C_cuda" and not torch.cuda.is_available()
        if reason is not None and not quiet:
            warnings.warn(f"enat_kernels: {reason}; falling back to the other backends", RuntimeWarning, stacklevel=3)


def cpu_extension_error() -> str | None:
    """None when enat_kernels._C is loaded, else why not."""
    load()
    return _status["_C"]


def cuda_extension_error() -> str | None:
    """None when enat_kernels._C_cuda is loaded, else why not."""
    load()
    return _status["_C_cuda"]


_image_errors: dict[int, str | None] = {}  # CUDA device index -> probe result


def cuda_device_error(index: int) -> str | None:
    """None when the loaded CUDA extension has a kernel image for CUDA device `index`.

    Probed once per device with a kernel-attributes query (no launch).  A build whose
    arch list misses the device and carries no PTX the driver can compile for it
    (say, sm_80/sm_90 code on a newer card) would fail every launch with "no kernel
    image"; the backend reports itself unavailable with this reason instead.
    """
    if index not in _image_errors:
        _image_errors[index] = _probe_kernel_image(index)
    return _image_errors[index]


def _probe_kernel_image(index: int) -> str | None:
    err = importlib.import_module("enat_kernels._C_cuda").kernel_image_error(index)
    if err is None:
        return None
    major, minor = torch.cuda.get_device_capability(index)
    archs = build_info().get("CUDA_ARCHS")
    return (
        f"no kernel image for {torch.cuda.get_device_name(index)} (compute capability {major}.{minor}) "
        f"in this build (compiled for {archs}): {err}; rebuild with TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\""
    )


def build_info() -> dict:
    """What the installed extension was built with (empty when it was not built)."""
    info = _build_info()
    if info is None:
        return {}
    return {k: getattr(info, k) for k in dir(info) if k.isupper()}


# Kernels found registered: the extensions are never unloaded, so a kernel once
# present stays present, and backend selection (every call) skips the dispatcher query.
_present: set[tuple[str, str]] = set()


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether `enat_kernels::<op>` has a kernel registered for `dispatch_key`."""
    if (op, dispatch_key) in _present:
        return True
    try:
        found = torch._C._dispatch_has_kernel_for_dispatch_key(f"enat_kernels::{op}", dispatch_key)
    except RuntimeError:  # op not defined at all
        return False
    if found:
        _present.add((op, dispatch_key))
    return found
