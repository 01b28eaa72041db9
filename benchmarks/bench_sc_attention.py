"""SC-Attention, forward and forward+backward: this library's backends next to the anchors.

One pytest-benchmark group per (direction, shape); in it every path of
_attention_paths.py.  Before timing, each path's result on the first input copy is
compared with the float32 reference (outputs on valid rows; gradients too for the
paths whose inputs are the five tensors), so a path that computes something else is
never timed.  See benchmarks/README.md for the commands.
"""

from __future__ import annotations

import pytest
import torch

from enat_kernels.reference import sc_attention_ref

from ._attention_paths import AttnCase, Unsupported, attention_paths
from ._cases import ATTN_SHAPES, active
from ._costs import attention_cost
from ._env import DEVICE, measure, record

PATHS = attention_paths(DEVICE.type)

# Relative tolerance of the sanity check (max error over max |reference|): loose,
# it catches wrong masks and layouts (errors of order 1), not rounding.
TOL = {torch.float32: 2e-3, torch.float16: 3e-2, torch.bfloat16: 4e-2}
GRAD_TOL = {torch.float32: 5e-3, torch.float16: 6e-2, torch.bfloat16: 8e-2}


def _cases():
    # Shape outermost: the per-shape context (block mask, compiled graphs, reference
    # results) is reused by all paths of a shape before the next one is built.
    return [pytest.param(shape, path, id=f"{shape.id}-{path.name}") for shape in active(ATTN_SHAPES) for path in PATHS]


_CONTEXT: dict = {}  # the current shape's AttnCase and reference results, one shape at a time


def _context(shape, env) -> dict:
    if _CONTEXT.get("shape") != shape:
        _CONTEXT.clear()
        _CONTEXT.update(shape=shape, case=AttnCase(shape, env))
    return _CONTEXT


def _expected(ctx: dict, x: tuple, dout: torch.Tensor | None):
    """float32 reference output (and gradients of the five inputs given dout), cached per shape."""
    key = "ref_bwd" if dout is not None else "ref_fwd"
    if key not in ctx:
        case = ctx["case"]
        leaves = [t.detach().float().requires_grad_(dout is not None) for t in x]
        out, _ = sc_attention_ref(*leaves, case.cond_lens, case.self_lens, case.scale)
        grads = torch.autograd.grad(out, leaves, dout.float()) if dout is not None else None
        ctx[key] = (out.detach(), grads)
    return ctx[key]


def _check(what: str, got: torch.Tensor, want: torch.Tensor, tol: float, rows: torch.Tensor | None = None):
    got, want = got.detach().float(), want.float()
    if rows is not None:  # padded query rows are not data (anchors leave garbage there)
        got, want = got[rows], want[rows]
    if want.numel() == 0:
        return
    err = (got - want).abs().max().item()
    ref = want.abs().max().item()
    assert err <= tol * max(ref, 1e-6), f"{what}: max error {err:.3g} vs max |reference| {ref:.3g} (tolerance {tol:g} relative)"


def checked_call(ctx: dict, path, env, backward: bool):
    """call(i): path's forward (and backward) on input copy i, after checking copy 0
    against the reference; and the number of copies.  Call inside path.context().

    Raises Unsupported when the path refuses the inputs.  Shared with paired.py.
    """
    case: AttnCase = ctx["case"]
    n = env.copies_for(case.bytes_per_copy(backward))
    raw = [case.inputs(seed=i) for i in range(n)]
    leaves = [path.prepare(case, x) for x in raw]
    if backward:
        leaves = [tuple(t.detach().requires_grad_() for t in lv) for lv in leaves]
        dense_douts = [case.dout(seed=i) for i in range(n)]
        douts = [path.path_dout(case, d) for d in dense_douts]
    out = path.forward(case, *leaves[0])
    want_out, want_grads = _expected(ctx, raw[0], dense_douts[0] if backward else None)
    _check(f"{path.name} output", path.dense_out(case, out), want_out, TOL[env.dtype], case.q_valid)
    if backward and path.canonical_leaves:
        grads = torch.autograd.grad(out, leaves[0], douts[0])
        for name, g, w in zip(("dq", "dk_cond", "dv_cond", "dk_self", "dv_self"), grads, want_grads):
            _check(f"{path.name} {name}", g, w, GRAD_TOL[env.dtype])

    def call(i: int):
        o = path.forward(case, *leaves[i % n])
        return torch.autograd.grad(o, leaves[i % n], douts[i % n]) if backward else o

    return call, n


def _run(benchmark, env, shape, path, direction: str):
    backward = direction == "fwd+bwd"
    ctx = _context(shape, env)
    case: AttnCase = ctx["case"]
    reason = path.unavailable(case, backward)
    if reason:
        pytest.skip(reason)
    benchmark.group = f"sc_attention {direction} | {shape.label}"
    with path.context():
        try:
            call, n = checked_call(ctx, path, env, backward)
        except Unsupported as e:
            pytest.skip(str(e))
        timing = measure(benchmark, call, n, env)

    flops, nbytes = attention_cost(
        shape.B, shape.Nq, shape.Nc, shape.H, shape.D, env.dtype.itemsize,
        direction=direction, cond_lens=case.cond_lens_list, self_lens=case.self_lens_list,
    )
    record(
        benchmark, env,
        op="sc_attention", direction=direction, case=shape.id, case_label=shape.label,
        shape={"B": shape.B, "Nq": shape.Nq, "Nc": shape.Nc, "H": shape.H, "D": shape.D, "ragged": shape.ragged},
        path=path.name, role=path.role, family=path.family, concat_counted=path.concat_counted,
        flops=flops, bytes=nbytes, **path.extra(case), **timing,
    )


@pytest.mark.parametrize("shape,path", _cases())
def test_sc_attention_fwd(benchmark, bench_env, shape, path):
    _run(benchmark, bench_env, shape, path, "fwd")


@pytest.mark.parametrize("shape,path", _cases())
def test_sc_attention_fwd_bwd(benchmark, bench_env, shape, path):
    _run(benchmark, bench_env, shape, path, "fwd+bwd")
