"""Token routing: every backend against loop oracles, exactly (routing only moves bytes).

The oracles (indices_loop, gather_loop, scatter_loop) are element-by-element loops,
independent of enat_kernels.reference, which is itself the torch backend.

One suite for all backends (cpu, triton, cuda, torch): a backend that cannot run on
this machine skips with the reason it gives.  Inputs are fresh random tensors (never
zeros), outputs are allocated poisoned, rows are ragged (different counts per row,
-1 padding anywhere in an index row), and every dtype / odd row size runs, so each
word width of the byte-moving kernels is exercised.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import enat_kernels as ek
from enat_kernels import _extension
from enat_kernels.reference import gather_rows_ref, mask_to_indices_ref, merge_ranks_ref, scatter_rows_ref
from support.backends import HAS_CUDA, device_for, skip_unless_routes

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.bool]
ROW_SIZES = [1, 3, 7, 64]  # odd sizes give 1- and 2-byte words; 64 the widest


def _name(d) -> str:
    return str(d).replace("torch.", "")


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class MaskCase:
    id: str
    L: int
    counts: tuple  # True entries of each batch row
    slack: int = 0  # count = max(counts) + slack

    def __str__(self):
        return self.id

    @property
    def count(self) -> int:
        return max(self.counts) + self.slack


MASK_CASES = [
    MaskCase("uniform", 16, (6, 6)),
    MaskCase("ragged", 37, (0, 37, 5, 20), slack=0),
    MaskCase("slack", 23, (3, 9, 1), slack=4),
    MaskCase("batch_1", 9, (4,)),
    MaskCase("all_false", 11, (0, 0), slack=3),
    MaskCase("long", 2500, (1300, 7, 2500)),  # several scan blocks per row
]


def random_mask(L: int, counts, gen) -> torch.Tensor:
    """(B, L) bool with exactly counts[b] True entries at random positions of row b."""
    rank = torch.rand(len(counts), L, generator=gen).argsort(dim=1).argsort(dim=1)
    return rank < torch.tensor(counts)[:, None]


def random_tokens(shape, dtype, gen) -> torch.Tensor:
    """Random values of any dtype, none zero (bool: random, int: +-[1, 1000))."""
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) < 0.5
    if dtype == torch.int64:
        sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1, 1)
        return torch.randint(1, 1000, shape, generator=gen) * sign
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = torch.where(x.abs() < 1e-3, torch.full_like(x, 0.5), x)
    return x.to(dtype)


def shuffled_rows(idx: torch.Tensor, gen) -> torch.Tensor:
    """Permute each row of an index tensor: valid entries in any order, -1 anywhere."""
    perm = torch.rand(idx.shape, generator=gen).argsort(dim=1)
    return idx.gather(1, perm)


def two_disjoint_sets(B: int, L: int, na, nb, gen):
    """Two ragged, disjoint, ascending index sets of each row of [0, L): na[b] and nb[b]
    positions, padded with -1 to max(na) + 1 and max(nb) + 1 columns."""
    rank = torch.rand(B, L, generator=gen).argsort(dim=1).argsort(dim=1)
    na_t, nb_t = torch.tensor(na)[:, None], torch.tensor(nb)[:, None]
    mask_a, mask_b = rank < na_t, (rank >= na_t) & (rank < na_t + nb_t)
    idx_a, _ = mask_to_indices_ref(mask_a, min(max(na) + 1, L))
    idx_b, _ = mask_to_indices_ref(mask_b, min(max(nb) + 1, L))
    return idx_a, idx_b, mask_a, mask_b


# ----------------------------------------------------------------------------- loop oracles
# Written independently of enat_kernels.reference (which is also the torch backend):
# element by element, on the host.


def indices_loop(mask: torch.Tensor, count: int):
    """True positions of each row, ascending, -1 padded to `count`; and the counts (int32)."""
    rows = [[j for j, m in enumerate(row) if m] for row in mask.tolist()]
    idx = torch.tensor([r + [-1] * (count - len(r)) for r in rows], dtype=torch.int64).reshape(len(rows), count)
    return idx, torch.tensor([len(r) for r in rows], dtype=torch.int32)


def gather_loop(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """out[b, i] = x[b, idx[b, i]]; zeros where idx is -1.  Differentiable."""
    out = torch.zeros((x.shape[0], idx.shape[1]) + tuple(x.shape[2:]), dtype=x.dtype)
    for b, row in enumerate(idx.tolist()):
        for i, j in enumerate(row):
            if j >= 0:
                out[b, i] = x[b, j]
    return out


def scatter_loop(a, idx_a, b, idx_b, seq_len: int) -> torch.Tensor:
    """Rows of a (and b) written at their indices of a zero sequence.  Differentiable."""
    out = torch.zeros((a.shape[0], seq_len) + tuple(a.shape[2:]), dtype=a.dtype)
    for src, idx in ((a, idx_a), (b, idx_b)):
        if src is None:
            continue
        for r, row in enumerate(idx.tolist()):
            for i, j in enumerate(row):
                if j >= 0:
                    out[r, j] = src[r, i]
    return out


def assert_same(got: torch.Tensor, ref: torch.Tensor, what: str = "output") -> None:
    """Routing moves bytes: results equal the reference exactly (dtype, shape, values)."""
    assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype}, expected {ref.dtype}"
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    assert got.is_contiguous(), f"{what} is not contiguous"
    got, ref = got.cpu(), ref.cpu()
    if not torch.equal(got, ref):
        bad = (got != ref).nonzero()[:5].tolist()
        raise AssertionError(f"{what} differs from the reference at {bad}")


# ----------------------------------------------------------------------------- forward


@pytest.mark.parametrize("case", MASK_CASES, ids=str)
@pytest.mark.parametrize("backend", ek.BACKENDS)
def test_mask_to_indices(backend, case, gen, poison):
    dev = skip_unless_routes(backend)
    mask = random_mask(case.L, case.counts, gen)
    idx, lens = ek.mask_to_indices(mask.to(dev), case.count, backend=backend)
    ref_idx, ref_lens = indices_loop(mask, case.count)
    assert_same(idx, ref_idx, "indices")
    assert_same(lens, ref_lens, "lens")
    assert lens.tolist() == list(case.counts)


@pytest.mark.parametrize("backend", ek.BACKENDS)
def test_mask_to_indices_non_contiguous_mask(backend, gen, poison):
    dev = skip_unless_routes(backend)
    mask = random_mask(20, (7, 3, 12), gen)
    view = mask.to(dev).t().contiguous().t()  # same values, column-major
    idx, lens = ek.mask_to_indices(view, 12, backend=backend)
    ref_idx, ref_lens = indices_loop(mask, 12)
    assert_same(idx, ref_idx, "indices")
    assert_same(lens, ref_lens, "lens")


@pytest.mark.parametrize("C", ROW_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("backend", ek.BACKENDS)
def test_gather_tokens(backend, dtype, C, gen, poison):
    dev = skip_unless_routes(backend)
    B, L = 4, 29
    x = random_tokens((B, L, C), dtype, gen)
    idx, _ = mask_to_indices_ref(random_mask(L, (0, 29, 5, 13), gen), 16)
    idx = shuffled_rows(idx, gen)
    out = ek.gather_tokens(x.to(dev), idx.to(dev), backend=backend)
    assert_same(out, gather_loop(x, idx))


@pytest.mark.parametrize("C", ROW_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("backend", ek.BACKENDS)
def test_restore_tokens(backend, dtype, C, gen, poison):
    """Two ragged subsets (rows of -1 anywhere, which must be skipped) back into a sequence."""
    dev = skip_unless_routes(backend)
    B, L = 3, 31
    idx_a, idx_b, _, _ = two_disjoint_sets(B, L, (4, 0, 17), (20, 9, 14), gen)
    idx_a, idx_b = shuffled_rows(idx_a, gen), shuffled_rows(idx_b, gen)
    a = random_tokens((B, idx_a.shape[1], C), dtype, gen)
    b = random_tokens((B, idx_b.shape[1], C), dtype, gen)
    out = ek.restore_tokens(a.to(dev), idx_a.to(dev), b.to(dev), idx_b.to(dev), L, backend=backend)
    assert_same(out, scatter_loop(a, idx_a, b, idx_b, L))


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("backend", ek.BACKENDS)
def test_scatter_tokens(backend, dtype, gen, poison):
    dev = skip_unless_routes(backend)
    B, L, C = 3, 26, 5
    idx, _ = mask_to_indices_ref(random_mask(L, (11, 2, 26), gen), L)
    idx = shuffled_rows(idx, gen)
    src = random_tokens((B, L, C), dtype, gen)
    out = ek.scatter_tokens(src.to(dev), idx.to(dev), L + 3, backend=backend)
    assert_same(out, scatter_loop(src, idx, None, None, L + 3))


@pytest.mark.parametrize("backend", ek.BACKENDS)
def test_trailing_dims_and_2d_tokens(backend, gen, poison):
    """(B, L, H, D) tokens move as rows of H * D; (B, L) tokens as rows of one element."""
    dev = skip_unless_routes(backend)
    B, L, H, D = 2, 13, 3, 5
    x = random_tokens((B, L, H, D), torch.float16, gen)
    idx = shuffled_rows(mask_to_indices_ref(random_mask(L, (4, 9), gen), 10)[0], gen)
    out = ek.gather_tokens(x.to(dev), idx.to(dev), backend=backend)
    assert out.shape == (B, 10, H, D)
    assert_same(out.flatten(2), gather_rows_ref(x.flatten(2), idx))
    back = ek.scatter_tokens(out, idx.to(dev), L, backend=backend)
    assert back.shape == (B, L, H, D)
    assert_same(back.flatten(2), scatter_rows_ref(gather_rows_ref(x.flatten(2), idx), idx, None, None, L))
    y = random_tokens((B, L), torch.int64, gen)
    assert_same(ek.gather_tokens(y.to(dev), idx.to(dev), backend=backend), gather_rows_ref(y[..., None], idx)[..., 0])


@pytest.mark.parametrize("backend", ek.BACKENDS)
def test_unaligned_views(backend, gen, poison):
    """Contiguous views that start at an odd byte offset force narrower words."""
    dev = skip_unless_routes(backend)
    B, L, C = 3, 11, 2  # float16 rows of 4 bytes, storage offset of 2 bytes
    flat = random_tokens((B * L * C + 1,), torch.float16, gen).to(dev)
    x = flat[1:].view(B, L, C)
    idx = shuffled_rows(mask_to_indices_ref(random_mask(L, (3, 11, 6), gen), 11)[0], gen)
    out = ek.gather_tokens(x, idx.to(dev), backend=backend)
    assert_same(out, gather_rows_ref(x.cpu(), idx))
    flat_out = random_tokens((B * 11 * C + 1,), torch.float16, gen).to(dev)
    a = flat_out[1:].view(B, 11, C)
    got = ek.scatter_tokens(a, idx.to(dev), L, backend=backend)
    assert_same(got, scatter_rows_ref(a.cpu(), idx, None, None, L))


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("backend", ek.BACKENDS)
def test_split_then_restore_is_identity(backend, dtype, gen, poison):
    dev = skip_unless_routes(backend)
    B, L, C = 4, 30, 7
    counts = (0, 30, 12, 5)
    x = random_tokens((B, L, C), dtype, gen).to(dev)
    mask = random_mask(L, counts, gen).to(dev)
    split = ek.split_tokens(x, mask, max(counts), L, backend=backend)
    # Each row's subsets are x[b][mask[b]] and x[b][~mask[b]], in order, then zero rows.
    for b in range(B):
        n_t = counts[b]
        torch.testing.assert_close(split.true_tokens[b, :n_t], x[b][mask[b]], atol=0, rtol=0)
        torch.testing.assert_close(split.false_tokens[b, : L - n_t], x[b][~mask[b]], atol=0, rtol=0)
        assert not split.true_tokens[b, n_t:].any() and not split.false_tokens[b, L - n_t :].any()
    assert split.true_lens.tolist() == list(counts)
    assert split.false_lens.tolist() == [L - c for c in counts]
    back = ek.restore_tokens(split.true_tokens, split.true_indices, split.false_tokens, split.false_indices, L, backend=backend)
    assert_same(back, x.cpu())


@pytest.mark.parametrize("backend", ek.BACKENDS)
def test_split_default_num_false(backend, gen, poison):
    """Rows with the same True count: num_false defaults to L - num_true."""
    dev = skip_unless_routes(backend)
    B, L, C = 2, 18, 4
    x = random_tokens((B, L, C), torch.float32, gen).to(dev)
    mask = random_mask(L, (7, 7), gen).to(dev)
    split = ek.split_tokens(x, mask, 7, backend=backend)
    assert split.false_tokens.shape == (B, L - 7, C)
    assert_same(split.true_tokens, x.cpu()[mask.cpu()].view(B, 7, C), "true tokens")
    assert_same(split.false_tokens, x.cpu()[~mask.cpu()].view(B, L - 7, C), "false tokens")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool], ids=_name)
@pytest.mark.parametrize("backend", ek.BACKENDS)
def test_merge_equals_gathering_the_union(backend, dtype, gen, poison):
    """merge_tokens of two disjoint subsets = gathering their union, in position order."""
    dev = skip_unless_routes(backend)
    B, L, C = 4, 27, 3
    na, nb = (5, 0, 27, 9), (13, 6, 0, 0)
    idx_a, idx_b, mask_a, mask_b = two_disjoint_sets(B, L, na, nb, gen)
    x = random_tokens((B, L, C), dtype, gen)
    a, b = gather_rows_ref(x, idx_a), gather_rows_ref(x, idx_b)
    merged, pos = ek.merge_tokens(a.to(dev), idx_a.to(dev), b.to(dev), idx_b.to(dev), backend=backend)
    n = idx_a.shape[1] + idx_b.shape[1]
    union, _ = indices_loop(mask_a | mask_b, n)
    assert_same(pos, union, "positions")
    assert_same(merged, gather_loop(x, union), "merged tokens")


# ----------------------------------------------------------------------------- gradients


def _grads(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return out.detach(), [torch.zeros_like(x) if g is None else g.detach() for x, g in zip(leaves, grads)]


def _check_grads(fused, ref, inputs, grad_out, dev):
    out, grads = _grads(fused, [t.to(dev) for t in inputs], grad_out.to(dev))
    ref_out, ref_grads = _grads(ref, inputs, grad_out)
    assert_same(out, ref_out)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_same(g, r, f"gradient of input {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_name)
@pytest.mark.parametrize("backend", ek.BACKENDS)
def test_gradients(backend, dtype, gen, poison):
    """Backward of gather, scatter, restore and merge equals the reference's autograd."""
    dev = skip_unless_routes(backend)
    B, L, C = 3, 21, 6
    idx_a, idx_b, _, _ = two_disjoint_sets(B, L, (7, 0, 12), (3, 15, 9), gen)
    sa, sb = shuffled_rows(idx_a, gen), shuffled_rows(idx_b, gen)
    ia, ib = sa.to(dev), sb.to(dev)
    x = random_tokens((B, L, C), dtype, gen)
    a, b = random_tokens((B, idx_a.shape[1], C), dtype, gen), random_tokens((B, idx_b.shape[1], C), dtype, gen)
    g_gather = random_tokens((B, idx_a.shape[1], C), dtype, gen)
    g_seq = random_tokens((B, L, C), dtype, gen)

    _check_grads(lambda x: ek.gather_tokens(x, ia, backend=backend), lambda x: gather_loop(x, sa), [x], g_gather, dev)
    _check_grads(
        lambda a: ek.scatter_tokens(a, ia, L, backend=backend),
        lambda a: scatter_loop(a, sa, None, None, L), [a], g_seq, dev,
    )
    _check_grads(
        lambda a, b: ek.restore_tokens(a, ia, b, ib, L, backend=backend),
        lambda a, b: scatter_loop(a, sa, b, sb, L), [a, b], g_seq, dev,
    )
    # merge: ascending index sets; reference = scatter into merged order by rank.
    rank_a, rank_b = merge_ranks_ref(idx_a, idx_b)
    n = idx_a.shape[1] + idx_b.shape[1]
    g_merged = random_tokens((B, n, C), dtype, gen)
    _check_grads(
        lambda a, b: ek.merge_tokens(a, idx_a.to(dev), b, idx_b.to(dev), backend=backend)[0],
        lambda a, b: scatter_rows_ref(a, rank_a, b, rank_b, n), [a, b], g_merged, dev,
    )


