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

from . import _dispatch
from . import _validation as check
from . import reference


def _ops(name: str):
    """(mask_to_indices, gather_rows, scatter_rows) of backend `name`."""
    if name == "torch":
        return reference.mask_to_indices_ref, reference.gather_rows_ref, reference.scatter_rows_ref
    if name == "triton":
        from . import triton as _triton

        return _triton.op("mask_to_indices"), _triton.op("gather_rows"), _triton.op("scatter_rows")
    ops = torch.ops.enat_kernels
    return ops.mask_to_indices.default, ops.gather_rows.default, ops.scatter_rows.default


def _rows(name: str, x) -> tuple[torch.Tensor, tuple]:
    """View x (B, L, ...) as contiguous (B, L, C); also return the trailing shape."""
    check.tensor(name, x)
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape (batch, tokens, ...), got {tuple(x.shape)}")
    tail = tuple(x.shape[2:])
    # The row size is spelled out: reshape cannot infer -1 when B or L is 0.
    return x.reshape(x.shape[0], x.shape[1], math.prod(tail)).contiguous(), tail


def _unrows(x: torch.Tensor, tail: tuple) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1], *tail)


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
    L = mask.shape[1]
    if not isinstance(count, (int, torch.SymInt)) or isinstance(count, bool):
        raise TypeError(f"count must be an int, got {type(count).__name__}")
    if not (0 <= count <= L):
        raise ValueError(f"count must lie in [0, {L}] (the mask's length), got {count}")
    if check.value_checks_enabled() and mask.numel() > 0:
        most = int(mask.sum(dim=1).max())
        if most > count:
            raise ValueError(f"count = {count} but a row of mask has {most} True entries; count must be at least the largest row count")
    name = _dispatch.select_routing(backend, mask.device, "mask_to_indices")
    return _ops(name)[0](mask.contiguous(), count)


def gather_tokens(x: torch.Tensor, indices: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Rows of x at `indices`: out[b, i] = x[b, indices[b, i]], zeros where indices is -1.

    x: (B, L, ...); indices: (B, N) int64.  Differentiable in x (its backward scatters).
    """
    x3, tail = _rows("x", x)
    check.indices("indices", indices, x3.shape[0], x3.shape[1], x3.device)
    name = _dispatch.select_routing(backend, x3.device, "gather_tokens")
    return _unrows(_ops(name)[1](x3, indices.contiguous()), tail)


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
    a3, tail = _rows("a", a)
    B = a3.shape[0]
    if not isinstance(seq_len, (int, torch.SymInt)) or isinstance(seq_len, bool):
        raise TypeError(f"seq_len must be an int, got {type(seq_len).__name__}")
    if seq_len < 0:
        raise ValueError(f"seq_len must be non-negative, got {seq_len}")
    if (b is None) != (idx_b is None):
        raise ValueError("b and idx_b must both be given or both be None")
    b3 = None
    if b is not None:
        b3, tail_b = _rows("b", b)
        check.same_dtype({"a": a3, "b": b3})
        check.same_device({"a": a3, "b": b3})
        check.dim_equal("batch", {"a.shape[0]": B, "b.shape[0]": b3.shape[0]})
        check.dim_equal("row shape", {"a.shape[2:]": tail, "b.shape[2:]": tail_b})
        check.indices("idx_b", idx_b, B, seq_len, a3.device)
        check.dim_equal("tokens", {"b.shape[1]": b3.shape[1], "idx_b.shape[1]": idx_b.shape[1]})
        idx_b = idx_b.contiguous()
    check.indices("idx_a", idx_a, B, seq_len, a3.device, unique_with=idx_b)
    check.dim_equal("tokens", {"a.shape[1]": a3.shape[1], "idx_a.shape[1]": idx_a.shape[1]})
    name = _dispatch.select_routing(backend, a3.device, "restore_tokens")
    return _unrows(_ops(name)[2](a3, idx_a.contiguous(), b3, idx_b, seq_len), tail)


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
    a3, _ = _rows("a", a)
    B, unbounded = a3.shape[0], torch.iinfo(torch.int64).max
    check.indices("idx_b", idx_b, B, unbounded, a3.device)
    check.indices("idx_a", idx_a, B, unbounded, a3.device, unique_with=idx_b)
    check.ascending("idx_a", idx_a)
    check.ascending("idx_b", idx_b)
    rank_a, rank_b = reference.merge_ranks_ref(idx_a, idx_b)
    n = idx_a.shape[1] + idx_b.shape[1]
    with check.value_checks(False):  # the ranks are unique by construction
        merged = restore_tokens(a, rank_a, b, rank_b, n, backend=backend)
        pos = restore_tokens((idx_a + 1)[:, :, None], rank_a, (idx_b + 1)[:, :, None], rank_b, n, backend=backend)
    return merged, pos[:, :, 0] - 1


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
    check.tensor("mask", mask, ndim=2, dtypes=(torch.bool,))
    L = mask.shape[1]
    if num_false is None and isinstance(num_true, (int, torch.SymInt)):
        num_false = L - num_true
    if check.value_checks_enabled() and mask.numel() > 0:
        # One host sync for both bounds, and errors that name the caller's arguments.
        n_true = mask.sum(dim=1)
        most_true, most_false = torch.stack([n_true.max(), L - n_true.min()]).tolist()
        for arg, bound, most, kind in (("num_true", num_true, most_true, "True"), ("num_false", num_false, most_false, "False")):
            if isinstance(bound, int) and not isinstance(bound, bool) and most > bound:
                raise ValueError(f"{arg} = {bound} but a row of mask has {most} {kind} entries; {arg} must bound every row's count")
    # Counts checked above, indices valid by construction; type and shape checks stay on.
    with check.value_checks(False):
        t_idx, t_len = mask_to_indices(mask, num_true, backend=backend)
        f_idx, f_len = mask_to_indices(~mask, num_false, backend=backend)
        return TokenSplit(
            gather_tokens(x, t_idx, backend=backend), t_idx, t_len,
            gather_tokens(x, f_idx, backend=backend), f_idx, f_len,
        )
