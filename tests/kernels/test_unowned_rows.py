"""Packed rows that no sequence owns (before cu_seqlens[0], from cu_seqlens[-1] on) come
back as zeros in out and in every gradient, and -inf in lse, in every backend.

Such rows arise when a packed buffer is larger than its sequences (a static-size
buffer under torch.compile or CUDA graphs, where the value checks are off).  Fresh
allocations are poisoned (NaN), and the unowned input rows hold NaN too, so a row a
backend leaves unwritten, or reads, shows.  The CUDA kernels are checked on the host
emulator in tests/test_cuda_sc_attention.py with the same inputs.
"""

from __future__ import annotations

import pytest
import torch

import enat_kernels as ek

from test_sc_attention import device_for, skip_unless_runs

# (q lengths, cond lengths, unowned rows before / after the q sequences, same for cond)
LAYOUTS = {
    "tail": ((3, 4), (4, 2), 0, 3, 0, 2),
    "head_and_tail": ((5, 2), (0, 3), 2, 1, 1, 4),
    "no_sequence_rows": ((0, 0), (0, 0), 0, 4, 0, 3),
}


def spare_rows_inputs(layout: str, H: int, D: int, dtype, device, gen):
    """Packed inputs with unowned rows (NaN in them), and the masks of those rows.

    Returns (q, k_cond, v_cond, k_self, v_self), cu_q, cu_c, max_q, max_c, unowned_q, unowned_c."""
    q_lens, c_lens, q_head, q_tail, c_head, c_tail = LAYOUTS[layout]

    def packed(lens, head, tail):
        total = head + sum(lens) + tail
        cu = torch.tensor([head] + [head + s for s in torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        unowned = torch.ones(total, dtype=torch.bool)
        unowned[head:head + sum(lens)] = False
        return total, cu, unowned

    Tq, cu_q, unowned_q = packed(q_lens, q_head, q_tail)
    Tc, cu_c, unowned_c = packed(c_lens, c_head, c_tail)

    def rnd(T, unowned):
        x = torch.randn(T, H, D, generator=gen)
        x[unowned] = float("nan")
        return x.to(device=device, dtype=dtype)

    inputs = (rnd(Tq, unowned_q), rnd(Tc, unowned_c), rnd(Tc, unowned_c), rnd(Tq, unowned_q), rnd(Tq, unowned_q))
    return (inputs, cu_q.to(device), cu_c.to(device), max(max(q_lens), 1), max(max(c_lens), 1),
            unowned_q.to(device), unowned_c.to(device))


def assert_unowned_rows(out, lse, grads, unowned_q, unowned_c):
    """Zeros / -inf in unowned rows, finite values in owned ones."""
    assert (out[unowned_q] == 0).all(), "out"
    assert (lse[:, unowned_q] == float("-inf")).all(), "lse"
    assert torch.isfinite(out[~unowned_q]).all() and not torch.isnan(lse[:, ~unowned_q]).any()
    for name, g in zip(("dq", "dk_cond", "dv_cond", "dk_self", "dv_self"), grads):
        unowned = unowned_c if name in ("dk_cond", "dv_cond") else unowned_q
        assert (g[unowned] == 0).all(), name
        assert torch.isfinite(g[~unowned]).all(), name


def _forward_backward(backend, inputs, cu_q, cu_c, max_q, max_c, dout, dlse):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    with ek.value_checks(False):  # cu_seqlens[-1] != rows is refused by the checks
        out, lse = ek.sc_attention_varlen(*leaves, cu_q, cu_c, max_q, max_c, return_lse=True, backend=backend)
    loss = (out.float() * dout).sum() + (torch.where(torch.isfinite(lse), lse, 0) * dlse).sum()
    loss.backward()
    return out.detach(), lse.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_unowned_rows_are_zero(backend, layout, gen, poison):
    dtype, D = torch.float32, 16
    skip_unless_runs(backend, dtype, D)
    device = device_for(backend)
    inputs, cu_q, cu_c, max_q, max_c, un_q, un_c = spare_rows_inputs(layout, 2, D, dtype, device, gen)
    dout = torch.randn(inputs[0].shape, generator=gen).to(device)
    dlse = torch.randn(2, inputs[0].shape[0], generator=gen).to(device)
    out, lse, grads = _forward_backward(backend, inputs, cu_q, cu_c, max_q, max_c, dout, dlse)
    assert_unowned_rows(out, lse, grads, un_q, un_c)
    if backend != "torch":  # owned rows are still the reference's (the fill does not clobber them)
        ref = _forward_backward("torch", inputs, cu_q, cu_c, max_q, max_c, dout, dlse)
        for got, want in zip([out, lse] + grads, [ref[0], ref[1]] + ref[2]):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
