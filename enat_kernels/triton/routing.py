"""Token routing in Triton: mask_to_indices, gather_rows, scatter_rows.

Contract: docs/KERNEL_CONTRACT.md.  The ops are ``enat_kernels::triton_<name>`` with
the schemas of csrc/schema.cpp; their autograd is the shared one of
`enat_kernels._ops.register_routing_autograd` (gather and scatter are each other's
backward).

Rows are moved as raw words, never as values: a contiguous (B, L, C) tensor is
reinterpreted as (B, L, row_bytes / w) words of w = 4, 2 or 1 bytes (the widest that
divides the row and the tensor's byte offset), so one kernel serves every dtype
(float16/bfloat16/float32/float64/int64/bool, ...), bit for bit, NaN payloads
included.  Contiguous runs of 4-byte words compile to 16-byte vector accesses when
Triton sees the row length and base pointers divisible by 16.

Nothing here reads tensor values on the host, so the ops never synchronize and trace
under torch.compile (the functions below double as the fake implementations).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .. import _op_checks, _ops
from . import launch

# Words a row is moved in, widest first.
_WORD_DTYPES = {4: torch.int32, 2: torch.int16, 1: torch.int8}
# Words moved per program: enough work per program to hide latency, few enough
# registers to keep several programs per SM.
_TILE_WORDS = 4096
_MAX_ROW_BLOCK = 1024  # words of one row handled by one program (longer rows: more programs)
_MAX_ROWS = 128  # rows per program (narrow rows)
_SCAN_BLOCK = 1024  # mask entries one mask_to_indices step reads

# One compiled variant per (dtype, row width): the token counts change at every sampling
# step, so the integer arguments that follow them are never specialized (Triton would
# otherwise compile new variants when a count is 1 or a multiple of 16), and the block
# sizes depend only on the row width (L for mask_to_indices).
_COUNT_ARGS_SCAN = ("L", "count")
_COUNT_ARGS_COPY = ("rows", "N", "src_len", "dst_len")


# ----------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=_COUNT_ARGS_SCAN)
def _mask_to_indices_kernel(mask_ptr, idx_ptr, lens_ptr, L, count, BLOCK: tl.constexpr):
    """One program per batch row: a running prefix sum over the row gives every True
    entry its output slot, so indices come out ascending with no atomics."""
    b = tl.program_id(0).to(tl.int64)
    row = mask_ptr + b * L
    out = idx_ptr + b * count
    offs = tl.arange(0, BLOCK)
    n = tl.zeros((), dtype=tl.int32)  # True entries seen so far
    for start in range(0, L, BLOCK):
        pos = start + offs
        flag = (tl.load(row + pos, mask=pos < L, other=0) != 0).to(tl.int32)
        slot = n + tl.cumsum(flag, axis=0) - 1
        tl.store(out + slot, pos.to(tl.int64), mask=(flag != 0) & (slot < count))
        n += tl.sum(flag, axis=0)
    n = tl.minimum(n, count)
    tl.store(lens_ptr + b, n)
    pad = tl.full((BLOCK,), -1, dtype=tl.int64)
    for start in range(0, count, BLOCK):
        i = start + offs
        tl.store(out + i, pad, mask=(i >= n) & (i < count))


@triton.jit(do_not_specialize=_COUNT_ARGS_COPY)
def _copy_rows_kernel(
    dst_ptr, src_ptr, idx_ptr, rows, N, src_len, dst_len, row_words,
    SCATTER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Program (i, j) moves words j*BLOCK_W.. of rows i*BLOCK_R.. (rows = B * N).

    Gather: dst row r = (b, i) <- src row (b, idx[r]), zeros for an index outside
    [0, src_len).  Scatter: dst row (b, idx[r]) <- src row r, skipped for an index
    outside [0, dst_len).  Out-of-range indices come only from invalid input; they
    never cause an out-of-bounds access.
    """
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    w = tl.program_id(1).to(tl.int64) * BLOCK_W + tl.arange(0, BLOCK_W)
    row_ok = r < rows
    p = tl.load(idx_ptr + r, mask=row_ok, other=-1)
    b = r // N
    w_ok = (w < row_words)[None, :]
    if SCATTER:
        ok = row_ok & (p >= 0) & (p < dst_len)
        src = r * row_words
        dst = (b * dst_len + p) * row_words
        m = ok[:, None] & w_ok
        vals = tl.load(src_ptr + src[:, None] + w[None, :], mask=m)
        tl.store(dst_ptr + dst[:, None] + w[None, :], vals, mask=m)
    else:
        ok = row_ok & (p >= 0) & (p < src_len)
        src = (b * src_len + p) * row_words
        dst = r * row_words
        vals = tl.load(src_ptr + src[:, None] + w[None, :], mask=ok[:, None] & w_ok, other=0)
        tl.store(dst_ptr + dst[:, None] + w[None, :], vals, mask=row_ok[:, None] & w_ok)


