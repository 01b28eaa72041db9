"""The SC-Attention cases every backend is tested on (one list, shared by all suites).

Covers the edge cases of docs/KERNEL_CONTRACT.md: empty cond segment (first sampling step), empty query
set (last step), ragged rows, cond far longer than self (encoder with reuse) and the
reverse (decoder), head_dim 32/64/128, batch 1, sizes that are not block multiples,
custom scales and non-contiguous views.  Padding rows of every input are filled with
NaN so that a kernel reading them as data fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttnCase:
    id: str
    B: int
    N: int
    Nc: int
    H: int = 2
    D: int = 64
    cond_lens: tuple | None = None
    self_lens: tuple | None = None
    scale: float | None = None
    views: bool = False  # q/k/v as strided views of fused projections

    def __str__(self):
        return self.id


CASES = [
    AttnCase("basic", B=2, N=24, Nc=40),
    AttnCase("empty_cond", B=2, N=24, Nc=0),
    AttnCase("empty_query", B=2, N=0, Nc=16),
    AttnCase("ragged", B=3, N=33, Nc=47, cond_lens=(47, 0, 20), self_lens=(33, 1, 17)),
    AttnCase("ragged_empty_rows", B=3, N=12, Nc=9, cond_lens=(5, 0, 0), self_lens=(0, 12, 0)),
    AttnCase("cond_long", B=2, N=8, Nc=150),
    AttnCase("self_long", B=2, N=150, Nc=8),
    AttnCase("odd_sizes", B=2, N=37, Nc=53, H=3),
    AttnCase("head_dim_32", B=2, N=20, Nc=30, D=32),
    AttnCase("head_dim_128", B=2, N=20, Nc=30, D=128),
    AttnCase("batch_1", B=1, N=70, Nc=70),
    AttnCase("scale", B=2, N=16, Nc=16, scale=0.3),
    AttnCase("views", B=2, N=19, Nc=29, views=True, cond_lens=(29, 11), self_lens=(19, 7)),
]

# (query/self lengths, cond lengths) per sequence, for the packed form.
VARLEN_CASES = {
    "varlen_basic": ((16, 7, 30), (20, 0, 9)),
    "varlen_empty_seq": ((0, 12, 5), (8, 0, 0)),
    "varlen_single": ((41,), (65,)),
    "varlen_no_cond": ((9, 13), (0, 0)),
}


def _lens(values, device):
    return None if values is None else torch.tensor(values, dtype=torch.int32, device=device)


def _poison_rows(x: torch.Tensor, lens: torch.Tensor | None) -> torch.Tensor:
    """NaN in the rows (dim 1) at or beyond lens[b]."""
    if lens is None:
        return x
    pad = torch.arange(x.shape[1], device=x.device)[None, :] >= lens[:, None].long()
    return x.masked_fill(pad[:, :, None, None], float("nan"))


def make_inputs(case: AttnCase, dtype, device, gen: torch.Generator):
    """(q, k_cond, v_cond, k_self, v_self, cond_lens, self_lens) with NaN padding."""
    B, N, Nc, H, D = case.B, case.N, case.Nc, case.H, case.D

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    cond_lens, self_lens = _lens(case.cond_lens, device), _lens(case.self_lens, device)
    if case.views:
        qkv = rnd(B, N, 5, H, D)  # as one fused projection would give
        kvc = rnd(B, Nc, 2, H, D)
        q, k_self, v_self = qkv[:, :, 0], qkv[:, :, 2], qkv[:, :, 4]
        k_cond, v_cond = kvc.unbind(2)
    else:
        q, k_self, v_self = rnd(B, N, H, D), rnd(B, N, H, D), rnd(B, N, H, D)
        k_cond, v_cond = rnd(B, Nc, H, D), rnd(B, Nc, H, D)
    q, k_self, v_self = (_poison_rows(t, self_lens) for t in (q, k_self, v_self))
    k_cond, v_cond = (_poison_rows(t, cond_lens) for t in (k_cond, v_cond))
    return q, k_cond, v_cond, k_self, v_self, cond_lens, self_lens


def make_varlen_inputs(q_lens, c_lens, H, D, dtype, device, gen):
    """Packed (q, k_cond, v_cond, k_self, v_self, cu_q, cu_c, max_q, max_c)."""
    Tq, Tc = sum(q_lens), sum(c_lens)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    def cu(lens):
        return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=device)

    return (rnd(Tq, H, D), rnd(Tc, H, D), rnd(Tc, H, D), rnd(Tq, H, D), rnd(Tq, H, D),
            cu(q_lens), cu(c_lens), max(q_lens), max(c_lens))


# ----------------------------------------------------------------------------- independent oracle


def sc_attention_oracle(q, k_cond, v_cond, k_self, v_self, cond_lens=None, self_lens=None, scale=None):
    """SC-Attention written independently of enat_kernels.reference: one row at a time,
    keys and values concatenated, einsum and softmax in the inputs' dtype (run it on
    float64 inputs for the oracle), differentiable.  Padded query rows: zeros, lse -inf.
    Returns out in q's dtype and lse (B, H, N) in float32 (float64 for float64 inputs)."""
    B, N, H, D = q.shape
    scale = D**-0.5 if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs, lses = [], []
    for b in range(B):
        lc = k_cond.shape[1] if cond_lens is None else int(cond_lens[b])
        ls = N if self_lens is None else int(self_lens[b])
        k = torch.cat([k_cond[b, :lc], k_self[b, :ls]])  # (keys, H, D)
        v = torch.cat([v_cond[b, :lc], v_self[b, :ls]])
        s = torch.einsum("ihd,jhd->hij", q[b, :ls], k).to(acc) * scale
        o = torch.einsum("hij,jhd->ihd", torch.softmax(s, dim=-1).to(q.dtype), v)
        outs.append(torch.cat([o, q.new_zeros(N - ls, H, D)]))
        lses.append(torch.cat([torch.logsumexp(s, dim=-1), torch.full((H, N - ls), -math.inf, dtype=acc, device=q.device)], dim=1))
    if B == 0:  # empty results still on the autograd graph, as the ops' are
        return q * 0, q.sum().to(acc) * 0 + q.new_zeros(0, H, N, dtype=acc)
    return torch.stack(outs), torch.stack(lses)


def sc_attention_varlen_oracle(q, k_cond, v_cond, k_self, v_self, cu_q, cu_c, scale=None):
    """The packed form through the dense oracle, one sequence at a time."""
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        qs, qe, cs, ce = int(cu_q[b]), int(cu_q[b + 1]), int(cu_c[b]), int(cu_c[b + 1])
        o, lse = sc_attention_oracle(q[None, qs:qe], k_cond[None, cs:ce], v_cond[None, cs:ce], k_self[None, qs:qe],
                                   v_self[None, qs:qe], scale=scale)
        outs.append(o[0])
        lses.append(lse[0])
    if not outs:  # no sequence: empty results still on the autograd graph, as the ops' are
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        return q[:0] * 0, q.sum().to(acc) * 0 + q.new_zeros(q.shape[1], 0, dtype=acc)
    return torch.cat(outs), torch.cat(lses, dim=1)