@pytest.mark.parametrize("backend", ek.BACKENDS)
def test_gradient_of_one_input_only(backend, gen, poison):
    """restore_tokens with only b requiring grad: a's backward is skipped, b's is right."""
    dev = skip_unless_routes(backend)
    B, L, C = 2, 12, 3
    idx_a, idx_b, _, _ = two_disjoint_sets(B, L, (4, 6), (8, 2), gen)
    a = random_tokens((B, idx_a.shape[1], C), torch.float32, gen).to(dev)
    b = random_tokens((B, idx_b.shape[1], C), torch.float32, gen).to(dev).requires_grad_(True)
    g = random_tokens((B, L, C), torch.float32, gen)
    out = ek.restore_tokens(a, idx_a.to(dev), b, idx_b.to(dev), L, backend=backend)
    (gb,) = torch.autograd.grad(out, b, g.to(dev))
    assert_same(gb, gather_rows_ref(g, idx_b))


@pytest.mark.parametrize("backend", ek.BACKENDS)
def test_gradcheck_float64(backend, gen):
    dev = skip_unless_routes(backend)
    B, L, C = 2, 7, 2
    idx_a, idx_b, _, _ = two_disjoint_sets(B, L, (3, 1), (2, 5), gen)
    ia, ib = idx_a.to(dev), idx_b.to(dev)
    x = random_tokens((B, L, C), torch.float64, gen).to(dev).requires_grad_(True)
    a = random_tokens((B, idx_a.shape[1], C), torch.float64, gen).to(dev).requires_grad_(True)
    b = random_tokens((B, idx_b.shape[1], C), torch.float64, gen).to(dev).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ek.gather_tokens(x, ia, backend=backend), (x,))
    assert torch.autograd.gradcheck(lambda a, b: ek.restore_tokens(a, ia, b, ib, L, backend=backend), (a, b))
    assert torch.autograd.gradcheck(lambda a, b: ek.merge_tokens(a, ia, b, ib, backend=backend)[0], (a, b))
    # Second order: the backward ops are differentiable too (gather <-> scatter).
    assert torch.autograd.gradgradcheck(lambda x: ek.gather_tokens(x, ia, backend=backend), (x,))


