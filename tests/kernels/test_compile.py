"""torch.compile: the public API traces into one graph, matches eager, and stays put.

A masked-generation step (split the tokens by a mask, SC-Attention of the True tokens
over a cond segment, restore, merge, gather) is compiled with ``fullgraph=True`` (any
graph break is an error) and compared with eager, forward and backward, for every
backend that runs here.  Most tests compile with ``aot_eager`` (Dynamo + fake tensors +
AOTAutograd: everything the library controls) through a backend that counts the
graphs it is given, so recompilations show; one test uses the default inductor.
"""

from __future__ import annotations

import pytest
import torch

import enat_kernels as ek
from support.backends import device_for

H, D = 2, 16


class CountingBackend:
    """A torch.compile backend: aot_eager, counting the graphs compiled."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _families(backend: str):
    """(attention backend, routing backend) for the step: `backend` for each op family
    it implements here, automatic choice for the other; skip if it implements neither."""
    dev = device_for(backend)
    attention = ek.supports("sc_attention", device=dev, dtype=torch.float32, head_dim=D, backend=backend)
    routing = ek.supports("gather_tokens", device=dev, backend=backend)
    attn_ok, route_ok = bool(attention), bool(routing)
    if backend == "triton" and dev == "cpu":
        # Under TRITON_INTERPRET=1 a triton_op is traced by running its body, whose
        # interpreted launch needs real memory; enat_kernels/triton/sc_attention.py makes
        # its ops opaque there (fake + no functional decomposition), the routing ops do
        # not, so the routing side of the step runs on the automatic (cpu) backend.
        route_ok = False
    if not (attn_ok or route_ok):
        pytest.skip(routing.reason or attention.reason)
    return dev, (backend if attn_ok else None), (backend if route_ok else None)


def make_step(attn_backend, route_backend):
    def step(x, mask, cond, w_qkv, w_kv):
        """One ENAT-style decoder step on tokens x (B, L, C) with L // 2 masked per row."""
        B, L, C = x.shape
        n = L // 2
        parts = ek.split_tokens(x, mask, n, backend=route_backend)
        qkv = (parts.true_tokens @ w_qkv).view(B, n, 3, H, D)  # fused projection: strided views
        q, k_self, v_self = qkv.unbind(2)
        k_cond, v_cond = (cond @ w_kv).view(B, cond.shape[1], 2, H, D).unbind(2)
        o = ek.sc_attention(q, k_cond, v_cond, k_self, v_self, self_lens=parts.true_lens, backend=attn_backend)
        y = ek.restore_tokens(o.reshape(B, n, C), parts.true_indices, parts.false_tokens, parts.false_indices, L, backend=route_backend)
        merged, pos = ek.merge_tokens(parts.true_tokens, parts.true_indices, parts.false_tokens, parts.false_indices, backend=route_backend)
        back = ek.gather_tokens(merged, pos.argsort(dim=1)[:, -L:], backend=route_backend)  # positions 0..L-1 in order
        return y, merged, pos, back

    return step


