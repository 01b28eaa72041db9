"""Input validation for the public API: clear errors before any kernel runs.

Two kinds of checks:

- metadata (types, dtypes, devices, ranks, shapes): always on, free.
- values (lengths within range, cu_seqlens increasing, indices in range and unique,
  mask counts): these read tensor data, which on a GPU is a device-to-host sync.
  They are on by default and skipped inside ``enat_kernels.value_checks(False)``,
  under ``torch.compile`` tracing and during CUDA graph capture.  Kernels never rely
  on them for memory safety: they clamp lengths and skip out-of-range indices.
"""

from __future__ import annotations

import contextlib
import numbers
import operator
import os
import threading

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)

_state = threading.local()


def _env_default() -> bool:
    return os.environ.get("ENAT_KERNELS_VALUE_CHECKS", "1").lower() not in ("0", "false", "no", "off")


def value_checks_enabled() -> bool:
    # Tracing first: Dynamo folds this to a constant, so the compiled graph does not
    # guard on the thread-local switch below (a guard on it would recompile).
    if torch.compiler.is_compiling():
        return False
    enabled = getattr(_state, "enabled", None)
    if enabled is None:
        enabled = _state.enabled = _env_default()
    if not enabled:
        return False
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return False
    return True


def _reads(*tensors) -> bool:
    """Whether to run a value check on these tensors: checks on, and the tensors hold data.

    Meta tensors (shape-only, e.g. for deferred initialization) have no values to read.
    """
    return value_checks_enabled() and all(t.device.type != "meta" for t in tensors if t is not None)


@contextlib.contextmanager
def value_checks(enabled: bool):
    """Turn the data-reading checks on or off in this thread (they cost a host sync on GPU).

    >>> with enat_kernels.value_checks(False):
    ...     out = enat_kernels.sc_attention(q, kc, vc, ks, vs, cond_lens=lens)
    """
    prev = getattr(_state, "enabled", None)  # None: follow ENAT_KERNELS_VALUE_CHECKS
    _state.enabled = bool(enabled)
    try:
        yield
    finally:
        _state.enabled = prev


# ----------------------------------------------------------------------------- helpers


def tensor(name: str, x, *, ndim: int | None = None, dtypes=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(x.dtype).replace('torch.', '')}")


def size(name: str, value, *, upper: int | None = None, upper_what: str = ""):
    """A host-side size argument (count, seq_len, max_seqlen): an int in [0, upper].

    Returns it as a Python int (numpy integers are accepted), or unchanged when it is
    a torch.SymInt (symbolic under torch.compile: its range is not checked).
    """
    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, bool) or isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    # ints pass as they are: operator.index on a symbolic size under torch.compile
    # (which Dynamo presents as an int) would specialize the graph to its value.
    if not isinstance(value, int):
        try:
            value = operator.index(value)
        except TypeError:
            raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if upper is not None and not 0 <= value <= upper:
        raise ValueError(f"{name} must lie in [0, {upper}]{upper_what}, got {value}")
    if value < 0:
        raise ValueError(f"{name} must be non-negative, got {value}")
    return value


# Tokens per row and packed rows are int32 in the kernels' index tensors (as in flash-attn).
MAX_TOKENS = 2**31 - 1


def at_most(name: str, value, bound: int, what: str = ""):
    """Upper bound of a size already checked by `size` (metadata only, no host sync)."""
    if not isinstance(value, torch.SymInt) and value > bound:
        raise ValueError(f"{name} must lie in [0, {bound}]{what}, got {value}")
    return value


def same_dtype(named: dict) -> None:
    items = [(n, t) for n, t in named.items() if t is not None]
    n0, t0 = items[0]
    for n, t in items[1:]:
        if t.dtype != t0.dtype:
            raise TypeError(f"{n} has dtype {t.dtype} but {n0} has {t0.dtype}; all must match")


def same_device(named: dict) -> None:
    items = [(n, t) for n, t in named.items() if t is not None]
    n0, t0 = items[0]
    for n, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{n} is on {t.device} but {n0} is on {t0.device}; all must be on one device")


def dim_equal(what: str, named: dict) -> None:
    """named: {"q.shape[0]": 4, ...}; all values must be equal."""
    items = list(named.items())
    n0, v0 = items[0]
    for n, v in items[1:]:
        if v != v0:
            raise ValueError(f"{what} mismatch: {n} = {v} but {n0} = {v0}")


def lengths(name: str, lens, batch: int, limit: int, device) -> None:
    """lens: None or an integer (batch,) tensor with values in [0, limit]."""
    if lens is None:
        return
    tensor(name, lens, ndim=1, dtypes=INDEX_DTYPES)
    if lens.shape[0] != batch:
        raise ValueError(f"{name} must have one entry per batch row ({batch}), got {lens.shape[0]}")
    if lens.device != device:
        raise ValueError(f"{name} is on {lens.device} but the inputs are on {device}")
    if _reads(lens) and lens.numel() > 0:
        lo, hi = torch.stack([lens.min(), lens.max()]).tolist()  # one host sync
        if lo < 0 or hi > limit:
            raise ValueError(f"{name} values must lie in [0, {limit}], got min {lo} and max {hi}")