# ----------------------------------------------------------------------------- empty cases


@pytest.mark.parametrize("backend", ek.BACKENDS)
def test_empty_cases(backend, gen, poison):
    """count 0, N 0, B 0, L 0 and seq_len 0 give correctly shaped results (zeros, -1)."""
    dev = skip_unless_routes(backend)
    C = 3

    def both(mask, count):
        idx, lens = ek.mask_to_indices(mask.to(dev), count, backend=backend)
        ref = mask_to_indices_ref(mask, count)
        assert_same(idx, ref[0], "indices")
        assert_same(lens, ref[1], "lens")

    both(torch.zeros(3, 8, dtype=torch.bool), 0)  # count 0, all-false rows
    both(torch.zeros(0, 8, dtype=torch.bool), 5)  # B 0
    both(torch.zeros(2, 0, dtype=torch.bool), 0)  # L 0

    x = random_tokens((2, 9, C), torch.float32, gen)
    none = torch.zeros(2, 0, dtype=torch.int64)
    assert_same(ek.gather_tokens(x.to(dev), none.to(dev), backend=backend), x[:, :0])  # N 0
    pad = torch.full((2, 4), -1, dtype=torch.int64)
    assert_same(ek.gather_tokens(x[:, :0].to(dev), pad.to(dev), backend=backend), torch.zeros(2, 4, C))  # L 0
    x0 = random_tokens((0, 9, C), torch.float32, gen)
    assert_same(ek.gather_tokens(x0.to(dev), torch.zeros(0, 4, dtype=torch.int64).to(dev), backend=backend), torch.zeros(0, 4, C))  # B 0
    xc0 = torch.zeros(2, 9, 0)
    assert_same(ek.gather_tokens(xc0.to(dev), pad.to(dev), backend=backend), torch.zeros(2, 4, 0))  # empty rows

    a0 = random_tokens((2, 0, C), torch.float32, gen)
    assert_same(ek.scatter_tokens(a0.to(dev), none.to(dev), 6, backend=backend), torch.zeros(2, 6, C))  # N 0
    # seq_len 0
    assert_same(ek.restore_tokens(a0.to(dev), none.to(dev), a0.to(dev), none.to(dev), 0, backend=backend), torch.zeros(2, 0, C))
    assert_same(
        ek.scatter_tokens(x0.to(dev), torch.zeros(0, 9, dtype=torch.int64).to(dev), 9, backend=backend), torch.zeros(0, 9, C)
    )  # B 0
    padded = random_tokens((2, 4, C), torch.float32, gen)
    assert_same(ek.scatter_tokens(padded.to(dev), pad.to(dev), 5, backend=backend), torch.zeros(2, 5, C))  # only -1

    merged, pos = ek.merge_tokens(a0.to(dev), none.to(dev), a0.to(dev), none.to(dev), backend=backend)
    assert merged.shape == (2, 0, C) and pos.shape == (2, 0)
    split = ek.split_tokens(x.to(dev), torch.zeros(2, 9, dtype=torch.bool).to(dev), 0, backend=backend)
    assert split.true_tokens.shape == (2, 0, C)
    assert_same(split.false_tokens, x)


