"""Loading the compiled extensions (refusals, fallback when one is broken), the backend
report, forcing a backend by environment variable and logging the choice."""

import subprocess
import sys
import textwrap
import types

import pytest
import torch

import enat_kernels as ek
from enat_kernels import _extension


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
    monkeypatch.setattr(
        _extension, "_build_info", lambda: _fake_build_info(CUDA_BUILT=False, CUDA_SKIP_REASON="ENAT_KERNELS_SKIP_CUDA is set")
    )
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
