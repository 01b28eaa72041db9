"""Which backend runs an op: the backend table, availability, selection and logging.

Every fact about a backend (the devices it runs on, where its ops are registered,
what SC-Attention inputs it takes, the compute capability it needs) is one row of
`BACKEND`; the order `auto` tries them, per device type and op family, is
`AUTO_ORDER`.  The functions below read these two tables and nothing else decides.

A backend is forced with the ``backend=`` argument of each public function or the
``ENAT_KERNELS_BACKEND`` environment variable; a forced backend that cannot run the
inputs raises ValueError instead of falling back.  When `auto` has to skip a fused
backend for inputs it does not support, it warns once per reason, so a slow path is
never silent.  ``ENAT_KERNELS_LOG_BACKEND=1`` (or the logger ``enat_kernels`` at INFO)
logs the backend chosen for every call.  `supports` answers the same question as the
selection, without running anything and without warnings.
"""

from __future__ import annotations

import logging
import operator
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import _extension, _variants

log = logging.getLogger("enat_kernels")
if os.environ.get("ENAT_KERNELS_LOG_BACKEND", "0").lower() in ("1", "true", "yes", "on"):
    log.setLevel(logging.INFO)
    if not log.handlers:
        _h = logging.StreamHandler(sys.stderr)
        _h.setFormatter(logging.Formatter("enat_kernels: %(message)s"))
        log.addHandler(_h)

# What each fused backend computes for SC-Attention.  head_dims None: any size up to
# max_head_dim.  Kept here, next to selection, so one table answers "will it run?".
@dataclass(frozen=True)
class AttentionCaps:
    dtypes: tuple
    head_dims: tuple | None
    max_head_dim: int = 256


# The op families the public functions belong to, and the generic ops (the schemas of
# csrc/schema.cpp) a backend must implement to run a family.
OP_FAMILIES = {
    "sc_attention": ("sc_attn_fwd", "sc_attn_bwd"),
    "routing": ("mask_to_indices", "gather_rows", "scatter_rows"),
}
PUBLIC_OPS = {
    "sc_attention": "sc_attention",
    "sc_attention_varlen": "sc_attention",
    "mask_to_indices": "routing",
    "gather_tokens": "routing",
    "scatter_tokens": "routing",
    "restore_tokens": "routing",
    "merge_tokens": "routing",
    "split_tokens": "routing",
}


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


# ----------------------------------------------------------------------------- the backends


def cuda_index(device: torch.device) -> int:
    """The index of a CUDA device; the current device when it names none ("cuda")."""
    return device.index if device.index is not None else torch.cuda.current_device()


def _cpu_runtime_error(device: torch.device) -> str | None:
    return _extension.cpu_extension_error()


def _cuda_runtime_error(device: torch.device) -> str | None:
    err = _extension.cuda_extension_error()
    if err is None and not torch.cuda.is_available():
        archs = _extension.build_info().get("CUDA_ARCHS")
        return f"extension loaded (compiled for {archs}), but no CUDA device is visible"
    if err is None:  # the build may hold no kernel image for this device's architecture
        err = _extension.cuda_device_error(cuda_index(device))
    return err


def _triton_runtime_error(device: torch.device) -> str | None:
    from . import triton as _triton

    return _triton.triton_error(device.type)


def _triton_op_error(op: str) -> str | None:
    from . import triton as _triton

    return _triton.op_error(op)


def _compiled_op_error(dispatch_key: str):
    """The op check of a compiled backend: its C++ kernel registered for `dispatch_key`."""

    def op_error(name: str, op: str) -> str | None:
        if not _extension.has_kernel(op, dispatch_key):
            return f"the {name} backend has no {op} kernel in this build"
        return None

    return op_error


@dataclass(frozen=True)
class Backend:
    """One backend: everything selection, `supports` and `backends()` know about it."""

    name: str
    # device type -> how the report names it; None: every device type
    devices: dict[str, str] | None
    summary: str
    # None when it can run on tensors of this device here (extension loaded, device visible)
    runtime_error: Callable[[torch.device], str | None]
    # (backend name, generic op) -> None when the op is registered, else why not
    op_error: Callable[[str, str], str | None]
    # name of a generic op under torch.ops.enat_kernels: prefix + op; None: the Python
    # reference (enat_kernels/reference.py) is called instead of an op
    op_prefix: str | None
    attention: AttentionCaps
    min_capability: tuple[int, int] | None = None  # of a CUDA device, for its kernels
    # dtypes it refuses on one device type though its table lists them: {device type: {dtype: why}}
    refused_dtypes: dict = field(default_factory=dict)


