"""What is specific to the Triton SC-Attention kernels (the math of every backend is
tested by test_sc_attention.py, ``-k triton``).

- one compiled variant whatever the lengths: Triton's own specialization key of real
  launches is compared across lengths (on a GPU, also the JIT cache itself);
- shapes spanning several blocks in both loops, rows ending on block boundaries;
- the op schemas equal csrc/schema.cpp's; opcheck; torch.compile(fullgraph=True);
- nothing is launched for an empty grid; out-of-range lengths are clamped;
- the kernels compile for sm_90 / sm_80 ahead of time (no GPU needed) without
  register spills, within shared memory, with wgmma on Hopper.

Without a GPU the kernels run under the Triton interpreter (float32/float16 only).
"""

from __future__ import annotations

import itertools
import pathlib
import re

import pytest
import torch

import enat_kernels as ek
from enat_kernels import _dispatch, _ops
from support.attention_cases import AttnCase, make_inputs
from support.attention_checks import check_dense_against_oracle
from support.backends import HAS_CUDA
from support.paths import REPO, TESTS
from support.triton_jit import jit_for_gpu

pytest.importorskip("triton")
from enat_kernels.triton import sc_attention as sa  # noqa: E402
from enat_kernels.triton import sc_attention_config as config  # noqa: E402
from enat_kernels.triton import sc_attention_kernels as kernels  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
_ERR = ek.supports("sc_attention", device=DEVICE, dtype=torch.float32, head_dim=64, backend="triton").reason
pytestmark = pytest.mark.skipif(bool(_ERR), reason=f"triton backend unavailable: {_ERR}")

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])


def _name(dtype):
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------- specialization


def _keys(launches):
    """[(kernel name, specialization key, launch options)] of a list of (kernel, (grid, kwargs))."""
    out = []
    for kernel, (_grid, kwargs) in launches:
        args = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
        _, spec, _ = jit_for_gpu(kernel)[2](**args)
        out.append((kernel.fn.__name__, spec, kwargs.get("num_warps"), kwargs.get("num_stages")))
    return out


def _dense_launches(N, Nc, lens, dtype, B=3, H=16, D=64):
    """Forward and backward launches for ENAT-like inputs: views of fused projections."""
    qkv = torch.empty(B, N, 3, H, D, dtype=dtype)
    kv_c = torch.empty(B, Nc, 2, H, D, dtype=dtype)
    q, k_self, v_self = qkv.unbind(2)
    k_cond, v_cond = kv_c.unbind(2)
    cl = torch.full((B,), Nc, dtype=torch.int32) if lens else None
    sl = torch.full((B,), N, dtype=torch.int32) if lens else None
    return _launches((q, k_cond, v_cond, k_self, v_self, cl, sl, None, None, N, Nc, D**-0.5))


def _varlen_launches(q_lens, c_lens, dtype, H=16, D=64):
    Tq, Tc = sum(q_lens), sum(c_lens)
    qkv = torch.empty(Tq, 3, H, D, dtype=dtype)
    kv_c = torch.empty(Tc, 2, H, D, dtype=dtype)
    q, k_self, v_self = qkv.unbind(1)
    k_cond, v_cond = kv_c.unbind(1)

    def cu(lens):
        return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)

    return _launches((q, k_cond, v_cond, k_self, v_self, None, None, cu(q_lens), cu(c_lens), max(q_lens), max(c_lens), 0.3))


def _launches(args):
    q = args[0]
    out = torch.empty(q.shape, dtype=q.dtype)
    _, lse_shape, _ = _ops.sc_attn_fwd_shapes(q)
    lse = torch.empty(lse_shape)
    grads = [torch.empty(t.shape, dtype=t.dtype) for t in args[:5]]
    bwd = sa.backward_launches(out, lse, *args[:5], out, lse, *args[5:], torch.empty(lse_shape), grads)
    kinds = (kernels.sc_attn_bwd_preprocess_kernel, kernels.sc_attn_bwd_dkdv_kernel, kernels.sc_attn_bwd_dq_kernel)
    return [(kernels.sc_attn_fwd_kernel, sa.forward_launch(*args, out, lse))] + list(zip(kinds, bwd))


