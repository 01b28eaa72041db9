"""Randomized tests (hypothesis): every available backend against an oracle.

SC-Attention (dense and packed) is compared with the float64 reference under the
accuracy rule of tests/support/tolerances.py, forward and backward, over random shapes (empty
ones included), ragged lengths, scales, dtypes, head_dims the backend supports, and
memory layouts: slices of a fused projection, transposed-then-viewed tensors,
batch-broadcast cond segments, token slices of longer buffers; all keep unit stride on
head_dim and are passed to the backend as they are (the gradients are taken with
respect to the underlying buffers, so the layout survives).  Token routing is compared
bit for bit with boolean indexing done row by row in Python.

The budget comes from the hypothesis profile (tests/conftest.py): "ci" by default
(few examples, derandomized: reproducible), "long" with HYPOTHESIS_PROFILE=long.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import enat_kernels as ek
from enat_kernels.reference import sc_attention_ref, sc_attention_varlen_ref
from support.attention_cases import make_varlen_inputs, sc_attention_oracle, sc_attention_varlen_oracle
from support.attention_checks import compare, forward_backward, lowp_and_oracle
from support.backends import device_for, skip_unless_routes

# `poison` is one mode for the whole test, not per-example state.
RANDOM = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])

ATTN_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
HEAD_DIMS = (8, 16, 24, 32, 40, 64, 72, 128)  # powers of two and odd sizes
DENSE_LAYOUTS = ("contiguous", "fused_qkv", "fused_heads", "transposed", "broadcast_cond", "token_slices")


def _attention_combos(backend: str):
    """(dtype, head_dim) pairs the backend supports on its device; skip if none."""
    dev = device_for(backend)
    combos = [
        (dt, d) for dt in ATTN_DTYPES for d in HEAD_DIMS if ek.supports("sc_attention", device=dev, dtype=dt, head_dim=d, backend=backend)
    ]
    if not combos:
        pytest.skip(ek.supports("sc_attention", device=dev, dtype=torch.float32, head_dim=64, backend=backend).reason)
    return dev, combos


def _scale(data, D: int):
    """None (the default D**-0.5) or a multiple in [-1, 1] of it: negative, zero, small.

    Not larger: flash-attention-style backwards compute delta = rowsum(dO * O) where
    PyTorch's softmax backward uses rowsum(P * dP); for a row with one key PyTorch's
    dq is then exactly 0 and a fused kernel's is a rounding residue that grows with
    the scale, which the accuracy rule's absolute floor (tests/support/tolerances.py) covers
    only up to about the default scale in float32 (measured: Triton, D = 64, one key,
    dq error 1.9e-6 at scale 0.125, 1.5e-5 at scale 1.0).
    """
    factor = data.draw(st.none() | st.floats(-1.0, 1.0, allow_nan=False, width=32), label="scale / D**-0.5")
    return None if factor is None else float(factor) * D**-0.5


# ----------------------------------------------------------------------------- dense


def _dense_buffers(layout, B, N, Nc, H, D, dtype, dev, gen):
    """(buffers, views): buffers are the leaves; views(*buffers) gives the five inputs."""

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dev, dtype)

    if layout == "fused_qkv":  # as linear(x).view(B, N, 3, H, D).unbind(2)
        bufs = [rnd(B, N, 3, H, D), rnd(B, Nc, 2, H, D)]
        return bufs, lambda s, c: (s[:, :, 0], c[:, :, 0], c[:, :, 1], s[:, :, 1], s[:, :, 2])
    if layout == "fused_heads":  # per-head packing: (B, N, H, 3 * D) split on the last dim
        bufs = [rnd(B, N, H, 3 * D), rnd(B, Nc, H, 2 * D)]
        return bufs, lambda s, c: (s[..., :D], c[..., :D], c[..., D:], s[..., D : 2 * D], s[..., 2 * D :])
    if layout == "transposed":  # (B, H, N, D) tensors seen as (B, N, H, D)
        bufs = [rnd(B, H, n, D) for n in (N, Nc, Nc, N, N)]
        return bufs, lambda *t: tuple(x.transpose(1, 2) for x in t)
    if layout == "broadcast_cond":  # one cond segment shared by the batch (batch stride 0)
        bufs = [rnd(B, N, H, D), rnd(1, Nc, H, D), rnd(1, Nc, H, D), rnd(B, N, H, D), rnd(B, N, H, D)]
        return bufs, lambda q, kc, vc, ks, vs: (q, kc.expand(B, -1, -1, -1), vc.expand(B, -1, -1, -1), ks, vs)
    if layout == "token_slices":  # the first N rows of longer buffers
        bufs = [rnd(B, n + 3, H, D) for n in (N, Nc, Nc, N, N)]
        return bufs, lambda q, kc, vc, ks, vs: (q[:, :N], kc[:, :Nc], vc[:, :Nc], ks[:, :N], vs[:, :N])
    bufs = [rnd(B, n, H, D) for n in (N, Nc, Nc, N, N)]
    return bufs, lambda *t: t


def _poison_padding(views, cond_lens, self_lens):
    """NaN in the padding rows, written through the views into the buffers."""
    q, kc, vc, ks, vs = views
    for t, lens in ((q, self_lens), (ks, self_lens), (vs, self_lens), (kc, cond_lens), (vc, cond_lens)):
        if lens is not None and t.shape[1] > 0:
            pad = torch.arange(t.shape[1], device=t.device)[None, :] >= lens[:, None].long()
            t.masked_fill_(pad[:, :, None, None], float("nan"))


def _check_against_oracle(backend, fns, bufs, dout, dlse, dtype, layout):
    """Output, lse and the gradients of every buffer of `backend` (fns: fused, reference,
    independent oracle) within the accuracy rule; the torch backend is measured against
    the independent oracle, since it is the reference.  Returns the fused results."""
    fused, ref, independent = fns
    got = forward_backward(fused, bufs, dout, dlse)
    lowp, oracle = lowp_and_oracle(backend, ref, independent, bufs, dout, dlse)
    compare(got, lowp, oracle, dtype, ["out", "lse"] + [f"grad of buffer {i} ({layout})" for i in range(len(bufs))])
    return got


@pytest.mark.parametrize("backend", ek.BACKENDS)
@RANDOM
@given(data=st.data())
def test_sc_attention_random(backend, data, poison):
    dev, combos = _attention_combos(backend)
    dtype, D = data.draw(st.sampled_from(combos), label="dtype, head_dim")
    B = data.draw(st.integers(0, 3), label="B")
    N = data.draw(st.integers(0, 33), label="N")
    Nc = data.draw(st.integers(0, 33), label="Nc")
    H = data.draw(st.integers(1, 3), label="H")
    layout = data.draw(st.sampled_from(DENSE_LAYOUTS), label="layout")
    ragged = st.lists(st.integers(0, N), min_size=B, max_size=B)
    self_lens = data.draw(st.none() | ragged, label="self_lens")
    cond_lens = None
    if layout != "broadcast_cond":  # a shared cond buffer cannot hold per-row padding
        cond_lens = data.draw(st.none() | st.lists(st.integers(0, Nc), min_size=B, max_size=B), label="cond_lens")
    scale = _scale(data, D)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))

    bufs, views = _dense_buffers(layout, B, N, Nc, H, D, dtype, dev, gen)
    cl = None if cond_lens is None else torch.tensor(cond_lens, dtype=torch.int32, device=dev)
    sl = None if self_lens is None else torch.tensor(self_lens, dtype=torch.int64, device=dev)
    inputs = views(*bufs)
    assert all(t.stride(-1) == 1 for t in inputs)
    _poison_padding(inputs, cl, sl)
    dout = torch.randn(B, N, H, D, generator=gen).to(dev, dtype)
    dlse = torch.randn(B, H, N, generator=gen).to(dev)

    def fused(*b):
        return ek.sc_attention(*views(*b), cond_lens=cl, self_lens=sl, scale=scale, return_lse=True, backend=backend)

    def ref(*b):
        return sc_attention_ref(*views(*b), cond_lens=cl, self_lens=sl, scale=scale)

    def independent(*b):
        return sc_attention_oracle(*views(*b), cond_lens=cl, self_lens=sl, scale=scale)

    got = _check_against_oracle(backend, (fused, ref, independent), bufs, dout, dlse, dtype, layout)
    assert got[0].shape == (B, N, H, D) and got[0].dtype == dtype and got[0].is_contiguous()
    assert got[1].shape == (B, H, N)


# ----------------------------------------------------------------------------- packed


@pytest.mark.parametrize("backend", ek.BACKENDS)
@RANDOM
@given(data=st.data())
def test_sc_attention_varlen_random(backend, data, poison):
    dev, combos = _attention_combos(backend)
    dtype, D = data.draw(st.sampled_from(combos), label="dtype, head_dim")
    B = data.draw(st.integers(0, 3), label="B")
    q_lens = data.draw(st.lists(st.integers(0, 20), min_size=B, max_size=B), label="q_lens")
    c_lens = data.draw(st.lists(st.integers(0, 20), min_size=B, max_size=B), label="c_lens")
    H = data.draw(st.integers(1, 3), label="H")
    slack_q, slack_c = data.draw(st.integers(0, 3), label="slack_q"), data.draw(st.integers(0, 3), label="slack_c")
    layout = data.draw(st.sampled_from(("contiguous", "fused", "transposed")), label="layout")
    scale = _scale(data, D)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))

    q, kc, vc, ks, vs, cu_q, cu_c, _, _ = make_varlen_inputs(q_lens or [0], c_lens or [0], H, D, dtype, dev, gen)
    if B == 0:  # no sequence: cu_seqlens = [0]
        cu_q, cu_c = cu_q[:1], cu_c[:1]
    # A loose bound, up to its upper limit (the packed rows).
    max_q, max_c = min(max(q_lens, default=0) + slack_q, q.shape[0]), min(max(c_lens, default=0) + slack_c, kc.shape[0])
    Tq = q.shape[0]
    if layout == "fused":  # (T, 3, H, D) and (T, 2, H, D) projections
        bufs = [torch.stack([q, ks, vs], 1), torch.stack([kc, vc], 1)]
        views = lambda s, c: (s[:, 0], c[:, 0], c[:, 1], s[:, 1], s[:, 2])  # noqa: E731
    elif layout == "transposed":  # (H, T, D) tensors seen as (T, H, D)
        bufs = [t.transpose(0, 1).contiguous() for t in (q, kc, vc, ks, vs)]
        views = lambda *t: tuple(x.transpose(0, 1) for x in t)  # noqa: E731
    else:
        bufs, views = [q, kc, vc, ks, vs], (lambda *t: t)
    dout = torch.randn(Tq, H, D, generator=gen).to(dev, dtype)
    dlse = torch.randn(H, Tq, generator=gen).to(dev)

    def fused(*b):
        return ek.sc_attention_varlen(*views(*b), cu_q, cu_c, max_q, max_c, scale=scale, return_lse=True, backend=backend)

    def ref(*b):
        return sc_attention_varlen_ref(*views(*b), cu_q, cu_c, max_q, max_c, scale=scale)

    def independent(*b):
        return sc_attention_varlen_oracle(*views(*b), cu_q, cu_c, scale=scale)

    got = _check_against_oracle(backend, (fused, ref, independent), bufs, dout, dlse, dtype, layout)
    assert got[0].shape == (Tq, H, D) and got[1].shape == (H, Tq)


# ----------------------------------------------------------------------------- routing

ROUTING_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8, torch.bool)
ROW_SHAPES = ((), (1,), (3,), (5,), (3, 2), (16,))
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t's bytes as integers.  The oracle works on these: PyTorch's own copies of
    float16/bfloat16 (gather, scatter, masked assignment) may rewrite NaN payloads."""
    return t.view(torch.uint8) if t.dtype == torch.bool else t.view(_BITS[t.element_size()])


