"""Hostile input to the public API: nothing may crash, hang or touch memory it does not own.

Every case runs twice, with value checks on and off, and states what it expects in
each mode: a clean exception (its type), or a run that finishes ("ok"; a case may
also assert on the result).  The cases run in child processes (this file run as a
script), many per process, so that a crash (a segfault, a sanitizer report, a heap
abort) fails the case that caused it instead of killing the test runner; after a
crash the remaining cases go on in a fresh child.  Under the sanitizer CI leg
(.ci/sanitize-leg.sh) the children inherit the preloaded AddressSanitizer runtime, so
an out-of-bounds access anywhere in the compiled CPU kernels fails its case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

I32, I64 = torch.int32, torch.int64
HUGE = 2**63 - 1
HERE = Path(__file__).resolve()

# Backends exercised here: those that run without a GPU, plus the GPU ones on a GPU.
BACKENDS = ["cpu", "torch"] + (["triton", "cuda"] if torch.cuda.is_available() else [])


def _dev(backend):
    return "cuda" if backend in ("triton", "cuda") else "cpu"


def _dtype(backend):
    return torch.float16 if backend == "cuda" else torch.float32


# ----------------------------------------------------------------------------- inputs


def _packed(backend, T=8, Tc=6, H=2, D=16, grad=True):
    g = torch.Generator().manual_seed(T * 100 + Tc)
    r = lambda n: torch.randn(n, H, D, generator=g).to(_dev(backend), _dtype(backend)).requires_grad_(grad)  # noqa: E731
    return r(T), r(Tc), r(Tc), r(T), r(T)


def _dense(backend, B=2, N=5, Nc=4, H=2, D=16, grad=True):
    g = torch.Generator().manual_seed(B * 100 + N)
    r = lambda n: torch.randn(B, n, H, D, generator=g).to(_dev(backend), _dtype(backend)).requires_grad_(grad)  # noqa: E731
    return r(N), r(Nc), r(Nc), r(N), r(N)


def _cu(backend, *offsets, dtype=I32):
    return torch.tensor(offsets, dtype=dtype, device=_dev(backend))


def _fwd_bwd(out):
    """Backward through out (and through lse when given): both kernels run."""
    if isinstance(out, tuple):
        out, lse = out
        (out.sum() + lse.masked_fill(lse.isinf(), 0).sum()).backward()
    else:
        out.sum().backward()
    return out


def _varlen(backend, cu_q=(0, 3, 8), cu_c=(0, 2, 6), max_q=5, max_c=4, T=8, Tc=6, **kw):
    import enat_kernels as ek

    q, kc, vc, ks, vs = _packed(backend, T, Tc)
    cq = cu_q if isinstance(cu_q, torch.Tensor) else _cu(backend, *cu_q)
    cc = cu_c if isinstance(cu_c, torch.Tensor) else _cu(backend, *cu_c)
    out = ek.sc_attention_varlen(q, kc, vc, ks, vs, cq, cc, max_q, max_c, return_lse=True, backend=backend, **kw)
    return _fwd_bwd(out)


def _attn(backend, cond_lens=None, self_lens=None, **over):
    import enat_kernels as ek

    q, kc, vc, ks, vs = _dense(backend)
    args = dict(q=q, k_cond=kc, v_cond=vc, k_self=ks, v_self=vs)
    args.update(over)
    def as_lens(x):  # lists become tensors on the backend's device; tensors stay as given
        return x if x is None or isinstance(x, torch.Tensor) else torch.as_tensor(x, device=_dev(backend))

    out = ek.sc_attention(**args, cond_lens=as_lens(cond_lens), self_lens=as_lens(self_lens), return_lse=True, backend=backend)
    return _fwd_bwd(out)


def _finite_owned(out, rows):
    assert torch.isfinite(out[rows]).all(), "rows a sequence owns must be finite"


def _owned_finite_rest_zero(backend, out, owned):
    """Rows in `owned` are finite; every other row is 0 where the backend writes rows
    no sequence owns (torch, cpu; docs/KERNEL_CONTRACT.md names the GPU kernels' gap)."""
    mask = torch.zeros(out.shape[0], dtype=torch.bool)
    mask[list(owned)] = True
    out = out.detach().cpu()
    assert torch.isfinite(out[mask]).all(), "rows a sequence owns must be finite"
    if backend in ("torch", "cpu"):
        assert torch.equal(out[~mask], torch.zeros_like(out[~mask])), "rows no sequence owns must be zeros"


def _clamped_lens_match(backend, cond_lens, self_lens):
    """Checks off: int64 lengths act as clamped to [0, Nc] / [0, N], in 64 bits."""
    import enat_kernels as ek
    from enat_kernels.reference import sc_attention_ref

    q, kc, vc, ks, vs = _dense(backend, grad=False)
    dev = _dev(backend)
    cl, sl = torch.tensor(cond_lens, dtype=I64, device=dev), torch.tensor(self_lens, dtype=I64, device=dev)
    out = ek.sc_attention(q, kc, vc, ks, vs, cond_lens=cl, self_lens=sl, backend=backend)
    want, _ = sc_attention_ref(q, kc, vc, ks, vs, cl.clamp(0, kc.shape[1]), sl.clamp(0, q.shape[1]))
    tol = 2e-3 if _dtype(backend) == torch.float16 else 2e-5
    torch.testing.assert_close(out, want, atol=tol, rtol=tol)


def _with_nonfinite(backend, which, value):
    import enat_kernels as ek

    q, kc, vc, ks, vs = _dense(backend, grad=False)
    t = {"q": q, "k_cond": kc, "v_cond": vc, "k_self": ks, "v_self": vs}
    t[which][0, 1, 0, 3] = value
    out = ek.sc_attention(*t.values(), backend=backend)
    assert out.shape == q.shape
    assert torch.isfinite(out[1]).all(), "a non-finite value in batch row 0 must not reach row 1"


def _routing(fn, *args, **kw):
    import enat_kernels as ek

    return getattr(ek, fn)(*args, **kw)


# ----------------------------------------------------------------------------- cases

# id -> (function(backend), expected with value checks on, expected with them off).
# Expected: an exception's type name, or "ok".
CASES: dict = {}


def case(name, on, off=None):
    def register(fn):
        CASES[name] = (fn, on, on if off is None else off)
        return fn

    return register


def _op_direct(backend, max_q, max_c):
    """The compiled op called directly (no Python checks): the adapter must cap max_seqlen."""
    if backend != "cpu":
        return  # the CUDA adapter refuses max_seqlen beyond int32 instead; other backends have no such op
    q, kc, vc, ks, vs = _packed(backend)
    cq, cc = _cu(backend, 0, 3, 8), _cu(backend, 0, 2, 6)
    out, lse = torch.ops.enat_kernels.sc_attn_fwd(q, kc, vc, ks, vs, None, None, cq, cc, max_q, max_c, 0.25)
    want = torch.ops.enat_kernels.sc_attn_fwd(q, kc, vc, ks, vs, None, None, cq, cc, 5, 4, 0.25)
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])
    (out.sum() + lse.sum()).backward()


