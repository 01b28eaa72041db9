"""CUDA C++ SC-Attention: what the shared suite (test_sc_attention.py) does not cover.

Three parts:

- The build: the compiled extension registers CUDA kernels for sc_attn_fwd / sc_attn_bwd
  (skips only when the CUDA extension was not built).
- The kernel bodies on the host emulator (no GPU needed): csrc/cuda/sc_attention_emu/
  compiles the very kernel code of csrc/cuda/sc_attention_kernels.cuh against host
  implementations of mma.sync / ldmatrix / cp.async written from the PTX ISA, which also
  check shared-memory races, reads of unwritten or not yet landed shared memory, and
  global accesses outside the tensors.  Outputs start as NaN.  Compared with the float64
  oracle under the same accuracy rule as the shared suite.
- GPU-only behaviour (skips without a GPU): non-default streams, CUDA graph capture and
  replay, large shapes spanning many tiles of both segments, bitwise-reproducible
  backward, misaligned inputs, errors of the op itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import enat_kernels as ek
from enat_kernels import _extension
from enat_kernels.reference import sc_attention_ref, sc_attention_varlen_ref
from support.attention_cases import CASES, VARLEN_CASES, AttnCase, make_inputs, make_varlen_inputs
from support.attention_checks import forward_backward
from support.backends import HAS_CUDA
from support.paths import REPO as ROOT
from support.tolerances import assert_within_pytorch_error
from support.unowned_rows import assert_unowned_rows, spare_rows_inputs

EMU_SRC = ROOT / "csrc" / "cuda" / "sc_attention_emu" / "emu_main.cpp"
GRADS = ("dq", "dk_cond", "dv_cond", "dk_self", "dv_self")

sys.path.insert(0, str(ROOT / "build_backend"))
import cuda_variants  # noqa: E402  (setup.py's reader of csrc/cuda/sc_attention_variants.h)

sys.path.pop(0)
# The variant list (csrc/cuda/sc_attention_variants.h): the emulated tests run each.
HEAD_DIMS, _DTYPE_NAMES = cuda_variants.read_variants()
LOWP = [getattr(torch, n) for n in _DTYPE_NAMES]


def _dtype_id(d):
    return str(d).replace("torch.", "")


# ----------------------------------------------------------------------------- build


def test_extension_registers_cuda_kernels():
    info = _extension.build_info()
    if not info.get("CUDA_BUILT"):
        pytest.skip(f"the CUDA extension was not built: {info.get('CUDA_SKIP_REASON', 'no build info')}")
    assert _extension.cuda_extension_error() is None, _extension.cuda_extension_error()
    assert _extension.has_kernel("sc_attn_fwd", "CUDA")
    assert _extension.has_kernel("sc_attn_bwd", "CUDA")


# ----------------------------------------------------------------------------- emulator


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    """Path of the emulator binary, compiled once per session (skips without a C++20 compiler)."""
    return _build_emulator(tmp_path_factory.mktemp("sc_attn_emu") / "sc_attn_emu")


def _build_emulator(out: Path, include_first: Path | None = None) -> Path:
    """Compiles the emulator into `out`; headers under `include_first` replace those of csrc/."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the kernel emulator")
    includes = ([f"-I{include_first}"] if include_first else []) + [f"-I{ROOT / 'csrc'}"]
    cmd = [cxx, "-std=c++20", "-O2", "-Wno-unknown-pragmas", *includes, str(EMU_SRC), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"building the emulator failed:\n{r.stderr[-4000:]}"
    return out


def _span_bytes(t: torch.Tensor) -> bytes:
    """The elements a strided view spans, from its first one (what a kernel may address)."""
    if t.numel() == 0:
        return b""
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    flat = torch.as_strided(t, (span,), (1,), t.storage_offset())
    return flat.contiguous().view(torch.int16).numpy().tobytes()


def _raw(t: torch.Tensor) -> bytes:
    t = t.contiguous()
    return (t.view(torch.int16) if t.dtype in LOWP else t).numpy().tobytes()


def emulate(exe, workdir: Path, op, inputs, *, lens=(None, None), cu=(None, None), max_q, max_c, scale, extra=None):
    """Run op ("fwd" or "bwd") of the kernels on the emulator; returns a reader of its outputs.

    inputs: (q, k_cond, v_cond, k_self, v_self) CPU tensors, dense or packed, any strides
    with unit head_dim stride (as the adapter passes them).  lens: (self_lens, cond_lens);
    cu: (cu_seqlens_q, cu_seqlens_cond); extra: out, dout, lse, dlse for "bwd".
    """
    q, kc = inputs[0], inputs[1]
    packed = q.dim() == 3
    B = cu[0].numel() - 1 if packed else q.shape[0]
    workdir.mkdir(parents=True, exist_ok=True)
    spec = {
        "op": op,
        "dtype": _dtype_id(q.dtype),
        "head_dim": q.shape[-1],
        "batch": B,
        "heads": q.shape[-2],
        "max_q": max_q,
        "max_c": max_c,
        "total_q": q.shape[0] if packed else 0,
        "total_c": kc.shape[0] if packed else 0,
        "scale": repr(float(scale)),
    }
    lines = [f"{k} {v}" for k, v in spec.items()]
    for name, t in zip(("q", "k_cond", "v_cond", "k_self", "v_self"), inputs):
        st = (0,) + tuple(t.stride()[:2]) if packed else tuple(t.stride()[:3])
        lines.append(f"strides_{name} " + " ".join(map(str, st)))
        (workdir / f"{name}.bin").write_bytes(_span_bytes(t))
    named = dict(zip(("self_lens", "cond_lens", "cu_q", "cu_c"), tuple(lens) + tuple(cu)))
    for name, t in named.items():
        if t is not None:
            (workdir / f"{name}.bin").write_bytes(t.to(torch.int32).contiguous().numpy().tobytes())
    for name, t in (extra or {}).items():
        if t is not None:
            (workdir / f"{name}.bin").write_bytes(_raw(t))
    (workdir / "spec.txt").write_text("\n".join(lines) + "\n")
    r = subprocess.run([str(exe), str(workdir)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"emulated {op} kernel failed (status {r.returncode}):\n{r.stderr[-4000:]}"

    def result(name, shape, dtype):
        raw = np.fromfile(workdir / f"res_{name}.bin", dtype=np.float32 if dtype == torch.float32 else np.int16)
        t = torch.from_numpy(raw.copy())
        return (t if dtype == torch.float32 else t.view(dtype)).reshape(shape)

    return result


def _check_all(got: dict, ref, inputs, dout, dlse, dtype):
    lowp = forward_backward(ref, inputs, dout, dlse)
    oracle = forward_backward(ref, [t.double() for t in inputs], dout.double(), None if dlse is None else dlse.double())
    for i, name in enumerate(("out", "lse") + GRADS):
        assert_within_pytorch_error(name, got[name], lowp[i], oracle[i], dtype)


def _emulate_fwd_bwd(exe, workdir, inputs, dout, dlse, *, lens=(None, None), cu=(None, None), max_q, max_c, scale):
    """Forward then backward on the emulator (the backward gets the emulated out and lse)."""
    q, kc = inputs[0], inputs[1]
    H = q.shape[-2]
    lse_shape = (H, q.shape[0]) if q.dim() == 3 else (q.shape[0], H, q.shape[1])
    kw = dict(lens=lens, cu=cu, max_q=max_q, max_c=max_c, scale=scale)
    res = emulate(exe, workdir / "fwd", "fwd", inputs, **kw)
    out, lse = res("out", q.shape, q.dtype), res("lse", lse_shape, torch.float32)
    res = emulate(exe, workdir / "bwd", "bwd", inputs, extra=dict(out=out, dout=dout, lse=lse, dlse=dlse), **kw)
    got = {"out": out, "lse": lse}
    for name, like in zip(GRADS, (q, kc, kc, q, q)):
        got[name] = res(name, like.shape, q.dtype)
    # delta = rowsum(dout * out) - dlse on valid rows: checked through the gradients.
    return got


# Cases beyond the shared list: at least three tiles in each segment (the race checks on
# the double buffers need a buffer to be refilled), and lengths that are not tile multiples.
EMU_EXTRA_CASES = [
    AttnCase("multi_tile_d64", B=1, N=150, Nc=200, H=1, D=64, cond_lens=(190,), self_lens=(141,)),
    AttnCase("multi_tile_d128", B=1, N=100, Nc=130, H=1, D=128, cond_lens=(129,), self_lens=(97,)),
    AttnCase("multi_tile_d32", B=2, N=140, Nc=70, H=1, D=32, cond_lens=(70, 3), self_lens=(140, 66)),
    AttnCase("negative_scale", B=1, N=40, Nc=21, H=2, D=64, scale=-0.2),
]


@pytest.mark.parametrize("dtype", LOWP, ids=_dtype_id)
@pytest.mark.parametrize("case", CASES + EMU_EXTRA_CASES, ids=str)
def test_emulated_dense(emulator, tmp_path, case, dtype, gen):
    q, kc, vc, ks, vs, cl, sl = make_inputs(case, dtype, "cpu", gen)
    B, N, H, D = q.shape
    dout = torch.randn(q.shape, generator=gen).to(dtype)
    dlse = torch.randn(B, H, N, generator=gen)
    scale = case.scale if case.scale is not None else D**-0.5
    inputs = (q, kc, vc, ks, vs)
    got = _emulate_fwd_bwd(emulator, tmp_path, inputs, dout, dlse, lens=(sl, cl), max_q=N, max_c=kc.shape[1], scale=scale)
    _check_all(got, lambda *x: sc_attention_ref(*x, cl, sl, case.scale), inputs, dout, dlse, dtype)


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("ragged", "views")], ids=str)
def test_emulated_dense_without_dlse(emulator, tmp_path, case, gen):
    """The backward with dlse absent (only `out` was used)."""
    dtype = torch.float16
    q, kc, vc, ks, vs, cl, sl = make_inputs(case, dtype, "cpu", gen)
    N, D = q.shape[1], q.shape[3]
    dout = torch.randn(q.shape, generator=gen).to(dtype)
    inputs = (q, kc, vc, ks, vs)
    got = _emulate_fwd_bwd(emulator, tmp_path, inputs, dout, None, lens=(sl, cl), max_q=N, max_c=kc.shape[1], scale=D**-0.5)
    _check_all(got, lambda *x: sc_attention_ref(*x, cl, sl), inputs, dout, None, dtype)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("case", list(VARLEN_CASES), ids=str)
def test_emulated_varlen(emulator, tmp_path, case, head_dim, gen):
    dtype = LOWP[HEAD_DIMS.index(head_dim) % len(LOWP)]  # the listed dtypes in turn
    q_lens, c_lens = VARLEN_CASES[case]
    q, kc, vc, ks, vs, cu_q, cu_c, mq, mc = make_varlen_inputs(q_lens, c_lens, 2, head_dim, dtype, "cpu", gen)
    dout = torch.randn(q.shape, generator=gen).to(dtype)
    dlse = torch.randn(2, q.shape[0], generator=gen)
    inputs = (q, kc, vc, ks, vs)
    got = _emulate_fwd_bwd(emulator, tmp_path, inputs, dout, dlse, cu=(cu_q, cu_c), max_q=mq, max_c=mc, scale=head_dim**-0.5)
    _check_all(got, lambda *x: sc_attention_varlen_ref(*x, cu_q, cu_c, mq, mc), inputs, dout, dlse, dtype)


def test_emulated_varlen_loose_max_seqlen(emulator, tmp_path, gen):
    """max_seqlen above every length only adds idle blocks; results are unchanged."""
    dtype = torch.float16
    q, kc, vc, ks, vs, cu_q, cu_c, mq, mc = make_varlen_inputs((5, 70), (33, 2), 2, 64, dtype, "cpu", gen)
    dout = torch.randn(q.shape, generator=gen).to(dtype)
    inputs = (q, kc, vc, ks, vs)
    got = _emulate_fwd_bwd(emulator, tmp_path, inputs, dout, None, cu=(cu_q, cu_c), max_q=mq + 100, max_c=mc + 70, scale=0.125)
    _check_all(got, lambda *x: sc_attention_varlen_ref(*x, cu_q, cu_c, mq, mc), inputs, dout, None, dtype)


@pytest.mark.parametrize("layout", ["tail", "head_and_tail", "no_sequence_rows"])
def test_emulated_unowned_rows_are_zero(emulator, tmp_path, layout, gen):
    """Packed rows no sequence owns: zeros in out and the gradients, -inf in lse (the
    emulator's outputs start as NaN, the unowned input rows hold NaN); owned rows as usual."""
    dtype = torch.float16
    inputs, cu_q, cu_c, mq, mc, un_q, un_c = spare_rows_inputs(layout, 2, 32, dtype, "cpu", gen)
    dout = torch.randn(inputs[0].shape, generator=gen).to(dtype)
    dlse = torch.randn(2, inputs[0].shape[0], generator=gen)
    got = _emulate_fwd_bwd(emulator, tmp_path, inputs, dout, dlse, cu=(cu_q, cu_c), max_q=mq, max_c=mc, scale=32**-0.5)
    assert_unowned_rows(got["out"], got["lse"], [got[n] for n in GRADS], un_q, un_c)
    ref = sc_attention_varlen_ref(*[t.double() for t in inputs], cu_q, cu_c, mq, mc, 32**-0.5)
    torch.testing.assert_close(got["out"].double(), ref[0], atol=2e-2, rtol=0)
    torch.testing.assert_close(got["lse"].double(), ref[1], atol=2e-2, rtol=0)


def test_emulated_out_of_range_lengths_stay_in_bounds(emulator, tmp_path, gen):
    """Lengths beyond their bounds (value checks off) are clamped, never read out of bounds.

    Dense lens above N / Nc act as N / Nc; negative ones as 0.  Packed cu_seqlens that
    overshoot the tensors are clamped to them.  The emulator fails on any access outside
    the tensors, so passing means in bounds; the dense result must equal the clamped one.
    """
    dtype = torch.float16
    case = AttnCase("lens", B=3, N=20, Nc=9)
    q, kc, vc, ks, vs, _, _ = make_inputs(case, dtype, "cpu", gen)
    sl, cl = torch.tensor([25, -3, 20], dtype=torch.int32), torch.tensor([-1, 100, 4], dtype=torch.int32)
    inputs = (q, kc, vc, ks, vs)
    res = emulate(emulator, tmp_path / "dense", "fwd", inputs, lens=(sl, cl), max_q=20, max_c=9, scale=0.125)
    out = res("out", q.shape, dtype)
    ref_out, _ = sc_attention_ref(*[t.double() for t in inputs], cl.clamp(0, 9), sl.clamp(0, 20), 0.125)
    assert torch.allclose(out.double(), ref_out, atol=2e-2), (out.double() - ref_out).abs().max()

    qp, kcp, vcp, ksp, vsp, _, _, _, _ = make_varlen_inputs((4, 6), (3, 5), 2, 32, dtype, "cpu", gen)
    bad_q, bad_c = torch.tensor([0, 7, 50], dtype=torch.int32), torch.tensor([2, -4, 40], dtype=torch.int32)
    packed = (qp, kcp, vcp, ksp, vsp)
    res = emulate(emulator, tmp_path / "packed", "fwd", packed, cu=(bad_q, bad_c), max_q=60, max_c=60, scale=0.2)
    # Sequence 0 owns rows 0..6, sequence 1 is clamped to rows 7..9: every row written.
    assert not torch.isnan(res("out", qp.shape, dtype).float()).any()
    assert not torch.isnan(res("lse", (2, qp.shape[0]), torch.float32)).any()


# ----------------------------------------------------------------------------- the variant list


def _emulator_variants(exe) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The variant list as the C++ preprocessor expands it (the emulator's --variants)."""
    r = subprocess.run([str(exe), "--variants"], capture_output=True, text=True, check=True)
    lines = dict(line.split(" ", 1) for line in r.stdout.strip().splitlines())
    return tuple(int(d) for d in lines["head_dims"].split()), tuple(lines["dtypes"].split())


def test_build_info_records_the_header_variant_list(emulator):
    """setup.py's reading of sc_attention_variants.h (recorded in the build info, read by
    the cuda capability) is what the C++ code compiles: both the macros' expansion."""
    from enat_kernels import _dispatch, _variants

    head_dims, dtypes = _emulator_variants(emulator)
    assert head_dims and dtypes
    assert cuda_variants.read_variants() == (head_dims, dtypes)
    info = _extension.build_info()
    assert info["CUDA_SC_ATTENTION_HEAD_DIMS"] == head_dims
    assert info["CUDA_SC_ATTENTION_DTYPES"] == dtypes
    torch_dtypes = tuple(getattr(torch, n) for n in dtypes)
    assert _variants.CUDA_SC_ATTENTION == _variants.Variants(head_dims, torch_dtypes)
    caps = _dispatch.ATTENTION_CAPS["cuda"]
    assert (caps.head_dims, caps.dtypes) == (head_dims, torch_dtypes)


def _and_list(items) -> str:
    """"a, b and c", as the C++ error text writes the list (sc_attn_join)."""
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


@pytest.mark.parametrize("dtype, head_dim, message", [
    ("float32", 64, f"unsupported dtype float32 (supported: {_and_list(_DTYPE_NAMES)})"),
    ("f16", 64, "unsupported dtype f16"),
    ("float16", 48, f"unsupported head_dim 48 (supported: {_and_list(HEAD_DIMS)})"),
    ("bfloat16", 0, "unsupported head_dim 0"),
])
def test_emulator_refuses_unlisted_variants(emulator, tmp_path, dtype, head_dim, message):
    """The dispatch the launchers use (with_dtype / with_head_dim) runs no kernel for a
    dtype or head_dim outside the list, instead of another variant's kernels."""
    (tmp_path / "spec.txt").write_text(f"op fwd\ndtype {dtype}\nhead_dim {head_dim}\n")
    r = subprocess.run([str(emulator), str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3 and message in r.stderr, r.stderr
    assert not list(tmp_path.glob("res_*.bin"))


def test_new_head_dim_is_one_edit(tmp_path, gen, monkeypatch):
    """Adding a head_dim to ENAT_SC_ATTN_HEAD_DIMS is the only edit: the generated
    translation units, the build info, the Python capability and the C++ dispatch all
    follow, and the kernels then compute it (here head_dim 96 on the emulator)."""
    from enat_kernels import _variants

    assert not list((ROOT / "csrc" / "cuda").glob("*hdim*")), "per-variant sources must be generated, not written"
    header = Path(cuda_variants.HEADER).read_text()
    edited = header.replace("X(64) X(128)", "X(64) X(96) X(128)")
    assert edited != header
    overlay = tmp_path / "include" / "cuda"
    overlay.mkdir(parents=True)
    (overlay / "sc_attention_variants.h").write_text(edited)

    head_dims, dtypes = cuda_variants.read_variants(str(overlay / "sc_attention_variants.h"))
    assert head_dims == (32, 64, 96, 128)
    sources = cuda_variants.variant_sources(head_dims)
    assert "ENAT_SC_ATTN_FWD_INSTANCE(96)" in sources["sc_attention_fwd_hdim96.cu"]
    assert "ENAT_SC_ATTN_BWD_INSTANCE(96)" in sources["sc_attention_bwd_hdim96.cu"]
    assert len(sources) == 2 * len(head_dims)
    info = {**_extension.build_info(), "CUDA_SC_ATTENTION_HEAD_DIMS": head_dims, "CUDA_SC_ATTENTION_DTYPES": dtypes}
    monkeypatch.setattr(_extension, "build_info", lambda: info)
    assert 96 in _variants.cuda_sc_attention().head_dims

    exe = _build_emulator(tmp_path / "sc_attn_emu96", include_first=tmp_path / "include")
    assert _emulator_variants(exe)[0] == head_dims
    case = AttnCase("d96", B=2, N=21, Nc=70, H=1, D=96, cond_lens=(70, 5), self_lens=(21, 9))
    dtype = torch.bfloat16
    q, kc, vc, ks, vs, cl, sl = make_inputs(case, dtype, "cpu", gen)
    inputs = (q, kc, vc, ks, vs)
    dout = torch.randn(q.shape, generator=gen).to(dtype)
    dlse = torch.randn(2, 1, 21, generator=gen)
    got = _emulate_fwd_bwd(exe, tmp_path, inputs, dout, dlse, lens=(sl, cl), max_q=21, max_c=70, scale=96**-0.5)
    _check_all(got, lambda *x: sc_attention_ref(*x, cl, sl), inputs, dout, dlse, dtype)


# ----------------------------------------------------------------------------- GPU

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def _cuda_inputs(case, dtype, gen):
    q, kc, vc, ks, vs, cl, sl = make_inputs(case, dtype, "cuda", gen)
    return (q, kc, vc, ks, vs), cl, sl


def _skip_unless_cuda_backend(dtype=torch.float16, head_dim=64):
    err = ek.supports("sc_attention", device="cuda", dtype=dtype, head_dim=head_dim, backend="cuda").reason
    if err:
        pytest.skip(err)


@gpu
@pytest.mark.parametrize("dtype", LOWP, ids=_dtype_id)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_large_shapes_many_tiles(head_dim, dtype, gen, poison):
    """B=4, 300 queries and 700 cond keys: many tiles in both segments, ragged rows."""
    _skip_unless_cuda_backend(dtype, head_dim)
    case = AttnCase("large", B=4, N=300, Nc=700, H=3, D=head_dim, cond_lens=(700, 0, 513, 64), self_lens=(300, 257, 1, 128))
    inputs, cl, sl = _cuda_inputs(case, dtype, gen)
    B, N, H, D = inputs[0].shape
    dout = torch.randn(inputs[0].shape, generator=gen).to("cuda", dtype)
    dlse = torch.randn(B, H, N, generator=gen).to("cuda")

    def fused(*x):
        return ek.sc_attention(*x, cond_lens=cl, self_lens=sl, return_lse=True, backend="cuda")

    def ref(*x):
        return sc_attention_ref(*x, cl, sl)

    got = dict(zip(("out", "lse") + GRADS, forward_backward(fused, inputs, dout, dlse)))
    _check_all(got, ref, inputs, dout, dlse, dtype)


@gpu
@pytest.mark.parametrize("dtype", LOWP, ids=_dtype_id)
@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("ragged", "views", "empty_cond")], ids=str)
def test_gpu_output_only_gradient(case, dtype, gen, poison):
    """dlse absent inside the op (the shared suite covers this in float32 only)."""
    _skip_unless_cuda_backend(dtype, case.D)
    inputs, cl, sl = _cuda_inputs(case, dtype, gen)
    dout = torch.randn(inputs[0].shape, generator=gen).to("cuda", dtype)

    def fused(*x):
        return ek.sc_attention(*x, cond_lens=cl, self_lens=sl, return_lse=True, backend="cuda")

    got = dict(zip(("out", "lse") + GRADS, forward_backward(fused, inputs, dout, None)))
    _check_all(got, lambda *x: sc_attention_ref(*x, cl, sl), inputs, dout, None, dtype)


@gpu
def test_gpu_non_default_stream(gen):
    """Forward and backward on a side stream match the default stream bit for bit."""
    _skip_unless_cuda_backend()
    case = next(c for c in CASES if c.id == "ragged")
    inputs, cl, sl = _cuda_inputs(case, torch.float16, gen)
    dout = torch.randn(inputs[0].shape, generator=gen).to("cuda", torch.float16)

    def run():
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        out, lse = ek.sc_attention(*leaves, cond_lens=cl, self_lens=sl, return_lse=True, backend="cuda")
        out.backward(dout)
        return [out.detach(), lse] + [t.grad for t in leaves]

    expected = run()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = run()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for name, g, e in zip(("out", "lse") + GRADS, got, expected):
        assert torch.equal(g, e), f"{name} differs on a non-default stream"


@gpu
def test_gpu_cuda_graph_capture_and_replay(gen):
    _skip_unless_cuda_backend()
    case = next(c for c in CASES if c.id == "ragged")
    inputs, cl, sl = _cuda_inputs(case, torch.bfloat16, gen)
    static = [t.clone() for t in inputs]
    dout = torch.randn(inputs[0].shape, generator=gen).to("cuda", torch.bfloat16)
    op = torch.ops.enat_kernels
    N, Nc, scale = inputs[0].shape[1], inputs[1].shape[1], 0.125

    def step():
        out, lse = op.sc_attn_fwd(*static, cl, sl, None, None, N, Nc, scale)
        grads = op.sc_attn_bwd(dout, None, *static, out, lse, cl, sl, None, None, N, Nc, scale)
        return (out, lse) + tuple(grads)

    side = torch.cuda.Stream()  # warm up outside the capture, as torch recommends
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), ek.value_checks(False):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), ek.value_checks(False):
        captured = step()
    for _ in range(2):  # fresh inputs copied into the captured buffers, then replay
        for s in static:
            s.copy_(torch.randn(s.shape, generator=gen).to("cuda", s.dtype))
        graph.replay()
        torch.cuda.synchronize()
        eager = step()
        for name, c, e in zip(("out", "lse") + GRADS, captured, eager):
            torch.testing.assert_close(c, e, rtol=0, atol=0, msg=f"{name} differs after replay")


