"""Bad metadata is refused the same way eagerly and while tracing, by every backend's op.

The compiled ops check their inputs' metadata in C++ (csrc/cpu/*.cpp,
csrc/cuda/*_api.cpp); under torch.compile the fake (meta) implementations run instead
(enat_kernels/_ops.py, the Triton ops of enat_kernels/triton/), and they must refuse
the same calls (enat_kernels/_op_checks.py).  Each row of the table below is a call
of an op with one piece of metadata wrong.  The eager CPU op on real tensors gives the
expected error type; the same call on FakeTensors must raise it too, for the compiled
op as the CPU and as the CUDA dispatch key would see it (fake tensors on "cpu" and on
"cuda": a fake needs no device) and for the Triton op.  The first row is the valid
call, which every variant must accept: a check that refuses everything fails there.

The ops are called directly, as torch.compile's traced graph calls them: the public
API's own checks (ValueError/TypeError, tests/kernels/test_errors.py) come before.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from enat_kernels import _extension
from support.backends import device_for

CPU_ERR = _extension.cpu_extension_error()
pytestmark = pytest.mark.skipif(CPU_ERR is not None, reason=f"the compiled ops are not loaded: {CPU_ERR}")

OPS = torch.ops.enat_kernels
B, N, NC, H, D = 2, 5, 3, 2, 8
T, TC = 7, 4  # packed rows


def _triton_ops():
    """The Triton ops, or the reason they are not registered here."""
    try:
        from enat_kernels import triton as ek_triton
    except Exception as e:  # noqa: BLE001  (any import failure: the variant skips)
        return None, f"enat_kernels.triton does not import: {e}"
    err = ek_triton.triton_error(device_for("triton"))
    names = ("sc_attn_fwd", "sc_attn_bwd", "mask_to_indices", "gather_rows", "scatter_rows")
    err = err or next((ek_triton.op_error(name) for name in names if ek_triton.op_error(name) is not None), None)
    if err is not None:
        return None, err
    return {name: ek_triton.op(name) for name in names}, None


# ----------------------------------------------------------------------------- inputs


def _rnd(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


def _override(args: dict, over: dict, gen) -> dict:
    """args with the entries of `over` replacing theirs (a callable is called with gen)."""
    return {**args, **{k: v(gen) if callable(v) else v for k, v in over.items()}}


def dense(gen, **over):
    """Arguments of sc_attn_fwd, dense form, with `over` replacing some of them."""
    args = dict(q=_rnd(gen, B, N, H, D), k_cond=_rnd(gen, B, NC, H, D), v_cond=_rnd(gen, B, NC, H, D),
                k_self=_rnd(gen, B, N, H, D), v_self=_rnd(gen, B, N, H, D), cond_lens=_i32(3, 1), self_lens=_i32(5, 2),
                cu_seqlens_q=None, cu_seqlens_cond=None, max_seqlen_q=N, max_seqlen_cond=NC, scale=D**-0.5)
    return _override(args, over, gen)


def packed(gen, **over):
    args = dict(q=_rnd(gen, T, H, D), k_cond=_rnd(gen, TC, H, D), v_cond=_rnd(gen, TC, H, D),
                k_self=_rnd(gen, T, H, D), v_self=_rnd(gen, T, H, D), cond_lens=None, self_lens=None,
                cu_seqlens_q=_i32(0, 3, 7), cu_seqlens_cond=_i32(0, 4, 4), max_seqlen_q=4, max_seqlen_cond=4, scale=0.3)
    return _override(args, over, gen)


def backward(gen, **over):
    """Arguments of sc_attn_bwd for the dense form (out and lse shaped as the forward's)."""
    fwd = dense(gen)
    args = dict(dout=_rnd(gen, B, N, H, D), dlse=_rnd(gen, B, H, N), q=fwd["q"], k_cond=fwd["k_cond"],
                v_cond=fwd["v_cond"], k_self=fwd["k_self"], v_self=fwd["v_self"], out=_rnd(gen, B, N, H, D),
                lse=_rnd(gen, B, H, N))
    args.update({k: fwd[k] for k in ("cond_lens", "self_lens", "cu_seqlens_q", "cu_seqlens_cond", "max_seqlen_q",
                                     "max_seqlen_cond", "scale")})
    return _override(args, over, gen)


def _mask(gen, *shape):
    return torch.rand(*shape, generator=gen) < 0.5


def _idx(*rows):
    return torch.tensor(rows, dtype=torch.int64)


def mask_args(gen, **over):
    args = dict(mask=_mask(gen, B, 6), count=3)
    return _override(args, over, gen)


def gather_args(gen, **over):
    args = dict(x=_rnd(gen, B, 6, 4), idx=_idx([0, 2, -1], [5, 1, 3]))
    return _override(args, over, gen)


def scatter_args(gen, **over):
    args = dict(a=_rnd(gen, B, 2, 4), idx_a=_idx([0, 3], [1, -1]), b=_rnd(gen, B, 3, 4), idx_b=_idx([1, 2, 4], [0, 2, 3]),
                seq_len=6)
    return _override(args, over, gen)


def _strided(*shape):
    """A float32 tensor whose last dimension has stride 2 (a view, not unit stride along head_dim)."""
    return lambda gen: _rnd(gen, *shape[:-1], 2 * shape[-1])[..., ::2]


# (id, op name, arguments builder, overrides); every row but the first is a bad call.
CASES = [
    ("valid-dense", "sc_attn_fwd", dense, {}),
    ("valid-packed", "sc_attn_fwd", packed, {}),
    ("valid-backward", "sc_attn_bwd", backward, {}),
    ("valid-mask", "mask_to_indices", mask_args, {}),
    ("valid-gather", "gather_rows", gather_args, {}),
    ("valid-scatter", "scatter_rows", scatter_args, {}),
    ("q-rank", "sc_attn_fwd", dense, dict(q=lambda g: _rnd(g, N, H * D))),
    ("q-dtype-int", "sc_attn_fwd", dense, {n: (lambda s: lambda g: torch.randint(0, 5, s, generator=g))(s) for n, s in
                                           (("q", (B, N, H, D)), ("k_cond", (B, NC, H, D)), ("v_cond", (B, NC, H, D)),
                                            ("k_self", (B, N, H, D)), ("v_self", (B, N, H, D)))}),
    ("k-cond-dtype", "sc_attn_fwd", dense, dict(k_cond=lambda g: _rnd(g, B, NC, H, D, dtype=torch.float64))),
    ("k-cond-rank", "sc_attn_fwd", dense, dict(k_cond=lambda g: _rnd(g, NC, H, D))),
    ("k-self-heads", "sc_attn_fwd", dense, dict(k_self=lambda g: _rnd(g, B, N, H + 1, D))),
    ("v-self-tokens", "sc_attn_fwd", dense, dict(v_self=lambda g: _rnd(g, B, N + 1, H, D))),
    ("v-cond-tokens", "sc_attn_fwd", dense, dict(v_cond=lambda g: _rnd(g, B, NC + 1, H, D))),
    ("k-cond-batch", "sc_attn_fwd", dense, dict(k_cond=lambda g: _rnd(g, B + 1, NC, H, D),
                                                v_cond=lambda g: _rnd(g, B + 1, NC, H, D))),
    ("head-dim-zero", "sc_attn_fwd", dense, {n: (lambda s: lambda g: torch.empty(s))(s) for n, s in
                                             (("q", (B, N, H, 0)), ("k_cond", (B, NC, H, 0)), ("v_cond", (B, NC, H, 0)),
                                              ("k_self", (B, N, H, 0)), ("v_self", (B, N, H, 0)))}),
    ("head-dim-stride", "sc_attn_fwd", dense, dict(k_cond=_strided(B, NC, H, D))),
    ("cond-lens-int64", "sc_attn_fwd", dense, dict(cond_lens=torch.tensor([3, 1]))),
    ("cond-lens-length", "sc_attn_fwd", dense, dict(cond_lens=_i32(3, 1, 0))),
    ("self-lens-rank", "sc_attn_fwd", dense, dict(self_lens=_i32(5, 2)[None])),
    ("self-lens-strided", "sc_attn_fwd", dense, dict(self_lens=_i32(5, 0, 2, 0)[::2])),
    ("dense-with-cu-seqlens", "sc_attn_fwd", dense, dict(cu_seqlens_q=_i32(0, 5, 10), cu_seqlens_cond=_i32(0, 3, 6))),
    ("packed-without-cu-seqlens", "sc_attn_fwd", packed, dict(cu_seqlens_q=None, cu_seqlens_cond=None)),
    ("packed-with-lens", "sc_attn_fwd", packed, dict(self_lens=_i32(3, 4))),
    ("cu-seqlens-int64", "sc_attn_fwd", packed, dict(cu_seqlens_q=torch.tensor([0, 3, 7]))),
    ("cu-seqlens-cond-length", "sc_attn_fwd", packed, dict(cu_seqlens_cond=_i32(0, 4))),
    ("cu-seqlens-empty", "sc_attn_fwd", packed, dict(cu_seqlens_q=_i32(), cu_seqlens_cond=_i32())),
    ("cu-seqlens-rank", "sc_attn_fwd", packed, dict(cu_seqlens_q=_i32(0, 3, 7)[None])),
    ("max-seqlen-negative", "sc_attn_fwd", packed, dict(max_seqlen_q=-1)),
    ("dense-max-seqlen-q", "sc_attn_fwd", dense, dict(max_seqlen_q=N + 1)),
    ("dense-max-seqlen-cond", "sc_attn_fwd", dense, dict(max_seqlen_cond=NC - 1)),
    ("bwd-dense-max-seqlen", "sc_attn_bwd", backward, dict(max_seqlen_q=N - 1)),
    ("bwd-dout-shape", "sc_attn_bwd", backward, dict(dout=lambda g: _rnd(g, B, N + 1, H, D))),
    ("bwd-out-dtype", "sc_attn_bwd", backward, dict(out=lambda g: _rnd(g, B, N, H, D, dtype=torch.float64))),
    ("bwd-lse-shape", "sc_attn_bwd", backward, dict(lse=lambda g: _rnd(g, B, N, H))),
    ("bwd-lse-dtype", "sc_attn_bwd", backward, dict(lse=lambda g: _rnd(g, B, H, N, dtype=torch.float64))),
    ("bwd-dlse-shape", "sc_attn_bwd", backward, dict(dlse=lambda g: _rnd(g, B, H, N + 1))),
    ("bwd-q-rank", "sc_attn_bwd", backward, dict(k_self=lambda g: _rnd(g, B * N, H, D))),
    ("mask-dtype", "mask_to_indices", mask_args, dict(mask=lambda g: _mask(g, B, 6).to(torch.uint8))),
    ("mask-rank", "mask_to_indices", mask_args, dict(mask=lambda g: _mask(g, B, 6, 1))),
    ("mask-strided", "mask_to_indices", mask_args, dict(mask=lambda g: _mask(g, B, 12)[:, ::2])),
    ("mask-count-negative", "mask_to_indices", mask_args, dict(count=-1)),
    ("gather-rank", "gather_rows", gather_args, dict(x=lambda g: _rnd(g, B, 6))),
    ("gather-strided", "gather_rows", gather_args, dict(x=lambda g: _rnd(g, B, 4, 6).transpose(1, 2))),
    ("gather-idx-int32", "gather_rows", gather_args, dict(idx=_idx([0, 2, -1], [5, 1, 3]).int())),
    ("gather-idx-batch", "gather_rows", gather_args, dict(idx=_idx([0, 2, -1]))),
    ("gather-idx-rank", "gather_rows", gather_args, dict(idx=_idx([0, 2, -1], [5, 1, 3])[..., None])),
    ("scatter-idx-a-length", "scatter_rows", scatter_args, dict(idx_a=_idx([0, 3, 4], [1, -1, 2]))),
    ("scatter-b-without-idx", "scatter_rows", scatter_args, dict(idx_b=None)),
    ("scatter-b-dtype", "scatter_rows", scatter_args, dict(b=lambda g: _rnd(g, B, 3, 4, dtype=torch.float64))),
    ("scatter-b-row-size", "scatter_rows", scatter_args, dict(b=lambda g: _rnd(g, B, 3, 5))),
    ("scatter-idx-b-length", "scatter_rows", scatter_args, dict(idx_b=_idx([1, 2], [0, 2]))),
    ("scatter-idx-b-batch", "scatter_rows", scatter_args, dict(idx_b=_idx([1, 2, 4]))),
    ("scatter-seq-len-negative", "scatter_rows", scatter_args, dict(seq_len=-1)),
]


ROUTING_OPS = ("mask_to_indices", "gather_rows", "scatter_rows")


def _interpreting() -> bool:
    from enat_kernels import triton as ek_triton

    return ek_triton.interpreting()


def _eager_outcome(op, args):
    """None if the eager CPU op accepts the call, else the type of its error."""
    try:
        op(**args)
    except Exception as e:  # noqa: BLE001  (the type is the result)
        return type(e)
    return None


def _fake(mode: FakeTensorMode, x, device: str):
    """A FakeTensor with x's shape, strides and dtype, on `device` (no such device needed)."""
    if not isinstance(x, torch.Tensor):
        return x
    meta = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
    return FakeTensor(mode, meta, torch.device(device))


@pytest.mark.parametrize("variant", ["cpu", "cuda", "triton"])
@pytest.mark.parametrize("case, op_name, build, over", [pytest.param(*c, id=c[0]) for c in CASES])
def test_fake_refuses_what_the_cpu_op_refuses(case, op_name, build, over, variant, gen):
    args = build(gen, **over)
    expected = _eager_outcome(getattr(OPS, op_name), args)
    assert (expected is None) == case.startswith("valid"), f"the eager CPU op gives {expected} for {case}"
    if variant == "triton":
        ops, err = _triton_ops()
        if ops is None:
            pytest.skip(err)
        op, device = ops[op_name], device_for("triton")
        if expected is None and op_name in ROUTING_OPS and _interpreting():
            # Under the interpreter the Triton routing ops have no fake of their own: their
            # body runs the kernels even on fake tensors.  A bad call is refused before any
            # launch (the other rows); tracing a valid call is test_routing.py's
            # test_triton_ops_trace_without_the_interpreter (where Triton can trace).
            pytest.skip("Triton routing ops do not trace under the interpreter")
    else:
        op, device = getattr(OPS, op_name), variant
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    fake_args = {k: _fake(mode, v, device) for k, v in args.items()}
    with mode:
        if expected is None:
            result = op(**fake_args)
            assert all(t.device.type == device for t in (result if isinstance(result, tuple) else (result,)))
        else:
            with pytest.raises(expected):
                op(**fake_args)


def test_the_table_covers_every_op():
    assert {c[1] for c in CASES} == {"sc_attn_fwd", "sc_attn_bwd", "mask_to_indices", "gather_rows", "scatter_rows"}
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("variant", ["compiled", "triton"])
def test_packed_fake_traces_max_seqlen_read_from_cu_seqlens(variant):
    # A compiled varlen step computes max_seqlen from cu_seqlens (`.item()`): the fake
    # must check it without taking the truth of a data-dependent value.
    if variant == "triton":
        ops, err = _triton_ops()
        if ops is None:
            pytest.skip(err)
        fwd = ops["sc_attn_fwd"]
    else:
        fwd = OPS.sc_attn_fwd

    def step(q, k, cu_q, cu_c):
        max_q = (cu_q[1:] - cu_q[:-1]).max().item()
        max_c = (cu_c[1:] - cu_c[:-1]).max().item()
        return fwd(q, k, k, q, q, None, None, cu_q, cu_c, max_q, max_c, 0.3)

    gen = torch.Generator().manual_seed(0)
    q, k = _rnd(gen, T, H, 16), _rnd(gen, TC, H, 16)  # a head_dim every backend has
    cu_q, cu_c = _i32(0, 3, 7), _i32(0, 4, 4)
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(capture_scalar_outputs=True):
            out, lse = torch.compile(step, fullgraph=True, backend="eager")(q, k, cu_q, cu_c)
    finally:
        torch._dynamo.reset()
    ref_out, ref_lse = step(q, k, cu_q, cu_c)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)