def _define():
    V, T, OK = "ValueError", "TypeError", "ok"

    # max_seqlen far above and below the truth, negative, huge.
    case("max-seqlen-int64-max", V)(lambda b: _varlen(b, max_q=HUGE))
    case("max-seqlen-cond-int64-max", V)(lambda b: _varlen(b, max_c=HUGE))
    case("max-seqlen-2^40", V)(lambda b: _varlen(b, max_q=2**40))
    case("max-seqlen-T-plus-1", V)(lambda b: _varlen(b, max_q=9))
    case("max-seqlen-negative", V)(lambda b: _varlen(b, max_q=-1))
    case("max-seqlen-int64-min", V)(lambda b: _varlen(b, max_c=-(2**63)))
    case("max-seqlen-far-below", V, OK)(lambda b: _owned_finite_rest_zero(b, _varlen(b, max_q=1, max_c=1), (0, 3)))
    case("max-seqlen-zero", V, OK)(lambda b: _varlen(b, max_q=0, max_c=0))
    case("max-seqlen-float", T)(lambda b: _varlen(b, max_q=5.0))
    case("op-direct-max-seqlen-huge", OK)(lambda b: _op_direct(b, HUGE, HUGE))
    # cu_seqlens: non-monotonic, negative, past the end, huge, wrong dtype/rank/device.
    case("cu-non-monotonic", V, OK)(
        lambda b: _finite_owned(_varlen(b, cu_q=(0, 6, 2, 8), cu_c=(0, 1, 2, 6), max_q=8, max_c=4), slice(0, 6)))
    case("cu-negative", V, OK)(lambda b: _varlen(b, cu_q=(0, -5, 8), max_q=8))
    case("cu-int32-max", V, OK)(lambda b: _varlen(b, cu_q=(0, 2**31 - 1, 8), cu_c=(0, -(2**31), 6), max_q=8, max_c=6))
    case("cu-start-not-zero", V, OK)(lambda b: _varlen(b, cu_q=(3, 3, 8)))
    case("cu-int64", T)(lambda b: _varlen(b, cu_q=_cu(b, 0, 3, 8, dtype=I64)))
    case("cu-float", T)(lambda b: _varlen(b, cu_c=_cu(b, 0, 2, 6).float()))
    case("cu-rank-2", V)(lambda b: _varlen(b, cu_q=_cu(b, 0, 3, 8)[None]))
    case("cu-meta", V)(lambda b: _varlen(b, cu_q=_cu(b, 0, 3, 8).to("meta")))
    case("cu-empty", V)(lambda b: _varlen(b, cu_q=_cu(b, 0)[:0], cu_c=_cu(b, 0)[:0]))
    case("cu-batch-mismatch", V)(lambda b: _varlen(b, cu_c=(0, 6)))
    case("varlen-empty", OK)(lambda b: _varlen(b, cu_q=(0,), cu_c=(0,), max_q=0, max_c=0, T=0, Tc=0))
    # Dense lengths: int64 beyond int32, negative, huge; wrong dtype/rank/device.
    case("lens-int64-2^32+1", V, OK)(lambda b: _clamped_lens_match(b, [2**32 + 1, 2], [2**32 + 1, 3]))
    case("lens-int64-minus-2^33", V, OK)(lambda b: _clamped_lens_match(b, [-(2**33), 4], [-(2**33), 5]))
    case("lens-int64-extremes", V, OK)(lambda b: _clamped_lens_match(b, [HUGE, -(2**63)], [-(2**63), HUGE]))
    case("lens-int32-extremes", V, OK)(
        lambda b: _attn(
            b, cond_lens=torch.tensor([2**31 - 1, -(2**31)], dtype=I32), self_lens=torch.tensor([-(2**31), 2**31 - 1], dtype=I32)
        )
    )
    case("lens-float", T)(lambda b: _attn(b, cond_lens=torch.tensor([1.0, 2.0])))
    case("lens-bool", T)(lambda b: _attn(b, self_lens=torch.tensor([True, False])))
    case("lens-rank-0", V)(lambda b: _attn(b, cond_lens=torch.tensor(3)))
    case("lens-rank-2", V)(lambda b: _attn(b, self_lens=torch.tensor([[1, 2]])))
    case("lens-meta", V)(lambda b: _attn(b, cond_lens=torch.tensor([1, 2], device="meta")))
    case("lens-batch", V)(lambda b: _attn(b, cond_lens=[1, 2, 3]))
    # Every tensor argument: wrong dtype, rank, device.
    for name in ("q", "k_cond", "v_cond", "k_self", "v_self"):
        case(f"{name}-int-dtype", T)(
            lambda b, n=name: _attn(b, **{n: torch.ones(2, 5 if n in ("q", "k_self", "v_self") else 4, 2, 16, dtype=I64)})
        )
        case(f"{name}-float64-mixed", T)(
            lambda b, n=name: _attn(b, **{n: torch.randn(2, 5 if n in ("q", "k_self", "v_self") else 4, 2, 16, dtype=torch.float64)})
        )
        case(f"{name}-rank-3", V)(lambda b, n=name: _attn(b, **{n: torch.randn(2, 5, 32)}))
        case(f"{name}-rank-5", V)(lambda b, n=name: _attn(b, **{n: torch.randn(2, 5, 2, 16, 1)}))
        case(f"{name}-meta", V)(
            lambda b, n=name: _attn(b, **{n: torch.randn(2, 5 if n in ("q", "k_self", "v_self") else 4, 2, 16, device="meta")})
        )
        case(f"{name}-not-tensor", T)(lambda b, n=name: _attn(b, **{n: [[1.0]]}))
    case("head-dim-mismatch", V)(lambda b: _attn(b, k_self=torch.randn(2, 5, 2, 8)))
    case("zero-batch", OK)(lambda b: _attn(b, **dict(zip(("q", "k_cond", "v_cond", "k_self", "v_self"), _dense(b, B=0)))))
    case("zero-tokens", OK)(lambda b: _attn(b, **dict(zip(("q", "k_cond", "v_cond", "k_self", "v_self"), _dense(b, N=0, Nc=0)))))
    # scale: extreme finite values run, non-finite ones are refused.
    for s in (1e30, -1e30, 1e-45, 0.0):
        case(f"scale-{s}", OK)(lambda b, s=s: _attn(b, scale=s))
    for s in (float("nan"), float("inf"), -float("inf")):
        case(f"scale-{s}", V)(lambda b, s=s: _attn(b, scale=s))
    case("scale-huge-int", OK)(lambda b: _attn(b, scale=10**30))
    case("scale-beyond-float", V)(lambda b: _attn(b, scale=10**400))
    # NaN / Inf data: no crash, and it stays in its batch row.
    for which in ("q", "k_cond", "v_cond", "k_self", "v_self"):
        for val in (float("nan"), float("inf"), -float("inf")):
            case(f"{which}-holds-{val}", OK)(lambda b, w=which, v=val: _with_nonfinite(b, w, v))

    # Token routing: huge and negative sizes, indices out of range, wrong dtypes.
    def x(b):
        return torch.randn(2, 5, 3, device=_dev(b))

    def ind(b, *rows, dtype=I64):
        return torch.tensor(rows, dtype=dtype, device=_dev(b))

    def mask(b):
        return torch.tensor([[1, 0, 1, 0, 0], [0, 1, 1, 0, 1]], dtype=torch.bool, device=_dev(b))

    case("gather-index-huge", V, OK)(lambda b: _routing("gather_tokens", x(b), ind(b, [0, 2**62], [HUGE, -(2**63)]), backend=b))
    case("gather-index-negative", V, OK)(lambda b: _routing("gather_tokens", x(b), ind(b, [0, -5], [1, 2]), backend=b))
    case("gather-index-int32", T)(lambda b: _routing("gather_tokens", x(b), ind(b, [0, 1], [1, 2], dtype=I32), backend=b))
    case("gather-index-float", T)(lambda b: _routing("gather_tokens", x(b), ind(b, [0, 1], [1, 2]).float(), backend=b))
    case("gather-index-rank-1", V)(lambda b: _routing("gather_tokens", x(b), ind(b, 0, 1), backend=b))
    case("scatter-index-huge", V, OK)(
        lambda b: _routing("scatter_tokens", x(b), ind(b, [0, 1, 2**40, 3, 4], [HUGE, 1, 2, 3, -9]), 5, backend=b)
    )
    case("scatter-seq-len-huge", V)(lambda b: _routing("scatter_tokens", x(b), ind(b, [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]), HUGE, backend=b))
    case("scatter-seq-len-2^40", V)(lambda b: _routing("scatter_tokens", x(b), ind(b, [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]), 2**40, backend=b))
    case("scatter-seq-len-negative", V)(lambda b: _routing("scatter_tokens", x(b), ind(b, [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]), -1, backend=b))
    case("scatter-duplicates", V, OK)(lambda b: _routing("scatter_tokens", x(b), ind(b, [0, 0, 0, 0, 0], [4, 4, 4, 4, 4]), 5, backend=b))
    case("mask-count-huge", V)(lambda b: _routing("mask_to_indices", mask(b), HUGE, backend=b))
    case("mask-count-negative", V)(lambda b: _routing("mask_to_indices", mask(b), -3, backend=b))
    case("mask-count-too-small", V, OK)(lambda b: _routing("mask_to_indices", mask(b), 1, backend=b))
    case("mask-int", T)(lambda b: _routing("mask_to_indices", mask(b).long(), 3, backend=b))
    case("split-num-true-huge", V)(lambda b: _routing("split_tokens", x(b), mask(b), HUGE, backend=b))
    case("split-num-false-negative", V)(lambda b: _routing("split_tokens", x(b), mask(b), 3, -2, backend=b))
    case("merge-unsorted", V, OK)(
        lambda b: _routing("merge_tokens", x(b)[:, :2], ind(b, [4, 1], [3, -1]), x(b)[:, :3], ind(b, [2, 0, 1 << 50], [1, 0, 2]), backend=b)
    )


