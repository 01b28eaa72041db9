"""Boundaries next to the rows of docs/ERRORS.md, where an off-by-one goes unnoticed:

- a duplicated index 0 (the smallest valid index, next to the -1 padding that may repeat);
- cu_seqlens decreasing by exactly 1 (the smallest decrease);
- automatic backend selection on CPU tensors picks the ``cpu`` kernels, read from the
  selection log (values cannot tell: the fallback computes the same thing).
"""

import logging
import re

import pytest
import torch

import enat_kernels as ek

I32 = torch.int32


def idx(*rows):
    return torch.tensor(rows, dtype=torch.int64)


def rows(n, B=2, C=3):
    return torch.randn(B, n, C)


DUPLICATE_ZERO = [
    ("gather", lambda: ek.gather_tokens(rows(5), idx([0, 0, 2], [1, 3, -1])), "indices repeat a token index in batch row 0"),
    ("gather-second-row", lambda: ek.gather_tokens(rows(5), idx([1, 3, -1], [0, 4, 0])), "indices repeat a token index in batch row 1"),
    ("scatter", lambda: ek.scatter_tokens(rows(3), idx([0, 0, -1], [1, 2, -1]), 5), "idx_a repeat a token index in batch row 0"),
    ("restore-across-sets", lambda: ek.restore_tokens(rows(2), idx([0, 3], [1, -1]), rows(2), idx([2, 0], [4, 2]), 5),
     "idx_a and the other index set together repeat a token index in batch row 0"),
    ("merge-across-sets", lambda: ek.merge_tokens(rows(2), idx([0, 3], [1, -1]), rows(2), idx([0, 4], [2, 4])),
     "idx_a and the other index set together repeat a token index in batch row 0"),
]


@pytest.mark.parametrize("call, message", [pytest.param(c, m, id=i) for i, c, m in DUPLICATE_ZERO])
def test_duplicated_index_zero_is_rejected(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_repeated_padding_is_accepted():
    """-1 repeats in every padded row; only valid indices must be unique."""
    x = rows(5)
    out = ek.gather_tokens(x, idx([0, -1, -1], [4, 2, -1]))
    assert torch.equal(out[0, 0], x[0, 0]) and torch.equal(out[1, :2], x[1, [4, 2]])


def packed(T=9, Tc=6, H=2, D=8):
    r = torch.randn
    return dict(q=r(T, H, D), k_cond=r(Tc, H, D), v_cond=r(Tc, H, D), k_self=r(T, H, D), v_self=r(T, H, D))


@pytest.mark.parametrize("which", ["q", "cond"])
def test_cu_seqlens_decreasing_by_one_is_rejected(which):
    good_q, good_c = torch.tensor([0, 3, 9], dtype=I32), torch.tensor([0, 2, 6], dtype=I32)
    bad_q, bad_c = torch.tensor([0, 5, 4, 9], dtype=I32), torch.tensor([0, 4, 3, 6], dtype=I32)  # 5 -> 4, 4 -> 3
    if which == "q":
        cu_q, cu_c = bad_q, torch.tensor([0, 2, 2, 6], dtype=I32)
    else:
        cu_q, cu_c = torch.tensor([0, 3, 3, 9], dtype=I32), bad_c
    with pytest.raises(ValueError, match=f"cu_seqlens_{which} must be non-decreasing"):
        ek.sc_attention_varlen(**packed(), cu_seqlens_q=cu_q, cu_seqlens_cond=cu_c, max_seqlen_q=9, max_seqlen_cond=6)
    # The same sizes with non-decreasing offsets (and equal neighbours: empty sequences) pass.
    ek.sc_attention_varlen(**packed(), cu_seqlens_q=good_q, cu_seqlens_cond=good_c, max_seqlen_q=6, max_seqlen_cond=4)


# ----------------------------------------------------------------------------- automatic selection


@pytest.fixture
def selection_log(caplog, monkeypatch):
    """The backend chosen by each call (backend=None, no ENAT_KERNELS_BACKEND), from the log."""
    status = ek.backends()["cpu"]
    if not status:
        pytest.skip(f"the cpu backend cannot run here: {status.reason}")
    monkeypatch.delenv("ENAT_KERNELS_BACKEND", raising=False)
    caplog.set_level(logging.INFO, logger="enat_kernels")

    def chosen(op):
        found = [m for m in caplog.messages if m.startswith(f"{op}: backend ")]
        assert found, f"no selection logged for {op}: {caplog.messages}"
        return found[-1]

    return chosen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_auto_selection_picks_cpu_for_attention(selection_log, dtype, gen):
    q, k, v = (torch.randn(2, 5, 2, 16, generator=gen).to(dtype) for _ in range(3))
    ek.sc_attention(q, k, v, k, v)
    assert selection_log("sc_attention").startswith("sc_attention: backend cpu (auto")
    p = packed()
    cu_q, cu_c = torch.tensor([0, 3, 9], dtype=I32), torch.tensor([0, 2, 6], dtype=I32)
    ek.sc_attention_varlen(**p, cu_seqlens_q=cu_q, cu_seqlens_cond=cu_c, max_seqlen_q=6, max_seqlen_cond=4)
    assert selection_log("sc_attention").startswith("sc_attention: backend cpu (auto")


def test_auto_selection_picks_cpu_for_routing(selection_log, gen):
    x = torch.randn(2, 6, 3, generator=gen)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 1, 1, 0, 1, 0]], dtype=torch.bool)
    i, _ = ek.mask_to_indices(mask, 3)
    assert selection_log("mask_to_indices") == "mask_to_indices: backend cpu (auto)"
    g = ek.gather_tokens(x, i)
    assert selection_log("gather_tokens") == "gather_tokens: backend cpu (auto)"
    ek.scatter_tokens(g, i, 6)
    assert selection_log("restore_tokens") == "restore_tokens: backend cpu (auto)"
    j, _ = ek.mask_to_indices(~mask, 3)
    ek.merge_tokens(g, i, ek.gather_tokens(x, j), j)
    assert selection_log("merge_tokens") == "merge_tokens: backend cpu (auto)"


