"""End-to-end sampling: the ENAT sampler from enat/ on each backend (tokens only, no VQ decode).

Uses `enat.sampler.sample(model, labels, steps=..., backend=...)` and a model built by
`_make_model` (random weights: speed does not depend on them).  Until enat/ provides
these, each case skips with the reason.  If enat/ names its model constructor or
its configuration fields differently, adapt `_make_model` / MODEL_CONFIGS (one place).

Roles: ours = the sampler with this library's fused backends; the anchor is the same
sampler with backend "torch" (plain PyTorch math for attention and routing).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

import pytest
import torch

from . import _env
from ._env import DEVICE, ON_GPU, measure, record


@dataclass(frozen=True)
class SampleShape:
    name: str
    B: int
    steps: int
    config: tuple  # (field, value) pairs passed to the model constructor
    smoke: bool = False

    @property
    def id(self) -> str:
        return f"{self.name}-B{self.B}-T{self.steps}"

    @property
    def label(self) -> str:
        cfg = " ".join(f"{k}={v}" for k, v in self.config)
        return f"{self.name}: B={self.B} steps={self.steps} {cfg}"


def _cfg(tokens, width, heads, enc, dec):
    # ENAT_SPEC.md's numbers: L tokens, width C, H heads, NE encoder and ND decoder blocks.
    return (("tokens", tokens), ("width", width), ("heads", heads), ("encoder_depth", enc), ("decoder_depth", dec))


MODEL_CONFIGS_GPU = [
    SampleShape("enat-L-256px", B=64, steps=8, config=_cfg(256, 1024, 16, 22, 2), smoke=True),
    SampleShape("enat-L-512px", B=16, steps=8, config=_cfg(1024, 1024, 16, 22, 2)),
]
MODEL_CONFIGS_CPU = [
    # Small enough for a CPU (ENAT-L would take minutes per batch here); D = 64 as in ENAT-L.
    SampleShape("enat-256-w256-h4-e4-d2", B=4, steps=8, config=_cfg(256, 256, 4, 4, 2), smoke=True),
]


def _shapes():
    shapes = MODEL_CONFIGS_GPU if ON_GPU else MODEL_CONFIGS_CPU
    if _env.SMOKE:
        shapes = [SampleShape(s.name, 2, 2, s.config, True) for s in shapes if s.smoke]
    return shapes


class Missing(Exception):
    """enat/ does not (yet) provide what this benchmark calls."""


def _sampler():
    try:
        mod = importlib.import_module("enat.sampler")
    except ModuleNotFoundError as e:
        raise Missing(f"enat.sampler is not importable yet ({e})") from None
    sample = getattr(mod, "sample", None)
    if sample is None:
        raise Missing("enat.sampler has no `sample` function")
    if "backend" not in inspect.signature(sample).parameters:
        raise Missing("enat.sampler.sample takes no `backend` argument")
    return sample


_MODELS: dict = {}


def _make_model(shape: SampleShape, env):
    """The model for a configuration, built once per session (random weights)."""
    if shape.config not in _MODELS:
        try:
            mod = importlib.import_module("enat.model")
        except ModuleNotFoundError as e:
            raise Missing(f"enat.model is not importable yet ({e})") from None
        cls = getattr(mod, "ENAT", None)
        if cls is None:
            raise Missing("enat.model has no ENAT class (adapt _make_model in benchmarks/bench_sampling.py)")
        try:
            model = cls(**dict(shape.config))
        except TypeError as e:
            raise Missing(f"enat.model.ENAT({', '.join(k for k, _ in shape.config)}) failed: {e} (adapt MODEL_CONFIGS)") from None
        _MODELS.clear()  # one model in memory at a time
        _MODELS[shape.config] = model.to(device=env.device, dtype=env.dtype).eval()
    return _MODELS[shape.config]


BACKENDS = ("cuda", "triton", "torch") if ON_GPU else ("cpu", "torch")


def _params():
    return [pytest.param(s, b, id=f"{s.id}-{b}") for s in _shapes() for b in BACKENDS]


@pytest.mark.parametrize("shape,backend", _params())
def test_sampling(benchmark, bench_env, shape, backend):
    env = bench_env
    from enat_kernels import _dispatch

    if backend == "triton" and env.device.type == "cpu":
        pytest.skip("Triton on CPU tensors runs in its interpreter: timings would say nothing")
    err = _dispatch.attention_error(backend, env.device.type, env.dtype, 64) or _dispatch.routing_error(backend, env.device.type)
    if err:
        pytest.skip(err)
    try:
        sample = _sampler()
        model = _make_model(shape, env)
    except Missing as e:
        pytest.skip(str(e))
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
        shape={"B": shape.B, "steps": shape.steps, **dict(shape.config)},
        path=f"{'ours' if backend != 'torch' else 'reference'}:{backend}",
        role="anchor" if backend == "torch" else "ours", family="enat.sampler", concat_counted=None,
        flops=None, bytes=None, **timing,
    )