@pytest.mark.parametrize("backend", ek.BACKENDS)
def test_empty_gradients(backend, gen):
    dev = skip_unless_routes(backend)
    x = random_tokens((2, 9, 3), torch.float32, gen).to(dev).requires_grad_(True)
    out = ek.gather_tokens(x, torch.zeros(2, 0, dtype=torch.int64).to(dev), backend=backend)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert_same(g, torch.zeros(2, 9, 3))


# ----------------------------------------------------------------------------- errors


def test_mask_errors(gen):
    mask = random_mask(10, (3, 6), gen)
    with pytest.raises(ValueError, match="count = 4 but a row of mask has 6"):
        ek.mask_to_indices(mask, 4)
    with pytest.raises(ValueError, match="count must lie in"):
        ek.mask_to_indices(mask, 11)
    with pytest.raises(ValueError, match="count must lie in"):
        ek.mask_to_indices(mask, -1)
    with pytest.raises(TypeError, match="count must be an int"):
        ek.mask_to_indices(mask, 4.0)
    with pytest.raises(TypeError, match="mask must have dtype"):
        ek.mask_to_indices(mask.to(torch.uint8), 6)
    with pytest.raises(ValueError, match="mask must have 2 dimensions"):
        ek.mask_to_indices(mask[0], 6)
    x = random_tokens((2, 10, 1), torch.float32, gen)
    with pytest.raises(ValueError, match="num_false = 2 but a row of mask has 7 False entries"):
        ek.split_tokens(x, mask, 6, 2)
    with pytest.raises(ValueError, match="num_true = 5 but a row of mask has 6 True entries"):
        ek.split_tokens(x, mask, 5, 7)
    with pytest.raises(ValueError, match="num_false = 4 but a row of mask has 7 False entries"):
        ek.split_tokens(x, mask, 6)  # default num_false = L - num_true
    with pytest.raises(TypeError, match="num_true must be an int"):
        ek.split_tokens(x, mask, 6.0)


