"""Public SC-Attention entry points: validation, backend choice, call.

``sc_attention`` takes dense (batch, tokens, heads, head_dim) tensors with optional
per-row lengths; ``sc_attention_varlen`` the packed (total_tokens, heads, head_dim)
form with int32 ``cu_seqlens``, as ``flash_attn_varlen_func`` does.
"""

from __future__ import annotations

import torch

from . import _dispatch, reference
from . import _validation as check


def _run(backend: str, varlen: bool, args: tuple):
    """Call backend's forward op (or the reference) with the op schema's arguments."""
    q, k_cond, v_cond, k_self, v_self, cond_lens, self_lens, cu_q, cu_c, max_q, max_c, scale = args
    if backend == "torch":
        if varlen:
            return reference.sc_attention_varlen_ref(q, k_cond, v_cond, k_self, v_self, cu_q, cu_c, max_q, max_c, scale)
        return reference.sc_attention_ref(q, k_cond, v_cond, k_self, v_self, cond_lens, self_lens, scale)
    return _dispatch.kernel(backend, "sc_attn_fwd")(*args)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    # Kernels take any batch/token/head strides but need unit stride along head_dim.
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_segments(q, k_cond, v_cond, k_self, v_self, ndim: int):
    """Shared checks of the five tensors; returns them with an empty cond segment filled in."""
    check.tensor("q", q, ndim=ndim, dtypes=check.FLOAT_DTYPES)
    if (k_cond is None) != (v_cond is None):
        raise ValueError("k_cond and v_cond must both be tensors or both be None (no cond segment)")
    if k_cond is None:
        k_cond = v_cond = q.new_empty((q.shape[0], 0) + tuple(q.shape[2:]) if ndim == 4 else (0,) + tuple(q.shape[1:]))
    named = {"q": q, "k_cond": k_cond, "v_cond": v_cond, "k_self": k_self, "v_self": v_self}
    for name, t in named.items():
        check.tensor(name, t, ndim=ndim, dtypes=check.FLOAT_DTYPES)
    check.same_dtype(named)
    check.same_device(named)
    check.dim_equal("heads", {f"{n}.shape[{ndim - 2}]": t.shape[-2] for n, t in named.items()})
    check.dim_equal("head_dim", {f"{n}.shape[{ndim - 1}]": t.shape[-1] for n, t in named.items()})
    if q.shape[-1] < 1:
        raise ValueError(f"head_dim (q.shape[{ndim - 1}]) must be at least 1, got {q.shape[-1]}")
    tok = 1 if ndim == 4 else 0
    check.dim_equal("cond tokens", {f"k_cond.shape[{tok}]": k_cond.shape[tok], f"v_cond.shape[{tok}]": v_cond.shape[tok]})
    check.dim_equal(
        "self tokens (the self segment is the queries' own)",
        {f"q.shape[{tok}]": q.shape[tok], f"k_self.shape[{tok}]": k_self.shape[tok], f"v_self.shape[{tok}]": v_self.shape[tok]},
    )
    return [_last_dim_contiguous(t) for t in (q, k_cond, v_cond, k_self, v_self)]


def _lens(name, lens, batch, limit, device):
    check.lengths(name, lens, batch, limit, device)
    if lens is None:
        return None
    if lens.dtype == torch.int64:
        # Clamp before narrowing: int64 values beyond int32 (checks off) would wrap.
        lens = lens.clamp(0, limit)
    return lens.to(torch.int32).contiguous()


