"""The sampler: schedule, invariants, reproducibility, batched guidance, ragged batches, no host syncs.

Invariants are checked on the reference path and on the fused cpu path (which warns
once if its attention kernel is not built and then uses the reference attention).
"""

import contextlib
import math

import pytest
import torch

import enat
import enat_kernels as ek
from enat import sample
from enat.sampler import SamplingPlan, _Sampler
from support.enat_models import responsive_model

CFG = "e2d1-c64h2-l64"
# The reference formulas and the fused path (kernels + fewer-pass sampler math).
BACKENDS = ["torch", "cpu"]


@pytest.fixture(scope="module")
def model():
    return responsive_model(CFG, seed=7)


def record(model, labels, **kw):
    """tokens and the (B, L) input ids of every step, then the final tokens."""
    seen = []
    out = sample(model, labels, callback=lambda info: seen.append((info.ids.clone(), info.sampled.clone())), **kw)
    inputs = [torch.full((len(labels), model.config.tokens), model.config.mask_id)] + [ids for ids, _ in seen]
    return out, inputs, [s for _, s in seen]


def test_mask_schedule_is_the_cosine_schedule():
    L, T = 256, 8
    expected = [L] + [math.floor(L * math.cos((s + 1) / T * math.pi / 2)) for s in range(T)]
    assert enat.mask_schedule(L, T) == expected
    assert expected[-1] == 0 and expected[1] == 251 and expected[4] == 181  # floor(256 cos(pi/4)) = 181


@pytest.mark.parametrize("steps", [1, 4, 8])
def test_remask_counts_follow_the_schedule(model, steps):
    labels = torch.tensor([0, 5, 1000])
    out, inputs, _ = record(model, labels, steps=steps, generator=torch.Generator().manual_seed(1))
    schedule = enat.mask_schedule(model.config.tokens, steps)
    for s, ids in enumerate(inputs):
        assert ((ids == model.config.mask_id).sum(1) == schedule[s]).all(), f"after step {s}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_visible_tokens_never_change_and_all_are_revealed(model, backend):
    labels = torch.tensor([3, 9, 27, 1000])
    out, inputs, sampled = record(model, labels, steps=8, generator=torch.Generator().manual_seed(2), backend=backend)
    V = model.config.mask_id
    final = out.reshape(len(labels), -1)
    for s, ids in enumerate(inputs):
        visible = ids != V
        assert torch.equal(final[visible], ids[visible]), f"a token visible after step {s} changed"
        for later in inputs[s + 1 :]:
            assert torch.equal(later[visible], ids[visible])
    assert out.shape == (4, *model.config.grid) and out.dtype == torch.int64
    assert ((out >= 0) & (out < V)).all()
    assert torch.equal(final, sampled[-1])