@pytest.mark.parametrize("lens", [False, True], ids=["no_lens", "lens"])
def test_dense_specialization_does_not_follow_lengths(lens):
    """Every (N, Nc) an ENAT sampler meets selects the same compiled kernels: lengths
    equal to 1 or divisible by 16, and the strides of lse that follow N, are not specialized."""
    shapes = [(128, 128), (32, 224), (1, 1), (17, 0), (250, 6), (1024, 0)]
    first = _keys(_dense_launches(*shapes[0], lens, torch.float16))
    assert len(first) == 4
    for N, Nc in shapes[1:]:
        assert _keys(_dense_launches(N, Nc, lens, torch.float16)) == first, f"N={N}, Nc={Nc} changes the kernel variant"


def test_varlen_specialization_does_not_follow_lengths():
    first = _keys(_varlen_launches((16, 7, 30), (20, 0, 9), torch.float16))
    for q_lens, c_lens in [((1,), (1,)), ((64, 64), (128, 0)), ((5, 0, 33, 2), (0, 0, 0, 1))]:
        assert _keys(_varlen_launches(q_lens, c_lens, torch.float16)) == first, f"{q_lens}, {c_lens}"


def test_specialization_keys_see_what_matters():
    """Guard against a vacuous comparison: the key does change with dtype and head_dim."""
    base = _keys(_dense_launches(32, 32, False, torch.float16))
    assert _keys(_dense_launches(32, 32, False, torch.bfloat16)) != base
    assert _keys(_dense_launches(32, 32, False, torch.float16, D=32)) != base


def test_config_tables_cover_exactly_the_variant_list():
    """The tables hold one entry per (family, head_dim, dtype) of the one list, nothing
    else; the capability the dispatcher uses and the error text are that list."""
    from enat_kernels import _variants

    keys = set(itertools.product(config.FAMILIES, config.HEAD_DIMS, config.DTYPES))
    assert set(config._FORWARD) == keys and set(config._BACKWARD) == keys
    assert _variants.TRITON_SC_ATTENTION == _variants.Variants(config.HEAD_DIMS, config.DTYPES)
    caps = _dispatch.ATTENTION_CAPS["triton"]
    assert (caps.head_dims, caps.dtypes) == (config.HEAD_DIMS, config.DTYPES)
    listed = f"head_dim in ({config._names(config.HEAD_DIMS)}) and {config._names(config.DTYPES)}"
    with pytest.raises(ValueError, match=re.escape(listed)):
        config.backward_config(torch.device("cpu"), 64, torch.float64)
    for arch, dtype, head_dim in CODEGEN_CASES:  # the compiled checks pick from the list
        assert head_dim in config.HEAD_DIMS and getattr(torch, dtype) in config.DTYPES


def test_config_refuses_a_head_dim_the_kernels_cannot_index(monkeypatch):
    """A listed head_dim must be a power of two (tl.arange(0, HEAD_DIM)): the tables refuse
    96 with that reason at import, not with the interpreter's or compiler's error at launch."""
    monkeypatch.setattr(config, "HEAD_DIMS", config.HEAD_DIMS + (96,))
    tiles = {**config._TILES_16BIT, **{(f, 96): config._TILES_16BIT[f, 128] for f in config.FAMILIES}}
    monkeypatch.setattr(config, "_TILES_16BIT", tiles)
    with pytest.raises(RuntimeError, match=r"HEAD_DIMS: \[96\] not a power of two"):
        config._tables()
    monkeypatch.setattr(config, "HEAD_DIMS", config.HEAD_DIMS[:-1] + (256,))
    with pytest.raises(RuntimeError, match=r"_TILES_16BIT: entries missing for .*256"):
        config._tables()


def test_config_table_covers_capabilities():
    """Each (head_dim, dtype) the dispatcher allows has a configuration on every GPU family,
    with tiles tl.dot accepts (>= 16) and no dependence on anything but family/head_dim/dtype."""
    caps = _dispatch.ATTENTION_CAPS["triton"]
    for family in config.FAMILIES:
        for d in caps.head_dims:
            for dt in caps.dtypes:
                key = (family, d, dt)
                fwd, bwd = config._FORWARD[key], config._BACKWARD[key]
                assert all(x >= 16 for x in fwd[:2]) and all(x >= 16 for x in (bwd[0], bwd[1], bwd[3], bwd[4])), key
    cpu = torch.device("cpu")
    assert config.forward_config(cpu, 64, torch.float16).dot_precision == "tf32"  # 16-bit dots: ignored
    assert config.forward_config(cpu, 64, torch.float32).dot_precision == "ieee"  # exact fp32, like PyTorch
    with pytest.raises(ValueError, match="head_dim"):
        config.forward_config(cpu, 48, torch.float16)