def test_index_errors(gen):
    B, L, C = 2, 8, 3
    x = random_tokens((B, L, C), torch.float32, gen)
    good = torch.tensor([[0, 5, -1], [7, 2, 3]])
    ek.gather_tokens(x, good)  # valid: no error
    with pytest.raises(ValueError, match=r"indices entries must lie in \[0, 8\)"):
        ek.gather_tokens(x, torch.tensor([[0, 8, -1], [1, 2, 3]]))
    with pytest.raises(ValueError, match=r"indices entries must lie in"):
        ek.gather_tokens(x, torch.tensor([[0, -2, -1], [1, 2, 3]]))
    with pytest.raises(ValueError, match="repeat a token index in batch row 1"):
        ek.gather_tokens(x, torch.tensor([[0, 1, -1], [4, 2, 4]]))
    with pytest.raises(TypeError, match="must be an integer tensor"):
        ek.gather_tokens(x, good.float())
    with pytest.raises(TypeError, match="must have dtype in \\(int64\\)"):
        ek.gather_tokens(x, good.int())
    with pytest.raises(ValueError, match="must have 2 rows"):
        ek.gather_tokens(x, good[:1])
    with pytest.raises(ValueError, match="x must have shape"):
        ek.gather_tokens(x[0, 0], good)