def assert_bits_equal(got: torch.Tensor, want_bits: torch.Tensor, what: str):
    """got (any dtype) holds exactly the bytes want_bits (its integer view) holds."""
    got_bits = _bits(got.contiguous())
    assert got_bits.shape == want_bits.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want_bits.shape)}"
    assert torch.equal(got_bits, want_bits), f"{what}: values differ"


def _tokens(B, L, tail, dtype, dev, gen, strided: bool):
    """Random token rows (NaN among the floats), optionally a non-contiguous view."""
    shape = (B, L, *tail)
    if dtype == torch.bool:
        x = torch.rand(shape, generator=gen) < 0.5
    elif dtype.is_floating_point:
        x = torch.randn(shape, generator=gen)
        x[torch.rand(shape, generator=gen) < 0.05] = float("nan")
    else:
        x = torch.randint(0, 100, shape, generator=gen)
    x = x.to(dev, dtype)
    if strided:  # same values, interleaved with other data along the tokens
        buf = torch.zeros((B, 2 * L, *tail), dtype=dtype, device=dev)
        buf[:, ::2] = x
        x = buf[:, ::2]
    return x


def _split_oracle(x, mask, count, want):
    """Rows of x (bits) where mask == want, per row, zero-padded to count; positions -1-padded."""
    B = x.shape[0]
    rows = torch.zeros((B, count, *x.shape[2:]), dtype=x.dtype, device=x.device)
    pos = torch.full((B, count), -1, dtype=torch.int64, device=x.device)
    for b in range(B):
        p = (mask[b] == want).nonzero()[:, 0]
        rows[b, : len(p)] = x[b, p]
        pos[b, : len(p)] = p
    return rows, pos, (mask == want).sum(1).to(torch.int32)


