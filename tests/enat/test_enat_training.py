"""enat.training: the loss (against a direct computation, and fused against the torch
path by the shared suite's rule, ragged rows included), the mask sampler, label
dropout, EMA, optimizer, warm-up and from-scratch initialization."""

import math
import re
import warnings

import pytest
import torch

from enat import ENAT
from enat import training as T
from support.enat_direct import DirectENAT
from support.tolerances import assert_within_pytorch_error

CFG = "e2d1-c64h2-l64"  # head_dim 32, 64 tokens, 1024 codes, 1000 classes


def build(config=CFG, backend="cpu", seed=1):
    m = ENAT(config, backend=backend).eval()  # eval: no dropout, the loss is deterministic
    m.reset_parameters(torch.Generator().manual_seed(seed))
    return m


def batch(model, rows, gen):
    c = model.config
    return torch.randint(0, c.codebook_size, (rows, c.tokens), generator=gen), torch.randint(0, c.num_classes, (rows,), generator=gen)


def draw_with(gen, rows, L, *, per_row, reuse):
    """A sampler draw that reuses (or not): draws until the coin says so."""
    for _ in range(100):
        d = T.sample_masks(rows, L, gen, per_row=per_row)
        if (d.prev_masking is not None) == reuse:
            return d
    raise AssertionError("the reuse coin never came up")


# ----------------------------------------------------------------------------- the loss


def direct_loss(model, cond_model, tokens, labels, masking, prev_masking, eps):
    """The published step's loss, written out on tests/support/enat_direct.py (equal counts per row)."""
    c = model.config
    direct = DirectENAT(model.state_dict(), c.depth_enc, c.depth_dec, c.heads, c.codebook_size)
    prev = None
    if prev_masking is not None:
        cond = DirectENAT(cond_model.state_dict(), c.depth_enc, c.depth_dec, c.heads, c.codebook_size)
        _, feat, pm = cond(tokens.masked_fill(prev_masking, c.mask_id), labels)
        prev = (feat, pm)
    logits, _, _ = direct(tokens.masked_fill(masking, c.mask_id), labels, prev=prev)
    logp = torch.log_softmax(logits[masking], dim=-1)
    nll = -logp.gather(1, tokens[masking][:, None])[:, 0]
    return ((1 - eps) * nll - eps * logp.mean(-1)).mean()


@pytest.mark.parametrize("reuse", [False, True])
def test_loss_matches_direct_computation(reuse, gen):
    model = build(backend="torch").double()
    ema = build(backend="torch", seed=2).double()  # a different cond model: its features must be the ones used
    tokens, labels = batch(model, 3, gen)
    d = draw_with(gen, 3, model.config.tokens, per_row=False, reuse=reuse)
    got = T.loss(model, tokens, labels, d.masking, d.prev_masking, cond_model=ema, label_smoothing=0.1)
    want = direct_loss(model, ema, tokens, labels, d.masking, d.prev_masking, 0.1)
    assert abs(got.item() - want.item()) < 1e-9, (got.item(), want.item())
    if reuse:  # the cond model matters; by default it is the model itself
        own = T.loss(model, tokens, labels, d.masking, d.prev_masking)
        assert abs(own.item() - direct_loss(model, model, tokens, labels, d.masking, d.prev_masking, 0.1).item()) < 1e-9
        assert abs(own.item() - got.item()) > 1e-6


def test_loss_of_a_ragged_batch_is_the_sum_of_its_rows(gen):
    """Rows with different mask counts: the batched loss (sum) equals the rows' losses computed alone."""
    model = build(backend="torch").double()
    tokens, labels = batch(model, 4, gen)
    d = draw_with(gen, 4, model.config.tokens, per_row=True, reuse=True)
    assert len(set(d.masked)) > 1 and len(set(d.prev_masked)) > 1
    total = T.loss(model, tokens, labels, d.masking, d.prev_masking, reduction="sum")
    rows = [T.loss(model, tokens[i : i + 1], labels[i : i + 1], d.masking[i : i + 1], d.prev_masking[i : i + 1], reduction="sum")
            for i in range(4)]
    assert abs(total.item() - sum(r.item() for r in rows)) < 1e-9
    mean = T.loss(model, tokens, labels, d.masking, d.prev_masking, counts=d)
    assert abs(mean.item() - total.item() / sum(d.masked)) < 1e-12