@pytest.mark.skipif(not HAS_CUDA, reason="counts compiled GPU kernels (needs a GPU)")
def test_no_recompilation_between_lengths(gen):
    """On a GPU: after one call, calls at other lengths add nothing to the JIT caches."""
    dev = torch.cuda.current_device()
    jit = [kernels.sc_attn_fwd_kernel, kernels.sc_attn_bwd_preprocess_kernel,
           kernels.sc_attn_bwd_dkdv_kernel, kernels.sc_attn_bwd_dq_kernel]

    def run(N, Nc):
        case = AttnCase("len", B=2, N=N, Nc=Nc, H=4, D=64)
        q, kc, vc, ks, vs, cl, sl = make_inputs(case, torch.bfloat16, DEVICE, gen)
        leaves = [t.requires_grad_() for t in (q, kc, vc, ks, vs)]
        out = ek.sc_attention(*leaves, backend="triton")
        out.sum().backward()
        torch.cuda.synchronize()
        return [len(k.device_caches[dev][0]) for k in jit]

    warm = run(96, 160)
    for N, Nc in [(32, 224), (17, 1), (128, 0)]:
        assert run(N, Nc) == warm, f"N={N}, Nc={Nc} compiled a new variant"


# ----------------------------------------------------------------------------- GPU code generation


def _compile_for_gpu(kernel, kwargs, arch):
    """Compile one launch ahead of time for sm_<arch> (no GPU needed); (kernel, ptxas -v report)."""
    import subprocess
    import tempfile

    import triton
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource

    jit, backend, binder = jit_for_gpu(kernel, arch)
    args = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
    bound, spec, _ = binder(**args)
    names = [p.name for p in jit.params]
    signature = {n: s[0] for n, s in zip(names, spec)}
    constexprs = {(i,): bound[n] for i, (n, s) in enumerate(zip(names, spec)) if s[0] == "constexpr"}
    attrs = {(i,): backend.parse_attr(s[1]) for i, s in enumerate(spec) if s[0] != "constexpr" and isinstance(s[1], str)}
    options = {"num_warps": kwargs["num_warps"], "num_stages": kwargs.get("num_stages", 3)}
    compiled = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=backend.target, options=options)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = pathlib.Path(tmp) / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        cmd = [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}",
               str(ptx), "-o", str(ptx.with_suffix(".o"))]
        report = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    return compiled, report


def codegen_report(arch: int, dtype_name: str, head_dim: int) -> list:
    """Compile the forward and backward launches of an ENAT-like shape for sm_<arch>, with
    the table entry of that GPU family.  Must run with TRITON_INTERPRET=0 (see below)."""
    family = "hopper" if arch >= 90 else "ampere"
    config.gpu_family = lambda device: family
    report = []
    for kernel, (_, kwargs) in _dense_launches(128, 96, True, getattr(torch, dtype_name), D=head_dim):
        compiled, ptxas = _compile_for_gpu(kernel, kwargs, arch)
        report.append({
            "name": kernel.fn.__name__, "shared": compiled.metadata.shared, "family": family,
            "spills": [int(n) for n in re.findall(r"(\d+) bytes spill stores", ptxas)],
            "wgmma": "wgmma.mma_async" in compiled.asm["ptx"], "ptxas": ptxas,
        })
    return report


# A few (arch, dtype, head_dim) entries of the list, the tightest among them (compiling all
# 24 takes too long for CI; docs/EXTENDING.md says how to check a new one).
CODEGEN_CASES = [(90, "bfloat16", 64), (80, "bfloat16", 64), (90, "float16", 128), (80, "bfloat16", 128)]


_SHORT_DTYPE = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


@pytest.mark.parametrize("arch, dtype, head_dim", CODEGEN_CASES,
                         ids=[f"sm{a}-{_SHORT_DTYPE.get(t, t)}-d{d}" for a, t, d in CODEGEN_CASES])
