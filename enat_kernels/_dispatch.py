"""Which backend runs an op: availability, capabilities, selection and logging.

Backends, in the order `auto` tries them for each device type:

- CUDA tensors: the faster of ``cuda`` and ``triton`` for the shape (see
  `_cuda_attention_order`), then ``torch``.
- CPU tensors: ``cpu`` (C++ kernels), then ``torch``.

A backend is forced with the ``backend=`` argument of each public function or the
``ENAT_KERNELS_BACKEND`` environment variable; a forced backend that cannot run the
inputs raises ValueError instead of falling back.  When `auto` has to skip a fused
backend for inputs it does not support, it warns once per reason, so a slow path is
never silent.  ``ENAT_KERNELS_LOG_BACKEND=1`` (or the logger ``enat_kernels`` at INFO)
logs the backend chosen for every call.
"""

from __future__ import annotations

import logging
import operator
import os
import sys
import warnings
from dataclasses import dataclass

import torch

from . import _extension, _variants

log = logging.getLogger("enat_kernels")
if os.environ.get("ENAT_KERNELS_LOG_BACKEND", "0").lower() in ("1", "true", "yes", "on"):
    log.setLevel(logging.INFO)
    if not log.handlers:
        _h = logging.StreamHandler(sys.stderr)
        _h.setFormatter(logging.Formatter("enat_kernels: %(message)s"))
        log.addHandler(_h)

BACKENDS = ("triton", "cuda", "cpu", "torch")

# What each fused backend computes for SC-Attention.  head_dims None: any size up to
# max_head_dim.  Kept here, next to selection, so one table answers "will it run?".
@dataclass(frozen=True)
class AttentionCaps:
    dtypes: tuple
    head_dims: tuple | None
    max_head_dim: int = 256


ATTENTION_CAPS = {
    "triton": AttentionCaps(_variants.TRITON_SC_ATTENTION.dtypes, _variants.TRITON_SC_ATTENTION.head_dims),
    "cuda": AttentionCaps(_variants.CUDA_SC_ATTENTION.dtypes, _variants.CUDA_SC_ATTENTION.head_dims),  # sm_80+
    "cpu": AttentionCaps((torch.float32, torch.float64, torch.bfloat16, torch.float16), None),
    "torch": AttentionCaps((torch.float16, torch.bfloat16, torch.float32, torch.float64), None, 1 << 30),
}


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


# ----------------------------------------------------------------------------- availability


def backend_error(name: str, device: str | torch.device) -> str | None:
    """None when backend `name` can run on tensors of `device` here, else why not.

    device: the inputs' device ("cuda:1", a torch.device) or a device type ("cuda":
    then the current device stands for it).
    """
    device = torch.device(device)
    device_type = device.type
    if name == "torch":
        return None
    if name == "cpu":
        if device_type != "cpu":
            return f"the cpu backend runs on CPU tensors, got {device_type} tensors"
        return _extension.cpu_extension_error()
    if name == "cuda":
        if device_type != "cuda":
            return f"the cuda backend runs on CUDA tensors, got {device_type} tensors"
        err = _extension.cuda_extension_error()
        if err is None and not torch.cuda.is_available():
            archs = _extension.build_info().get("CUDA_ARCHS")
            return f"extension loaded (compiled for {archs}), but no CUDA device is visible"
        if err is None:  # the build may hold no kernel image for this device's architecture
            err = _extension.cuda_device_error(cuda_index(device))
        return err
    if name == "triton":
        from . import triton as _triton

        return _triton.triton_error(device_type)
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")


def _op_error(name: str, op: str, device: str | torch.device) -> str | None:
    """Whether backend `name` runs here and implements `op` in this build."""
    err = backend_error(name, device)
    if err is not None or name == "torch":
        return err
    if name == "triton":
        from . import triton as _triton

        return _triton.op_error(op)
    key = "CPU" if name == "cpu" else "CUDA"
    if not _extension.has_kernel(op, key):
        return f"the {name} backend has no {op} kernel in this build"
    return None