BACKEND = {
    "triton": Backend(
        name="triton",
        devices={"cuda": "CUDA", "cpu": "CPU (Triton interpreter)"},  # CPU only under TRITON_INTERPRET=1
        summary="Triton kernels (enat_kernels/triton/), registered as enat_kernels::triton_<op>",
        runtime_error=_triton_runtime_error,
        op_error=lambda name, op: _triton_op_error(op),
        op_prefix="triton_",
        attention=AttentionCaps(_variants.TRITON_SC_ATTENTION.dtypes, _variants.TRITON_SC_ATTENTION.head_dims),
        refused_dtypes={"cpu": {torch.bfloat16: "the Triton interpreter (CPU) does not support bfloat16"}},
    ),
    "cuda": Backend(
        name="cuda",
        devices={"cuda": "CUDA"},
        summary="CUDA C++ kernels (csrc/cuda/, enat_kernels._C_cuda)",
        runtime_error=_cuda_runtime_error,
        op_error=_compiled_op_error("CUDA"),
        op_prefix="",
        attention=AttentionCaps(_variants.CUDA_SC_ATTENTION.dtypes, _variants.CUDA_SC_ATTENTION.head_dims),
        # mma.sync m16n8k16 and cp.async: the adapter would raise, selection says so up front
        min_capability=(8, 0),
    ),
    "cpu": Backend(
        name="cpu",
        devices={"cpu": "CPU"},
        summary="C++ kernels (csrc/cpu/, enat_kernels._C)",
        runtime_error=_cpu_runtime_error,
        op_error=_compiled_op_error("CPU"),
        op_prefix="",
        attention=AttentionCaps((torch.float32, torch.float64, torch.bfloat16, torch.float16), None),
    ),
    "torch": Backend(
        name="torch",
        devices=None,
        summary="reference PyTorch math, every device",
        runtime_error=lambda device: None,
        op_error=lambda name, op: None,
        op_prefix=None,
        attention=AttentionCaps((torch.float16, torch.bfloat16, torch.float32, torch.float64), None, 1 << 30),
    ),
}
assert all(row.name == name for name, row in BACKEND.items())
# Read from the table: the backend names in its order, and each one's SC-Attention caps.
BACKENDS = tuple(BACKEND)
ATTENTION_CAPS = {name: row.attention for name, row in BACKEND.items()}

# The order `auto` tries the fused backends, per (device type, op family); the torch
# reference follows them all.  A device type not listed has no fused backend.
AUTO_ORDER = {
    # Triton first: no GPU measurement orders the two kernels (README, "Status").  A
    # measured per-shape rule belongs here and in csrc/cuda/NOTES.md, "Backend order".
    ("cuda", "sc_attention"): ("triton", "cuda"),
    # The routing ops are row copies bound by memory bandwidth: the C++ kernels launch
    # without Triton's Python-side launcher, so they go first.
    ("cuda", "routing"): ("cuda", "triton"),
    ("cpu", "sc_attention"): ("cpu",),
    ("cpu", "routing"): ("cpu",),
}


def auto_order(device_type: str, family: str) -> tuple[str, ...]:
    """The backends `auto` tries for op family `family` on `device_type`, torch last."""
    return AUTO_ORDER.get((device_type, family), ()) + ("torch",)


# ----------------------------------------------------------------------------- availability