def test_gpu_code_generation(arch, dtype, head_dim):
    """Every kernel compiles for the GPU (ahead of time, no GPU needed) with its table entry:
    no register spills, shared memory within the family's limit, wgmma on Hopper.  The
    check a CPU-only machine can make that the first GPU run will compile.

    Runs in a subprocess without TRITON_INTERPRET: under the interpreter every
    @triton.jit helper is an interpreted function, which the compiler cannot inline."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton has no NVIDIA backend")
    code = (
        "import json, sys; sys.path[:0] = sys.argv[1].split(','); import test_triton_sc_attention as t; "
        "print('REPORT' + json.dumps(t.codegen_report(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))))"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    run = subprocess.run([sys.executable, "-c", code, f"{pathlib.Path(__file__).parent},{TESTS}", str(arch), dtype, str(head_dim)],
                         env=env, cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout.split("REPORT", 1)[1])
    assert [k["name"] for k in report] == ["sc_attn_fwd_kernel", "sc_attn_bwd_preprocess_kernel",
                                           "sc_attn_bwd_dkdv_kernel", "sc_attn_bwd_dq_kernel"]
    smem_limit = {"hopper": 227 * 1024, "ampere": 99 * 1024}
    for k in report:
        assert k["spills"] and max(k["spills"]) == 0, f"{k['name']} spills registers on sm_{arch}: {k['ptxas']}"
        assert k["shared"] <= smem_limit[k["family"]], f"{k['name']} needs {k['shared']} B of shared memory"
        if arch >= 90 and k["name"] != "sc_attn_bwd_preprocess_kernel":
            assert k["wgmma"], f"{k['name']} does not use wgmma on sm_90"


# ----------------------------------------------------------------------------- several blocks


MULTI_BLOCK = [
    # Both loops span several key blocks; rows end on a block boundary (64, 128), inside
    # one, or are empty; the backward's key programs and query steps see tails too.
    AttnCase("multi_block", B=3, N=130, Nc=192, cond_lens=(192, 64, 0), self_lens=(130, 64, 1)),
    AttnCase("multi_block_d16", B=2, N=100, Nc=70, H=3, D=16, cond_lens=(70, 33), self_lens=(96, 100), views=True),
]


def _check_against_oracle(case, dtype, gen):
    """Forward and backward (with dlse) of the triton backend within the accuracy rule."""
    check_dense_against_oracle("triton", case, dtype, DEVICE, gen)


@pytest.mark.parametrize("case", MULTI_BLOCK, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
def test_several_blocks_both_loops(case, dtype, gen, poison):
    _check_against_oracle(case, dtype, gen)


@pytest.mark.parametrize(
    "case",
    [MULTI_BLOCK[0], AttnCase("multi_block_d128", B=2, N=70, Nc=40, D=128, cond_lens=(40, 7), self_lens=(70, 32), scale=0.05)],
    ids=str,
)
def test_ampere_table(case, gen, poison, monkeypatch):
    """The interpreter (and a Hopper GPU) runs the "hopper" table; the "ampere" one (other
    block sizes: 16-row steps at head_dim 64, 32-key dK/dV programs at 128) must compute
    the same.  Its tiles also fit a Hopper GPU, so this runs there too."""
    monkeypatch.setattr(config, "gpu_family", lambda device: "ampere")
    assert config.backward_config(torch.device(DEVICE), case.D, torch.float16) == config.BackwardConfig(
        *config._BACKWARD[("ampere", case.D, torch.float16)], "tf32")
    _check_against_oracle(case, torch.float16, gen)


def test_out_of_range_lengths_are_clamped(gen, poison):
    """With value checks off, lengths beyond [0, N] / [0, Nc] act as their clamped values
    (the kernel never reads past a row's own segment)."""
    case = AttnCase("clamp", B=2, N=40, Nc=24, D=32)
    q, kc, vc, ks, vs, _, _ = make_inputs(case, torch.float32, DEVICE, gen)
    dev = q.device
    bad_cl, bad_sl = torch.tensor([100, -3], dtype=torch.int32, device=dev), torch.tensor([47, 9], dtype=torch.int32, device=dev)
    cl, sl = torch.tensor([24, 0], dtype=torch.int32, device=dev), torch.tensor([40, 9], dtype=torch.int32, device=dev)
    with ek.value_checks(False):
        out_bad, lse_bad = ek.sc_attention(q, kc, vc, ks, vs, cond_lens=bad_cl, self_lens=bad_sl, return_lse=True, backend="triton")
    out, lse = ek.sc_attention(q, kc, vc, ks, vs, cond_lens=cl, self_lens=sl, return_lse=True, backend="triton")
    assert torch.equal(out_bad, out) and torch.equal(lse_bad, lse)


# ----------------------------------------------------------------------------- registration


def _csrc_schema(op: str) -> str:
    """The schema string of `op` as csrc/schema.cpp defines it (C++ literals joined)."""
    text = (REPO / "csrc" / "schema.cpp").read_text()
    for call in re.findall(r"m\.def\((.*?)\);", text, flags=re.S):
        schema = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', call))
        if schema.startswith(op + "("):
            return schema
    raise AssertionError(f"{op} not found in csrc/schema.cpp")


@pytest.mark.parametrize("op", ["sc_attn_fwd", "sc_attn_bwd"])
def test_schema_matches_csrc(op):
    """Same arguments (names, types, order) and return types as the C++ op.  The schema
    is inferred from annotations on every torch (torch < 2.14 ignores triton_op's
    schema=), and an inferred schema has unnamed returns."""
    ours = sa.OPS[op]._opoverload._schema
    theirs = torch._C.parse_schema("enat_kernels::triton_" + _csrc_schema(op))
    assert str(ours).split(" -> ")[0] == str(theirs).split(" -> ")[0]
    assert [str(r.type) for r in ours.returns] == [str(r.type) for r in theirs.returns]
    assert ours.name == f"enat_kernels::triton_{op}"


def test_ops_discovered_through_package():
    from enat_kernels import triton as ek_triton

    assert ek_triton.op("sc_attn_fwd") is sa.sc_attn_fwd and ek_triton.op("sc_attn_bwd") is sa.sc_attn_bwd


def test_op_refuses_unsupported_inputs():
    q = torch.zeros(1, 4, 1, 48, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        sa.sc_attn_fwd(q, q[:, :0], q[:, :0], q, q, None, None, None, None, 4, 0, 1.0)
    q = torch.zeros(1, 4, 1, 64, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="float64"):
        sa.sc_attn_fwd(q, q[:, :0], q[:, :0], q, q, None, None, None, None, 4, 0, 1.0)


def _small_dense(gen, requires_grad):
    case = AttnCase("opcheck", B=2, N=20, Nc=12, H=2, D=16, cond_lens=(12, 5), self_lens=(20, 3))
    q, kc, vc, ks, vs, cl, sl = make_inputs(case, torch.float32, DEVICE, gen)
    tensors = [t.detach().clone().requires_grad_(requires_grad) for t in (q, kc, vc, ks, vs)]
    return (*tensors, cl, sl, None, None, 20, 12, 0.25)


def _small_varlen(gen):
    def cu(lens):
        return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)

    q_lens, c_lens, H, D = (9, 0, 14), (5, 7, 0), 2, 16
    Tq, Tc = sum(q_lens), sum(c_lens)
    q, ks, vs = (torch.randn(Tq, H, D, generator=gen).to(DEVICE).requires_grad_() for _ in range(3))
    kc, vc = (torch.randn(Tc, H, D, generator=gen).to(DEVICE).requires_grad_() for _ in range(2))
    return (q, kc, vc, ks, vs, None, None, cu(q_lens), cu(c_lens), max(q_lens), max(c_lens), 0.3)


@pytest.mark.parametrize("form", ["dense", "varlen"])
def test_opcheck_forward(form, gen):
    args = _small_dense(gen, True) if form == "dense" else _small_varlen(gen)
    torch.library.opcheck(sa.sc_attn_fwd, args)


@pytest.mark.parametrize("with_dlse", [True, False], ids=["dlse", "no_dlse"])
def test_opcheck_backward(with_dlse, gen):
    args = _small_dense(gen, False)
    out, lse = sa.sc_attn_fwd(*args)
    dout = torch.randn(out.shape, generator=gen).to(DEVICE)
    dlse = torch.randn(lse.shape, generator=gen).to(DEVICE) if with_dlse else None
    torch.library.opcheck(sa.sc_attn_bwd, (dout, dlse, *args[:5], out, lse, *args[5:]))


def test_torch_compile_fullgraph_matches_eager(gen):
    case = AttnCase("compile", B=2, N=20, Nc=30, H=2, D=32, cond_lens=(30, 4), self_lens=(20, 7))
    q, kc, vc, ks, vs, cl, sl = make_inputs(case, torch.float32, DEVICE, gen)
    dout = torch.randn(q.shape, generator=gen).to(DEVICE)

    def f(q, kc, vc, ks, vs):
        out, lse = ek.sc_attention(q, kc, vc, ks, vs, cond_lens=cl, self_lens=sl, return_lse=True, backend="triton")
        return out * 2.0, lse

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (q, kc, vc, ks, vs)]
        out, lse = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, dout)
        return [out.detach(), lse.detach(), *grads]

    torch._dynamo.reset()
    compiled = run(torch.compile(f, fullgraph=True))
    eager = run(f)
    for name, c, e in zip(("out", "lse", "dq", "dk_cond", "dv_cond", "dk_self", "dv_self"), compiled, eager):
        torch.testing.assert_close(c, e, msg=lambda m, name=name: f"{name}: {m}")