def test_forced_backend_is_logged_as_forced(selection_log, gen):
    q, k, v = (torch.randn(1, 4, 2, 8, generator=gen) for _ in range(3))
    ek.sc_attention(q, k, v, k, v, backend="torch")
    assert selection_log("sc_attention") == "sc_attention: backend torch (forced)"


# ----------------------------------------------------------------------------- value-check switch


@pytest.mark.parametrize("value, enabled", [("0", False), ("false", False), ("No", False), ("OFF", False),
                                            ("1", True), ("yes", True), ("", True)])
def test_value_checks_environment_spellings(monkeypatch, value, enabled):
    """ENAT_KERNELS_VALUE_CHECKS: every documented spelling of off, in any case, turns them off."""
    import threading

    from enat_kernels import _validation

    monkeypatch.setattr(_validation, "_state", threading.local())  # the default is read once per thread
    monkeypatch.setenv("ENAT_KERNELS_VALUE_CHECKS", value)
    assert _validation.value_checks_enabled() is enabled


# ----------------------------------------------------------------------------- smallest index sets


def test_index_zero_after_padding_is_not_ascending():
    """merge_tokens needs -1 padding at the end of a row: a 0 after a -1 is refused."""
    with pytest.raises(ValueError, match=re.escape("idx_b must be ascending with -1 padding at the end of each row; batch row 1 is not")):
        ek.merge_tokens(rows(2), idx([0, 2], [1, -1]), rows(2), idx([1, 3], [-1, 0]))


def test_a_single_index_is_checked():
    """One index in all (a (1, 1) tensor) still gets its value checks."""
    with pytest.raises(ValueError, match=re.escape("indices entries must lie in [0, 5) or be -1 (padding), got min 7 and max 7")):
        ek.gather_tokens(rows(5, B=1), idx([7]))


