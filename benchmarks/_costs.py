"""FLOPs and bytes moved: the useful work of each benchmarked operation, written once.

Every path of a group is credited with the same work (the work the operation needs,
not what a path happens to do), so TFLOP/s and TB/s compare paths exactly as their
times do.  Ragged rows count only their valid tokens: padding is not work.

SC-Attention, per batch row b with Lq = self_lens[b] queries (= self keys) and
Lc = cond_lens[b] cond keys, H heads of size D, e bytes per element:

- forward FLOPs: 4 * H * D * Lq * (Lc + Lq)       (Q K^T and P V, 2 FLOPs per MAC)
- backward FLOPs: 2.5 x forward                      (S recomputed, dV, dP, dQ, dK: the
  convention of flash-attn's benchmarks); forward + backward: 3.5 x forward
- forward bytes: e * H * D * (4 Lq + 2 Lc)           (read q, k_self, v_self, k_cond,
  v_cond; write out)
- forward + backward bytes: e * H * D * (12 Lq + 6 Lc) + 8 * H * Lq
  (backward reads q, k_self, v_self, out, dout, k_cond, v_cond and writes the five
  gradients; the float32 log-sum-exp is written by the forward, read by the backward)

Token routing (B rows of L tokens of C channels, e bytes per element, row = C * e):

- split:   2 * B * L * row + B * L                  (read every row once, write it to
  its subset; read the bool mask)
- gather:  2 * B * N * row + B * L                  (N = tokens picked; read the mask)
- restore: 2 * B * L * row + 8 * B * L              (rows of both subsets moved back;
  read their int64 positions)
- merge:   2 * B * (Na + Nb) * row + 8 * B * (Na + Nb)
"""

from __future__ import annotations

from typing import Sequence

BWD_FLOP_FACTOR = 2.5


def _lengths(lens: Sequence[int] | None, batch: int, full: int) -> list[int]:
    if lens is None:
        return [full] * batch
    return [max(0, min(int(v), full)) for v in lens]


def attention_cost(
    B: int,
    Nq: int,
    Nc: int,
    H: int,
    D: int,
    elem_bytes: int,
    *,
    direction: str,
    cond_lens: Sequence[int] | None = None,
    self_lens: Sequence[int] | None = None,
) -> tuple[float, float]:
    """(FLOPs, bytes) of SC-Attention; direction is "fwd" or "fwd+bwd"."""
    lq = _lengths(self_lens, B, Nq)
    lc = _lengths(cond_lens, B, Nc)
    pairs = sum(q * (c + q) for q, c in zip(lq, lc))
    rows_q, rows_c = sum(lq), sum(lc)
    fwd_flops = 4.0 * H * D * pairs
    if direction == "fwd":
        return fwd_flops, float(elem_bytes * H * D * (4 * rows_q + 2 * rows_c))
    if direction == "fwd+bwd":
        flops = fwd_flops * (1.0 + BWD_FLOP_FACTOR)
        return flops, float(elem_bytes * H * D * (12 * rows_q + 6 * rows_c) + 8 * H * rows_q)
    raise ValueError(f"direction must be 'fwd' or 'fwd+bwd', got {direction!r}")


def routing_bytes(op: str, B: int, L: int, C: int, elem_bytes: int, n_a: int = 0, n_b: int = 0) -> float:
    """Bytes moved by a routing op.  gather: n_a = tokens picked.  merge: n_a, n_b = subset sizes."""
    row = C * elem_bytes
    if op == "split":
        return float(2 * B * L * row + B * L)
    if op == "gather":
        return float(2 * B * n_a * row + B * L)
    if op == "restore":
        return float(2 * B * L * row + 8 * B * L)
    if op == "merge":
        n = n_a + n_b
        return float(2 * B * n * row + 8 * B * n)
    raise ValueError(f"unknown routing op {op!r}")
