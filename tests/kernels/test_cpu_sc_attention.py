"""The CPU SC-Attention kernels (csrc/cpu/sc_attention*): checks beyond the shared suite.

tests/kernels/test_sc_attention.py runs the cpu backend on the shared cases.  Here: the op
registrations (torch.library.opcheck), finite-difference gradients in float64
(gradcheck), shapes large enough for several query blocks and key tiles, lengths
out of range (clamped, never read out of bounds), bitwise determinism across runs and
thread counts, and the portable (non-AVX2) build of the kernels.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import enat_kernels as ek
from enat_kernels.reference import sc_attention_ref
from support.attention_cases import AttnCase, make_inputs, make_varlen_inputs
from support.attention_checks import compare, forward_backward
from support.paths import TESTS

CPU_ERR = ek.supports("sc_attention", device="cpu", dtype=torch.float32, head_dim=64, backend="cpu").reason
pytestmark = pytest.mark.skipif(bool(CPU_ERR), reason=CPU_ERR)

OPS = torch.ops.enat_kernels


def _finite(inputs):
    """make_inputs puts NaN in padding rows; gradcheck and opcheck's comparisons want numbers."""
    return [t.nan_to_num(0.0) for t in inputs]


# ----------------------------------------------------------------------------- op registration


@pytest.mark.parametrize(
    "case",
    [
        AttnCase("dense", B=2, N=9, Nc=7, H=2, D=16),
        AttnCase("ragged_views", B=3, N=11, Nc=6, H=2, D=24, cond_lens=(6, 0, 2), self_lens=(11, 3, 0), views=True),
        AttnCase("empty_cond", B=2, N=5, Nc=0, H=1, D=8),
    ],
    ids=str,
)
def test_opcheck_dense(case, gen):
    q, kc, vc, ks, vs, cl, sl = make_inputs(case, torch.float32, "cpu", gen)
    q, kc, vc, ks, vs = (t.requires_grad_() for t in _finite([q, kc, vc, ks, vs]))
    scale = case.D**-0.5
    fwd_args = (q, kc, vc, ks, vs, cl, sl, None, None, case.N, case.Nc, scale)
    torch.library.opcheck(OPS.sc_attn_fwd.default, fwd_args)
    out, lse = OPS.sc_attn_fwd(*fwd_args)
    dout = torch.randn(out.shape, generator=gen)
    dlse = torch.randn(lse.shape, generator=gen)
    detached = [t.detach() for t in (q, kc, vc, ks, vs)]
    bwd_args = (dout, dlse, *detached, out.detach(), lse.detach(), cl, sl, None, None, case.N, case.Nc, scale)
    torch.library.opcheck(OPS.sc_attn_bwd.default, bwd_args)


def test_opcheck_packed(gen):
    q, kc, vc, ks, vs, cu_q, cu_c, mq, mc = make_varlen_inputs((5, 0, 9), (4, 6, 0), 2, 16, torch.float32, "cpu", gen)
    q, kc, vc, ks, vs = (t.requires_grad_() for t in (q, kc, vc, ks, vs))
    fwd_args = (q, kc, vc, ks, vs, None, None, cu_q, cu_c, mq, mc, 0.25)
    torch.library.opcheck(OPS.sc_attn_fwd.default, fwd_args)
    out, lse = OPS.sc_attn_fwd(*fwd_args)
    bwd_args = (torch.randn(out.shape, generator=gen), None, *[t.detach() for t in (q, kc, vc, ks, vs)],
                out.detach(), lse.detach(), None, None, cu_q, cu_c, mq, mc, 0.25)
    torch.library.opcheck(OPS.sc_attn_bwd.default, bwd_args)


# ----------------------------------------------------------------------------- gradients


def _lse_finite(lse):
    return lse.masked_fill(torch.isinf(lse), 0.0)  # -inf on padded rows: no finite difference


