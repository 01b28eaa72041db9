"""Token routing: move token subsets out of and back into a sequence, on the device.

ENAT encodes visible tokens, decodes masked ones and re-encodes only newly revealed
ones; each of these moves a subset of the (B, L, C) token rows.  The published code
uses boolean indexing (``x[mask]``), which needs the number of True entries on the
host (a device-to-host sync) and cannot handle rows with different counts.  Here the
caller supplies the count (a sampler knows it from its schedule), indices come out in
ascending position order padded with -1 for shorter rows, and every move is one kernel.

All functions accept token tensors of any dtype shaped (B, L) or (B, L, ...): trailing
dimensions are treated as one row of bytes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from . import _dispatch, reference
from . import _validation as check

_REFERENCE = {
    "mask_to_indices": reference.mask_to_indices_ref,
    "gather_rows": reference.gather_rows_ref,
    "scatter_rows": reference.scatter_rows_ref,
}


def _op(name: str, op: str):
    """Routing op `op` ("mask_to_indices", "gather_rows", "scatter_rows") of backend `name`."""
    return _REFERENCE[op] if name == "torch" else _dispatch.kernel(name, op)


def _rows(name: str, x) -> tuple[torch.Tensor, tuple]:
    """View x (B, L, ...) as contiguous (B, L, C); also return the trailing shape."""
    check.tensor(name, x)
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape (batch, tokens, ...), got {tuple(x.shape)}")
    tail = tuple(x.shape[2:])
    # math.prod, not -1: a reshape cannot infer -1 when B or L is 0.
    return x.reshape(x.shape[0], x.shape[1], math.prod(tail)).contiguous(), tail


def _unrows(x: torch.Tensor, tail: tuple) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1], *tail)


# Unchecked runners: the public functions below validate, then call these, so that
# composite functions (split_tokens, merge_tokens) check each input once and never
# re-check indices they computed themselves.


def _mask_to_indices(mask: torch.Tensor, count, backend, op: str):
    name = _dispatch.select_routing(backend, mask.device, op)
    return _op(name, "mask_to_indices")(mask.contiguous(), count)


def _gather(x3: torch.Tensor, idx: torch.Tensor, backend, op: str) -> torch.Tensor:
    name = _dispatch.select_routing(backend, x3.device, op)
    return _op(name, "gather_rows")(x3, idx.contiguous())


def _scatter(a3, idx_a, b3, idx_b, seq_len, backend, op: str) -> torch.Tensor:
    name = _dispatch.select_routing(backend, a3.device, op)
    return _op(name, "scatter_rows")(a3, idx_a.contiguous(), b3, None if idx_b is None else idx_b.contiguous(), seq_len)


def _check_pair(a, idx_a, b, idx_b):
    """Metadata checks of one or two token subsets and their index tensors.

    Returns (a3, b3, tail): a and b as contiguous (B, N, C), and the trailing shape.
    """
    a3, tail = _rows("a", a)
    if (b is None) != (idx_b is None):
        raise ValueError("b and idx_b must both be given or both be None")
    B = a3.shape[0]
    check.indices("idx_a", idx_a, B, 0, a3.device, values=False)
    check.dim_equal("tokens", {"a.shape[1]": a3.shape[1], "idx_a.shape[1]": idx_a.shape[1]})
    b3 = None
    if b is not None:
        b3, tail_b = _rows("b", b)
        check.same_dtype({"a": a3, "b": b3})
        check.same_device({"a": a3, "b": b3})
        check.dim_equal("batch", {"a.shape[0]": B, "b.shape[0]": b3.shape[0]})
        check.dim_equal("row shape", {"a.shape[2:]": tail, "b.shape[2:]": tail_b})
        check.indices("idx_b", idx_b, B, 0, a3.device, values=False)
        check.dim_equal("tokens", {"b.shape[1]": b3.shape[1], "idx_b.shape[1]": idx_b.shape[1]})
    return a3, b3, tail


def mask_to_indices(mask: torch.Tensor, count: int, *, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the True entries of each row, ascending, without a host sync.

    Args:
        mask: (B, L) bool.
        count: the most True entries any row has (known to the caller, e.g. from a
            sampling schedule).  A row with more raises ValueError (value check).

    Returns:
        indices (B, count) int64, each row's True positions ascending then -1 padding;
        lens (B,) int32, the number of True entries per row.
    """
    check.tensor("mask", mask, ndim=2, dtypes=(torch.bool,))
    count = check.size("count", count, upper=mask.shape[1], upper_what=" (the mask's length)")
    check.mask_counts(mask, ("count", count))
    return _mask_to_indices(mask, count, backend, "mask_to_indices")