def sc_attention(
    q: torch.Tensor,
    k_cond: torch.Tensor | None,
    v_cond: torch.Tensor | None,
    k_self: torch.Tensor,
    v_self: torch.Tensor,
    *,
    cond_lens: torch.Tensor | None = None,
    self_lens: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
):
    """SC-Attention: queries attend, under one softmax, to a cond segment and their own.

    Args:
        q: (B, N, H, D) queries.
        k_cond, v_cond: (B, Nc, H, D) keys/values of the conditioning segment (cached
            visible tokens); Nc may be 0, or pass None for both.
        k_self, v_self: (B, N, H, D) keys/values of the queries' own segment.
        cond_lens: optional int (B,): row b uses the first cond_lens[b] cond keys.
        self_lens: optional int (B,): row b has self_lens[b] valid queries and self
            keys; query rows beyond it come back zero (lse -inf).
        scale: softmax scale, default D ** -0.5.
        return_lse: also return the float32 log-sum-exp (B, H, N) (float64 for float64
            inputs), so attention over further segments can be merged exactly.
        backend: "triton", "cuda", "cpu", "torch" or None (automatic, see
            enat_kernels.backends()).

    Returns:
        out (B, N, H, D) in q's dtype, or (out, lse) when return_lse.

    The inputs may be non-contiguous views (e.g. slices of one fused Linear output) as
    long as head_dim has unit stride; otherwise they are copied.  Gradients flow to all
    five tensors (and through lse when it is used).
    """
    q, k_cond, v_cond, k_self, v_self = _check_segments(q, k_cond, v_cond, k_self, v_self, ndim=4)
    B, N, H, D = q.shape
    Nc = k_cond.shape[1]
    check.dim_equal(
        "batch",
        {
            "q.shape[0]": B,
            "k_cond.shape[0]": k_cond.shape[0],
            "v_cond.shape[0]": v_cond.shape[0],
            "k_self.shape[0]": k_self.shape[0],
            "v_self.shape[0]": v_self.shape[0],
        },
    )
    cond_lens = _lens("cond_lens", cond_lens, B, Nc, q.device)
    self_lens = _lens("self_lens", self_lens, B, N, q.device)
    scale = check.scale(scale)
    if scale is None:
        scale = D**-0.5
    name = _dispatch.select_attention(backend, q.device, q.dtype, D)
    out, lse = _run(name, False, (q, k_cond, v_cond, k_self, v_self, cond_lens, self_lens, None, None, N, Nc, scale))
    return (out, lse) if return_lse else out


def sc_attention_varlen(
    q: torch.Tensor,
    k_cond: torch.Tensor | None,
    v_cond: torch.Tensor | None,
    k_self: torch.Tensor,
    v_self: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_cond: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_cond: int,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str | None = None,
):
    """SC-Attention on packed sequences, as ``flash_attn_varlen_func``.

    Args:
        q, k_self, v_self: (Tq, H, D); sequence b owns rows cu_seqlens_q[b]:cu_seqlens_q[b+1].
        k_cond, v_cond: (Tc, H, D); sequence b's cond rows are
            cu_seqlens_cond[b]:cu_seqlens_cond[b+1] (None for both: no cond segment,
            then cu_seqlens_cond must be all zeros).
        cu_seqlens_q, cu_seqlens_cond: int32 (B + 1,), starting at 0, non-decreasing.
        max_seqlen_q, max_seqlen_cond: host ints bounding the sequence lengths (they
            size the launch grid without reading cu_seqlens on the host).

    Returns:
        out (Tq, H, D), or (out, lse) with lse (H, Tq) float32 when return_lse.
    """
    q, k_cond, v_cond, k_self, v_self = _check_segments(q, k_cond, v_cond, k_self, v_self, ndim=3)
    T, H, D = q.shape
    max_seqlen_q = check.cu_seqlens("cu_seqlens_q", cu_seqlens_q, T, max_seqlen_q, "max_seqlen_q", q.device)
    max_seqlen_cond = check.cu_seqlens(
        "cu_seqlens_cond",
        cu_seqlens_cond,
        k_cond.shape[0],
        max_seqlen_cond,
        "max_seqlen_cond",
        q.device,
        like=("cu_seqlens_q", cu_seqlens_q),
    )
    scale = check.scale(scale)
    if scale is None:
        scale = D**-0.5
    name = _dispatch.select_attention(backend, q.device, q.dtype, D)
    args = (
        q,
        k_cond,
        v_cond,
        k_self,
        v_self,
        None,
        None,
        cu_seqlens_q.contiguous(),
        cu_seqlens_cond.contiguous(),
        max_seqlen_q,
        max_seqlen_cond,
        scale,
    )
    out, lse = _run(name, True, args)
    return (out, lse) if return_lse else out