@pytest.mark.parametrize(
    "case",
    [
        AttnCase("dense", B=2, N=5, Nc=4, H=2, D=8),
        AttnCase("ragged", B=2, N=6, Nc=5, H=1, D=8, cond_lens=(5, 0), self_lens=(4, 6)),
        AttnCase("views", B=1, N=4, Nc=3, H=2, D=8, views=True),
    ],
    ids=str,
)
def test_gradcheck_dense(case, gen):
    q, kc, vc, ks, vs, cl, sl = make_inputs(case, torch.float64, "cpu", gen)
    leaves = [t.detach().requires_grad_() for t in _finite([q, kc, vc, ks, vs])]

    def fn(*x):
        out, lse = ek.sc_attention(*x, cond_lens=cl, self_lens=sl, scale=0.4, return_lse=True, backend="cpu")
        return out, _lse_finite(lse)

    torch.autograd.gradcheck(fn, leaves, fast_mode=True)


def test_gradcheck_packed(gen):
    q, kc, vc, ks, vs, cu_q, cu_c, mq, mc = make_varlen_inputs((3, 0, 4), (2, 3, 0), 2, 8, torch.float64, "cpu", gen)
    leaves = [t.detach().requires_grad_() for t in (q, kc, vc, ks, vs)]

    def fn(*x):
        out, lse = ek.sc_attention_varlen(*x, cu_q, cu_c, mq, mc, return_lse=True, backend="cpu")
        return out, lse

    torch.autograd.gradcheck(fn, leaves, fast_mode=True)


# ----------------------------------------------------------------------------- more shapes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize(
    "case",
    [
        # Several query blocks (N > 128) and key tiles (Nc = 300: 4 full tiles + a partial one).
        AttnCase("multi_tile_d64", B=2, N=256, Nc=300, H=2, D=64, cond_lens=(300, 171), self_lens=(256, 139)),
        AttnCase("multi_tile_d128", B=2, N=256, Nc=300, H=2, D=128, cond_lens=(13, 300), self_lens=(200, 256)),
        # head_dim neither a multiple of the vector width nor of the register tile.
        AttnCase("odd_head_dim", B=2, N=131, Nc=70, H=3, D=37, cond_lens=(70, 1), self_lens=(131, 17)),
        AttnCase("head_dim_256", B=1, N=40, Nc=90, H=2, D=256),
        AttnCase("head_dim_3", B=2, N=19, Nc=23, H=2, D=3, cond_lens=(23, 5), self_lens=(7, 19)),
    ],
    ids=str,
)
def test_shapes_against_oracle(case, dtype, gen, poison):
    q, kc, vc, ks, vs, cl, sl = make_inputs(case, dtype, "cpu", gen)
    dout = torch.randn(q.shape, generator=gen).to(dtype)
    dlse = torch.randn(case.B, case.H, case.N, generator=gen)

    def fused(*x):
        return ek.sc_attention(*x, cond_lens=cl, self_lens=sl, return_lse=True, backend="cpu")

    def ref(*x):
        return sc_attention_ref(*x, cond_lens=cl, self_lens=sl)

    inputs = (q, kc, vc, ks, vs)
    got = forward_backward(fused, inputs, dout, dlse)
    lowp = forward_backward(ref, inputs, dout, dlse)
    oracle = forward_backward(ref, [t.double() for t in inputs], dout.double(), dlse.double())
    compare(got, lowp, oracle, dtype)


# ----------------------------------------------------------------------------- robustness


