"""End-to-end sampling: the ENAT sampler from enat/ on each backend (tokens only, no VQ decode).

Times `enat.sampler.sample(model, labels, steps=..., backend=...)` (8 steps, guidance
on) on a model with random weights built from an enat.configs name.

Roles: ours = the sampler with this library's fused backends; the anchor is the same
sampler with backend "torch" (plain PyTorch math for attention and routing).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from enat.configs import get_config
from enat.model import ENAT
from enat.sampler import sample

from . import _env
from ._env import ON_GPU, measure, record


@dataclass(frozen=True)
class SampleShape:
    config: str  # an enat.configs name (numbers of the configuration)
    B: int
    steps: int
    smoke: bool = False

    @property
    def id(self) -> str:
        return f"{self.config}-B{self.B}-T{self.steps}"

    @property
    def label(self) -> str:
        return f"{self.config}: B={self.B} steps={self.steps}"


MODEL_CONFIGS_GPU = [
    # The GPU target: ENAT-L at 256 px, 250 images, 8 steps with guidance.
    SampleShape("enat-l-256", B=250, steps=8, smoke=True),
    SampleShape("enat-l-512", B=16, steps=8),
]
MODEL_CONFIGS_CPU = [
    # The CPU demo configuration of `enat-sample` (D = 64 as in ENAT-L).
    SampleShape("e4d2-c256h4-l256", B=8, steps=8, smoke=True),
]


def _shapes():
    shapes = MODEL_CONFIGS_GPU if ON_GPU else MODEL_CONFIGS_CPU
    if _env.SMOKE:
        shapes = [SampleShape(s.config, 2, 2, True) for s in shapes if s.smoke]
    return shapes


_MODELS: dict = {}


def _make_model(shape: SampleShape, env):
    """The model for a configuration, built once per session (random weights: speed
    does not depend on them)."""
    if shape.config not in _MODELS:
        _MODELS.clear()  # one model in memory at a time
        _MODELS[shape.config] = ENAT(get_config(shape.config)).to(device=env.device, dtype=env.dtype).eval()
    return _MODELS[shape.config]


BACKENDS = ("cuda", "triton", "torch") if ON_GPU else ("cpu", "torch")


def _params():
    return [pytest.param(s, b, id=f"{s.id}-{b}") for s in _shapes() for b in BACKENDS]


@pytest.mark.parametrize("shape,backend", _params())
def test_sampling(benchmark, bench_env, shape, backend):
    env = bench_env
    import enat_kernels

    if backend == "triton" and env.device.type == "cpu":
        pytest.skip("Triton on CPU tensors runs in its interpreter: timings would say nothing")
    dt = env.device.type
    err = (enat_kernels.supports("sc_attention", device=dt, dtype=env.dtype, head_dim=64, backend=backend).reason
           or enat_kernels.supports("gather_tokens", device=dt, backend=backend).reason)
    if err:
        pytest.skip(err)
    model = _make_model(shape, env)
    benchmark.group = f"sampling | {shape.label}"
    g = torch.Generator(device=env.device).manual_seed(0)
    labels = torch.randint(0, 1000, (shape.B,), generator=g, device=env.device)

    def call(_):
        with torch.inference_mode():
            return sample(model, labels, steps=shape.steps, backend=backend)

    tokens = call(0)
    assert tokens.shape[0] == shape.B and not tokens.is_floating_point(), f"sample returned {tuple(tokens.shape)} {tokens.dtype}"
    timing = measure(benchmark, call, 1, env)
    record(
        benchmark, env,
        op="sampling", direction=None, case=shape.id, case_label=shape.label,
        shape={"B": shape.B, "steps": shape.steps, "config": shape.config},
        path=f"{'ours' if backend != 'torch' else 'reference'}:{backend}",
        role="anchor" if backend == "torch" else "ours", family="enat.sampler", concat_counted=None,
        flops=None, bytes=None, **timing,
    )
