"""Each fused backend's ENAT (kernels + the fused path's GEMM/LayerNorm restructuring)
against the reference backend, by the flash-attn rule of tests/support/tolerances.py: the
float32 error against the float64 reference must stay within a small multiple of the
error the float32 reference itself makes.

cpu: the C++ routing kernels always; C++ SC-Attention once it is built (until then
attention falls back to torch with a warning, which is checked).  triton: under the
interpreter on CPU tensors, float32, a tiny configuration; it skips with the reason
when no Triton kernel exists in this checkout.
"""

import contextlib
import logging
import warnings

import pytest
import torch

import enat.backends as enat_backends
import enat_kernels as ek
from enat import sample
from enat_kernels import _dispatch
from support.enat_models import responsive_model
from support.tolerances import assert_within_pytorch_error

CONFIGS = {"cpu": "e2d1-c64h2-l64", "triton": "e2d1-c32h2-l16-v64-k10"}


def build(config, backend, seed=3):
    return responsive_model(config, seed=seed, backend=backend)


def kernels_here(backend, head_dim):
    """(routing kernel?, attention kernel?) of `backend` on CPU tensors; skips if it has neither."""
    status = ek.backends("cpu")[backend]
    if not status:
        pytest.skip(status.reason)
    routing = ek.supports("gather_tokens", device="cpu", backend=backend)
    attention = ek.supports("sc_attention", device="cpu", dtype=torch.float32, head_dim=head_dim, backend=backend)
    if not routing and not attention:
        pytest.skip(f"{backend}: {routing.reason}; {attention.reason}")
    return bool(routing), bool(attention)


def trajectory(model, rows=3, steps=5, seed=11):
    labels = torch.arange(rows) % (model.config.num_classes + 1)
    inputs = [torch.full((rows, model.config.tokens), model.config.mask_id)]
    sample(model, labels, steps=steps, generator=torch.Generator().manual_seed(seed), backend="torch",
           callback=lambda info: inputs.append(info.ids.clone()))
    return labels, inputs[:-1]


def run_chain(model, labels, inputs, backend, dtype):
    """logits and feat of every step, chained with reuse, for one backend and dtype."""
    outs, prev = [], None
    with torch.no_grad(), model.using_backend(backend):
        for ids in inputs:
            prev = model(ids, labels, prev=prev)
            outs.append((prev.logits.to(dtype), prev.feat.to(dtype)))
    return outs


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fused_model_within_pytorch_error(backend, poison, caplog):
    model = build(CONFIGS[backend], backend)
    has_routing, has_attention = kernels_here(backend, model.config.head_dim)
    with _nowarn():
        resolved = model.resolved_backends("cpu", torch.float32)
    assert resolved.routing == (backend if has_routing else "torch")
    assert resolved.attention == (backend if has_attention else "torch")
    enat_backends._warned.clear()  # warned once per process: let this test see it

    labels, inputs = trajectory(model)
    with caplog.at_level(logging.INFO, logger="enat_kernels"):
        if has_attention:
            got = run_chain(model, labels, inputs, backend, torch.float32)
        else:  # the fallback is announced, never silent
            with pytest.warns(RuntimeWarning, match="attention uses the torch reference"):
                got = run_chain(model, labels, inputs, backend, torch.float32)
    used = {r.getMessage() for r in caplog.records}
    if has_routing:
        assert any(m.startswith("gather_tokens: backend " + backend) for m in used), used
    if has_attention:
        assert any(m.startswith("sc_attention: backend " + backend) for m in used), used
    assert not any(m.startswith("sc_attention: backend torch") for m in used) or not has_attention

    lowp = run_chain(model, labels, inputs, "torch", torch.float32)
    oracle = run_chain(model.double(), labels, inputs, "torch", torch.float64)
    for s, (g, lp, o) in enumerate(zip(got, lowp, oracle)):
        for name, a, b, c in zip(("logits", "feat"), g, lp, o):
            assert_within_pytorch_error(f"step {s} {name}", a, b, c, torch.float32)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fused_model_ragged_batch(backend, poison):
    """Rows with different numbers of masked tokens: per-row lengths through the kernels."""
    model = build(CONFIGS[backend], backend)
    kernels_here(backend, model.config.head_dim)
    labels, inputs = trajectory(model, rows=3, steps=6)
    rows = torch.arange(3)
    prev_ids = torch.stack([inputs[s][r] for s, r in zip((0, 2, 3), rows)])
    ids = torch.stack([inputs[s][r] for s, r in zip((1, 3, 5), rows)])
    assert len(set((ids == model.config.mask_id).sum(1).tolist())) == 3
    results = {}
    with torch.no_grad(), _nowarn():
        for be, dt in ((backend, torch.float32), ("torch", torch.float32), ("torch", torch.float64)):
            m = model.to(dt)
            with m.using_backend(be):
                prev = m(prev_ids, labels)
                out = m(ids, labels, prev=prev)
            results[(be, dt)] = (out.logits, out.feat)
    got, lowp, oracle = results[(backend, torch.float32)], results[("torch", torch.float32)], results[("torch", torch.float64)]
    for name, a, b, c in zip(("logits", "feat"), got, lowp, oracle):
        assert_within_pytorch_error(f"ragged {name}", a, b, c, torch.float32)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fused_sampling_agrees_with_reference(backend):
    """End to end: the same seeds give (nearly) the same tokens on both paths; a broken
    fused path would agree on ~1/V of them.  Exact equality is not required: a logit
    difference of a few ulps may flip a near-tie."""
    model = build(CONFIGS[backend], backend)
    kernels_here(backend, model.config.head_dim)
    labels = torch.tensor([1, 4, 7, 2])
    with _nowarn():
        a = sample(model, labels, steps=6, generator=torch.Generator().manual_seed(2))
    b = sample(model, labels, steps=6, generator=torch.Generator().manual_seed(2), backend="torch")
    assert (a == b).float().mean().item() >= 0.95


@contextlib.contextmanager
def _nowarn():
    """Silence the fallback warning (its presence is tested above)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def test_fused_backend_for_falls_back_when_no_kernel_loads(monkeypatch):
    """`--backend auto` on a machine whose compiled extension cannot load (built for
    another torch, or the source tree shadowing the installed package) runs the torch
    path with a warning naming the reason, instead of failing."""
    from enat import backends as enat_backends

    monkeypatch.setattr(enat_backends, "_warned", set())
    monkeypatch.setattr(_dispatch, "backend_error", lambda name, device: "could not import enat_kernels._C (mocked)")
    with pytest.warns(RuntimeWarning, match=r"no fused backend runs on cpu here \(cpu: could not import"):
        assert enat_backends.fused_backend_for(torch.device("cpu")) == "torch"
    monkeypatch.setattr(_dispatch, "backend_error", lambda name, device: None)
    assert enat_backends.fused_backend_for(torch.device("cpu")) == "cpu"