@gpu
def test_gpu_backward_is_bitwise_reproducible(gen):
    """No atomics in the backward: two runs give identical bits."""
    _skip_unless_cuda_backend()
    case = AttnCase("det", B=2, N=200, Nc=300, H=2, D=64)
    inputs, _, _ = _cuda_inputs(case, torch.float16, gen)
    dout = torch.randn(inputs[0].shape, generator=gen).to("cuda", torch.float16)
    op = torch.ops.enat_kernels
    out, lse = op.sc_attn_fwd(*inputs, None, None, None, None, 200, 300, 0.125)
    a = op.sc_attn_bwd(dout, None, *inputs, out, lse, None, None, None, None, 200, 300, 0.125)
    b = op.sc_attn_bwd(dout, None, *inputs, out, lse, None, None, None, None, 200, 300, 0.125)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@gpu
def test_gpu_misaligned_view_is_copied(gen):
    """A view whose base is not 16-byte aligned still gives the right result."""
    _skip_unless_cuda_backend()
    B, N, H, D = 2, 33, 2, 64
    flat = torch.randn(B * N * H * D + 1, generator=gen).to("cuda", torch.float16)
    q = flat[1:].view(B, N, H, D)  # 2-byte offset
    kc, vc, ks, vs = (torch.randn(B, N, H, D, generator=gen).to("cuda", torch.float16) for _ in range(4))
    out = ek.sc_attention(q, kc, vc, ks, vs, backend="cuda")
    ref, _ = sc_attention_ref(q.double(), kc.double(), vc.double(), ks.double(), vs.double())
    torch.testing.assert_close(out.double(), ref, atol=5e-3, rtol=0)