# ----------------------------------------------------------------------------- launchers


def _word_size(*tensors: torch.Tensor) -> int:
    """Widest word (4, 2 or 1 bytes) dividing the row bytes and every tensor's byte offset.

    The tensors are contiguous (B, *, C) with one dtype; storages are allocated at least
    16-byte aligned, so the byte offset decides the alignment of a word view.
    """
    row_bytes = tensors[0].shape[2] * tensors[0].element_size()
    offsets = [t.storage_offset() * t.element_size() for t in tensors]
    for size in _WORD_DTYPES:
        if row_bytes % size == 0 and all(o % size == 0 for o in offsets):
            return size
    return 1


def _view_words(x: torch.Tensor, size: int) -> torch.Tensor:
    """x's bytes as integer words of `size` bytes (no copy): (B, L, C) -> (B, L, W)."""
    if x.dtype == torch.bool:  # bool reinterprets as a same-size integer only
        x = x.view(torch.uint8)
    return x.view(_WORD_DTYPES[size])


def copy_rows_launch(dst: torch.Tensor, src: torch.Tensor, idx: torch.Tensor, src_len, dst_len, scatter: bool):
    """(grid, kwargs) of _copy_rows_kernel on word views of dst and src (same dtype and
    row size); None when there is nothing to move (never an empty grid)."""
    B, N = idx.shape
    rows = B * N
    size = _word_size(dst, src)
    dst_w, src_w = _view_words(dst, size), _view_words(src, size)
    row_words = dst_w.shape[2]
    if rows == 0 or row_words == 0:
        return None
    block_w = min(triton.next_power_of_2(row_words), _MAX_ROW_BLOCK)
    block_r = max(1, min(_TILE_WORDS // block_w, _MAX_ROWS))
    grid = (triton.cdiv(rows, block_r), triton.cdiv(row_words, block_w))
    return grid, dict(
        dst_ptr=dst_w, src_ptr=src_w, idx_ptr=idx, rows=rows, N=N, src_len=src_len, dst_len=dst_len,
        row_words=row_words, SCATTER=scatter, BLOCK_R=block_r, BLOCK_W=block_w,
    )


def mask_to_indices_launch(mask: torch.Tensor, count: int, indices: torch.Tensor, lens: torch.Tensor):
    """(grid, kwargs) of _mask_to_indices_kernel (one program per row; count == 0 still
    launches: lens must be written); None for an empty batch."""
    B, L = mask.shape
    if B == 0:
        return None
    block = min(triton.next_power_of_2(max(L, 16)), _SCAN_BLOCK)
    return (B,), dict(mask_ptr=mask.view(torch.uint8), idx_ptr=indices, lens_ptr=lens, L=L, count=count, BLOCK=block)


def _launch(kernel, device: torch.device, launch_args) -> None:
    if launch_args is not None:
        grid, kwargs = launch_args
        launch(kernel, grid, device, **kwargs)


# ----------------------------------------------------------------------------- ops


@triton_op("enat_kernels::triton_mask_to_indices", mutates_args=())
def mask_to_indices(mask: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    _op_checks.mask_to_indices_inputs(mask, count)
    B = mask.shape[0]
    indices = mask.new_empty((B, count), dtype=torch.int64)
    lens = mask.new_empty((B,), dtype=torch.int32)
    _launch(_mask_to_indices_kernel, mask.device, mask_to_indices_launch(mask, count, indices, lens))
    return indices, lens


@triton_op("enat_kernels::triton_gather_rows", mutates_args=())
def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    _op_checks.gather_rows_inputs(x, idx)
    out = x.new_empty((x.shape[0], idx.shape[1], x.shape[2]))
    _launch(_copy_rows_kernel, x.device, copy_rows_launch(out, x, idx, x.shape[1], idx.shape[1], scatter=False))
    return out


@triton_op("enat_kernels::triton_scatter_rows", mutates_args=())
def scatter_rows(
    a: torch.Tensor, idx_a: torch.Tensor, b: torch.Tensor | None, idx_b: torch.Tensor | None, seq_len: int
) -> torch.Tensor:
    _op_checks.scatter_rows_inputs(a, idx_a, b, idx_b, seq_len)
    out = a.new_zeros((a.shape[0], seq_len, a.shape[2]))
    _launch(_copy_rows_kernel, a.device, copy_rows_launch(out, a, idx_a, a.shape[1], seq_len, scatter=True))
    if b is not None and idx_b is not None:
        _launch(_copy_rows_kernel, a.device, copy_rows_launch(out, b, idx_b, b.shape[1], seq_len, scatter=True))
    return out


_ops.register_routing_autograd(gather_rows, scatter_rows)

OPS = {"mask_to_indices": mask_to_indices, "gather_rows": gather_rows, "scatter_rows": scatter_rows}