def check_backend_name(backend: str | None) -> str | None:
    """`backend` when it names a backend or is None (automatic); else ValueError."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend


def backend_error(name: str, device: str | torch.device) -> str | None:
    """None when backend `name` can run on tensors of `device` here, else why not.

    device: the inputs' device ("cuda:1", a torch.device) or a device type ("cuda":
    then the current device stands for it).
    """
    row = BACKEND.get(name)
    if row is None:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    device = torch.device(device)
    if row.devices is not None and device.type not in row.devices:
        kinds = " or ".join(t.upper() for t in row.devices)
        return f"the {name} backend runs on {kinds} tensors, got {device.type} tensors"
    return row.runtime_error(device)


def _op_error(name: str, op: str, device: str | torch.device) -> str | None:
    """Whether backend `name` runs here and implements the generic op `op` in this build."""
    return backend_error(name, device) or BACKEND[name].op_error(name, op)


def family_error(name: str, family: str, device: str | torch.device) -> str | None:
    """Whether backend `name` runs here and implements every op of `family`."""
    for op in OP_FAMILIES[family]:
        err = _op_error(name, op, device)
        if err is not None:
            return err
    return None


def attention_error(name: str, device: str | torch.device, dtype: torch.dtype | None, head_dim: int | None) -> str | None:
    """None when backend `name` can compute SC-Attention for these inputs, else why not.

    device: the inputs' device ("cuda:1", a torch.device) or a device type ("cuda":
    then capabilities are those of the current device).  dtype, head_dim: None skips
    that check.
    """
    device = torch.device(device)
    err = family_error(name, "sc_attention", device)
    if err is not None:
        return err
    row = BACKEND[name]
    if row.min_capability is not None and device.type == "cuda" and torch.cuda.is_available():
        # For the inputs' own device, not the current one.
        index = cuda_index(device)
        major, minor = torch.cuda.get_device_capability(index)
        if (major, minor) < row.min_capability:
            need = ".".join(map(str, row.min_capability))
            return f"the {name} backend needs compute capability {need} or newer, the device cuda:{index} has {major}.{minor}"
    caps = row.attention
    if dtype is not None:
        refused = row.refused_dtypes.get(device.type, {})
        if dtype in refused:
            return refused[dtype]
        if dtype not in caps.dtypes:
            return f"the {name} backend does not support dtype {_dtype_name(dtype)} (supports {', '.join(map(_dtype_name, caps.dtypes))})"
    listed = caps.head_dims is None or head_dim in caps.head_dims
    if head_dim is not None and (head_dim < 1 or head_dim > caps.max_head_dim or not listed):
        allowed = caps.head_dims if caps.head_dims is not None else f"1..{caps.max_head_dim}"
        return f"the {name} backend does not support head_dim {head_dim} (supports {allowed})"
    return None


def routing_error(name: str, device: str | torch.device) -> str | None:
    return family_error(name, "routing", device)


# ----------------------------------------------------------------------------- selection

_warned: set[str] = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=6)  # the caller of sc_attention (through _auto and _choose_*)


def _requested(backend: str | None) -> str | None:
    if backend is None:
        env = os.environ.get("ENAT_KERNELS_BACKEND") or None
        if env is not None and env not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {env!r} from the environment variable ENAT_KERNELS_BACKEND")
        return env
    return check_backend_name(backend)


def _first_that_runs(order: tuple[str, ...], error) -> tuple[str | None, list[tuple[str, str]]]:
    """The first backend of `order` for which error(name) is None (None if none), and
    those passed over, with why."""
    skipped = []
    for name in order:
        err = error(name)
        if err is None:
            return name, skipped
        skipped.append((name, err))
    return None, skipped


def _auto(label: str, order: tuple[str, ...], error) -> str:
    """`auto` for one call of validated inputs, which the torch reference always runs:
    warn once per fused backend skipped."""
    name, skipped = _first_that_runs(order[:-1], error)
    for other, err in skipped:
        _warn_once(f"enat_kernels.{label}: skipping the {other} backend: {err}; using the next one")
    return name or order[-1]


# Under torch.compile, selection runs once per compiled graph, at trace time: the
# choice depends only on constants (the requested name, device, dtype, head_dim),
# and Dynamo cannot trace the dispatcher queries, imports, warnings and logging it
# uses, so the two _choose_* functions are marked constant-result and their answer is
# baked into the graph.  They return (backend, None) or (None, error) rather than
# raising, because an exception inside a constant-result function reaches the caller
# as an internal Dynamo error.  Sequence lengths never enter the choice, so a compiled
# graph does not specialize on them.


@torch.compiler.assume_constant_result
def _choose_attention(requested, device: str, dtype, head_dim: int):
    if requested is not None:
        err = attention_error(requested, device, dtype, head_dim)
        if err is not None:
            return None, f"backend={requested!r} cannot run these inputs: {err}"
        log.info("sc_attention: backend %s (forced)", requested)
        return requested, None
    dt = torch.device(device).type
    name = _auto("sc_attention", auto_order(dt, "sc_attention"), lambda n: attention_error(n, device, dtype, head_dim))
    if name == "torch":
        log.info("sc_attention: backend torch (auto fallback, reference math)")
    else:
        log.info("sc_attention: backend %s (auto, %s %s head_dim %d)", name, dt, _dtype_name(dtype), head_dim)
    return name, None


def select_attention(backend, device: torch.device, dtype, head_dim: int) -> str:
    """The backend that runs SC-Attention; ValueError when a forced backend cannot."""
    # The device as a string: a constant for torch.compile, and it keeps the index
    # whose capability decides (not the current device's).
    name, err = _choose_attention(_requested(backend), str(device), dtype, operator.index(head_dim))
    if err is not None:
        raise ValueError(err)
    return name


@torch.compiler.assume_constant_result
def _choose_routing(requested, device: str, op: str):
    if requested is not None:
        err = routing_error(requested, device)
        if err is not None:
            return None, f"backend={requested!r} cannot run {op}: {err}"
        log.info("%s: backend %s (forced)", op, requested)
        return requested, None
    name = _auto(op, auto_order(torch.device(device).type, "routing"), lambda n: routing_error(n, device))
    log.info("%s: backend %s (auto fallback)" if name == "torch" else "%s: backend %s (auto)", op, name)
    return name, None


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
    return getattr(torch.ops.enat_kernels, BACKEND[backend].op_prefix + op).default


# ----------------------------------------------------------------------------- the public query


@dataclass(frozen=True)
class Support:
    """The answer of `supports`: the backend that would run the op, or why none would.

    backend: the name, or None when the requested backend cannot run the op on these
    inputs.  reason: why not (backend None); with automatic choice, the fused backends
    passed over and why ("" when the first one runs).  True when a backend runs.
    """

    backend: str | None
    reason: str

    def __bool__(self) -> bool:
        return self.backend is not None


def supports(
    op: str, *tensors: torch.Tensor, backend: str | None = None, device=None, dtype: torch.dtype | None = None, head_dim: int | None = None
) -> Support:
    """Whether (and with which backend) public op `op` runs on these inputs, without running it.

    op: a public function name ("sc_attention", "gather_tokens", ...).  The inputs are
    given either as the op's tensors (the first one decides: q's device, dtype and
    head_dim for attention, the device for routing) or described by keyword: device,
    and for attention optionally dtype and head_dim (left out: not checked).  backend:
    as the op's argument (None: automatic, or ``ENAT_KERNELS_BACKEND``).  Answers
    exactly as the op's own selection would, but never warns, logs or raises for an
    input a backend cannot take; shapes and values are checked by the op itself.
    """
    family = PUBLIC_OPS.get(op)
    if family is None:
        raise ValueError(f"op must be one of {tuple(PUBLIC_OPS)}, got {op!r}")
    if tensors:
        if device is not None or dtype is not None or head_dim is not None:
            raise TypeError("supports() takes the op's tensors or device/dtype/head_dim, not both")
        first = tensors[0]
        if not isinstance(first, torch.Tensor):
            raise TypeError(f"supports() takes the op's tensors, got {type(first).__name__}")
        device = first.device
        if family == "sc_attention":
            dtype, head_dim = first.dtype, (first.shape[-1] if first.dim() else None)  # a bad rank: the op's to refuse
    elif device is None:
        raise TypeError("supports() needs the op's tensors or device=")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"supports(): dtype must be a torch.dtype, got {dtype!r}")
    if head_dim is not None:
        try:
            head_dim = operator.index(head_dim)
        except TypeError:
            raise TypeError(f"supports(): head_dim must be an int, got {head_dim!r}") from None
    device = torch.device(device)
    if family == "sc_attention":
        error = lambda name: attention_error(name, device, dtype, head_dim)  # noqa: E731
    else:
        error = lambda name: routing_error(name, device)  # noqa: E731
    requested = _requested(backend)
    if requested is not None:
        err = error(requested)
        return Support(requested, "") if err is None else Support(None, err)
    name, skipped = _first_that_runs(auto_order(device.type, family), error)
    return Support(name, "; ".join(f"{other}: {err}" for other, err in skipped))


# ----------------------------------------------------------------------------- report


@dataclass(frozen=True)
class BackendStatus:
    available: bool
    reason: str

    def __bool__(self) -> bool:
        return self.available

    def __repr__(self) -> str:
        return f"{'available' if self.available else 'unavailable'}: {self.reason}"


_FAMILY_LABELS = {"sc_attention": "sc_attention", "routing": "token routing"}


def _status(row: Backend, device: torch.device) -> BackendStatus:
    """What `backends()` says of one backend on one device: its op families, or why not."""
    err = backend_error(row.name, device)
    if err is not None:
        return BackendStatus(False, err)
    errors = {family: family_error(row.name, family, device) for family in OP_FAMILIES}
    kinds = ", ".join(_FAMILY_LABELS[f] for f, e in errors.items() if e is None)
    missing = "; ".join(dict.fromkeys(e for e in errors.values() if e is not None))  # one line per distinct reason
    if not kinds:  # every kernel failed to load
        return BackendStatus(False, missing)
    note = f" ({missing})" if missing else ""
    return BackendStatus(True, f"{row.devices[device.type]}: {kinds}{note}")


def backends(device: str | torch.device | None = None) -> dict[str, BackendStatus]:
    """Which backends are usable on this machine, and why the others are not.

    Each entry names the device type it runs on and which of its op families are
    built.  device: report for tensors on this device; None: each backend on the
    first of its device types it can run on here (else, why it runs on none).
    """
    out = {}
    for name, row in BACKEND.items():
        if row.devices is None:
            out[name] = BackendStatus(True, row.summary)
            continue
        if device is not None:
            out[name] = _status(row, torch.device(device))
            continue
        why = {}
        for device_type in row.devices:
            err = backend_error(name, device_type)
            if err is None:
                out[name] = _status(row, torch.device(device_type))
                break
            why.setdefault(err, device_type)
        else:
            # One reason per distinct cause, naming the device type when there are several.
            reasons = list(why) if len(why) == 1 else [f"{t.upper()}: {r}" for r, t in why.items()]
            out[name] = BackendStatus(False, "; ".join(reasons))
    return out
