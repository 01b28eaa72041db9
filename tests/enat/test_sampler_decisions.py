"""The sampler's decisions, on both paths, with a stub model whose logits are crafted.

The stub returns, for every masked position, a fixed random row of logits that
depends on the label and the position (peaked: one token far above the others).
Knowing the logits, the tests recompute each step from the published sampler's formulas:

- guided logits = cond + g (cond - uncond), g = 0 at step 0, r_prev * cfg_scale after;
- with mask_temp = 0, the re-masked positions are the floor(L cos(r pi / 2)) masked
  positions whose sampled token has the lowest log-probability;
- with noise, the sampled tokens and the re-masked set follow
  argmax(logp / T_samp + G1) and logp(pick) + T_mask G2, with G1, G2 standard Gumbel
  noise -log(-log u) drawn from the generator in that order (one draw of each per step);
- a token visible at the input of a step is never re-masked, even when every masked
  token's log-probability is ~0 and its noise is positive.

"torch" runs the reference formulas op by op, "cpu" the fused ones.
"""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import enat_kernels as ek
from enat import get_config, sample
from enat.model import ENATOutput
from enat.sampler import _Sampler
from support.enat_models import responsive_model

PATHS = ["torch", "cpu"]
CFG = "e1d1-c32h2-l16-v64-k10"  # L = 16, V = 64, 10 classes + null


class StubModel(nn.Module):
    """Looks like an ENAT model to the sampler; logits[label, position] come from a table."""

    def __init__(self, config: str, backend: str, table: torch.Tensor):
        super().__init__()
        self.config = get_config(config)
        self.backend = backend
        self.dummy = nn.Parameter(torch.zeros(1))  # device and dtype for the sampler
        self.table = table  # (K + 1, L, V)
        self.eval()

    @contextlib.contextmanager
    def using_backend(self, backend):
        old, self.backend = self.backend, backend
        try:
            yield self
        finally:
            self.backend = old

    def resolved_backends(self, device=None, dtype=None):
        return SimpleNamespace(routing=None)  # enat_kernels chooses

    def modulation(self, labels):
        return None

    def forward(self, ids, labels, prev=None, counts=None, logits_for="all", modulation=None):
        masking = ids == self.config.mask_id
        idx, lens = ek.mask_to_indices(masking, counts.masked)
        full = self.table[labels]  # (B, L, V)
        if logits_for == "all":
            logits = full
        else:
            logits = torch.gather(full, 1, idx.clamp(min=0)[:, :, None].expand(-1, -1, full.shape[2]))
        return ENATOutput(logits, None, masking, idx, lens)


def crafted_table(config: str, gen: torch.Generator, peak: float = 6.0) -> torch.Tensor:
    """(K + 1, L, V) logits: random rows, each with one token `peak` above the rest."""
    c = get_config(config)
    t = torch.randn(c.num_classes + 1, c.tokens, c.codebook_size, generator=gen)
    top = torch.randint(0, c.codebook_size, (c.num_classes + 1, c.tokens, 1), generator=gen)
    return t.scatter_add(2, top, torch.full(top.shape, peak))


def remask_count(L: int, step: int, steps: int) -> int:
    return math.floor(L * math.cos((step + 1) / steps * math.pi / 2))


def guided_expected(table, labels, null, positions, g):
    """cond + g (cond - uncond) at `positions` (B, Nm), float64."""
    cond = table[labels][torch.arange(len(labels))[:, None], positions].double()
    uncond = table[torch.full_like(labels, null)][torch.arange(len(labels))[:, None], positions].double()
    return cond + g * (cond - uncond)


def masked_positions(ids, mask_id):
    """(B, Nm) masked positions per row, ascending; every row has the same count."""
    m = ids == mask_id
    n = int(m.sum(1)[0])
    assert (m.sum(1) == n).all()
    return torch.sort(torch.where(m, torch.arange(ids.shape[1]), ids.shape[1]), dim=1).values[:, :n]


