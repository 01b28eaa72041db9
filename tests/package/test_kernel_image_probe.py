"""A CUDA build without a kernel image for the device (its arch list missed the card,
and no PTX the driver can compile covers it) reports the cuda backend unavailable with
the reason, and automatic selection falls back, instead of failing every launch.

No GPU here: the device, the loaded extension and its probe are mocked.
"""

import sys
import types

import pytest
import torch

import enat_kernels as ek
from enat_kernels import _dispatch, _extension
from enat_kernels import triton as ek_triton

NO_IMAGE = "no kernel image is available for execution on the device (cudaErrorNoKernelImageForDevice)"


@pytest.fixture
def fake_gpu(monkeypatch):
    """One CUDA device of capability 12.0 and a loaded CUDA extension whose probe answers
    `probe.answer`; counts the probes per device."""
    probe = types.SimpleNamespace(answer=NO_IMAGE, calls=[])

    def kernel_image_error(index):
        probe.calls.append(index)
        return probe.answer

    monkeypatch.setitem(sys.modules, "enat_kernels._C_cuda", types.SimpleNamespace(kernel_image_error=kernel_image_error))
    monkeypatch.setattr(_extension, "_image_errors", {})
    monkeypatch.setattr(_extension, "cuda_extension_error", lambda: None)
    monkeypatch.setattr(_extension, "build_info", lambda: {"CUDA_ARCHS": "8.0;9.0+PTX", "CUDA_BUILT": True})
    monkeypatch.setattr(_extension, "has_kernel", lambda op, key: True)
    monkeypatch.setattr(ek_triton, "triton_error", lambda device_type: "triton mocked away")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (12, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake GPU")
    return probe


def test_backends_say_why_cuda_cannot_run(fake_gpu):
    status = ek.backends()["cuda"]
    assert not status.available
    assert "no kernel image for Fake GPU (compute capability 12.0)" in status.reason
    assert "compiled for 8.0;9.0+PTX" in status.reason and NO_IMAGE in status.reason
    assert 'TORCH_CUDA_ARCH_LIST="12.0"' in status.reason


def test_auto_selection_falls_back_and_forcing_cuda_says_why(fake_gpu):
    dev = torch.device("cuda")
    assert _dispatch.select_attention(None, dev, torch.bfloat16, 64) == "torch"
    assert _dispatch.select_routing(None, dev, "gather_rows") == "torch"
    with pytest.raises(ValueError, match="backend='cuda' cannot run these inputs: no kernel image"):
        _dispatch.select_attention("cuda", dev, torch.bfloat16, 64)


def test_device_with_an_image_keeps_cuda(fake_gpu):
    fake_gpu.answer = None
    assert ek.backends()["cuda"].available
    assert _dispatch.select_attention(None, torch.device("cuda"), torch.bfloat16, 64) == "cuda"


def test_probe_runs_once_per_device(fake_gpu):
    for _ in range(3):
        _dispatch.backend_error("cuda", "cuda")
    assert _extension.cuda_device_error(1) is not None
    assert fake_gpu.calls == [0, 1]


def test_probe_asks_about_the_inputs_device(fake_gpu):
    """Inputs on cuda:1 while cuda:0 is current: the probe (and so the choice) is for
    device 1, for attention and for routing alike."""
    fake_gpu.answer = None
    _dispatch.backend_error("cuda", "cuda:1")
    assert fake_gpu.calls == [1]
    assert _dispatch.select_routing(None, torch.device("cuda", 1), "gather_rows") == "cuda"
    assert _dispatch.select_attention(None, torch.device("cuda", 1), torch.bfloat16, 64) == "cuda"
    assert fake_gpu.calls == [1]  # probed once, for device 1 only