def test_restore_and_merge_errors(gen):
    B, L, C = 2, 8, 3
    ia, ib = torch.tensor([[0, 5, -1], [7, 2, 3]]), torch.tensor([[1, -1], [4, 6]])
    a, b = random_tokens((B, 3, C), torch.float32, gen), random_tokens((B, 2, C), torch.float32, gen)
    ek.restore_tokens(a, ia, b, ib, L)  # valid: no error
    with pytest.raises(ValueError, match="idx_a and the other index set together repeat a token index in batch row 1"):
        ek.restore_tokens(a, ia, b, torch.tensor([[1, -1], [4, 2]]), L)
    with pytest.raises(ValueError, match="repeat a token index in batch row 0"):
        ek.restore_tokens(a, torch.tensor([[5, 5, -1], [7, 2, 3]]), None, None, L)
    with pytest.raises(ValueError, match=r"idx_b entries must lie in \[0, 8\)"):
        ek.restore_tokens(a, ia, b, torch.tensor([[1, -1], [4, 8]]), L)
    with pytest.raises(ValueError, match=r"idx_a entries must lie in \[0, 7\)"):
        ek.restore_tokens(a, ia, b, ib, 7)
    with pytest.raises(ValueError, match="batch mismatch"):
        ek.restore_tokens(a, ia, b[:1], ib[:1], L)
    with pytest.raises(ValueError, match="idx_b must have 2 rows"):
        ek.restore_tokens(a, ia, b, ib[:1], L)
    with pytest.raises(ValueError, match="tokens mismatch"):
        ek.restore_tokens(a[:, :2], ia, None, None, L)
    with pytest.raises(TypeError, match="b has dtype"):
        ek.restore_tokens(a, ia, b.double(), ib, L)
    with pytest.raises(ValueError, match="both be given"):
        ek.restore_tokens(a, ia, b, None, L)
    with pytest.raises(TypeError, match="must be an integer tensor"):
        ek.scatter_tokens(a, ia.double(), L)
    with pytest.raises(ValueError, match="seq_len must be non-negative"):
        ek.scatter_tokens(a, ia, -1)
    with pytest.raises(TypeError, match="seq_len must be an int"):
        ek.scatter_tokens(a, ia, 8.0)
    # merge: ascending, disjoint sets
    ma, mb = torch.tensor([[0, 5, -1], [2, 3, 7]]), torch.tensor([[1, -1], [4, 6]])
    ek.merge_tokens(a, ma, b, mb)  # valid: no error
    with pytest.raises(ValueError, match="idx_a must be ascending"):
        ek.merge_tokens(a, torch.tensor([[5, 0, -1], [2, 3, 7]]), b, mb)
    with pytest.raises(ValueError, match="idx_b must be ascending"):
        ek.merge_tokens(a, ma, b, torch.tensor([[-1, 1], [4, 6]]))
    with pytest.raises(ValueError, match="repeat a token index in batch row 1"):
        ek.merge_tokens(a, ma, b, torch.tensor([[1, -1], [4, 7]]))
    with pytest.raises(ValueError, match="batch mismatch"):
        ek.merge_tokens(a, ma, b[:1], mb)


@pytest.mark.parametrize("backend", ek.BACKENDS)
def test_value_checks_off_skips_data_checks(backend, gen, poison):
    """Under value_checks(False) bad values raise nothing: kernels clamp counts and
    skip out-of-range indices (zero rows for gather), as the contract says.  The
    metadata checks stay on."""
    dev = skip_unless_routes(backend)
    B, L, C = 2, 8, 3
    mask = random_mask(L, (3, 6), gen)
    x = random_tokens((B, L, C), torch.float32, gen)
    bad = torch.tensor([[0, 8, -1], [100, 2, -7]])  # out of range on both sides
    a = random_tokens((B, 3, C), torch.float32, gen)
    with ek.value_checks(False):
        idx, lens = ek.mask_to_indices(mask.to(dev), 4, backend=backend)  # a row has 6 > 4
        ref_idx, ref_lens = mask_to_indices_ref(mask, 4)
        assert_same(idx, ref_idx, "indices")
        assert_same(lens, ref_lens, "lens")
        assert lens.tolist() == [3, 4]
        got = ek.gather_tokens(x.to(dev), bad.to(dev), backend=backend)
        assert_same(got, gather_rows_ref(x, bad))
        assert not got[0, 1:].any() and not got[1, ::2].any()
        got = ek.scatter_tokens(a.to(dev), bad.to(dev), L, backend=backend)
        assert_same(got, scatter_rows_ref(a, bad, None, None, L))
        dup = torch.tensor([[1, 1, -1], [3, 4, 5]])  # duplicates: undefined row, no error
        ek.restore_tokens(a.to(dev), dup.to(dev), None, None, L, backend=backend)
        with pytest.raises(TypeError, match="mask must have dtype"):
            ek.mask_to_indices(mask.to(dev).float(), 4, backend=backend)
        with pytest.raises(ValueError, match="must have 2 rows"):
            ek.gather_tokens(x.to(dev), bad[:1].to(dev), backend=backend)


def test_forced_backend_that_cannot_run_raises(gen):
    x = random_tokens((2, 5, 3), torch.float32, gen)
    idx = torch.tensor([[0, -1], [4, 1]])
    with pytest.raises(ValueError, match="backend='cuda' cannot run gather_tokens"):
        ek.gather_tokens(x, idx, backend="cuda")  # CPU tensors
    with pytest.raises(ValueError, match="backend must be one of"):
        ek.gather_tokens(x, idx, backend="nope")


# ----------------------------------------------------------------------------- op registration


