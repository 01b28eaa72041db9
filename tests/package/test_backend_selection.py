"""Backend loading and device handling, checked with mocks (no GPU, no second GPU here).

- A Triton kernel module that fails to load, with any exception, makes the Triton
  backend report "unavailable: <reason>" (or lose only the ops of that module); it
  never breaks another backend or automatic selection.
- Capability checks read the inputs' own device, for automatic and forced backends.
- Every Triton launch runs with the inputs' device made current.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import sys

import pytest
import torch

import enat_kernels as ek
from enat_kernels import _dispatch
from enat_kernels import triton as ek_triton

SC_MODULE = "enat_kernels.triton.sc_attention"
ROUTING_MODULE = "enat_kernels.triton.routing"


class _Refuse(importlib.abc.MetaPathFinder):
    """Makes importing the named modules raise `error` (what an old torch or a broken
    Triton install does), whatever its type."""

    def __init__(self, names, error):
        self.names, self.error = set(names), error

    def find_spec(self, fullname, path=None, target=None):
        if fullname in self.names:
            raise self.error
        return None


def _fail_import(monkeypatch, names, error):
    for name in names:
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "meta_path", [_Refuse(names, error)] + sys.meta_path)
    monkeypatch.setattr(ek_triton, "_LOAD_ERRORS", {})


def _triton_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_importable():
    if ek_triton.triton_error(_triton_device()) is not None:
        pytest.skip(ek_triton.triton_error(_triton_device()))


@pytest.mark.parametrize("error", [ValueError("infer_schema(func): Parameter q must have a type annotation."),
                                   RuntimeError("Triton cannot compile"), ImportError("libcuda.so.1")],
                         ids=lambda e: type(e).__name__)
def test_failing_attention_module_leaves_routing_and_other_backends(monkeypatch, triton_importable, error, gen):
    _fail_import(monkeypatch, [SC_MODULE], error)
    dt = _triton_device()
    err = _dispatch.attention_error("triton", dt, torch.float32, 64)
    assert err is not None and type(error).__name__ in err and str(error) in err
    assert _dispatch.routing_error("triton", dt) is None  # the other kernel module still loads
    status = ek.backends()["triton"]
    assert status.available and "token routing" in status.reason and type(error).__name__ in status.reason
    # Automatic selection skips it; forcing it names the reason.
    q = torch.randn(2, 5, 2, 16, generator=gen)
    assert torch.isfinite(ek.sc_attention(q, None, None, q, q)).all()
    with pytest.raises(ValueError, match=type(error).__name__):
        ek.sc_attention(q, None, None, q, q, backend="triton")
    name, msg = _dispatch._choose_attention(None, "cuda:0", torch.float16, 64, 8, 8)
    assert msg is None and name in ("cuda", "torch")


def test_every_kernel_module_failing_makes_triton_unavailable(monkeypatch, triton_importable):
    _fail_import(monkeypatch, [SC_MODULE, ROUTING_MODULE], RuntimeError("broken"))
    status = ek.backends()["triton"]
    assert not status.available and "RuntimeError: broken" in status.reason
    assert repr(status).startswith("unavailable: loading enat_kernels.triton.")
    assert ek.backends()["torch"].available
    idx, lens = ek.mask_to_indices(torch.tensor([[True, False, True]]), 2)
    assert idx.tolist() == [[0, 2]] and lens.tolist() == [2]


@pytest.mark.parametrize("error", [ImportError("no module"), RuntimeError("driver mismatch"), AttributeError("x")],
                         ids=lambda e: type(e).__name__)
def test_failing_triton_import_is_reported(monkeypatch, error):
    _fail_import(monkeypatch, ["triton"], error)
    for dt in ("cpu", "cuda"):
        err = ek_triton.triton_error(dt)
        assert err is not None and str(error) in err
    status = ek.backends()["triton"]
    assert not status.available and str(error) in status.reason
    q = torch.randn(1, 3, 1, 16)
    ek.sc_attention(q, None, None, q, q)  # auto-selection unaffected


# ----------------------------------------------------------------------------- capability by device


def _pretend_cuda(monkeypatch, capabilities: dict, current: int = 0):
    """Pretend CUDA devices with the given compute capabilities, `current` being current."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)

    def capability(device=None):
        if device is None:
            return capabilities[current]
        index = torch.device("cuda", device).index if isinstance(device, int) else torch.device(device).index
        return capabilities[current if index is None else index]

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(_dispatch, "_op_error", lambda name, op, dt: None)  # every kernel "built"