def make_inputs(B, L, Nc, dev, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    C = H * D
    x = torch.randn(B, L, C, generator=g)
    mask = torch.rand(B, L, generator=g).argsort(1) < L // 2  # exactly L // 2 True per row
    cond = torch.randn(B, Nc, C, generator=g)
    w_qkv = torch.randn(C, 3 * C, generator=g) * C**-0.5
    w_kv = torch.randn(C, 2 * C, generator=g) * C**-0.5
    ins = [t.to(dev) for t in (x, mask, cond, w_qkv, w_kv)]
    if requires_grad:
        for i in (0, 2, 3, 4):
            ins[i].requires_grad_(True)
    return ins


def _assert_same(got, want, exact: bool):
    for g, w in zip(got, want):
        if exact:
            assert torch.equal(g, w)
        else:
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def _loss(outputs, dev):
    y, merged, pos, back = outputs
    return (y * y).sum() + (merged * torch.arange(merged.shape[1], device=dev)[None, :, None]).sum() + back.sum()


@pytest.mark.parametrize("backend", ek.BACKENDS)
def test_fullgraph_matches_eager_forward_backward_without_recompiling(backend):
    """dynamic=True: one graph for every batch size and sequence length; outputs equal
    to eager bit for bit (same ops, same kernels), gradients to rounding."""
    dev, ab, rb = _families(backend)
    step = make_step(ab, rb)
    counter = CountingBackend()
    compiled = torch.compile(step, fullgraph=True, dynamic=True, backend=counter)
    for B, L, Nc, seed in ((2, 10, 7, 0), (3, 23, 31, 1), (2, 14, 12, 2)):
        ins = make_inputs(B, L, Nc, dev, seed, requires_grad=True)
        leaves = [ins[i] for i in (0, 2, 3, 4)]
        got, want = compiled(*ins), step(*ins)
        _assert_same(got, want, exact=True)
        _assert_same(torch.autograd.grad(_loss(got, dev), leaves), torch.autograd.grad(_loss(want, dev), leaves), exact=False)
    assert counter.graphs == 1, f"{counter.graphs} graphs compiled for one function"


@pytest.mark.parametrize("backend", ek.BACKENDS)
def test_mark_dynamic_sequence_lengths_do_not_recompile(backend):
    """Static by default; sequence lengths marked dynamic: no recompilation when they change."""
    dev, ab, rb = _families(backend)
    step = make_step(ab, rb)
    counter = CountingBackend()
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    for L, Nc, seed in ((10, 7, 0), (22, 30, 1)):
        x, mask, cond, w_qkv, w_kv = make_inputs(2, L, Nc, dev, seed)
        for t in (x, mask, cond):
            torch._dynamo.mark_dynamic(t, 1)
        _assert_same(compiled(x, mask, cond, w_qkv, w_kv), step(x, mask, cond, w_qkv, w_kv), exact=True)
    assert counter.graphs == 1


def test_inductor_forward_and_backward():
    """The default compiler (inductor) with the automatic backends: same values and
    gradients as eager (inductor fuses the surrounding math, hence a tolerance)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    step = make_step(None, None)
    compiled = torch.compile(step, fullgraph=True)
    ins = make_inputs(2, 10, 6, dev, 0, requires_grad=True)
    leaves = [ins[i] for i in (0, 2, 3, 4)]
    # One small graph: compiling in this process beats starting a pool of workers.
    # (config.patch, not monkeypatch: the config module cannot have attributes deleted.)
    with torch._inductor.config.patch(compile_threads=1):
        got = compiled(*ins)
        g_got = torch.autograd.grad(_loss(got, dev), leaves)
    want = step(*ins)
    _assert_same(got, want, exact=False)
    _assert_same(g_got, torch.autograd.grad(_loss(want, dev), leaves), exact=False)


def test_value_checks_are_skipped_under_tracing():
    """A length out of range raises in eager; compiled, it is clamped (no host sync)."""
    q = torch.randn(2, 5, H, D)
    kc = torch.randn(2, 4, H, D)
    lens = torch.tensor([9, 2])

    def f(q, kc, lens):
        return ek.sc_attention(q, kc, kc, q, q, cond_lens=lens)

    with pytest.raises(ValueError, match="cond_lens values"):
        f(q, kc, lens)
    out = torch.compile(f, fullgraph=True, backend=CountingBackend())(q, kc, lens)
    torch.testing.assert_close(out, f(q, kc, lens.clamp(max=4)))


def test_metadata_errors_still_fire_under_tracing():
    """docs/ERRORS.md: under fullgraph=True a metadata error stops the compilation."""
    q = torch.randn(2, 5, H, D)

    def f(q, k):
        return ek.sc_attention(q, None, None, k, k)

    with pytest.raises(torch._dynamo.exc.Unsupported, match="Observed exception"):
        torch.compile(f, fullgraph=True, backend=CountingBackend())(q, q.double())