def gather_tokens(x: torch.Tensor, indices: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Rows of x at `indices`: out[b, i] = x[b, indices[b, i]], zeros where indices is -1.

    x: (B, L, ...); indices: (B, N) int64, unique per row (the backward scatters).
    Differentiable in x.
    """
    x3, tail = _rows("x", x)
    check.indices("indices", indices, x3.shape[0], x3.shape[1], x3.device)
    return _unrows(_gather(x3, indices, backend, "gather_tokens"), tail)


def scatter_tokens(src: torch.Tensor, indices: torch.Tensor, seq_len: int, *, backend: str | None = None) -> torch.Tensor:
    """A zero (B, seq_len, ...) sequence with src's rows at `indices` (-1 rows skipped)."""
    return restore_tokens(src, indices, None, None, seq_len, backend=backend)


def restore_tokens(
    a: torch.Tensor,
    idx_a: torch.Tensor,
    b: torch.Tensor | None,
    idx_b: torch.Tensor | None,
    seq_len: int,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Put two token subsets back at their positions in one (B, seq_len, ...) sequence.

    Positions named by neither index set are zero.  The two index sets must be
    disjoint and each free of repeats (value check).  Differentiable in a and b.
    """
    a3, b3, tail = _check_pair(a, idx_a, b, idx_b)
    seq_len = check.at_most("seq_len", check.size("seq_len", seq_len), check.MAX_TOKENS, " (tokens per row are int32-bounded)")
    B = a3.shape[0]
    if b is not None:
        check.indices("idx_b", idx_b, B, seq_len, a3.device)
    check.indices("idx_a", idx_a, B, seq_len, a3.device, unique_with=idx_b)
    return _unrows(_scatter(a3, idx_a, b3, idx_b, seq_len, backend, "restore_tokens"), tail)


def merge_tokens(
    a: torch.Tensor,
    idx_a: torch.Tensor,
    b: torch.Tensor,
    idx_b: torch.Tensor,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two token subsets into one sequence in position order.

    idx_a and idx_b are ascending, disjoint positions (each padded with -1, as
    mask_to_indices gives them).  Returns the merged rows (B, Na + Nb, ...) and their
    positions (B, Na + Nb) int64; rows beyond a row's la + lb valid tokens are zero
    with position -1.  ENAT uses this to assemble the visible set from the newly
    revealed tokens and the cached ones.
    """
    if b is None or idx_b is None:
        raise TypeError("merge_tokens needs both subsets: b and idx_b must be tensors")
    a3, b3, tail = _check_pair(a, idx_a, b, idx_b)
    B, unbounded = a3.shape[0], torch.iinfo(torch.int64).max
    check.indices("idx_b", idx_b, B, unbounded, a3.device)
    check.indices("idx_a", idx_a, B, unbounded, a3.device, unique_with=idx_b)
    check.ascending("idx_a", idx_a)
    check.ascending("idx_b", idx_b)
    rank_a, rank_b = reference.merge_ranks_ref(idx_a, idx_b)  # unique by construction
    n = idx_a.shape[1] + idx_b.shape[1]
    merged = _scatter(a3, rank_a, b3, rank_b, n, backend, "merge_tokens")
    pos = _scatter((idx_a + 1)[:, :, None], rank_a, (idx_b + 1)[:, :, None], rank_b, n, backend, "merge_tokens")
    return _unrows(merged, tail), pos[:, :, 0] - 1


class TokenSplit(NamedTuple):
    """Result of split_tokens: the True and False subsets of a sequence."""

    true_tokens: torch.Tensor
    true_indices: torch.Tensor
    true_lens: torch.Tensor
    false_tokens: torch.Tensor
    false_indices: torch.Tensor
    false_lens: torch.Tensor


def split_tokens(
    x: torch.Tensor,
    mask: torch.Tensor,
    num_true: int,
    num_false: int | None = None,
    *,
    backend: str | None = None,
) -> TokenSplit:
    """Split x (B, L, ...) by mask (B, L) into the True rows and the False rows.

    The equivalent of ``(x[mask], x[~mask])`` without the host sync, for rows with the
    same or with different counts.  num_true bounds the True count of every row;
    num_false bounds the False count (default L - num_true, exact when every row has
    num_true True entries).
    """
    x3, tail = _rows("x", x)
    check.tensor("mask", mask, ndim=2, dtypes=(torch.bool,))
    check.same_device({"x": x3, "mask": mask})
    check.dim_equal("batch", {"x.shape[0]": x3.shape[0], "mask.shape[0]": mask.shape[0]})
    check.dim_equal("tokens", {"x.shape[1]": x3.shape[1], "mask.shape[1]": mask.shape[1]})
    L = mask.shape[1]
    num_true = check.size("num_true", num_true, upper=L, upper_what=" (the mask's length)")
    hint = ""
    if num_false is None:
        num_false, hint = L - num_true, " (it defaults to L - num_true, exact only when every row has num_true True entries)"
    num_false = check.size("num_false", num_false, upper=L, upper_what=" (the mask's length)")
    check.mask_counts(mask, ("num_true", num_true), ("num_false", num_false), hint=hint)
    t_idx, t_len = _mask_to_indices(mask, num_true, backend, "split_tokens")
    f_idx, f_len = _mask_to_indices(~mask, num_false, backend, "split_tokens")
    return TokenSplit(
        _unrows(_gather(x3, t_idx, backend, "split_tokens"), tail), t_idx, t_len,
        _unrows(_gather(x3, f_idx, backend, "split_tokens"), tail), f_idx, f_len,
    )
