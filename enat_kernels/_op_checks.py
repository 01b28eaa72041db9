"""The metadata checks of the ops themselves, in Python, for every backend.

The compiled CPU and CUDA ops check their inputs' metadata in C++ before any kernel
runs (TORCH_CHECK in csrc/cpu/*.cpp and csrc/cuda/*_api.cpp): ranks, shapes, dtypes,
devices, unit stride along head_dim, the dtype, rank, contiguity and length of lens
and cu_seqlens.  Under torch.compile those C++ bodies do not run: the fake (meta)
implementations of enat_kernels/_ops.py do, and they call the functions below, as do
the Triton ops (enat_kernels/triton/) on every call.  So an op called directly with a
bad shape is refused the same way (RuntimeError, as TORCH_CHECK raises) by every
backend, traced or eager.

The public API (attention.py, routing.py) checks more, with ValueError/TypeError
naming the argument (_validation.py), before it calls an op; these checks guard the
ops' own contract.  Backend capabilities (dtypes, head_dims per backend) are checked
by the dispatcher and the kernels' launchers, not here.  Metadata only: no tensor
data is read, and symbolic sizes are fine (torch._check).
"""

from __future__ import annotations

import torch

from ._validation import FLOAT_DTYPES

SEGMENTS = ("q", "k_cond", "v_cond", "k_self", "v_self")


def lse_dtype(q: torch.Tensor) -> torch.dtype:
    """The log-sum-exp is float32, float64 for float64 inputs."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def lse_shape(q: torch.Tensor) -> tuple:
    """(B, H, N) for dense q (B, N, H, D), (H, T) for packed q (T, H, D)."""
    if q.dim() == 4:
        B, N, H, _ = q.shape
        return (B, H, N)
    T, H, _ = q.shape
    return (H, T)


def _unit_stride_rows(t: torch.Tensor) -> bool:
    # As the kernels read rows: any batch/token/head strides, unit stride along head_dim.
    # The stride first: it is a plain 1 for every usual input, so no size is guarded on.
    return t.stride(-1) == 1 or t.shape[-1] <= 1 or t.numel() == 0


def _int32_vector(name: str, t, q: torch.Tensor, entries) -> None:
    torch._check(t.device == q.device, lambda: f"sc_attention: {name} must be on q's device ({q.device}), got {t.device}")
    torch._check(
        t.dtype == torch.int32 and t.dim() == 1 and t.is_contiguous(),
        lambda: f"sc_attention: {name} must be a contiguous 1-d int32 tensor, got {t.dtype} of shape {tuple(t.shape)}",
    )
    torch._check(t.shape[0] == entries, lambda: f"sc_attention: {name} must have {entries} entries, got {t.shape[0]}")


def sc_attention_inputs(q, k_cond, v_cond, k_self, v_self, cond_lens, self_lens, cu_seqlens_q, cu_seqlens_cond,
                        max_seqlen_q, max_seqlen_cond) -> None:
    """The arguments of sc_attn_fwd (and the shared ones of sc_attn_bwd), in either form."""
    torch._check(q.dim() in (3, 4),
                 lambda: f"sc_attention: q must be (B, N, H, D) or packed (T, H, D), got shape {tuple(q.shape)}")
    torch._check(q.dtype in FLOAT_DTYPES, lambda: f"sc_attention: unsupported dtype {q.dtype}")
    for name, t in zip(SEGMENTS, (q, k_cond, v_cond, k_self, v_self)):
        torch._check(
            t.device == q.device and t.dim() == q.dim() and t.dtype == q.dtype,
            lambda: f"sc_attention: {name} must have q's device, rank and dtype ({q.device}, {q.dim()}, {q.dtype}), "
                    f"got {t.device}, {t.dim()}, {t.dtype}",
        )
        torch._check(t.shape[-1] == q.shape[-1] and t.shape[-2] == q.shape[-2],
                     lambda: f"sc_attention: {name} must have q's heads and head_dim, got shape {tuple(t.shape)}")
        torch._check(_unit_stride_rows(t), lambda: f"sc_attention: {name} must have unit stride along head_dim")
    torch._check(k_self.shape == q.shape and v_self.shape == q.shape,
                 lambda: "sc_attention: k_self and v_self must have q's shape")
    torch._check(v_cond.shape == k_cond.shape, lambda: "sc_attention: v_cond must have k_cond's shape")
    torch._check(q.shape[-1] >= 1, lambda: "sc_attention: head_dim must be at least 1")
    if q.dim() == 3:
        torch._check(
            cu_seqlens_q is not None and cu_seqlens_cond is not None and cond_lens is None and self_lens is None,
            lambda: "sc_attention: the packed form takes cu_seqlens_q and cu_seqlens_cond, not lens",
        )
        torch._check(cu_seqlens_q.dim() == 1 and cu_seqlens_q.shape[0] >= 1,
                     lambda: "sc_attention: cu_seqlens_q must have batch + 1 >= 1 entries")
        entries = cu_seqlens_q.shape[0]
        _int32_vector("cu_seqlens_q", cu_seqlens_q, q, entries)
        _int32_vector("cu_seqlens_cond", cu_seqlens_cond, q, entries)
        # One check each: `a >= 0 and b >= 0` would take the truth of a symbolic bool,
        # which fails while tracing when max_seqlen comes from a tensor (`.item()`).
        for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_cond", max_seqlen_cond)):
            torch._check(value >= 0, lambda: f"sc_attention: {name} must be non-negative, got {value}")
    else:
        torch._check(cu_seqlens_q is None and cu_seqlens_cond is None,
                     lambda: "sc_attention: the dense form takes no cu_seqlens")
        torch._check(k_cond.shape[0] == q.shape[0], lambda: "sc_attention: k_cond must have q's batch size")
        # Dense bounds are the shapes (the CUDA op sizes its grid from them); one check each, as above.
        torch._check(max_seqlen_q == q.shape[1],
                     lambda: f"sc_attention: dense inputs need max_seqlen_q = N = {q.shape[1]}, got {max_seqlen_q}")
        torch._check(max_seqlen_cond == k_cond.shape[1],
                     lambda: f"sc_attention: dense inputs need max_seqlen_cond = Nc = {k_cond.shape[1]}, got {max_seqlen_cond}")
        for name, lens in (("cond_lens", cond_lens), ("self_lens", self_lens)):
            if lens is not None:
                _int32_vector(name, lens, q, q.shape[0])


def sc_attention_backward_inputs(dout, dlse, q, k_cond, v_cond, k_self, v_self, out, lse, cond_lens, self_lens,
                                 cu_seqlens_q, cu_seqlens_cond, max_seqlen_q, max_seqlen_cond) -> None:
    """The arguments of sc_attn_bwd: the forward's, plus dout and out shaped like q and
    the forward's lse (and dlse) shaped like lse."""
    sc_attention_inputs(q, k_cond, v_cond, k_self, v_self, cond_lens, self_lens, cu_seqlens_q, cu_seqlens_cond,
                        max_seqlen_q, max_seqlen_cond)
    for name, t in (("dout", dout), ("out", out)):
        torch._check(t.shape == q.shape and t.dtype == q.dtype and t.device == q.device,
                     lambda: f"sc_attention backward: {name} must be shaped like q, in q's dtype and on q's device")
        torch._check(_unit_stride_rows(t), lambda: f"sc_attention backward: {name} must have unit stride along head_dim")
    shape = torch.Size(lse_shape(q))
    torch._check(
        lse.shape == shape and lse.dtype == lse_dtype(q) and lse.device == q.device,
        lambda: f"sc_attention backward: lse must be the forward's log-sum-exp ({lse_dtype(q)} of shape {tuple(shape)})",
    )
    if dlse is not None:
        torch._check(dlse.shape == shape and dlse.device == q.device,
                     lambda: "sc_attention backward: dlse must be shaped like lse")