# ----------------------------------------------------------------------------- launches


class _LaunchCounter:
    """Counts launches of the four kernels (pre-run hooks run once per launch)."""

    def __init__(self):
        self.kernels = [kernels.sc_attn_fwd_kernel, kernels.sc_attn_bwd_preprocess_kernel,
                        kernels.sc_attn_bwd_dkdv_kernel, kernels.sc_attn_bwd_dq_kernel]
        self.counts = {k.fn.__name__: 0 for k in self.kernels}
        self._hooks = []

    def __enter__(self):
        for k in self.kernels:
            def hook(*args, _name=k.fn.__name__, **kwargs):
                self.counts[_name] += 1
            k.pre_run_hooks.append(hook)
            self._hooks.append((k, hook))
        return self

    def __exit__(self, *exc):
        for k, hook in self._hooks:
            k.pre_run_hooks.remove(hook)

    def total(self):
        return sum(self.counts.values())


def _fwd_bwd_direct(args, gen):
    out, lse = sa.sc_attn_fwd(*args)
    dout = torch.randn(out.shape, generator=gen).to(DEVICE)
    return out, lse, sa.sc_attn_bwd(dout, None, *args[:5], out, lse, *args[5:])


def test_empty_query_set_launches_nothing(gen, poison):
    """N = 0 (the last sampling step): empty results, zero cond gradients, no kernel launched."""
    case = AttnCase("empty_q", B=2, N=0, Nc=16, D=16)
    q, kc, vc, ks, vs, _, _ = make_inputs(case, torch.float32, DEVICE, gen)
    with _LaunchCounter() as launches:
        out, lse, grads = _fwd_bwd_direct((q, kc, vc, ks, vs, None, None, None, None, 0, 16, 0.25), gen)
    assert launches.total() == 0, launches.counts
    assert out.shape == q.shape and lse.shape == (2, 2, 0)
    assert torch.equal(grads[1], torch.zeros_like(kc)) and torch.equal(grads[2], torch.zeros_like(vc))