def cu_seqlens(name: str, cu, total: int, max_seqlen: int, max_name: str, device, *, like: tuple | None = None):
    """int32 (batch + 1,) offsets: 0, non-decreasing, ending at `total`, steps <= max_seqlen.

    like: (name, tensor) of offsets checked before, whose length this one must match.
    Returns max_seqlen as an int (see `size`).
    """
    tensor(name, cu, ndim=1, dtypes=(torch.int32,))
    if cu.shape[0] < 1:
        raise ValueError(f"{name} must have batch + 1 >= 1 entries, got none")
    if like is not None and cu.shape[0] != like[1].shape[0]:
        raise ValueError(f"{name} must have as many entries as {like[0]} ({like[1].shape[0]}: batch + 1), got {cu.shape[0]}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but the inputs are on {device}")
    max_seqlen = size(max_name, max_seqlen)
    # No sequence can be longer than the packed rows; a bound far above them would only
    # size empty scratch buffers and launch grids (and overflow their sizes).  Checked
    # after the value checks, whose messages say more when the offsets are wrong too.
    def bounded():
        return at_most(max_name, max_seqlen, total, " (the number of packed rows)")

    if not _reads(cu):
        return bounded()
    c = cu.long()
    steps = c[1:] - c[:-1] if c.numel() > 1 else c.new_zeros(1)
    # First, last, smallest and largest step in one host sync.
    first, last, lo, hi = torch.stack([c[0], c[-1], steps.min(), steps.max()]).tolist()
    if first != 0:
        raise ValueError(f"{name}[0] must be 0, got {first}")
    if last != total:
        raise ValueError(f"{name}[-1] must equal the number of packed rows ({total}), got {last}")
    if lo < 0:
        raise ValueError(f"{name} must be non-decreasing")
    if hi > max_seqlen:
        raise ValueError(f"{max_name} = {max_seqlen} is smaller than the longest sequence in {name} ({hi})")
    return bounded()


def scale(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"scale must be a float or None, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond float's range
        raise ValueError("scale must be finite, got an int beyond float's range") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"scale must be finite, got {value}")
    return value


def indices(name: str, idx, batch: int, limit: int, device, *, unique_with=None, values: bool = True) -> None:
    """idx: int64 (batch, N), entries in [0, limit) or -1 (padding), no repeats in a row.

    unique_with: another index tensor whose entries must not repeat any of idx's.
    values=False: metadata only (the caller checks the values later).
    """
    if isinstance(idx, torch.Tensor) and idx.is_floating_point():
        raise TypeError(f"{name} must be an integer tensor (int64), got {idx.dtype}")
    tensor(name, idx, ndim=2, dtypes=(torch.int64,))
    if idx.shape[0] != batch:
        raise ValueError(f"{name} must have {batch} rows (the batch), got {idx.shape[0]}")
    if idx.device != device:
        raise ValueError(f"{name} is on {idx.device} but the tokens are on {device}")
    if not values or not _reads(idx, unique_with) or idx.numel() == 0:
        return
    lo, hi = torch.stack([idx.min(), idx.max()]).tolist()
    if lo < -1 or hi >= limit:
        raise ValueError(f"{name} entries must lie in [0, {limit}) or be -1 (padding), got min {lo} and max {hi}")
    both = idx if unique_with is None else torch.cat([idx, unique_with], dim=1)
    s, _ = both.sort(dim=1)
    dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
    if bool(dup.any()):
        row = int(dup.any(dim=1).nonzero()[0, 0])
        what = name if unique_with is None else f"{name} and the other index set together"
        raise ValueError(f"{what} repeat a token index in batch row {row}; indices must be unique")


def ascending(name: str, idx: torch.Tensor) -> None:
    """Value check: each row strictly increasing over its valid entries, -1 padding trailing."""
    if not _reads(idx) or idx.shape[1] < 2:
        return
    prev, nxt = idx[:, :-1], idx[:, 1:]
    bad = ((nxt >= 0) & (prev < 0)) | ((nxt >= 0) & (nxt <= prev))
    if bool(bad.any()):
        row = int(bad.any(dim=1).nonzero()[0, 0])
        raise ValueError(f"{name} must be ascending with -1 padding at the end of each row; batch row {row} is not")


def mask_counts(mask: torch.Tensor, true_bound: tuple | None, false_bound: tuple | None = None, *, hint: str = "") -> None:
    """Value check: no row of `mask` has more True (False) entries than its bound.

    true_bound, false_bound: (argument name, bound) or None.  One host sync for both.
    hint: appended to the message about the False bound.
    """
    if not _reads(mask) or mask.numel() == 0:
        return
    n_true = mask.sum(dim=1)
    most_true, most_false = torch.stack([n_true.max(), mask.shape[1] - n_true.min()]).tolist()
    for bound, most, kind, extra in ((true_bound, most_true, True, ""), (false_bound, most_false, False, hint)):
        if bound is not None and most > bound[1]:
            name, count = bound
            raise ValueError(
                f"{name} = {count} but a row of mask has {most} {kind} entries; "
                f"{name} must be at least the largest count in a row{extra}"
            )
