"""Token routing on tensors of more than 2**31 elements (and bytes): 64-bit offsets.

A kernel that computes an element or byte offset in 32 bits reads or writes the wrong
row (or crashes) once a tensor passes 2**31 elements.  The tests use uint8/bool tensors
just past that size whose memory is never touched except for the few rows the test
writes: on the CPU they are numpy.zeros arrays (calloc: zero pages mapped lazily), so
they cost address space, not memory.  Only the scatter test writes its whole output
(about 2 GiB, once).

SC-Attention is not tested this way: its output alone would be 2**31 elements written.
Its kernels' index arithmetic is reviewed instead (docs/ERRORS.md, "Sizes").
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import enat_kernels as ek
from support.backends import skip_unless_routes

# (B, L, C) uint8 with B * L * C = 2**31 + 2048: the last row starts 2**31 + 1024 bytes in.
B, L, C = 2, (1 << 20) + 1, 1024
BIG = 1 << 31


def _mem_available_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return float("inf")


def _lazy_zeros(shape, dtype, dev):
    """Zeros whose pages are only mapped when touched (CPU); plain zeros on a GPU."""
    if dev != "cpu":
        return torch.zeros(shape, dtype=dtype, device=dev)
    return torch.from_numpy(np.zeros(shape, dtype=np.bool_ if dtype == torch.bool else np.uint8))


def _skip_if_interpreted(backend: str, dev) -> None:
    if backend == "triton" and dev == "cpu":
        pytest.skip("under TRITON_INTERPRET=1 every program runs in numpy: a pass over 2 GiB takes many minutes")


def _row(seed: int, dev) -> torch.Tensor:
    return torch.randint(1, 256, (C,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8).to(dev)


@pytest.mark.parametrize("backend", ek.BACKENDS)
def test_gather_reads_rows_beyond_2_31(backend):
    dev = skip_unless_routes(backend)
    x = _lazy_zeros((B, L, C), torch.uint8, dev)
    assert x.numel() > BIG and (B * L - 1) * C > BIG  # the last row starts past 2**31
    rows = {(1, L - 1): _row(0, dev), (1, L // 2): _row(1, dev), (0, 7): _row(2, dev)}
    for (b, p), v in rows.items():
        x[b, p] = v
    idx = torch.tensor([[7, -1, 3], [L - 1, L // 2, 0]], device=dev)
    out = ek.gather_tokens(x, idx, backend=backend)
    assert out.shape == (B, 3, C)
    assert torch.equal(out[0, 0], rows[(0, 7)]) and torch.equal(out[1, 0], rows[(1, L - 1)]) and torch.equal(out[1, 1], rows[(1, L // 2)])
    assert not out[0, 1].any() and not out[0, 2].any() and not out[1, 2].any()


@pytest.mark.parametrize("backend", ek.BACKENDS)
def test_scatter_writes_rows_beyond_2_31(backend):
    dev = skip_unless_routes(backend)
    if backend == "torch":
        pytest.skip("the torch reference builds the 2 GiB output out of place, twice (PyTorch's own 64-bit indexing)")
    _skip_if_interpreted(backend, dev)
    if dev == "cpu" and _mem_available_gib() < 8:
        pytest.skip(f"needs about 2.1 GiB of memory for the output; {_mem_available_gib():.1f} GiB available")
    src = torch.stack([torch.stack([_row(3, dev), _row(4, dev)]), torch.stack([_row(5, dev), _row(6, dev)])])  # (B, 2, C)
    idx = torch.tensor([[L - 1, 1], [L - 1, L - 2]], device=dev)
    out = ek.scatter_tokens(src, idx, L, backend=backend)
    assert out.shape == (B, L, C) and out.numel() > BIG
    for b in range(B):
        for i in range(2):
            assert torch.equal(out[b, int(idx[b, i])], src[b, i]), (b, i)
    # Nothing else was written (a wrapped 32-bit offset would land elsewhere).
    assert int(torch.count_nonzero(out)) == int(torch.count_nonzero(src))


@pytest.mark.parametrize("backend", ek.BACKENDS)
def test_mask_to_indices_beyond_2_31(backend):
    """A (3, 2**30) mask: row 2 starts at element 2**31."""
    dev = skip_unless_routes(backend)
    if backend == "torch":
        pytest.skip("the torch reference argsorts the whole mask: O(B * L) int64 memory (24 GiB here)")
    _skip_if_interpreted(backend, dev)
    rows, length = 3, 1 << 30
    mask = _lazy_zeros((rows, length), torch.bool, dev)
    mask[0, :2] = True
    mask[1, 5] = mask[1, 9] = True
    mask[2, 3] = mask[2, length - 1] = True  # the CPU kernel scans row 2 to its end
    with ek.value_checks(False):  # the count check would sum 3 GiB
        ind, lens = ek.mask_to_indices(mask, 2, backend=backend)
    assert ind.tolist() == [[0, 1], [5, 9], [3, length - 1]]
    assert lens.tolist() == [2, 2, 2]