def loss_and_grads(model, backend, dtype, tokens, labels, d, cond_model):
    m = model.to(dtype)
    cm = None if cond_model is None else cond_model.to(dtype)
    m.zero_grad(set_to_none=True)
    with m.using_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        value = T.loss(m, tokens, labels, d.masking, d.prev_masking, cond_model=cm, counts=d)
        value.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return value.detach(), grads


@pytest.mark.parametrize("per_row", [False, True], ids=["equal-rows", "ragged-rows"])
@pytest.mark.parametrize("reuse", [False, True], ids=["no-reuse", "reuse"])
def test_fused_loss_and_gradients_within_pytorch_error(per_row, reuse, gen, poison):
    """The cpu backend's loss and every parameter's gradient against the float64 torch path,
    within a small multiple of the float32 torch path's own error (tests/support/tolerances.py)."""
    model, ema = build(), build(seed=5)
    tokens, labels = batch(model, 4, gen)
    d = draw_with(gen, 4, model.config.tokens, per_row=per_row, reuse=reuse)
    assert (len(set(d.masked)) > 1) == per_row
    got = loss_and_grads(model, "cpu", torch.float32, tokens, labels, d, ema)
    lowp = loss_and_grads(model, "torch", torch.float32, tokens, labels, d, ema)
    oracle = loss_and_grads(model, "torch", torch.float64, tokens, labels, d, ema)
    assert_within_pytorch_error("loss", got[0], lowp[0], oracle[0], torch.float32)
    assert set(got[1]) == set(oracle[1])
    assert any(n.startswith("prev_proj") for n in got[1]) == reuse  # the reuse pass feeds the trained one
    assert not any(n.startswith("prev_embedder") for n in got[1])
    for name in oracle[1]:
        assert_within_pytorch_error(f"grad {name}", got[1][name], lowp[1][name], oracle[1][name], torch.float32)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_visible_features_are_the_forward_features_at_visible_positions(backend, gen, poison):
    """The fused reuse pass runs only embedding and encoder: its features must be the
    full forward's wherever reuse reads them (visible positions), on ragged rows too."""
    model = build(backend=backend)
    tokens, labels = batch(model, 4, gen)
    d = T.sample_masks(4, model.config.tokens, gen, per_row=True)
    ids = tokens.masked_fill(d.masking, model.config.mask_id)
    with torch.no_grad():
        full = model(ids, labels)
        part = model.visible_features(ids, labels, counts=d.counts())
    assert part.logits is None and torch.equal(part.masking, d.masking)
    visible = ~d.masking
    assert torch.allclose(part.feat[visible], full.feat[visible], atol=1e-5, rtol=0)
    assert torch.count_nonzero(part.feat[d.masking]) == 0
    assert torch.equal(part.masked_index, full.masked_index)


def test_reuse_pass_takes_no_gradient(gen):
    model, ema = build(backend="torch"), build(backend="torch", seed=5)
    ema.requires_grad_(True)
    tokens, labels = batch(model, 2, gen)
    d = draw_with(gen, 2, model.config.tokens, per_row=False, reuse=True)
    T.loss(model, tokens, labels, d.masking, d.prev_masking, cond_model=ema).backward()
    assert all(p.grad is None for p in ema.parameters())


# ----------------------------------------------------------------------------- the mask sampler


