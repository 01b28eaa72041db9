"""Packed inputs with rows that no sequence owns, and what those rows must hold.

Shared by tests/kernels/test_unowned_rows.py (every backend) and the CUDA host
emulator's tests (tests/kernels/test_cuda_sc_attention.py).
"""

from __future__ import annotations

import torch

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