@pytest.mark.parametrize("current", [0, 1])
def test_cuda_capability_is_read_from_the_inputs_device(monkeypatch, current):
    _pretend_cuda(monkeypatch, {0: (7, 5), 1: (9, 0)}, current=current)
    assert _dispatch.attention_error("cuda", "cuda:1", torch.float16, 64) is None
    err = _dispatch.attention_error("cuda", torch.device("cuda", 0), torch.float16, 64)
    assert err == "the cuda backend needs compute capability 8.0 or newer, the device cuda:0 has 7.5"
    # A bare device type means the current device.
    assert (_dispatch.attention_error("cuda", "cuda", torch.float16, 64) is None) == (current == 1)


@pytest.mark.parametrize("current", [0, 1])
def test_selection_uses_the_inputs_device(monkeypatch, current):
    _pretend_cuda(monkeypatch, {0: (7, 5), 1: (8, 0)}, current=current)
    monkeypatch.setattr(_dispatch, "_cuda_attention_order", lambda *a: ("cuda", "triton"))
    sel = _dispatch.select_attention
    assert sel(None, torch.device("cuda", 1), torch.float16, 64, 8, 8) == "cuda"
    assert sel("cuda", torch.device("cuda", 1), torch.float16, 64, 8, 8) == "cuda"
    monkeypatch.setattr(_dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match="cuda:0 has 7.5"):
        assert sel(None, torch.device("cuda", 0), torch.float16, 64, 8, 8) == "triton"
    with pytest.raises(ValueError, match="cuda:0 has 7.5"):
        sel("cuda", torch.device("cuda", 0), torch.float16, 64, 8, 8)


def test_triton_table_follows_the_inputs_device(monkeypatch):
    from enat_kernels.triton import sc_attention_config as config

    _pretend_cuda(monkeypatch, {0: (8, 0), 1: (9, 0)}, current=0)
    monkeypatch.setattr(config, "_FAMILIES", {})
    assert config.gpu_family(torch.device("cuda", 1)) == "hopper"
    assert config.gpu_family(torch.device("cuda", 0)) == "ampere"
    assert config.gpu_family(torch.device("cuda")) == "ampere"  # the current device


# ----------------------------------------------------------------------------- launches under the device


def test_device_guard_makes_the_inputs_device_current(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append(torch.device(device))
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    with ek_triton.device_guard(torch.device("cuda", 1)):
        pass
    with ek_triton.device_guard(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]


def test_every_triton_launch_runs_under_the_inputs_device(monkeypatch, triton_importable, gen):
    """Each kernel launch of every Triton op happens inside device_guard(inputs' device)."""
    if _dispatch.attention_error("triton", _triton_device(), torch.float32, 16) is not None:
        pytest.skip("triton SC-Attention unavailable")
    from enat_kernels.triton import routing as tr
    from enat_kernels.triton import sc_attention as sa

    guards, launches = [], []
    inside = []
    real_guard, real_launcher = ek_triton.device_guard, ek_triton._launcher

    @contextlib.contextmanager
    def recording_guard(device):
        guards.append(device)
        inside.append(True)
        with real_guard(device):
            yield
        inside.pop()

    def recording_launcher(kernel):
        launches.append((kernel, bool(inside)))
        return real_launcher(kernel)

    monkeypatch.setattr(ek_triton, "device_guard", recording_guard)
    monkeypatch.setattr(ek_triton, "_launcher", recording_launcher)
    dev = torch.device(_triton_device())
    q = torch.randn(2, 5, 2, 16, generator=gen).to(dev).requires_grad_()
    kc = torch.randn(2, 3, 2, 16, generator=gen).to(dev)
    out = sa.sc_attn_fwd(q, kc, kc, q, q, None, None, None, None, 5, 3, 0.25)[0]
    out.sum().backward()
    mask = torch.tensor([[True, False, True, True]], device=dev)
    idx, _ = tr.mask_to_indices(mask, 3)
    x = torch.randn(1, 4, 8, generator=gen).to(dev)
    tr.scatter_rows(tr.gather_rows(x, idx), idx, None, None, 4)
    assert len(launches) >= 7 and all(ok for _, ok in launches), launches
    assert guards and all(g == dev for g in guards)


@pytest.mark.parametrize("triton_version, numpy_version, fails", [("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False),
                                                                   ("3.8.0", "2.4.6", False), ("3.5.1", "2.5.0", True)])
def test_interpreter_refused_where_triton_cannot_run_it(monkeypatch, triton_version, numpy_version, fails):
    """Triton < 3.8's interpreter with numpy >= 2.4 fails inside every kernel with a loop: the
    backend says so (and falls back) instead of raising from a kernel."""
    import numpy
    import triton

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    err = ek_triton.triton_error("cpu")
    assert (err is not None) == fails
    if fails:
        assert f"Triton {triton_version}" in err and f"numpy {numpy_version}" in err and "numpy<2.4" in err
