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
import logging
import re
import sys
import warnings

import pytest
import torch

import enat_kernels as ek
from enat_kernels import _dispatch, _extension
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


@contextlib.contextmanager
def warnings_as_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


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
    name, msg = _dispatch._choose_attention(None, "cuda:0", torch.float16, 64)
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
    # ...with a kernel image for each device (the real probe would start the CUDA runtime).
    monkeypatch.setattr(_extension, "cuda_device_error", lambda index: None)


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
    monkeypatch.setitem(_dispatch.AUTO_ORDER, ("cuda", "sc_attention"), ("cuda", "triton"))
    sel = _dispatch.select_attention
    assert sel(None, torch.device("cuda", 1), torch.float16, 64) == "cuda"
    assert sel("cuda", torch.device("cuda", 1), torch.float16, 64) == "cuda"
    monkeypatch.setattr(_dispatch, "_warned", set())
    with pytest.warns(RuntimeWarning, match="cuda:0 has 7.5"):
        assert sel(None, torch.device("cuda", 0), torch.float16, 64) == "triton"
    with pytest.raises(ValueError, match="cuda:0 has 7.5"):
        sel("cuda", torch.device("cuda", 0), torch.float16, 64)


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


# ----------------------------------------------------------------------------- the public query


def _attention_inputs(gen, D=16, dtype=torch.float32, N=5, Nc=3):
    return tuple(torch.randn(2, n, 2, D, generator=gen).to(dtype) for n in (N, Nc, Nc, N, N))


@pytest.mark.parametrize("backend", [None, *ek.BACKENDS])
@pytest.mark.parametrize("D, dtype", [(16, torch.float32), (24, torch.float32), (16, torch.float64), (32, torch.float16)])
def test_supports_answers_as_the_op_selects(backend, D, dtype, gen, caplog, monkeypatch):
    """On CPU tensors, supports() names the backend the op then runs (read from the log),
    or the reason the forced op then raises; it warns nothing itself."""
    monkeypatch.delenv("ENAT_KERNELS_BACKEND", raising=False)
    monkeypatch.setattr(_dispatch, "_warned", set())
    inputs = _attention_inputs(gen, D, dtype)
    with warnings_as_errors():
        answer = ek.supports("sc_attention", *inputs, backend=backend)
    assert answer == ek.supports("sc_attention", device="cpu", dtype=dtype, head_dim=D, backend=backend)
    if answer.backend is None:
        assert backend is not None and answer.reason and not answer
        with pytest.raises(ValueError, match=re.escape(f"backend={backend!r} cannot run these inputs: {answer.reason}")):
            ek.sc_attention(*inputs, backend=backend)
        return
    assert answer and (answer.backend == backend or backend is None)
    caplog.set_level(logging.INFO, logger="enat_kernels")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # auto's own skip warnings
        out = ek.sc_attention(*inputs, backend=backend)
    assert torch.isfinite(out).all()
    chosen = [r.getMessage() for r in caplog.records if r.getMessage().startswith("sc_attention: backend ")]
    assert chosen and chosen[-1].startswith(f"sc_attention: backend {answer.backend} ("), chosen


def test_supports_on_cpu_tensors_names_each_backend(gen):
    q = _attention_inputs(gen)[0]
    assert ek.supports("sc_attention", q, backend="torch") == ek.Support("torch", "")
    cuda = ek.supports("sc_attention", q, backend="cuda")
    assert cuda.backend is None and cuda.reason == "the cuda backend runs on CUDA tensors, got cpu tensors"
    cpu_status = ek.backends("cpu")["cpu"]
    assert ek.supports("sc_attention", q).backend == ("cpu" if cpu_status else "torch")
    assert ek.supports("gather_tokens", torch.randn(2, 4, 3), backend="cpu").backend == ("cpu" if cpu_status else None)
    if ek_triton.triton_error("cpu") is None:  # the interpreter: float32 and float16 only
        assert ek.supports("sc_attention", q, backend="triton").backend == "triton"
        bf16 = ek.supports("sc_attention", q.bfloat16(), backend="triton")
        assert bf16.reason == "the Triton interpreter (CPU) does not support bfloat16"
        odd = ek.supports("sc_attention", device="cpu", dtype=torch.float32, head_dim=24, backend="triton")
        listed = _dispatch.ATTENTION_CAPS["triton"].head_dims
        assert odd.reason == f"the triton backend does not support head_dim 24 (supports {listed})"