def test_out_of_range_lengths_are_clamped(gen):
    """With value checks off, lengths beyond [0, N] act as if clamped (never read past the tensors)."""
    case = AttnCase("c", B=3, N=10, Nc=7, H=2, D=16)
    q, kc, vc, ks, vs, _, _ = make_inputs(case, torch.float32, "cpu", gen)
    bad_sl = torch.tensor([10 + 1000, -5, 4], dtype=torch.int32)
    bad_cl = torch.tensor([-1, 7 + 99, 3], dtype=torch.int32)
    with ek.value_checks(False):
        got = ek.sc_attention(q, kc, vc, ks, vs, cond_lens=bad_cl, self_lens=bad_sl, return_lse=True, backend="cpu")
    want = ek.sc_attention(q, kc, vc, ks, vs, cond_lens=bad_cl.clamp(0, 7), self_lens=bad_sl.clamp(0, 10),
                           return_lse=True, backend="cpu")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_packed_lengths_beyond_the_tensor_are_clamped(gen):
    q, kc, vc, ks, vs, cu_q, cu_c, mq, mc = make_varlen_inputs((6, 5), (3, 4), 2, 16, torch.float32, "cpu", gen)
    bad_q = torch.tensor([0, 6, 11 + 500], dtype=torch.int32)  # last sequence runs past Tq
    bad_c = torch.tensor([0, 3, 7 + 40], dtype=torch.int32)
    with ek.value_checks(False):
        # max_seqlen at its upper bound (the packed rows): lengths are cut by the tensor.
        got = ek.sc_attention_varlen(q, kc, vc, ks, vs, bad_q, bad_c, q.shape[0], kc.shape[0], return_lse=True, backend="cpu")
    want = ek.sc_attention_varlen(q, kc, vc, ks, vs, cu_q, cu_c, mq, mc, return_lse=True, backend="cpu")
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize(
    "case",
    [
        AttnCase("ragged", B=3, N=150, Nc=90, H=3, D=64, cond_lens=(90, 0, 41), self_lens=(150, 77, 1)),
        # One (b, h) pair: the forward splits its queries into smaller blocks when it
        # has more than one thread, which must not change any bit.
        AttnCase("one_pair", B=1, N=150, Nc=40, H=1, D=32),
    ],
    ids=str,
)
def test_bitwise_deterministic_across_runs_and_threads(case, gen):
    inputs = make_inputs(case, torch.float32, "cpu", gen)
    q, kc, vc, ks, vs, cl, sl = inputs
    dout = torch.randn(q.shape, generator=gen)
    dlse = torch.randn(case.B, case.H, case.N, generator=gen)

    def run():
        return forward_backward(
            lambda *x: ek.sc_attention(*x, cond_lens=cl, self_lens=sl, return_lse=True, backend="cpu"),
            (q, kc, vc, ks, vs), dout, dlse,
        )

    threads = torch.get_num_threads()
    first, second = run(), run()
    try:
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for name, a, b, c in zip(("out", "lse", "dq", "dk_cond", "dv_cond", "dk_self", "dv_self"), first, second, single):
        assert torch.equal(a, b), f"{name} differs between two runs"
        assert torch.equal(a, c), f"{name} differs between {threads} threads and 1"


# ----------------------------------------------------------------------------- portable build

_PORTABLE_SCRIPT = textwrap.dedent(
    """
    import torch
    assert torch.backends.cpu.get_cpu_capability() == "DEFAULT", torch.backends.cpu.get_cpu_capability()
    import enat_kernels as ek
    from enat_kernels.reference import sc_attention_ref
    from support.attention_cases import AttnCase, make_inputs
    from support.attention_checks import compare, forward_backward

    gen = torch.Generator().manual_seed(0)
    case = AttnCase("p", B=2, N=140, Nc=70, H=2, D=40, cond_lens=(70, 9), self_lens=(140, 33))
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        q, kc, vc, ks, vs, cl, sl = make_inputs(case, dtype, "cpu", gen)
        dout = torch.randn(q.shape, generator=gen).to(dtype)
        dlse = torch.randn(case.B, case.H, case.N, generator=gen)
        fused = lambda *x: ek.sc_attention(*x, cond_lens=cl, self_lens=sl, return_lse=True, backend="cpu")
        ref = lambda *x: sc_attention_ref(*x, cond_lens=cl, self_lens=sl)
        inputs = (q, kc, vc, ks, vs)
        compare(forward_backward(fused, inputs, dout, dlse), forward_backward(ref, inputs, dout, dlse),
                 forward_backward(ref, [t.double() for t in inputs], dout.double(), dlse.double()), dtype)
    print("ok")
    """
)


@pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() == "DEFAULT", reason="already running the portable build")
def test_portable_build_against_oracle():
    """ATEN_CPU_CAPABILITY=default selects the kernels compiled without AVX2 (used on older CPUs)."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    # The enat_kernels this process imported (installed, or built in place), not
    # necessarily the source tree: in CI the source tree has no compiled extension
    # (hence also cwd=TESTS: `python -c` puts the working directory first on sys.path).
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(ek.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([pkg_root, str(TESTS), env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", _PORTABLE_SCRIPT], env=env, cwd=TESTS, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout[-2000:] + res.stderr[-4000:]


# ----------------------------------------------------------------------------- extreme values (docs/ERRORS.md)


def test_exp_underflow_counts_as_zero_as_in_pytorch():
    """A key whose score is 1000 below the row max weighs 0, even with a value of 3e38
    (a clamped exp2 once weighed it 2^-126, turning 3e38 into 3.5)."""
    q = torch.zeros(1, 1, 1, 16)
    q[..., 0] = 1
    ks, vs = torch.zeros(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    kc, vc = torch.zeros(1, 1, 1, 16), torch.full((1, 1, 1, 16), 3e38)
    kc[..., 0] = -1000
    got = ek.sc_attention(q, kc, vc, ks, vs, scale=1.0, backend="cpu")
    want = ek.sc_attention(q, kc, vc, ks, vs, scale=1.0, backend="torch")
    assert torch.equal(got, vs) and torch.equal(want, vs)


def test_huge_scale_gives_finite_gradients(gen):
    """scale = 1e30: the softmax is one-hot; outputs and value gradients match torch, and
    every gradient is finite (the backward's s - lse is exact: scores stay in natural units)."""
    q, kc, vc, ks, vs = (torch.randn(1, n, 2, 16, generator=gen).requires_grad_() for n in (5, 4, 4, 5, 5))
    grads = {}
    for backend in ("cpu", "torch"):
        for t in (q, kc, vc, ks, vs):
            t.grad = None
        out = ek.sc_attention(q, kc, vc, ks, vs, scale=1e30, backend=backend)
        out.sum().backward()
        grads[backend] = (out.detach(), *(t.grad.clone() for t in (q, kc, vc, ks, vs)))
    for g in grads["cpu"]:
        assert torch.isfinite(g).all()
    torch.testing.assert_close(grads["cpu"][0], grads["torch"][0])
    for i in (3, 5):  # dv_cond, dv_self
        torch.testing.assert_close(grads["cpu"][i], grads["torch"][i])


def test_infinite_score_as_documented(gen):
    """A +inf score (an infinite key) makes its query NaN on the cpu backend (as
    torch.softmax: inf - inf); queries that see it as -inf, and other batch rows, are exact."""
    q, kc, vc, ks, vs = (torch.randn(2, n, 1, 16, generator=gen) for n in (3, 2, 2, 3, 3))
    q[0, :, 0, 2] = torch.tensor([-1.0, 1.0, 2.0])
    kc[0, 1, 0, 2] = -float("inf")  # query 0 scores +inf, queries 1 and 2 -inf
    got = ek.sc_attention(q, kc, vc, ks, vs, backend="cpu")
    assert got[0, 0].isnan().all()
    finite_kc = kc.clone()
    finite_kc[0, 1] = 0.0
    want = ek.sc_attention(q, finite_kc, vc, ks, vs, cond_lens=torch.tensor([1, 2]), backend="torch")
    torch.testing.assert_close(got[0, 1:], want[0, 1:])
    torch.testing.assert_close(got[1], want[1])