def run_recorded(stub, labels, steps, cfg_scale, **kw):
    """sample() on the stub; records each step's input ids, guided logits and sampled ids."""
    guided, inputs, sampled = [], [], []
    choose = _Sampler._choose

    def spy(self, s, ids, logits, idx, routing):
        guided.append((logits.clone(), idx.clone()))
        inputs.append(ids.clone())
        return choose(self, s, ids, logits, idx, routing)

    _Sampler._choose = spy
    try:
        out = sample(
            stub,
            labels,
            steps=steps,
            cfg_scale=cfg_scale,
            callback=lambda info: sampled.append((info.ids.clone(), info.sampled.clone())),
            **kw,
        )
    finally:
        _Sampler._choose = choose
    return out, guided, inputs, sampled


@pytest.fixture
def table(gen):
    return crafted_table(CFG, gen)


@pytest.mark.parametrize("batch_guidance", [True, False])
@pytest.mark.parametrize("path", PATHS)
def test_guided_logits_at_every_step(path, batch_guidance, table, gen):
    stub = StubModel(CFG, path, table)
    c, T, cfg_scale = stub.config, 6, 2.5
    labels = torch.tensor([3, 7, c.null_label])
    _, guided, inputs, _ = run_recorded(stub, labels, T, cfg_scale, generator=gen, batch_guidance=batch_guidance)
    assert len(guided) == T
    for s, ((logits, idx), ids) in enumerate(zip(guided, inputs)):
        pos = masked_positions(ids, c.mask_id)
        assert torch.equal(idx, pos), f"step {s}: masked positions"
        g = 0.0 if s == 0 else s / T * cfg_scale  # r of the previous step times cfg_scale
        want = guided_expected(table, labels, c.null_label, pos, g)
        torch.testing.assert_close(logits.double(), want, atol=1e-5, rtol=1e-5, msg=f"step {s}, g = {g}")
    # The guidance really moved the logits (a conditional row differs from its cond logits).
    _, (last, idx) = inputs[-1], guided[-1]
    cond = guided_expected(table, labels, c.null_label, idx, 0.0)
    assert (last[:2].double() - cond[:2]).abs().max() > 1.0


@pytest.mark.parametrize("path", PATHS)
def test_without_masking_noise_the_least_confident_are_remasked(path, table, gen):
    stub = StubModel(CFG, path, table)
    c, T, cfg_scale = stub.config, 5, 2.0
    labels = torch.tensor([1, 4, 9, c.null_label])
    _, guided, inputs, sampled = run_recorded(stub, labels, T, cfg_scale, mask_temp=0.0, samp_temp=3.0, generator=gen)
    for s in range(T):
        logits, idx = guided[s]
        nxt, picks = sampled[s]
        logp = torch.log_softmax(logits.double(), dim=-1)
        pick = torch.gather(picks, 1, idx)  # the sampled ids at the masked positions
        conf = torch.gather(logp, 2, pick[:, :, None])[:, :, 0]
        k = remask_count(c.tokens, s, T)
        for b in range(len(labels)):
            want = set(idx[b, torch.argsort(conf[b])[:k]].tolist())
            got = set((nxt[b] == c.mask_id).nonzero()[:, 0].tolist())
            assert got == want, f"step {s}, row {b}"


def gumbel_draw(shape, gen):
    u = torch.rand(shape, generator=gen).clamp(min=torch.finfo(torch.float32).tiny)
    return -torch.log(-torch.log(u))