_define()


# ----------------------------------------------------------------------------- child


def _child(names: list[str]) -> None:
    """Run the named cases (both modes each), one JSON line per result; a crash cuts the stream."""
    import enat_kernels as ek

    for spec in names:
        name, backend, mode = spec.split("|")
        print(json.dumps({"start": spec}), flush=True)
        fn = CASES[name][0]
        try:
            with ek.value_checks(mode == "on"):
                fn(backend)
            got, msg = "ok", ""
        except Exception as e:  # noqa: BLE001  the type is the result
            got, msg = type(e).__name__, str(e)[:300]
        print(json.dumps({"done": spec, "got": got, "msg": msg}), flush=True)


def run_batch(specs: list[str], timeout: float = 600) -> dict:
    """Results per spec; a spec whose child died is reported as such, the rest rerun."""
    results: dict = {}
    pending = list(specs)
    while pending:
        proc = subprocess.run(
            [sys.executable, str(HERE), *pending],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        )
        started = None
        for line in proc.stdout.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "start" in rec:
                started = rec["start"]
            else:
                results[rec["done"]] = (rec["got"], rec["msg"])
                started = None
        if started is None and proc.returncode == 0:
            break
        crashed = started if started is not None else next(s for s in pending if s not in results)
        results[crashed] = ("crash", f"child exited with {proc.returncode}: {proc.stderr[-3000:]}")
        pending = [s for s in pending if s not in results]
    return results