def _opcheck_samples(gen, dev):
    """(op name, args) samples for the routing ops."""
    B, L, C = 2, 9, 3
    mask = random_mask(L, (4, 7), gen).to(dev)
    idx_a, idx_b, _, _ = two_disjoint_sets(B, L, (3, 2), (4, 6), gen)
    idx_a, idx_b = idx_a.to(dev), idx_b.to(dev)
    x = random_tokens((B, L, C), torch.float32, gen).to(dev).requires_grad_(True)
    a = random_tokens((B, idx_a.shape[1], C), torch.float32, gen).to(dev).requires_grad_(True)
    b = random_tokens((B, idx_b.shape[1], C), torch.float32, gen).to(dev).requires_grad_(True)
    return [
        ("mask_to_indices", (mask, 7)),
        ("mask_to_indices", (mask, 0)),
        ("gather_rows", (x, idx_a)),
        ("gather_rows", (x.detach().double(), idx_b)),
        ("scatter_rows", (a, idx_a, b, idx_b, L)),
        ("scatter_rows", (a, idx_a, None, None, L + 2)),
        ("scatter_rows", (a.detach().to(torch.bfloat16), idx_a, None, None, L)),
    ]


# Under TRITON_INTERPRET=1, torch.library.wrap_triton hands back the raw interpreted
# kernel instead of a traceable wrapper, so a triton_op's fake implementation (its own
# body, run on fake tensors) and its functional decomposition (torch.compile) try to
# run the kernel on fake tensors and fail.  On the interpreter only the checks that
# run real tensors apply; on a GPU every check runs.
INTERPRETER_LIMIT = "the Triton interpreter cannot trace wrap_triton kernels (fake tensors, torch.compile)"


def _interpreted(backend: str) -> bool:
    from enat_kernels import triton as ek_triton

    return backend == "triton" and device_for(backend) == "cpu" and ek_triton.interpreting()


@pytest.mark.parametrize("backend", ["cpu", "cuda", "triton"])
def test_opcheck(backend, gen):
    """Schema, autograd registration, fake implementation and AOT dispatch of every routing op."""
    dev = skip_unless_routes(backend)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if _interpreted(backend):
        tests = tests[:2]  # INTERPRETER_LIMIT
    for name, args in _opcheck_samples(gen, dev):
        if backend == "triton":
            from enat_kernels import triton as ek_triton

            op = ek_triton.op(name)
        else:
            op = getattr(torch.ops.enat_kernels, name).default
        torch.library.opcheck(op, args, test_utils=tests)


_TRACE_TRITON_OPS = """
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._subclasses.functional_tensor import dispatch_functionalize
from enat_kernels import _ops
from enat_kernels.triton import routing as T

def f(x, mask, a, idx_a, b, idx_b):
    idx, lens = T.mask_to_indices(mask, 5)
    return idx, lens, T.gather_rows(x, idx), T.scatter_rows(a, idx_a, b, idx_b, x.shape[1])

x, mask = torch.randn(2, 12, 3, dtype=torch.float16), torch.rand(2, 12) < 0.3
a, b = torch.randn(2, 4, 3, dtype=torch.float16), torch.randn(2, 5, 3, dtype=torch.float16)
ia, ib = torch.full((2, 4), -1), torch.full((2, 5), -1)
# Functionalized, as torch.compile's AOT stage sees it: each op decomposes into its kernels.
code = make_fx(dispatch_functionalize(f), tracing_mode="symbolic")(x, mask, a, ia, b, ib).code
assert code.count("triton_kernel_wrapper_functional(") == 4, code  # mask, gather, scatter a, scatter b
with FakeTensorMode() as mode:
    args = [mode.from_tensor(t) for t in (x, mask, a, ia, b, ib)]
    got = f(*args)
    want = (*_ops.mask_to_indices_fake(args[1], 5), _ops.gather_rows_fake(args[0], got[0]),
            _ops.scatter_rows_fake(args[2], args[3], args[4], args[5], 12))
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, (g, w)
print("ok")
"""