@gpu
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_gpu_opcheck(packed, gen):
    """Schema, fake (meta) implementation and autograd registration agree with the CUDA kernels."""
    _skip_unless_cuda_backend()
    dtype, op = torch.float16, torch.ops.enat_kernels
    if packed:
        q, kc, vc, ks, vs, cu_q, cu_c, mq, mc = make_varlen_inputs((7, 20), (5, 0), 2, 64, dtype, "cuda", gen)
        extra = (None, None, cu_q, cu_c, mq, mc, 0.125)
    else:
        case = next(c for c in CASES if c.id == "ragged")
        (q, kc, vc, ks, vs), cl, sl = _cuda_inputs(case, dtype, gen)
        extra = (cl, sl, None, None, q.shape[1], kc.shape[1], 0.125)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, kc, vc, ks, vs)]
    torch.library.opcheck(op.sc_attn_fwd.default, (*leaves, *extra))
    out, lse = op.sc_attn_fwd(q, kc, vc, ks, vs, *extra)
    dout = torch.randn(q.shape, generator=gen).to("cuda", dtype)
    torch.library.opcheck(op.sc_attn_bwd.default, (dout, torch.randn_like(lse), q, kc, vc, ks, vs, out, lse, *extra))


@gpu
def test_gpu_op_rejects_unsupported_inputs():
    _skip_unless_cuda_backend()
    op = torch.ops.enat_kernels
    x = torch.randn(1, 4, 1, 64, device="cuda")
    with pytest.raises(RuntimeError, match="float16 and bfloat16"):
        op.sc_attn_fwd(x, x, x, x, x, None, None, None, None, 4, 4, 0.1)
    y = torch.randn(1, 4, 1, 48, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="head_dim"):
        op.sc_attn_fwd(y, y, y, y, y, None, None, None, None, 4, 4, 0.1)