def test_same_seed_same_tokens(model):
    labels = torch.tensor([1, 2, 3])
    a = sample(model, labels, steps=6, generator=torch.Generator().manual_seed(42))
    b = sample(model, labels, steps=6, generator=torch.Generator().manual_seed(42))
    c = sample(model, labels, steps=6, generator=torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert (a != c).float().mean() > 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_guidance_equals_two_passes(model, backend):
    labels = torch.tensor([10, 20, 1000])
    kw = dict(steps=6, cfg_scale=3.0, backend=backend)
    one = sample(model, labels, generator=torch.Generator().manual_seed(3), batch_guidance=True, **kw)
    two = sample(model, labels, generator=torch.Generator().manual_seed(3), batch_guidance=False, **kw)
    assert torch.equal(one, two)
    # Guidance is active in both (its formula is checked in test_sampler_decisions.py).
    unguided = sample(model, labels, generator=torch.Generator().manual_seed(3), **{**kw, "cfg_scale": 0.0})
    assert (one[:2] != unguided[:2]).float().mean() > 0.3
    assert torch.equal(one[2], unguided[2])  # the null-label row: cond = uncond


def test_guidance_matters(model):
    """cfg_scale changes most tokens of every conditional row (else the guidance tests above
    could pass with guidance ignored), and none of an unconditional one."""
    labels = torch.tensor([10, 20, 30, 1000])
    a = sample(model, labels, steps=6, cfg_scale=0.0, generator=torch.Generator().manual_seed(3))
    b = sample(model, labels, steps=6, cfg_scale=4.0, generator=torch.Generator().manual_seed(3))
    changed = (a != b).flatten(1).float().mean(1)
    assert (changed[:3] > 0.3).all(), changed.tolist()
    assert changed[3] == 0


def test_head_on_masked_tokens_equals_head_on_all(model):
    labels = torch.tensor([4, 1000])
    a = sample(model, labels, steps=5, generator=torch.Generator().manual_seed(8), head="masked")
    b = sample(model, labels, steps=5, generator=torch.Generator().manual_seed(8), head="all")
    assert torch.equal(a, b)


def test_guidance_and_temperatures_per_step():
    plan = SamplingPlan.build(64, [4], cfg_scale=2.0, mask_temp=1.5, samp_temp=6.0)
    assert [g[0] for g in plan.guidance] == [0.0, 0.5, 1.0, 1.5]  # r_prev * cfg_scale, 0 at step 0
    assert [t[0] for t in plan.mask_temp] == pytest.approx([1.125, 0.75, 0.375, 0.0])
    assert [t[0] for t in plan.samp_temp] == pytest.approx([4.5, 3.0, 1.5, 1e-3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ragged_batch_rows_equal_rows_sampled_alone(model, backend):
    """Rows with different step counts (so different masked counts at every step), one
    generator per row: each row's tokens equal that row sampled alone."""
    labels, steps, seeds = torch.tensor([5, 6, 1000]), [6, 3, 4], [11, 12, 13]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    out, inputs, _ = record(model, labels, steps=steps, generator=gens, backend=backend)
    for b in range(3):
        alone = sample(model, labels[b : b + 1], steps=steps[b], generator=[torch.Generator().manual_seed(seeds[b])],
                       backend=backend)
        assert torch.equal(out[b], alone[0]), f"row {b}"
    counts = torch.stack([(ids == model.config.mask_id).sum(1) for ids in inputs])  # (T + 1, B)
    L, T = model.config.tokens, max(steps)
    for b, Tb in enumerate(steps):
        own = enat.mask_schedule(L, Tb)
        assert counts[:, b].tolist() == [L] * (T - Tb) + own  # waits fully masked, then its own schedule
    assert len(set(counts[3].tolist())) == 3  # the batch really is ragged


def test_per_row_generators_do_not_depend_on_the_batch(model):
    labels, seeds = torch.tensor([7, 8, 9, 10]), [1, 2, 3, 4]
    full = sample(model, labels, steps=4, generator=[torch.Generator().manual_seed(s) for s in seeds])
    half = sample(model, labels[2:], steps=4, generator=[torch.Generator().manual_seed(s) for s in seeds[2:]])
    assert torch.equal(full[2:], half)


@contextlib.contextmanager
def forbid_host_reads(monkeypatch):
    """Make every Python-level way of reading a tensor value on the host raise."""

    def refuse(name):
        def f(*args, **kwargs):
            raise AssertionError(f"host read inside the sampling loop: {name}")
        return f

    for name in ("item", "tolist", "numpy", "cpu", "nonzero", "masked_select", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse(f"Tensor.{name}"))
    for name in ("nonzero", "masked_select", "unique", "argwhere"):
        monkeypatch.setattr(torch, name, refuse(f"torch.{name}"))
    getitem = torch.Tensor.__getitem__

    def checked_getitem(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
            raise AssertionError("boolean indexing (data-dependent shape) inside the sampling loop")
        return getitem(self, index)

    monkeypatch.setattr(torch.Tensor, "__getitem__", checked_getitem)
    try:
        yield
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("ragged", [False, True])
def test_no_host_reads_inside_the_loop(model, backend, ragged, monkeypatch, recwarn):
    labels = torch.tensor([1, 2, 3])
    steps = [5, 3, 4] if ragged else 5
    gens = [torch.Generator().manual_seed(i) for i in range(3)] if ragged else torch.Generator().manual_seed(0)
    with torch.no_grad(), model.using_backend(backend), ek.value_checks(False):
        run = _Sampler(model, labels, steps, 2.5, 1.5, 6.0, gens, True, "masked")
        with forbid_host_reads(monkeypatch):
            out = run.loop()
    with pytest.raises(AssertionError, match="host read"):  # the guard catches enat_kernels' value checks
        with torch.no_grad(), model.using_backend(backend), ek.value_checks(True), forbid_host_reads(monkeypatch):
            run.loop()
    assert (out != model.config.mask_id).all()


def test_refuses_bad_arguments(model):
    with pytest.raises(ValueError, match="eval mode"):
        sample(model.train(), torch.tensor([1]))
    model.eval()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1000\]"):
        sample(model, torch.tensor([1001]))
    with pytest.raises(ValueError, match="one torch.Generator per row"):
        sample(model, torch.tensor([1, 2]), generator=[torch.Generator()])
    with pytest.raises(ValueError, match="steps must be"):
        sample(model, torch.tensor([1, 2]), steps=[3])
    with pytest.raises(ValueError, match="CUDA device"):
        enat.CUDAGraphSampler(model, batch_size=2)


def test_cfg_is_a_deprecated_alias_of_cfg_scale(model):
    """The guidance scale's old keyword `cfg` still works (same tokens), with a DeprecationWarning."""
    labels = torch.tensor([3, 7])
    kw = dict(steps=4, backend="torch")
    new = sample(model, labels, cfg_scale=4.0, generator=torch.Generator().manual_seed(5), **kw)
    with pytest.warns(DeprecationWarning, match="the keyword cfg is deprecated, use cfg_scale") as caught:
        old = sample(model, labels, cfg=4.0, generator=torch.Generator().manual_seed(5), **kw)
    assert caught[0].filename == __file__  # points at the caller
    default = sample(model, labels, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(old, new) and not torch.equal(new, default)  # the alias's value is the one used
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        enat.CUDAGraphSampler(model, batch_size=2, cfg=4.0)