def test_mask_counts_follow_the_published_rule():
    g, L = torch.Generator().manual_seed(0), 64
    reuses, ratios = 0, []
    for _ in range(400):
        d = T.sample_masks(3, L, g)
        assert d.masking.shape == (3, L) and d.masking.dtype == torch.bool
        assert d.masking.sum(1).tolist() == list(d.masked) and len(set(d.masked)) == 1  # one ratio per batch
        assert 1 <= d.masked[0] <= L - 1
        ratios.append(d.masked[0] / L)
        if d.prev_masking is not None:
            reuses += 1
            assert d.prev_masking.sum(1).tolist() == list(d.prev_masked) and len(set(d.prev_masked)) == 1
            assert bool((d.prev_masking | ~d.masking).all())  # a superset: the extra tokens were visible
            assert d.masked[0] <= d.prev_masked[0] <= L
    assert 0.42 < reuses / 400 < 0.58
    mean = sum(ratios) / len(ratios)
    assert 0.78 < mean < 0.82  # Beta(12, 3): mean 0.8, sd 0.1


def test_beta_draws_have_the_beta_moments():
    x = T._beta_integer(12, 3, 40000, torch.Generator().manual_seed(1))
    assert abs(x.mean().item() - 0.8) < 0.003
    assert abs(x.var().item() - 12 * 3 / (15**2 * 16)) < 0.0008
    assert 0 < x.min().item() and x.max().item() < 1


def test_masked_positions_are_uniform_and_extra_masking_scales_with_u():
    g, L, n = torch.Generator().manual_seed(2), 16, 3000
    freq = torch.zeros(L)
    extra = []
    for _ in range(n):
        d = T.sample_masks(2, L, g, reuse_prob=1.0)
        freq += d.masking.float().mean(0)
        extra.append((d.prev_masked[0] - d.masked[0]) / (L - d.masked[0]))
    freq /= n
    assert (freq - freq.mean()).abs().max() < 0.03  # no position is favoured
    assert abs(sum(extra) / n - 0.5) < 0.03  # u ~ U(0, 1): half the visible tokens on average


def test_per_row_ratios_make_ragged_batches():
    g = torch.Generator().manual_seed(3)
    d = T.sample_masks(16, 256, g, per_row=True, reuse_prob=1.0)
    assert len(set(d.masked)) > 4 and len(set(d.prev_masked)) > 4
    assert d.masking.sum(1).tolist() == list(d.masked)
    assert all(p >= m for p, m in zip(d.prev_masked, d.masked))
    c = d.counts()
    assert c.masked == max(d.masked) and c.visible == 256 - min(d.masked)
    assert c.new == max(p - m for p, m in zip(d.prev_masked, d.masked)) and c.prev_visible == 256 - min(d.prev_masked)


def test_draws_are_reproducible_and_rows_select():
    a = T.draw_step(6, 64, torch.Generator().manual_seed(7))
    b = T.draw_step(6, 64, torch.Generator().manual_seed(7))
    c = T.draw_step(6, 64, torch.Generator().manual_seed(8))
    assert torch.equal(a.drop, b.drop) and torch.equal(a.masks.masking, b.masks.masking)
    assert not torch.equal(a.masks.masking, c.masks.masking)
    part = a.rows(2, 5)
    assert torch.equal(part.masks.masking, a.masks.masking[2:5]) and part.masks.masked == a.masks.masked[2:5]
    assert torch.equal(part.drop, a.drop[2:5])


def test_label_dropout():
    g = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 1000, (20000,), generator=g)
    out = T.drop_labels(labels, 1000, g)
    dropped = out == 1000
    assert 0.14 < dropped.float().mean().item() < 0.16
    assert torch.equal(out[~dropped], labels[~dropped])
    assert torch.equal(T.drop_labels(labels, 1000, g, p=0.0), labels)


# ----------------------------------------------------------------------------- optimizer, schedule, EMA, init