def _rows(name: str, x: torch.Tensor) -> None:
    torch._check(x.dim() == 3 and x.is_contiguous(), lambda: f"{name} must be a contiguous (B, L, C) tensor")


def _row_indices(name: str, idx: torch.Tensor, rows: torch.Tensor) -> None:
    torch._check(
        idx.dtype == torch.int64 and idx.dim() == 2 and idx.is_contiguous() and idx.shape[0] == rows.shape[0],
        lambda: f"{name} must be a contiguous int64 (B, N) tensor with the rows' batch size",
    )
    torch._check(idx.device == rows.device, lambda: f"{name} must be on the rows' device ({rows.device}), got {idx.device}")


def mask_to_indices_inputs(mask: torch.Tensor, count) -> None:
    torch._check(mask.dtype == torch.bool and mask.dim() == 2 and mask.is_contiguous(),
                 lambda: "mask must be a contiguous bool (B, L) tensor")
    torch._check(count >= 0, lambda: "count must be non-negative")


def gather_rows_inputs(x: torch.Tensor, idx: torch.Tensor) -> None:
    _rows("x", x)
    _row_indices("idx", idx, x)


def scatter_rows_inputs(a: torch.Tensor, idx_a: torch.Tensor, b, idx_b, seq_len) -> None:
    _rows("a", a)
    _row_indices("idx_a", idx_a, a)
    torch._check(idx_a.shape[1] == a.shape[1], lambda: "idx_a must have one entry per row of a")
    torch._check((b is None) == (idx_b is None), lambda: "b and idx_b must both be given or both be None")
    torch._check(seq_len >= 0, lambda: "seq_len must be non-negative")
    if b is not None:
        _rows("b", b)
        _row_indices("idx_b", idx_b, a)
        torch._check(b.dtype == a.dtype and b.device == a.device and b.shape[0] == a.shape[0] and b.shape[2] == a.shape[2],
                     lambda: "b must match a in dtype, device, batch and row size")
        torch._check(idx_b.shape[1] == b.shape[1], lambda: "idx_b must have one entry per row of b")