if os.environ.get("ENAT_ADVERSARIAL_EXTRA_ABORT") == "1":
    CASES["_abort"] = (lambda b: os.abort(), "ok", "ok")

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
    _child(sys.argv[1:])
    sys.exit(0)


# ----------------------------------------------------------------------------- tests

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def results(request):
    """One batch for the cases this session selected (all of them without -k)."""
    specs = [
        f"{it.callspec.params['name']}|{it.callspec.params['backend']}|{mode}"
        for it in request.session.items
        if it.path == request.path and hasattr(it, "callspec") and "name" in it.callspec.params
        for mode in ("on", "off")
    ]
    return run_batch(specs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_case(results, name, backend):
    for mode in ("on", "off"):
        expected = CASES[name][1 if mode == "on" else 2]
        got, msg = results[f"{name}|{backend}|{mode}"]
        assert got == expected, f"value checks {mode}: expected {expected}, got {got}: {msg}"


def test_a_crash_is_a_failed_case_not_a_dead_runner(monkeypatch):
    """The harness itself: a child that aborts on one case still reports the others."""
    # The child defines its cases by importing this file: the variable adds the abort case.
    monkeypatch.setenv("ENAT_ADVERSARIAL_EXTRA_ABORT", "1")
    got = run_batch(["zero-batch|cpu|on", "_abort|cpu|on", "zero-batch|cpu|off"])
    assert got["_abort|cpu|on"][0] == "crash"
    assert got["zero-batch|cpu|on"][0] == "ok" and got["zero-batch|cpu|off"][0] == "ok"
