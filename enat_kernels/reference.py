"""The reference implementations (the oracle): plain PyTorch, differentiable by autograd.

These define what every backend must compute (docs/KERNEL_CONTRACT.md).  They also
serve as the ``torch`` backend, so they avoid host synchronization: no ``.item()``,
no data-dependent shapes.  Matmuls run in the input dtype, softmax and log-sum-exp in
float32 (float64 for float64 inputs); called on float64 inputs they are the oracle the
tests compare every kernel with.

Padding is never read as data: query rows at or beyond ``self_lens`` and key rows
beyond a segment's length are replaced by zeros before any arithmetic, so NaN in
padding cannot leak, and padded query rows come back as zeros with lse = -inf.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _row_mask(lens: torch.Tensor | None, batch: int, n: int, device) -> torch.Tensor:
    """(batch, n) bool: True for rows i < lens[b] (all rows when lens is None)."""
    ar = torch.arange(n, device=device)
    if lens is None:
        return torch.ones(batch, n, dtype=torch.bool, device=device)
    return ar[None, :] < lens.to(device=device, dtype=torch.long)[:, None]


def sc_attention_ref(
    q: torch.Tensor,
    k_cond: torch.Tensor,
    v_cond: torch.Tensor,
    k_self: torch.Tensor,
    v_self: torch.Tensor,
    cond_lens: torch.Tensor | None = None,
    self_lens: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SC-Attention on dense (B, N, H, D) inputs.

    Row b, head h, query i < self_lens[b] attends under one softmax to the first
    cond_lens[b] rows of (k_cond, v_cond) and then the first self_lens[b] rows of
    (k_self, v_self).  Returns ``out`` (B, N, H, D) in q's dtype and ``lse`` (B, H, N)
    in float32 (float64 for float64 inputs).
    """
    B, N, H, D = q.shape
    Nc = k_cond.shape[1]
    if scale is None:
        scale = D**-0.5
    acc = _acc_dtype(q.dtype)
    dev = q.device

    q_valid = _row_mask(self_lens, B, N, dev)  # queries are the self segment's tokens
    c_valid = _row_mask(cond_lens, B, Nc, dev)
    key_valid = torch.cat([c_valid, q_valid], dim=1)  # (B, Nc + N)

    k = torch.cat([k_cond, k_self], dim=1)
    v = torch.cat([v_cond, v_self], dim=1)
    zero = torch.zeros((), dtype=q.dtype, device=dev)
    q = torch.where(q_valid[:, :, None, None], q, zero)
    k = torch.where(key_valid[:, :, None, None], k, zero)
    v = torch.where(key_valid[:, :, None, None], v, zero)

    s = torch.matmul(q.transpose(1, 2), k.permute(0, 2, 3, 1)).to(acc) * scale  # (B, H, N, Nk)
    s = s.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf where a row sees no key
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(s - finite_lse[..., None])
    p = p * q_valid[:, None, :, None]
    out = torch.matmul(p.to(q.dtype), v.transpose(1, 2)).transpose(1, 2).contiguous()
    lse = lse.masked_fill(~q_valid[:, None, :], float("-inf"))
    return out, lse


def _packed_rows(cu_seqlens: torch.Tensor, max_seqlen: int, total: int):
    """Index of packed row (b, i) in the packed tensor, or `total` (a zero row) past the end.

    Also returns the offsets and lengths used.  Invalid cu_seqlens (value checks off)
    are clamped as the kernels clamp them: offsets to [0, total], lengths to
    [0, max_seqlen], so no index leaves [0, total].
    """
    cu = cu_seqlens.long().clamp(0, total)
    lens = (cu[1:] - cu[:-1]).clamp(0, max_seqlen)
    ar = torch.arange(max_seqlen, device=cu.device)
    valid = ar[None, :] < lens[:, None]
    idx = torch.where(valid, cu[:-1, None] + ar[None, :], torch.full_like(valid, total, dtype=torch.long))
    return idx, cu, lens