@pytest.mark.parametrize("backend", ek.BACKENDS)
@RANDOM
@given(data=st.data())
def test_routing_random(backend, data, poison):
    skip_unless_routes(backend)
    dev = device_for(backend)
    B = data.draw(st.integers(0, 3), label="B")
    L = data.draw(st.integers(0, 40), label="L")
    tail = data.draw(st.sampled_from(ROW_SHAPES), label="row shape")
    dtype = data.draw(st.sampled_from(ROUTING_DTYPES), label="dtype")
    strided = data.draw(st.booleans(), label="strided")
    counts = data.draw(st.lists(st.integers(0, L), min_size=B, max_size=B), label="True per row")
    slack = data.draw(st.integers(0, 2), label="slack")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))

    x = _tokens(B, L, tail, dtype, dev, gen, strided)
    xb = _bits(x.contiguous())
    ranks = torch.rand(B, L, generator=gen).argsort(1).argsort(1)
    mask = (ranks < torch.tensor(counts, dtype=torch.long).reshape(B, 1)).to(dev)
    num_true = min(max(counts, default=0) + slack, L)
    num_false = min(max((L - c for c in counts), default=0) + slack, L)

    # split = boolean indexing per row
    parts = ek.split_tokens(x, mask, num_true, num_false, backend=backend)
    for want, (rows, pos, lens) in ((True, parts[:3]), (False, parts[3:])):
        w_rows, w_pos, w_lens = _split_oracle(xb, mask, num_true if want else num_false, want)
        assert_bits_equal(rows, w_rows, f"{want} rows")
        assert torch.equal(pos, w_pos) and torch.equal(lens, w_lens), f"{want} positions / lens"

    # restore and merge put every row back where it came from
    back = ek.restore_tokens(parts.true_tokens, parts.true_indices, parts.false_tokens, parts.false_indices, L, backend=backend)
    assert_bits_equal(back, xb, "restore_tokens(split_tokens(x))")
    merged, pos = ek.merge_tokens(parts.true_tokens, parts.true_indices, parts.false_tokens, parts.false_indices, backend=backend)
    n = num_true + num_false
    m = min(n, L)  # n >= L unless B == 0
    assert merged.shape == (B, n, *tail) and pos.shape == (B, n)
    assert_bits_equal(merged[:, :m], xb[:, :m], "merge_tokens rows")
    assert torch.equal(pos[:, :m], torch.arange(m, device=dev).expand(B, m)) and (pos[:, m:] == -1).all()
    assert not _bits(merged[:, m:]).any(), "merge_tokens padding rows must be zero"

    # gather / scatter with unsorted unique indices and -1 padding
    N = data.draw(st.integers(0, L), label="N")
    idx = torch.rand(B, L, generator=gen).argsort(1)[:, :N].to(dev)
    idx = idx.masked_fill(torch.rand(B, N, generator=gen).to(dev) < 0.3, -1)
    got = ek.gather_tokens(x, idx, backend=backend)
    want = torch.zeros((B, N, *tail), dtype=xb.dtype, device=dev)
    sel = idx >= 0
    want[sel] = xb[torch.arange(B, device=dev)[:, None].expand(B, N)[sel], idx[sel]]
    assert_bits_equal(got, want, "gather_tokens")
    spread = ek.scatter_tokens(got, idx, L, backend=backend)
    hit = torch.zeros(B, L, dtype=torch.bool, device=dev)
    hit[torch.arange(B, device=dev)[:, None].expand(B, N)[sel], idx[sel]] = True
    assert_bits_equal(spread, torch.where(hit.reshape(B, L, *[1] * len(tail)), xb, 0), "scatter_tokens")

    if dtype.is_floating_point:  # the backward of a gather is a scatter (and back)
        leaf = x.detach().clone().nan_to_num().requires_grad_(True)
        g_out = torch.randn((B, N, *tail), generator=gen).to(dev, dtype)
        (g_x,) = torch.autograd.grad(ek.gather_tokens(leaf, idx, backend=backend), leaf, g_out)
        want_g = torch.zeros_like(leaf)
        want_g[torch.arange(B, device=dev)[:, None].expand(B, N)[sel], idx[sel]] = g_out[sel]
        assert_bits_equal(g_x, _bits(want_g), "gradient of gather_tokens")