def test_backends_report_on_a_cpu_machine():
    """ek.backends() names the device and the ops of each usable backend."""
    if torch.cuda.is_available():
        pytest.skip("the report describes a machine without CUDA here")
    report = ek.backends()
    assert set(report) == {"triton", "cuda", "cpu", "torch"}
    assert report["torch"] and report["torch"].reason == "reference PyTorch math, every device"
    assert not report["cuda"]
    if report["cpu"]:
        assert report["cpu"].reason == "CPU: sc_attention, token routing"
    from enat_kernels import triton as ek_triton

    if ek_triton.triton_error("cpu") is None:
        assert report["triton"].reason.startswith("CPU (Triton interpreter): ")
    else:
        assert not report["triton"]


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_head_dim_one_runs(backend, gen):
    """The smallest head_dim is accepted by the backends without a fixed list of sizes."""
    from support.attention_cases import sc_attention_oracle

    answer = ek.supports("sc_attention", device="cpu", dtype=torch.float32, head_dim=1, backend=backend)
    if backend == "cpu" and not ek.backends()["cpu"]:
        pytest.skip(ek.backends()["cpu"].reason)
    assert answer.backend == backend, answer.reason
    q, kc, vc, ks, vs = (torch.randn(2, n, 2, 1, generator=gen) for n in (5, 4, 4, 5, 5))
    out = ek.sc_attention(q, kc, vc, ks, vs, backend=backend)
    want, _ = sc_attention_oracle(*(t.double() for t in (q, kc, vc, ks, vs)))
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_log_backend_environment_variable(tmp_path):
    """ENAT_KERNELS_LOG_BACKEND=1 (read at import) prints each call's backend on stderr."""
    import os
    import subprocess
    import sys

    code = ("import torch, enat_kernels as ek; q = torch.randn(1, 3, 1, 8); "
            "ek.sc_attention(q, q, q, q, q, backend='torch')")
    # The same enat_kernels as this process (the installed one, or a copy under test).
    here = os.path.dirname(os.path.dirname(ek.__file__))
    env = {**os.environ, "ENAT_KERNELS_LOG_BACKEND": "1", "PYTHONPATH": here}
    env.pop("ENAT_KERNELS_BACKEND", None)
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "enat_kernels: sc_attention: backend torch (forced)" in run.stderr.splitlines()


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_the_chosen_backend_is_the_one_that_runs(backend, gen):
    """backend="cpu" runs the registered kernels, backend="torch" the reference (no op
    call): the profiler shows which (the values are the same either way)."""
    if backend == "cpu" and not ek.backends()["cpu"]:
        pytest.skip(ek.backends()["cpu"].reason)
    x = torch.randn(2, 6, 3, generator=gen)
    q = torch.randn(2, 4, 2, 8, generator=gen)
    with torch.autograd.profiler.profile() as prof:
        ek.gather_tokens(x, idx([0, 4], [5, -1]), backend=backend)
        ek.sc_attention(q, q, q, q, q, backend=backend)
    ran = {e.name for e in prof.function_events}
    for op in ("enat_kernels::gather_rows", "enat_kernels::sc_attn_fwd"):
        assert (op in ran) == (backend == "cpu"), (op, sorted(ran))


def test_triton_head_dims_are_those_listed():
    """The Triton kernels run exactly the head_dims of HEAD_DIMS in sc_attention_config.py
    (16, 32, 64 and 128 today); the suites skip a size a backend refuses, so the selection
    over every size up to the CPU limit is checked here against the list."""
    from enat_kernels import triton as ek_triton
    from enat_kernels.triton import sc_attention_config as config

    err = ek_triton.triton_error("cpu")
    if err is not None:
        pytest.skip(err)
    ok = [D for D in range(1, 257) if ek.supports("sc_attention", device="cpu", dtype=torch.float32, head_dim=D, backend="triton")]
    assert ok == list(config.HEAD_DIMS) and {16, 32, 64, 128} <= set(ok)