def test_optimizer_and_warmup_defaults_are_the_published_ones():
    model = build()
    opt = T.make_optimizer(model)
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (4e-4, 0.03, (0.99, 0.99))
    assert group["fused"] is True  # torch's one-kernel AdamW, the same update
    sched = T.warmup_schedule(opt)
    lrs = []
    for _ in range(5002):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and math.isclose(lrs[2500], 2e-4) and math.isclose(lrs[5000], 4e-4) and lrs[5001] == lrs[5000]


def test_ema_update():
    model, ema = build(seed=1), build(seed=2)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    T.ema_update(ema, model, decay=0.9)
    for k, v in ema.state_dict().items():
        want = 0.9 * before[k] + 0.1 * model.state_dict()[k]
        assert torch.allclose(v, want, atol=1e-6, rtol=0), k


def test_init_from_scratch():
    model = T.init_from_scratch(build(), torch.Generator().manual_seed(0))
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert torch.count_nonzero(mod.bias) == 0, name
            if "adaLN" in name:
                assert torch.count_nonzero(mod.weight) == 0, name
            else:
                bound = math.sqrt(6 / sum(mod.weight.shape))
                assert mod.weight.abs().max() <= bound and mod.weight.abs().max() > 0.9 * bound, name
    std = model.y_embedder.embedding_table.weight.std().item()
    assert 0.018 < std < 0.022
    # Every block starts as the identity: the decoder's input reaches the head unchanged.
    g = torch.Generator().manual_seed(1)
    tokens, labels = batch(model, 2, g)
    masking = T.sample_masks(2, model.config.tokens, g, reuse_prob=0.0).masking
    with torch.no_grad():
        a = model(tokens.masked_fill(masking, model.config.mask_id), labels).feat
        b = model(tokens.masked_fill(masking, model.config.mask_id), (labels + 1) % 1000).feat
    assert torch.equal(a, b)  # zero adaLN: the label has no effect yet


# ----------------------------------------------------------------------------- bad input (docs/ERRORS.md)


def _loss_call(**kw):
    def call():
        model = build(backend="torch")
        tokens = torch.zeros(2, 64, dtype=torch.long)
        args = dict(masking=torch.zeros(2, 64, dtype=torch.bool), prev_masking=None)
        args.update(kw)
        return T.loss(model, tokens, torch.zeros(2, dtype=torch.long), args.pop("masking"), args.pop("prev_masking"), **args)
    return call


ERROR_CASES = [
    ("train-loss-masking", _loss_call(masking=torch.zeros(2, 64, dtype=torch.long)), ValueError,
     "masking must be a bool tensor shaped like tokens (2, 64), got torch.int64 (2, 64)"),
    ("train-loss-prev-masking", _loss_call(prev_masking=torch.zeros(2, 63, dtype=torch.bool)), ValueError,
     "prev_masking must be a bool tensor shaped like tokens (2, 64), got torch.bool (2, 63)"),
    ("train-loss-reduction", _loss_call(reduction="none"), ValueError, "reduction must be 'mean' or 'sum', got 'none'"),
    ("train-loss-model", lambda: T.loss(torch.nn.Linear(2, 2), None, None, None), TypeError,
     "model must be an ENAT model (or a wrapper of one), got Linear"),
    ("train-generator-type", lambda: T.sample_masks(2, 16, 0), TypeError, "generator must be a torch.Generator, got int"),
    ("train-masks-seq-len", lambda: T.sample_masks(2, 1, torch.Generator()), ValueError, "batch must be >= 0 and seq_len >= 2, got 2, 1"),
    ("train-masks-reuse-prob", lambda: T.sample_masks(2, 16, torch.Generator(), reuse_prob=1.5), ValueError,
     "reuse_prob must lie in [0, 1], got 1.5"),
    ("train-masks-beta", lambda: T.sample_masks(2, 16, torch.Generator(), ratio_beta=(1.5, 3)), ValueError,
     "ratio_beta must be two positive integers, got (1.5, 3)"),
]


@pytest.mark.parametrize("call, exc, message", [pytest.param(c, e, m, id=i) for i, c, e, m in ERROR_CASES])
def test_rejects(call, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        call()
