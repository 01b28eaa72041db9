"""Packed rows that no sequence owns (before cu_seqlens[0], from cu_seqlens[-1] on) come
back as zeros in out and in every gradient, and -inf in lse, in every backend.

Such rows arise when a packed buffer is larger than its sequences (a static-size
buffer under torch.compile or CUDA graphs, where the value checks are off).  Fresh
allocations are poisoned (NaN), and the unowned input rows hold NaN too, so a row a
backend leaves unwritten, or reads, shows.  The CUDA kernels are checked on the host
emulator in tests/kernels/test_cuda_sc_attention.py with the same inputs (support/unowned_rows.py).
"""

from __future__ import annotations

import pytest
import torch

import enat_kernels as ek
from support.backends import device_for, skip_unless_runs
from support.unowned_rows import LAYOUTS, assert_unowned_rows, spare_rows_inputs


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