def test_triton_ops_trace_without_the_interpreter():
    """What the interpreter cannot check (INTERPRETER_LIMIT), checked in a process without
    it: the Triton ops trace with symbolic shapes into kernel-call nodes, and their fake
    results match the shared fakes of _ops.py.  Nothing is launched."""
    import os
    import subprocess
    import sys

    from enat_kernels import triton as ek_triton

    err = ek_triton.triton_error("cuda" if HAS_CUDA else "cpu")
    if err is not None and "TRITON_INTERPRET" not in err:
        pytest.skip(err)
    env = dict(os.environ, TRITON_INTERPRET="0")
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(ek.__file__)))  # the enat_kernels under test
    env["PYTHONPATH"] = os.pathsep.join([pkg_root, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _TRACE_TRITON_OPS],
        env=env,
        cwd=os.path.dirname(os.path.abspath(__file__)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.parametrize("backend", ek.BACKENDS)
def test_compiles_without_graph_breaks(backend, gen):
    """split -> restore traces whole under torch.compile (fakes, SymInt sizes, no host sync)."""
    dev = skip_unless_routes(backend)
    if _interpreted(backend):
        pytest.skip(INTERPRETER_LIMIT)
    torch._dynamo.reset()

    def roundtrip(x, mask):
        s = ek.split_tokens(x, mask, 5, 9, backend=backend)  # rows: 5 and 3 True of 12
        return ek.restore_tokens(s.true_tokens * 2, s.true_indices, s.false_tokens, s.false_indices, x.shape[1], backend=backend)

    compiled = torch.compile(roundtrip, backend="aot_eager", fullgraph=True)
    x = random_tokens((2, 12, 4), torch.float32, gen).to(dev).requires_grad_(True)
    mask = random_mask(12, (5, 3), gen).to(dev)
    got = compiled(x, mask)
    ref = torch.where(mask[:, :, None], x * 2, x)
    assert_same(got.detach(), ref.detach().cpu())
    (g,) = torch.autograd.grad(got.sum(), x)
    assert_same(g, torch.where(mask[:, :, None], 2.0, 1.0).expand_as(x).contiguous().cpu())


def test_cpu_and_cuda_kernels_registered():
    """The compiled extension registers all three routing ops for CPU (and CUDA when built)."""
    if _extension.cpu_extension_error() is not None:
        pytest.skip(_extension.cpu_extension_error())
    for op in ("mask_to_indices", "gather_rows", "scatter_rows"):
        assert _extension.has_kernel(op, "CPU"), op
        if _extension.cuda_extension_error() is None:
            assert _extension.has_kernel(op, "CUDA"), op


# ----------------------------------------------------------------------------- recompilation


def _sampling_counts(seq_len: int = 256, steps: int = 8) -> list[int]:
    """Every token count the routing ops see in one sampling run (cosine schedule), plus
    the values Triton specializes integers on (1, multiples of 16)."""
    import dataclasses

    from enat.sampler import SamplingPlan

    plan = SamplingPlan.build(seq_len, [steps], 2.5, 4.5, 1.0)
    counts = {c for s in range(plan.total_steps) for c in dataclasses.astuple(plan.counts(s))}
    return sorted(counts | {1, 16, 32, seq_len - 1, seq_len})


def _routing_keys(count: int, dtype, width: int, L: int = 256, B: int = 2):
    """{launch kind: Triton specialization key} of mask_to_indices, gather and scatter at
    one token count: the key that selects (or compiles) a kernel variant."""
    from enat_kernels.triton import routing as T
    from support.triton_jit import jit_for_gpu

    mask = torch.zeros(B, L, dtype=torch.bool)
    idx = torch.empty(B, count, dtype=torch.int64)
    x, rows = torch.empty(B, L, width, dtype=dtype), torch.empty(B, count, width, dtype=dtype)
    launches = {
        "mask_to_indices": (T._mask_to_indices_kernel, T.mask_to_indices_launch(mask, count, idx, torch.empty(B, dtype=torch.int32))),
        "gather": (T._copy_rows_kernel, T.copy_rows_launch(rows, x, idx, L, count, scatter=False)),
        "scatter": (T._copy_rows_kernel, T.copy_rows_launch(x, rows, idx, count, L, scatter=True)),
    }
    return {kind: repr(jit_for_gpu(kernel)[2](**launch[1])[1]) for kind, (kernel, launch) in launches.items() if launch is not None}


@pytest.mark.parametrize("dtype, width", [(torch.bfloat16, 768), (torch.int64, 1)], ids=["tokens", "ids"])
def test_triton_routing_compiles_once_per_row_width(dtype, width):
    """Over a whole sampling run's token counts (L = 256, T = 8) each routing kernel has one
    specialization key, so one compiled variant per (dtype, row width): the counts never
    reach the key (not specialized, block sizes from the row width only)."""
    pytest.importorskip("triton")
    counts = _sampling_counts()
    assert len(counts) > 10
    variants: dict = {}
    for count in counts:
        for kind, key in _routing_keys(count, dtype, width).items():
            variants.setdefault(kind, set()).add(key)
    assert {kind: len(keys) for kind, keys in variants.items()} == {"mask_to_indices": 1, "gather": 1, "scatter": 1}
    # Not vacuous: the key does follow the row width and the sequence length.
    assert _routing_keys(5, dtype, width + 3)["gather"] != _routing_keys(5, dtype, width)["gather"]
    assert _routing_keys(5, dtype, width, L=64)["mask_to_indices"] != _routing_keys(5, dtype, width)["mask_to_indices"]


@pytest.mark.skipif(not HAS_CUDA, reason="counts compiled GPU kernels (needs a GPU)")
def test_triton_routing_jit_cache_stays_put_over_a_sampling_run(gen):
    """On a GPU: after the first step's counts, the rest of the run compiles nothing."""
    from enat_kernels.triton import routing as T

    dev = torch.cuda.current_device()
    jit = (T._mask_to_indices_kernel, T._copy_rows_kernel)
    x = torch.randn(2, 256, 768, generator=gen).to("cuda", torch.bfloat16)
    sizes = []
    for count in _sampling_counts():
        mask = torch.rand(2, 256, generator=gen).to("cuda") < count / 256
        idx, _ = T.mask_to_indices(mask, count)
        T.scatter_rows(T.gather_rows(x, idx), idx, None, None, 256)
        torch.cuda.synchronize()
        sizes.append([len(k.device_caches[dev][0]) for k in jit])
    assert all(s == sizes[0] for s in sizes), sizes
