"""Thin guards around enat_kernels' restore/merge for subsets with no tokens.

enat_kernels.routing reshapes its inputs with ``reshape(B, N, -1)``, which raises for a
subset of 0 tokens (e.g. the visible set at the first sampling step).  Until that is
fixed upstream, empty subsets are kept out of the calls here; everything else goes
straight to the kernels.
"""

from __future__ import annotations

import enat_kernels as ek


def restore(a, idx_a, b, idx_b, seq_len: int, backend):
    """restore_tokens(a, idx_a, b, idx_b, seq_len), where a or b may have no tokens (b may be None)."""
    if b is not None and b.shape[1] == 0:
        b = idx_b = None
    if a.shape[1] == 0:
        if b is None:
            return a.new_zeros(a.shape[0], seq_len, *a.shape[2:])
        a, idx_a, b, idx_b = b, idx_b, None, None
    return ek.restore_tokens(a, idx_a, b, idx_b, seq_len, backend=backend)


def merge(a, idx_a, b, idx_b, backend):
    """merge_tokens(a, idx_a, b, idx_b), where a or b may have no tokens (the other is already in order)."""
    if a.shape[1] == 0:
        return b, idx_b
    if b.shape[1] == 0:
        return a, idx_a
    return ek.merge_tokens(a, idx_a, b, idx_b, backend=backend)
