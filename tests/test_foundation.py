"""Package foundation: extension loading and fallback, backend report, the SCAttention module."""

import subprocess
import sys
import textwrap
import types

import pytest
import torch

import enat_kernels as ek
from enat_kernels import _extension
from enat_kernels.reference import sc_attention_ref


def test_compiled_extension_loads_when_built():
    info = ek.build_info()
    if not info:
        pytest.skip("enat_kernels was not built in this environment (no _build_info.py)")
    assert info["TORCH_VERSION"] == torch.__version__
    assert _extension.cpu_extension_error() is None
    assert ek.backends()["cpu"].available
    if info["CUDA_BUILT"]:
        # Compiled here even without a GPU; the module must import.
        assert _extension.cuda_extension_error() is None
        assert _extension.has_kernel("gather_rows", "CUDA")


def test_backends_report_every_backend_with_a_reason():
    report = ek.backends()
    assert list(report) == list(ek.BACKENDS)
    for name, status in report.items():
        assert isinstance(status, ek.BackendStatus)
        assert status.reason, name
    assert report["torch"].available
    if not torch.cuda.is_available():
        assert not report["cuda"].available


def _fake_build_info(**over):
    info = types.SimpleNamespace(
        TORCH_VERSION=torch.__version__, TORCH_CUDA_VERSION=None, CUDA_BUILT=True, CUDA_SKIP_REASON=None, CUDA_ARCHS="8.0", DEBUG=False
    )
    for k, v in over.items():
        setattr(info, k, v)
    return info


def test_loader_refuses_extension_built_for_another_torch(monkeypatch):
    monkeypatch.setattr(_extension, "_build_info", lambda: _fake_build_info(TORCH_VERSION="2.0.0"))
    reason = _extension._load("_C")
    assert reason is not None and "2.0.0" in reason and torch.__version__ in reason


def test_loader_reports_unbuilt_package(monkeypatch):
    monkeypatch.setattr(_extension, "_build_info", lambda: None)
    assert "not built" in _extension._load("_C")


def test_loader_reports_skipped_cuda_build(monkeypatch):
    monkeypatch.setattr(_extension, "_build_info", lambda: _fake_build_info(CUDA_BUILT=False, CUDA_SKIP_REASON="ENAT_KERNELS_SKIP_CUDA is set"))
    assert "ENAT_KERNELS_SKIP_CUDA" in _extension._load("_C_cuda")


def test_import_survives_a_broken_extension_and_falls_back():
    """With enat_kernels._C unimportable, the package imports, warns once, and runs on torch."""
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["enat_kernels._C"] = None  # makes `import enat_kernels._C` raise ImportError
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import enat_kernels as ek
        msgs = [str(x.message) for x in w if "enat_kernels" in str(x.message)]
        assert len(msgs) == 1 and "_C" in msgs[0], msgs
        status = ek.backends()
        assert not status["cpu"].available, status
        import torch
        q = torch.randn(1, 4, 2, 16)
        out = ek.sc_attention(q, None, None, q, q)
        idx, lens = ek.mask_to_indices(torch.tensor([[True, False, True]]), 2)
        assert idx.tolist() == [[0, 2]] and lens.tolist() == [2]
        try:
            ek.sc_attention(q, None, None, q, q, backend="cpu")
        except ValueError as e:
            assert "_C" in str(e)
        else:
            raise AssertionError("forcing an unavailable backend must raise")
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr


def test_forced_backend_env_variable(monkeypatch):
    monkeypatch.setenv("ENAT_KERNELS_BACKEND", "torch")
    assert ek.supports("sc_attention", device="cpu", dtype=torch.float32, head_dim=64).backend == "torch"
    monkeypatch.setenv("ENAT_KERNELS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend must be one of"):
        ek.supports("sc_attention", device="cpu", dtype=torch.float32, head_dim=64)


def test_backend_choice_is_logged_when_asked(caplog):
    q = torch.randn(1, 4, 2, 16)
    with caplog.at_level("INFO", logger="enat_kernels"):
        ek.sc_attention(q, None, None, q, q, backend="torch")
    assert any("sc_attention: backend torch" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- module


def test_scattention_parameter_names_match_the_checkpoint():
    m = ek.SCAttention(64, 4)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "q.weight": (64, 64), "q.bias": (64,),
        "kv.A.weight": (128, 64), "kv.A.bias": (128,),
        "kv.B.weight": (128, 64), "kv.B.bias": (128,),
        "proj.weight": (64, 64), "proj.bias": (64,),
    }


@pytest.mark.parametrize("with_cond", [True, False])
def test_scattention_forward_is_enat_attention(with_cond, gen):
    """K first, V second in each kv output; softmax over cond then self; then proj."""
    torch.manual_seed(0)
    B, N, Nc, C, H = 2, 6, 9, 32, 4
    D = C // H
    m = ek.SCAttention(C, H, backend="torch").double()
    x = torch.randn(B, N, C, generator=gen, dtype=torch.float64)
    cond = torch.randn(B, Nc, C, generator=gen, dtype=torch.float64) if with_cond else None
    got = m(x, cond)

    q = m.q(x).reshape(B, N, H, D).transpose(1, 2)
    kv = m.kv["B"](x).reshape(B, N, 2, H, D).permute(2, 0, 3, 1, 4)
    k, v = kv[0], kv[1]
    if with_cond:
        kvc = m.kv["A"](cond).reshape(B, Nc, 2, H, D).permute(2, 0, 3, 1, 4)
        k, v = torch.cat([kvc[0], k], 2), torch.cat([kvc[1], v], 2)
    attn = ((q @ k.transpose(-2, -1)) * D**-0.5).softmax(-1)
    want = m.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_scattention_rejects_bad_head_count():
    with pytest.raises(ValueError, match="divisible"):
        ek.SCAttention(30, 4)


def test_reference_is_the_torch_backend(gen):
    q, k, v = (torch.randn(2, 5, 2, 16, generator=gen) for _ in range(3))
    kc, vc = (torch.randn(2, 7, 2, 16, generator=gen) for _ in range(2))
    out, lse = ek.sc_attention(q, kc, vc, k, v, return_lse=True, backend="torch")
    ro, rl = sc_attention_ref(q, kc, vc, k, v)
    assert torch.equal(out, ro) and torch.equal(lse, rl)