def test_supports_with_mocked_cuda_devices(monkeypatch):
    """Two pretended GPUs, cuda:0 pre-Ampere: the answer reads the inputs' own device and
    follows the automatic order of the table (attention: triton first; routing: cuda first)."""
    _pretend_cuda(monkeypatch, {0: (7, 5), 1: (9, 0)}, current=1)
    f16 = dict(dtype=torch.float16, head_dim=64)
    with warnings_as_errors():
        assert ek.supports("sc_attention", device="cuda:1", **f16, backend="cuda") == ek.Support("cuda", "")
        old = ek.supports("sc_attention", device="cuda:0", **f16, backend="cuda")
        assert old == ek.Support(None, "the cuda backend needs compute capability 8.0 or newer, the device cuda:0 has 7.5")
        assert ek.supports("sc_attention", device="cuda", **f16, backend="cuda").backend == "cuda"  # current: cuda:1
        assert ek.supports("sc_attention", device="cuda:1", **f16).backend == _dispatch.AUTO_ORDER[("cuda", "sc_attention")][0]
        assert ek.supports("gather_tokens", device="cuda:0").backend == _dispatch.AUTO_ORDER[("cuda", "routing")][0]
        monkeypatch.setitem(_dispatch.AUTO_ORDER, ("cuda", "sc_attention"), ("cuda", "triton"))
        skipped = ek.supports("sc_attention", device="cuda:0", **f16)
        assert skipped == ek.Support("triton", f"cuda: {old.reason}")
        f32 = ek.supports("sc_attention", device="cuda:1", dtype=torch.float32, head_dim=64)
        assert f32.backend == "triton" and "does not support dtype float32" in f32.reason


def test_automatic_order_is_the_documented_one():
    """The order the README states: on CUDA tensors SC-Attention tries triton then cuda,
    routing cuda then triton; on CPU tensors the cpu backend; torch always last."""
    assert _dispatch.auto_order("cuda", "sc_attention") == ("triton", "cuda", "torch")
    assert _dispatch.auto_order("cuda", "routing") == ("cuda", "triton", "torch")
    assert _dispatch.auto_order("cpu", "sc_attention") == _dispatch.auto_order("cpu", "routing") == ("cpu", "torch")
    assert _dispatch.auto_order("mps", "routing") == ("torch",)


def test_one_automatic_order_for_the_model(monkeypatch):
    """enat's `--backend auto` picks the first backend of the table's attention order."""
    from enat import backends as enat_backends

    _pretend_cuda(monkeypatch, {0: (9, 0)})
    assert enat_backends.fused_backend_for(torch.device("cuda")) == _dispatch.AUTO_ORDER[("cuda", "sc_attention")][0]
    monkeypatch.setitem(_dispatch.AUTO_ORDER, ("cuda", "sc_attention"), ("cuda", "triton"))
    assert enat_backends.fused_backend_for(torch.device("cuda")) == "cuda"


def test_backends_for_a_device(monkeypatch):
    """backends(device) reports each backend for tensors on that device."""
    report = ek.backends("cpu")
    assert report["cuda"].reason == "the cuda backend runs on CUDA tensors, got cpu tensors"
    assert report["torch"] and report["cpu"].available == ek.backends()["cpu"].available
    _pretend_cuda(monkeypatch, {0: (9, 0)})
    assert not ek.backends("cuda")["cpu"]
