"""Training step: forward + backward + AdamW + EMA, as enat-train runs it, fused path against the torch path.

CPU: the CLI's configuration (e4d2-c256h4-l256), float32.  GPU: ENAT-L at 256 px with
bf16 autocast (the GPU shapes are only collected on a GPU, so on a CPU-only machine
they are absent rather than failing).  Each case is a step whose draw reuses (the
gradient-free pass of the EMA model, then the trained pass) or one that does not.
Peak memory is recorded with every case on a GPU; on a CPU, where torch keeps no
allocator statistics, benchmarks/paired_training.py measures it per process.
The paired script is the one to trust on a shared machine; see its docstring.
"""

from __future__ import annotations

import pytest
import torch

import enat_kernels
from enat.backends import fused_backend_for

from . import _env
from ._env import ON_GPU, measure, record
from ._training_paths import CPU_SHAPES, GPU_SHAPES, TrainShape, cuda_peak, make_trainer, step_call


def _shapes():
    shapes = GPU_SHAPES if ON_GPU else CPU_SHAPES
    if _env.SMOKE:
        shapes = [TrainShape(s.config, 2, s.reuse, True) for s in shapes if s.smoke]  # batch 2: seconds, not minutes
    return shapes


def _params():
    paths = ("fused", "torch")
    return [pytest.param(s, p, id=f"{s.id}-{p}") for s in _shapes() for p in paths]


@pytest.mark.parametrize("shape,path", _params())
def test_training_step(benchmark, bench_env, shape, path):
    env = bench_env
    backend = fused_backend_for(env.device) if path == "fused" else "torch"
    status = enat_kernels.backends(env.device)[backend]
    if not status:
        pytest.skip(status.reason)
    precision = "bf16" if env.device.type == "cuda" else "fp32"
    trainer = make_trainer(shape, backend, env.device, precision)
    benchmark.group = f"training step | {shape.label}"
    call = step_call(trainer, env.sync)
    loss = call()
    assert torch.isfinite(torch.as_tensor(loss)).all(), f"training step gave loss {loss}"
    peak = {}
    if env.device.type == "cuda" and not env.smoke:
        with cuda_peak(env.device) as peak:
            call()
    timing = measure(benchmark, call, 1, env)
    record(
        benchmark, env,
        op="training_step", direction="fwd+bwd+optim", case=shape.id, case_label=shape.label,
        shape={"B": shape.batch, "config": shape.config, "reuse": shape.reuse},
        path=f"{'ours' if path == 'fused' else 'reference'}:{backend}",
        role="ours" if path == "fused" else "anchor", family="enat.training", concat_counted=None,
        flops=None, bytes=None, peak_memory_bytes=peak.get("peak_bytes"), **timing,
    )
