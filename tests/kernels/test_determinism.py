"""Determinism: the same inputs give the same bits, call after call (docs/DETERMINISM.md).

Forward passes of every backend that runs here; backward passes of the routing ops
(copies) and of the SC-Attention backends that promise no atomics.  Repeated calls in one process; allocations are poisoned, so an
element a kernel leaves unwritten (whatever memory held) shows as a difference.
"""

import pytest
import torch

import enat_kernels as ek
from support.attention_cases import CASES, VARLEN_CASES, make_inputs, make_varlen_inputs
from support.backends import device_for, skip_unless_routes, skip_unless_runs

REPEATS = 3
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8 if t.dtype == torch.bool else _INT[t.element_size()])


def assert_repeatable(fn, what: str):
    """fn() -> tuple of tensors; every call must return the same bits."""
    first = [_bits(t).clone() for t in fn()]
    for i in range(1, REPEATS):
        again = [_bits(t) for t in fn()]
        for j, (a, b) in enumerate(zip(first, again)):
            assert torch.equal(a, b), f"{what}: output {j} differs between call 1 and call {i + 1}"


DET_CASES = [c for c in CASES if c.id in ("ragged", "views", "cond_long", "odd_sizes")]


@pytest.mark.parametrize("case", DET_CASES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("backend", ek.BACKENDS)
def test_sc_attention_forward_is_deterministic(backend, dtype, case, gen, poison):
    skip_unless_runs(backend, dtype, case.D)
    q, kc, vc, ks, vs, cl, sl = make_inputs(case, dtype, device_for(backend), gen)
    assert_repeatable(
        lambda: ek.sc_attention(q, kc, vc, ks, vs, cond_lens=cl, self_lens=sl, return_lse=True, backend=backend),
        f"sc_attention[{backend}, {case}]",
    )


@pytest.mark.parametrize("backend", ek.BACKENDS)
def test_sc_attention_backward_is_deterministic(backend, gen, poison):
    """The fused backends' backward kernels use no atomics (docs/DETERMINISM.md); the
    torch reference's dense backward has none on the CPU."""
    dtype, case = torch.float32, next(c for c in CASES if c.id == "ragged")
    skip_unless_runs(backend, dtype, case.D)
    dev = device_for(backend)
    if backend == "torch" and dev != "cpu":
        pytest.skip("the torch reference's backward is as deterministic as PyTorch's CUDA kernels are")
    q, kc, vc, ks, vs, cl, sl = make_inputs(case, dtype, dev, gen)
    dout = torch.randn(q.shape, generator=gen).to(dev)
    dlse = torch.randn(q.shape[0], q.shape[2], q.shape[1], generator=gen).to(dev)

    def grads():
        leaves = [t.detach().requires_grad_(True) for t in (q, kc, vc, ks, vs)]
        out, lse = ek.sc_attention(*leaves, cond_lens=cl, self_lens=sl, return_lse=True, backend=backend)
        return torch.autograd.grad((out, lse), leaves, (dout, dlse))

    assert_repeatable(grads, f"sc_attention backward[{backend}]")


@pytest.mark.parametrize("backend", ek.BACKENDS)
def test_sc_attention_varlen_forward_is_deterministic(backend, gen, poison):
    dtype, H, D = torch.float32, 2, 64
    skip_unless_runs(backend, dtype, D)
    q_lens, c_lens = VARLEN_CASES["varlen_basic"]
    q, kc, vc, ks, vs, cu_q, cu_c, mq, mc = make_varlen_inputs(q_lens, c_lens, H, D, dtype, device_for(backend), gen)
    assert_repeatable(
        lambda: ek.sc_attention_varlen(q, kc, vc, ks, vs, cu_q, cu_c, mq, mc, return_lse=True, backend=backend),
        f"sc_attention_varlen[{backend}]",
    )


@pytest.mark.parametrize("backend", ek.BACKENDS)
def test_routing_forward_and_backward_are_deterministic(backend, gen, poison):
    skip_unless_routes(backend)
    dev = device_for(backend)
    B, L, C = 4, 300, 40  # enough rows to be split over threads / blocks
    x = torch.randn(B, L, C, generator=gen).to(dev)
    mask = torch.rand(B, L, generator=gen).to(dev) < 0.4
    n_true = int(mask.sum(1).max())
    n_false = int((~mask).sum(1).max())

    def forward():
        parts = ek.split_tokens(x, mask, n_true, n_false, backend=backend)
        back = ek.restore_tokens(parts.true_tokens, parts.true_indices, parts.false_tokens, parts.false_indices, L, backend=backend)
        merged, pos = ek.merge_tokens(parts.true_tokens, parts.true_indices, parts.false_tokens, parts.false_indices, backend=backend)
        return (*parts, back, merged, pos)

    def backward():
        leaf = x.detach().requires_grad_(True)
        parts = ek.split_tokens(leaf, mask, n_true, n_false, backend=backend)
        out = ek.restore_tokens(parts.true_tokens * 2, parts.true_indices, parts.false_tokens, parts.false_indices, L, backend=backend)
        return torch.autograd.grad(out, leaf, torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(dev))

    assert_repeatable(forward, f"routing forward[{backend}]")
    assert_repeatable(backward, f"routing backward[{backend}]")
