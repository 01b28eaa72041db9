"""The oracle itself: reference.py against a direct float64 reading of the formula in docs/KERNEL_CONTRACT.md."""

import math

import pytest
import torch

from enat_kernels.reference import (
    gather_rows_ref,
    mask_to_indices_ref,
    merge_ranks_ref,
    sc_attention_ref,
    sc_attention_varlen_ref,
    scatter_rows_ref,
)
from support.attention_cases import CASES, VARLEN_CASES, make_inputs, make_varlen_inputs


def direct(q, kc, vc, ks, vs, cond_lens, self_lens, scale):
    """O[b,i,h] = sum_j softmax_j(s q.k) v over the first cond_len keys of the cond
    segment then the first self_len keys of the self segment; loops, float64."""
    B, N, H, D = q.shape
    Nc = kc.shape[1]
    scale = D**-0.5 if scale is None else scale
    out = torch.zeros(B, N, H, D, dtype=torch.float64)
    lse = torch.full((B, H, N), -math.inf, dtype=torch.float64)
    for b in range(B):
        lc = Nc if cond_lens is None else int(cond_lens[b])
        ls = N if self_lens is None else int(self_lens[b])
        k = torch.cat([kc[b, :lc], ks[b, :ls]]).double()
        v = torch.cat([vc[b, :lc], vs[b, :ls]]).double()
        for h in range(H):
            for i in range(ls):
                s = scale * (k[:, h] @ q[b, i, h].double())
                lse[b, h, i] = torch.logsumexp(s, 0)
                out[b, i, h] = torch.softmax(s, 0) @ v[:, h]
    return out, lse


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_formula(case, gen):
    q, kc, vc, ks, vs, cl, sl = make_inputs(case, torch.float64, "cpu", gen)
    out, lse = sc_attention_ref(q, kc, vc, ks, vs, cond_lens=cl, self_lens=sl, scale=case.scale)
    out_d, lse_d = direct(q, kc, vc, ks, vs, cl, sl, case.scale)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    torch.testing.assert_close(out, out_d, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, lse_d, atol=1e-12, rtol=1e-12)


def test_reference_lse_is_float32_for_low_precision(gen):
    q, kc, vc, ks, vs, *_ = make_inputs(CASES[0], torch.float16, "cpu", gen)
    out, lse = sc_attention_ref(q, kc, vc, ks, vs)
    assert out.dtype == torch.float16 and lse.dtype == torch.float32


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("ragged", "ragged_empty_rows", "views", "empty_cond")], ids=str)
def test_reference_gradcheck(case, gen):
    """Gradients of the oracle (all five inputs) by finite differences, float64.

    Padding rows hold NaN in make_inputs; gradcheck needs finite inputs, so they are
    zeroed here (the NaN case is covered by the backend suites)."""
    small = dict(B=min(case.B, 2), N=min(case.N, 5), Nc=min(case.Nc, 6), D=8)
    inputs = make_inputs(case, torch.float64, "cpu", gen)
    q, kc, vc, ks, vs, cl, sl = inputs
    sl = None if sl is None else sl.clamp(max=small["N"])[: small["B"]]
    cl = None if cl is None else cl.clamp(max=small["Nc"])[: small["B"]]
    ts = [
        t[: small["B"], : (small["N"] if i in (0, 3, 4) else small["Nc"]), :, : small["D"]].nan_to_num(0.0).contiguous().requires_grad_()
        for i, t in enumerate((q, kc, vc, ks, vs))
    ]

    def fn(*x):
        out, lse = sc_attention_ref(*x, cond_lens=cl, self_lens=sl)
        return out, lse.masked_fill(torch.isinf(lse), 0.0)  # -inf rows: no finite difference

    torch.autograd.gradcheck(fn, ts)


@pytest.mark.parametrize("case", list(VARLEN_CASES), ids=str)
def test_varlen_reference_matches_formula(case, gen):
    q_lens, c_lens = VARLEN_CASES[case]
    q, kc, vc, ks, vs, cu_q, cu_c, mq, mc = make_varlen_inputs(q_lens, c_lens, 2, 16, torch.float64, "cpu", gen)
    out, lse = sc_attention_varlen_ref(q, kc, vc, ks, vs, cu_q, cu_c, mq, mc)
    for b in range(len(q_lens)):
        qs, qe, cs, ce = int(cu_q[b]), int(cu_q[b + 1]), int(cu_c[b]), int(cu_c[b + 1])
        o_d, l_d = direct(q[None, qs:qe], kc[None, cs:ce], vc[None, cs:ce], ks[None, qs:qe], vs[None, qs:qe], None, None, None)
        torch.testing.assert_close(out[qs:qe], o_d[0], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(lse[:, qs:qe], l_d[0], atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------- routing


def test_mask_to_indices_ref(gen):
    mask = torch.rand(4, 37, generator=gen) < 0.4
    count = int(mask.sum(1).max())
    idx, lens = mask_to_indices_ref(mask, count + 3)
    for b in range(4):
        pos = mask[b].nonzero()[:, 0]
        assert lens[b] == len(pos)
        assert idx[b, : len(pos)].tolist() == pos.tolist()
        assert (idx[b, len(pos) :] == -1).all()


def test_gather_scatter_merge_ref(gen):
    B, L, C = 3, 20, 5
    x = torch.randn(B, L, C, generator=gen)
    perm = torch.stack([torch.randperm(L, generator=gen) for _ in range(B)])
    ia, ib = perm[:, :7].sort(1).values, perm[:, 7:].sort(1).values
    a, b = gather_rows_ref(x, ia), gather_rows_ref(x, ib)
    for r in range(B):
        assert torch.equal(a[r], x[r, ia[r]])
    assert torch.equal(scatter_rows_ref(a, ia, b, ib, L), x)
    ra, rb = merge_ranks_ref(ia, ib)
    assert torch.equal(torch.sort(torch.cat([ra, rb], 1), 1).values, torch.arange(L).expand(B, L))
    # A rank is the number of positions of either set that come before it.
    for r in range(B):
        for j in range(ia.shape[1]):
            assert ra[r, j] == int((ia[r] < ia[r, j]).sum() + (ib[r] < ia[r, j]).sum())