def test_empty_varlen_queries_launch_nothing(gen, poison):
    cu_q = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    cu_c = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
    q = torch.randn(0, 2, 16, generator=gen).to(DEVICE)
    kc = torch.randn(9, 2, 16, generator=gen).to(DEVICE)
    with _LaunchCounter() as launches:
        _, _, grads = _fwd_bwd_direct((q, kc, kc.clone(), q, q.clone(), None, None, cu_q, cu_c, 0, 5, 0.25), gen)
    assert launches.total() == 0, launches.counts
    assert torch.equal(grads[1], torch.zeros_like(kc))


def test_empty_cond_segment_launches_each_kernel_once(gen, poison):
    """Nc = 0 (the first sampling step): one launch per kernel, no cond key blocks."""
    case = AttnCase("empty_c", B=2, N=12, Nc=0, D=16)
    q, kc, vc, ks, vs, _, _ = make_inputs(case, torch.float32, DEVICE, gen)
    args = (q, kc, vc, ks, vs, None, None, None, None, 12, 0, 0.25)
    with _LaunchCounter() as launches:
        _fwd_bwd_direct(args, gen)
    assert all(n == 1 for n in launches.counts.values()), launches.counts
    (_, (fwd_grid, _)), _, (_, (dkdv_grid, _)), _ = _launches(args)
    assert fwd_grid[0] == dkdv_grid[0] == case.H * case.B  # one block per (row, head), no cond key blocks