def cuda_index(device: torch.device) -> int:
    """The index of a CUDA device; the current device when it names none ("cuda")."""
    return device.index if device.index is not None else torch.cuda.current_device()


def attention_error(name: str, device: str | torch.device, dtype: torch.dtype, head_dim: int) -> str | None:
    """None when backend `name` can compute SC-Attention for these inputs, else why not.

    device: the inputs' device ("cuda:1", a torch.device) or a device type ("cuda":
    then capabilities are those of the current device).
    """
    device = torch.device(device)
    device_type = device.type
    err = _op_error(name, "sc_attn_fwd", device)
    if err is not None:
        return err
    if name == "cuda" and torch.cuda.is_available():
        # The kernels need sm_80 (mma.sync m16n8k16, cp.async); the adapter would
        # raise a RuntimeError, the API says so up front, for the inputs' own device.
        index = cuda_index(device)
        major, minor = torch.cuda.get_device_capability(index)
        if major < 8:
            return f"the cuda backend needs compute capability 8.0 or newer, the device cuda:{index} has {major}.{minor}"
    caps = ATTENTION_CAPS[name]
    if name == "triton" and device_type == "cpu" and dtype == torch.bfloat16:
        return "the Triton interpreter (CPU) does not support bfloat16"
    if dtype not in caps.dtypes:
        return f"the {name} backend does not support dtype {_dtype_name(dtype)} (supports {', '.join(map(_dtype_name, caps.dtypes))})"
    if head_dim < 1 or head_dim > caps.max_head_dim or (caps.head_dims is not None and head_dim not in caps.head_dims):
        allowed = caps.head_dims if caps.head_dims is not None else f"1..{caps.max_head_dim}"
        return f"the {name} backend does not support head_dim {head_dim} (supports {allowed})"
    return None


def routing_error(name: str, device: str | torch.device) -> str | None:
    return _op_error(name, "gather_rows", device)


# ----------------------------------------------------------------------------- selection

_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=5)  # the caller of the public function


def _cuda_attention_order(dtype: torch.dtype, head_dim: int, n_q: int, n_cond: int) -> tuple[str, ...]:
    """Preference between the two GPU backends for one SC-Attention shape.

    Until the CUDA C++ kernel has been measured against the Triton kernel on a GPU
    (benchmarks/results/), Triton goes first.  The measured per-shape rule (and the
    CUDA kernel's tiling it depends on) goes in csrc/cuda/NOTES.md, "Backend order".
    n_q and n_cond are None under torch.compile: the order must then be decided from
    dtype and head_dim alone.
    """
    return ("triton", "cuda")


def _requested(backend: str | None) -> str | None:
    if backend is None:
        env = os.environ.get("ENAT_KERNELS_BACKEND") or None
        if env is not None and env not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {env!r} from the environment variable ENAT_KERNELS_BACKEND")
        return env
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend


# Under torch.compile, selection runs once per compiled graph, at trace time: the
# choice depends only on constants (the requested name, device type, dtype, head_dim),
# and Dynamo cannot trace the dispatcher queries, imports, warnings and logging it
# uses, so the two _choose_* functions are marked constant-result and their answer is
# baked into the graph.  They return (backend, None) or (None, error) rather than
# raising, because an exception inside a constant-result function reaches the caller
# as an internal Dynamo error.


@torch.compiler.assume_constant_result
def _choose_attention(requested, device: str, dtype, head_dim: int, n_q, n_cond):
    dt = torch.device(device).type
    if requested is not None:
        err = attention_error(requested, device, dtype, head_dim)
        if err is not None:
            return None, f"backend={requested!r} cannot run these inputs: {err}"
        log.info("sc_attention: backend %s (forced)", requested)
        return requested, None
    order = _cuda_attention_order(dtype, head_dim, n_q, n_cond) if dt == "cuda" else ("cpu",) if dt == "cpu" else ()
    for name in order:
        err = attention_error(name, device, dtype, head_dim)
        if err is None:
            log.info("sc_attention: backend %s (auto, %s %s head_dim %d)", name, dt, _dtype_name(dtype), head_dim)
            return name, None
        _warn_once(f"enat_kernels.sc_attention: skipping the {name} backend: {err}; using the next one")
    log.info("sc_attention: backend torch (auto fallback, reference math)")
    return "torch", None