@pytest.mark.parametrize("path", PATHS)
def test_with_noise_the_decisions_follow_the_formula(path, table):
    stub = StubModel(CFG, path, table)
    c, T, cfg_scale, mask_temp, samp_temp = stub.config, 6, 3.0, 1.5, 4.0
    labels = torch.tensor([2, 5, c.null_label])
    B, L, V = len(labels), c.tokens, c.codebook_size
    _, guided, inputs, sampled = run_recorded(
        stub, labels, T, cfg_scale, mask_temp=mask_temp, samp_temp=samp_temp, generator=torch.Generator().manual_seed(21)
    )
    replay = torch.Generator().manual_seed(21)
    for s in range(T):
        r = (s + 1) / T
        ids = inputs[s]
        pos = masked_positions(ids, c.mask_id)
        Nm = pos.shape[1]
        g = 0.0 if s == 0 else s / T * cfg_scale
        logp = torch.log_softmax(guided_expected(table, labels, c.null_label, pos, g), dim=-1)
        g1, g2 = gumbel_draw((B, Nm, V), replay), gumbel_draw((B, Nm), replay)
        pick = torch.argmax(logp / max(samp_temp * (1 - r), 1e-3) + g1, dim=-1)
        conf = torch.gather(logp, 2, pick[:, :, None])[:, :, 0] + mask_temp * (1 - r) * g2
        nxt, picks = sampled[s]
        assert torch.equal(torch.gather(picks, 1, pos), pick), f"step {s}: sampled tokens"
        k = remask_count(L, s, T)
        for b in range(B):
            want = set(pos[b, torch.argsort(conf[b])[:k]].tolist())
            got = set((nxt[b] == c.mask_id).nonzero()[:, 0].tolist())
            assert got == want, f"step {s}, row {b}: re-masked set"


@pytest.mark.parametrize("path", PATHS)
def test_visible_tokens_are_never_remasked(path, gen):
    """Masked tokens all have log-probability ~0 (a peak of 60), the masking noise is
    large: a visible token that lost its +inf confidence would rank below many of them."""
    table = crafted_table(CFG, gen, peak=60.0)
    stub = StubModel(CFG, path, table)
    c, T = stub.config, 8
    labels = torch.tensor([0, 3, 6, 8, c.null_label])
    for seed in range(3):
        _, _, inputs, sampled = run_recorded(
            stub, labels, T, 1.0, mask_temp=20.0, samp_temp=1.0, generator=torch.Generator().manual_seed(seed)
        )
        for s in range(1, T):
            visible = inputs[s] != c.mask_id
            nxt, _ = sampled[s]
            assert visible.any()
            assert (nxt[visible] != c.mask_id).all(), f"seed {seed}, step {s}: a visible token was re-masked"
            assert torch.equal(nxt[visible], inputs[s][visible])


@pytest.mark.parametrize("batch_guidance", [True, False])
@pytest.mark.parametrize("path", PATHS)
def test_guided_logits_of_the_real_model(path, batch_guidance):
    """On the real (responsive) model: the sampler's guided logits at step s equal
    cond + g (cond - uncond) computed from two plain forward passes of the model."""
    model = responsive_model("e1d1-c32h2-l16-v64-k10", seed=5, backend=path)
    c, T, cfg_scale = model.config, 4, 2.5
    labels = torch.tensor([2, 9])
    _, guided, inputs, _ = run_recorded(
        model, labels, T, cfg_scale, generator=torch.Generator().manual_seed(4), batch_guidance=batch_guidance
    )
    with torch.no_grad(), model.using_backend("torch"):
        prev_c = prev_u = None
        for s, ids in enumerate(inputs):
            prev_c = model(ids, labels, prev=prev_c)
            prev_u = model(ids, torch.full_like(labels, c.null_label), prev=prev_u)
            pos = masked_positions(ids, c.mask_id)
            rows = torch.arange(len(labels))[:, None]
            cond, uncond = prev_c.logits[rows, pos].double(), prev_u.logits[rows, pos].double()
            g = 0.0 if s == 0 else s / T * cfg_scale
            logits, _ = guided[s]
            torch.testing.assert_close(logits.double(), cond + g * (cond - uncond), atol=1e-4, rtol=1e-4, msg=f"step {s}")
            if s:
                assert (g * (cond - uncond)).abs().max() > 1.0  # guidance is not negligible here