def _pad_gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (T, H, D) -> (B, S, H, D), index `T` giving zeros."""
    padded = torch.cat([x, x.new_zeros((1,) + tuple(x.shape[1:]))], dim=0)
    return padded[idx]


def sc_attention_varlen_ref(
    q: torch.Tensor,
    k_cond: torch.Tensor,
    v_cond: torch.Tensor,
    k_self: torch.Tensor,
    v_self: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_cond: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_cond: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SC-Attention on packed inputs: q/k_self/v_self (Tq, H, D), k_cond/v_cond (Tc, H, D).

    Sequence b's queries (and self keys) are rows cu_seqlens_q[b]:cu_seqlens_q[b+1],
    its cond keys rows cu_seqlens_cond[b]:cu_seqlens_cond[b+1].  Returns out (Tq, H, D)
    and lse (H, Tq).  Pads to dense with device-side gathers (no host sync).
    """
    Tq, H, D = q.shape
    Tc = k_cond.shape[0]
    B = cu_seqlens_q.shape[0] - 1
    q_idx, cu, q_lens = _packed_rows(cu_seqlens_q, max_seqlen_q, Tq)
    c_idx, _, c_lens = _packed_rows(cu_seqlens_cond, max_seqlen_cond, Tc)
    out_d, lse_d = sc_attention_ref(
        _pad_gather(q, q_idx),
        _pad_gather(k_cond, c_idx),
        _pad_gather(v_cond, c_idx),
        _pad_gather(k_self, q_idx),
        _pad_gather(v_self, q_idx),
        cond_lens=c_lens,
        self_lens=q_lens,
        scale=scale,
    )
    # Packed row t belongs to sequence b(t) at offset t - cu[b(t)].  A row no sequence
    # owns (only invalid cu_seqlens leave one) reads the zero row appended at
    # B * max_seqlen_q: out 0, lse -inf, like a padded row.
    t = torch.arange(Tq, device=q.device)
    b_of_t = torch.searchsorted(cu[1:], t, right=True).clamp(max=max(B - 1, 0))
    off = t - cu[b_of_t] if B > 0 else t
    owned = (off >= 0) & (off < q_lens[b_of_t]) if B > 0 else torch.zeros_like(t, dtype=torch.bool)
    flat = torch.where(owned, b_of_t * max_seqlen_q + off, torch.full_like(t, B * max_seqlen_q))
    out = torch.cat([out_d.reshape(B * max_seqlen_q, H, D), out_d.new_zeros(1, H, D)])[flat]
    lse_rows = lse_d.permute(1, 0, 2).reshape(H, B * max_seqlen_q)
    lse = torch.cat([lse_rows, lse_rows.new_full((H, 1), float("-inf"))], dim=1)[:, flat]
    return out, lse


# ----------------------------------------------------------------------------- routing


def mask_to_indices_ref(mask: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the True entries of each row of `mask` (B, L), ascending.

    Returns indices (B, count) int64 padded with -1 and lens (B,) int32 (the number of
    True per row, clamped to `count`).
    """
    B, L = mask.shape
    pos = torch.arange(L, device=mask.device)
    key = torch.where(mask, pos, pos + L)  # True positions first, each group in order
    order = key.argsort(dim=1)[:, :count]
    if order.shape[1] < count:
        order = F.pad(order, (0, count - order.shape[1]), value=-1)
    lens = mask.sum(dim=1).clamp(max=count)
    keep = torch.arange(count, device=mask.device)[None, :] < lens[:, None]
    return torch.where(keep, order, torch.full_like(order, -1)), lens.to(torch.int32)


def gather_rows_ref(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """out[b, i] = x[b, idx[b, i]], zeros where idx is -1 (or outside [0, L): invalid
    input, which the contract says gives zeros, not an error).  x (B, L, C), idx (B, N)."""
    L = x.shape[1]
    if L == 0:  # nothing to read: index a zero row instead (a new tensor would cut autograd)
        x = torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[2])], dim=1)
    valid = (idx >= 0) & (idx < L)
    safe = torch.where(valid, idx, torch.zeros_like(idx))
    rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(idx)
    # Advanced indexing, not torch.gather: CPU gather of bfloat16 rewrites NaN bits,
    # and rows are moved bit for bit.
    out = x[rows, safe]
    return torch.where(valid[:, :, None], out, torch.zeros((), dtype=x.dtype, device=x.device))


def scatter_rows_ref(
    a: torch.Tensor,
    idx_a: torch.Tensor,
    b: torch.Tensor | None,
    idx_b: torch.Tensor | None,
    seq_len: int,
) -> torch.Tensor:
    """A zero (B, seq_len, C) sequence with a's rows at idx_a and b's at idx_b (-1 skipped)."""
    B, _, C = a.shape
    out = a.new_zeros(B, seq_len + 1, C)  # row seq_len swallows -1 (and out-of-range) entries
    for src, idx in ((a, idx_a), (b, idx_b)):
        if src is None:
            continue
        tgt = torch.where((idx >= 0) & (idx < seq_len), idx, torch.full_like(idx, seq_len))
        rows = torch.arange(B, device=a.device)[:, None].expand_as(tgt)
        # index_put, not scatter: CPU scatter of float16 rewrites the bits of NaNs it
        # does not target, and rows are moved bit for bit.
        out = out.index_put((rows, tgt), src)
    return out[:, :seq_len].contiguous()  # the contract promises a contiguous result


def merge_ranks_ref(idx_a: torch.Tensor, idx_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each row of two ascending, disjoint index sets lands in their merged order.

    Padding (-1) entries get rank -1.  Device-side (searchsorted), no host sync.
    """
    big = torch.iinfo(torch.int64).max
    a = torch.where(idx_a >= 0, idx_a, torch.full_like(idx_a, big)).contiguous()
    b = torch.where(idx_b >= 0, idx_b, torch.full_like(idx_b, big)).contiguous()
    rank_a = torch.arange(a.shape[1], device=a.device)[None, :] + torch.searchsorted(b, a)
    rank_b = torch.arange(b.shape[1], device=b.device)[None, :] + torch.searchsorted(a, b)
    rank_a = torch.where(idx_a >= 0, rank_a, torch.full_like(rank_a, -1))
    rank_b = torch.where(idx_b >= 0, rank_b, torch.full_like(rank_b, -1))
    return rank_a, rank_b