def select_attention(backend, device: torch.device, dtype, head_dim: int, n_q: int, n_cond: int) -> str:
    """The backend that runs SC-Attention; ValueError when a forced backend cannot.

    n_q, n_cond are None under torch.compile (sequence lengths may be symbolic there,
    and the choice must not specialize on them); head_dim is specialized.
    """
    if torch.compiler.is_compiling():
        n_q = n_cond = None
    # The device as a string: a constant for torch.compile, and it keeps the index
    # whose capability decides (not the current device's).
    name, err = _choose_attention(_requested(backend), str(device), dtype, operator.index(head_dim), n_q, n_cond)
    if err is not None:
        raise ValueError(err)
    return name


@torch.compiler.assume_constant_result
def _choose_routing(requested, device: str, op: str):
    dt = torch.device(device).type
    if requested is not None:
        err = routing_error(requested, device)
        if err is not None:
            return None, f"backend={requested!r} cannot run {op}: {err}"
        log.info("%s: backend %s (forced)", op, requested)
        return requested, None
    order = ("cuda", "triton") if dt == "cuda" else ("cpu",) if dt == "cpu" else ()
    for name in order:
        err = routing_error(name, device)
        if err is None:
            log.info("%s: backend %s (auto)", op, name)
            return name, None
        _warn_once(f"enat_kernels.{op}: skipping the {name} backend: {err}; using the next one")
    log.info("%s: backend torch (auto fallback)", op)
    return "torch", None


def select_routing(backend, device: torch.device, op: str) -> str:
    """The backend that runs token routing op `op`; ValueError when a forced backend cannot."""
    name, err = _choose_routing(_requested(backend), str(device), op)
    if err is not None:
        raise ValueError(err)
    return name


def kernel(backend: str, op: str):
    """The op `op` ("sc_attn_fwd", "gather_rows", ...) of a fused backend, to call.

    Looked up through torch.ops, which Dynamo traces (the Triton package's `op()`
    imports modules, which it cannot); selection has already imported the Triton
    module that registers ``enat_kernels::triton_<op>``.
    """
    name = f"triton_{op}" if backend == "triton" else op
    return getattr(torch.ops.enat_kernels, name).default


# ----------------------------------------------------------------------------- report


@dataclass(frozen=True)
class BackendStatus:
    available: bool
    reason: str

    def __bool__(self) -> bool:
        return self.available

    def __repr__(self) -> str:
        return f"{'available' if self.available else 'unavailable'}: {self.reason}"


def backends() -> dict[str, BackendStatus]:
    """Which backends are usable on this machine, and why the others are not.

    Each entry names the device type it runs on and which of its ops are built.
    """
    out = {}
    for name, dt in (("triton", "cuda"), ("cuda", "cuda"), ("cpu", "cpu"), ("torch", "cpu")):
        if name == "triton" and not torch.cuda.is_available():
            from . import triton as _triton

            if _triton.interpreting():
                dt = "cpu"  # interpreter mode (its reason when it cannot run)
        err = backend_error(name, dt)
        if err is not None:
            out[name] = BackendStatus(False, err)
            continue
        if name == "torch":
            out[name] = BackendStatus(True, "reference PyTorch math, every device")
            continue
        have = {"sc_attn_fwd": "sc_attention", "gather_rows": "token routing"}
        op_errors = {op: _op_error(name, op, dt) for op in have}
        kinds = ", ".join(have[o] for o, e in op_errors.items() if e is None)
        missing = "; ".join(dict.fromkeys(e for e in op_errors.values() if e is not None))  # one line per distinct reason
        if not kinds and name == "triton" and missing:  # every kernel module failed to load
            out[name] = BackendStatus(False, missing)
            continue
        where = "CPU (Triton interpreter)" if name == "triton" and dt == "cpu" else dt.upper()
        note = f" ({missing})" if missing and name == "triton" else ""
        out[name] = BackendStatus(True, f"{where}: {kinds or 'no kernels yet'}{note}")
    return out
