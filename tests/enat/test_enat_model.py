"""The ENAT model (backend "torch") against a direct implementation of the published model (tests/support/enat_direct.py).

Inputs are the token maps of a real sampling trajectory; each step is checked without
reuse and with reuse (chained through `prev`), in float32, max abs difference < 1e-4.
The model's label embeddings and adaLN parameters are of order one
(tests/support/enat_models.py), so labels, gates and the attention matter; guard tests below
check that a deliberately wrong direct model misses by a wide margin.
"""

import pytest
import torch

import enat
from enat import TokenCounts, sample
from support.enat_direct import DirectENAT
from support.enat_models import responsive_model

CFG = "e2d1-c64h2-l64"
TOL = 1e-4


def build(config=CFG, backend="torch", seed=1):
    return responsive_model(config, seed=seed, backend=backend)


@pytest.fixture(scope="module")
def model():
    return build()


@pytest.fixture(scope="module")
def direct(model):
    c = model.config
    return DirectENAT(model.state_dict(), c.depth_enc, c.depth_dec, c.heads, c.codebook_size)


@pytest.fixture(scope="module")
def trajectory(model):
    """Labels and the input ids of every step of one sampling run (4 rows, 6 steps)."""
    labels = torch.tensor([3, 999, 1000, 42])  # 1000: the null class
    inputs = [torch.full((4, model.config.tokens), model.config.mask_id)]
    sample(model, labels, steps=6, cfg_scale=2.5, generator=torch.Generator().manual_seed(5),
           callback=lambda info: inputs.append(info.ids.clone()))
    return labels, inputs[:-1]  # the last entry is the all-revealed output


def max_diff(a, b):
    return (a - b).abs().max().item()


def test_trajectory_is_a_real_one(trajectory, model):
    labels, inputs = trajectory
    counts = [int((ids == model.config.mask_id).sum(1)[0]) for ids in inputs]
    assert counts == enat.mask_schedule(model.config.tokens, 6)[:-1]
    assert counts[0] == model.config.tokens and 0 < counts[-1] < counts[1]


def test_matches_direct_without_reuse(model, direct, trajectory):
    labels, inputs = trajectory
    with torch.no_grad():
        for s, ids in enumerate(inputs):
            logits, feat, masking = model(ids, labels)
            ref_logits, ref_feat, ref_masking = direct(ids, labels)
            assert torch.equal(masking, ref_masking)
            assert logits.shape == (4, model.config.tokens, model.config.codebook_size)
            assert max_diff(feat, ref_feat) < TOL, f"step {s}: feat"
            assert max_diff(logits, ref_logits) < TOL, f"step {s}: logits"


def test_matches_direct_with_reuse(model, direct, trajectory):
    labels, inputs = trajectory
    out = ref = None
    with torch.no_grad():
        for s, ids in enumerate(inputs):
            out = model(ids, labels, prev=out)
            logits, feat, _ = ref = direct(ids, labels, prev=None if ref is None else (ref[1], ref[2]))
            assert max_diff(out.feat, feat) < TOL, f"step {s}: feat"
            assert max_diff(out.logits, logits) < TOL, f"step {s}: logits"


def test_label_changes_the_logits_clearly(model, trajectory):
    """Conditional and null-label logits differ by a sizeable part of the logits' spread."""
    labels, inputs = trajectory
    null = torch.full_like(labels, model.config.null_label)
    with torch.no_grad():
        for ids in inputs[:3]:
            cond, uncond = model(ids, labels).logits, model(ids, null).logits
            rows = labels != model.config.null_label
            gap = (cond[rows] - uncond[rows]).abs().mean()
            assert gap > 0.3 * cond.std(), f"mean |cond - uncond| {gap:.3f}, logits std {cond.std():.3f}"
            assert torch.equal(cond[~rows], uncond[~rows])


# Deliberately wrong direct models: each must miss by far more than TOL.
WRONG = {
    "attention scale 1/D": dict(attn_scale=lambda D: 1.0 / D),
    "attention scale D^-0.5 / 2": dict(attn_scale=lambda D: 0.5 * D**-0.5),
    "shift and scale swapped": dict(chunk_order=(1, 0, 3, 2, 4, 6, 5, 7)),
    "cond shift and scale swapped": dict(chunk_order=(0, 1, 3, 2, 4, 5, 6, 7)),
    "gates swapped": dict(chunk_order=(0, 1, 2, 3, 7, 5, 6, 4)),
}


@pytest.mark.parametrize("wrong", list(WRONG))
def test_a_wrong_model_misses_by_far(model, trajectory, wrong):
    labels, inputs = trajectory
    c = model.config
    bad = DirectENAT(model.state_dict(), c.depth_enc, c.depth_dec, c.heads, c.codebook_size, **WRONG[wrong])
    worst = 0.0
    with torch.no_grad():
        for ids in inputs[1:4]:
            worst = max(worst, max_diff(model(ids, labels).logits, bad(ids, labels)[0]))
    assert worst > 1000 * TOL, f"{wrong}: logits differ by only {worst:.2e} (tolerance {TOL})"


def test_reuse_changes_the_result(model, trajectory):
    """Reuse is not a no-op (else the previous test could not fail on the prev path)."""
    labels, inputs = trajectory
    with torch.no_grad():
        first = model(inputs[2], labels, prev=model(inputs[1], labels))
        fresh = model(inputs[2], labels)
    assert max_diff(first.logits, fresh.logits) > 1e-2


def test_masked_logits_are_the_masked_rows_of_all_logits(model, trajectory):
    labels, inputs = trajectory
    with torch.no_grad():
        prev = model(inputs[2], labels)
        full = model(inputs[3], labels, prev=prev)
        part = model(inputs[3], labels, prev=prev, logits_for="masked")
    idx = part.masked_index
    assert (idx >= 0).all()  # uniform rows: no padding
    gathered = torch.gather(full.logits, 1, idx[:, :, None].expand(-1, -1, full.logits.shape[2]))
    assert max_diff(part.logits, gathered) < 1e-5
    assert torch.equal(part.feat, full.feat)


def test_counts_from_the_schedule_equal_counts_from_the_masks(model, trajectory):
    labels, inputs = trajectory
    plan = enat.SamplingPlan.build(model.config.tokens, [6] * 4, 2.5, 1.5, 6.0)
    for s, ids in enumerate(inputs):
        m = ids == model.config.mask_id
        prev = inputs[s - 1] == model.config.mask_id if s else None
        expected = TokenCounts.from_masks(m, prev)
        got = plan.counts(s)
        assert (got.masked, got.visible) == (expected.masked, expected.visible)
        if s:
            assert (got.new, got.prev_visible) == (expected.new, expected.prev_visible)


def test_ragged_batch_equals_rows_alone(model, direct, trajectory):
    """Rows at different steps (different numbers of masked tokens) in one batch, with reuse."""
    labels, inputs = trajectory
    steps = [(1, 2), (3, 4), (0, 1)]  # (prev step, step) per row
    rows = torch.tensor([0, 1, 3])
    prev_ids = torch.stack([inputs[a][r] for (a, _), r in zip(steps, rows)])
    ids = torch.stack([inputs[b][r] for (_, b), r in zip(steps, rows)])
    lab = labels[rows]
    assert len(set((ids == model.config.mask_id).sum(1).tolist())) == 3  # really ragged
    with torch.no_grad():
        prev = model(prev_ids, lab)
        out = model(ids, lab, prev=prev)
        for i in range(3):
            alone_prev = model(prev_ids[i : i + 1], lab[i : i + 1])
            alone = model(ids[i : i + 1], lab[i : i + 1], prev=alone_prev)
            assert max_diff(prev.feat[i], alone_prev.feat[0]) < 1e-5
            assert max_diff(out.feat[i], alone.feat[0]) < 1e-5
            assert max_diff(out.logits[i], alone.logits[0]) < 1e-5
            d_prev = direct(prev_ids[i : i + 1], lab[i : i + 1])
            d = direct(ids[i : i + 1], lab[i : i + 1], prev=(d_prev[1], d_prev[2]))
            assert max_diff(out.logits[i], d[0][0]) < TOL


def test_state_dict_matches_the_released_checkpoints(model):
    """Keys and shapes of the released checkpoints (nnet_ema.pth)."""
    c = model.config
    C, V, K, L, F = c.width, c.codebook_size, c.num_classes, c.tokens, 4 * c.width
    expected = {
        "x_embedder.word_embeddings.weight": (V + 1, C), "x_embedder.position_embeddings.weight": (L, C),
        "x_embedder.LayerNorm.weight": (C,), "x_embedder.LayerNorm.bias": (C,),
        "y_embedder.embedding_table.weight": (K + 1, C),
        "prev_embedder.fc1.weight": (F, C), "prev_embedder.fc1.bias": (F,),
        "prev_embedder.fc2.weight": (C, F), "prev_embedder.fc2.bias": (C,),
        "prev_proj.norm.weight": (C,), "prev_proj.norm.bias": (C,),
        "prev_proj.mlp.fc1.weight": (F, C), "prev_proj.mlp.fc1.bias": (F,),
        "prev_proj.mlp.fc2.weight": (C, F), "prev_proj.mlp.fc2.bias": (C,),
        "norm.weight": (C,), "norm.bias": (C,),
        "mlm_layer.fc.weight": (C, C), "mlm_layer.fc.bias": (C,),
        "mlm_layer.ln.weight": (C,), "mlm_layer.ln.bias": (C,), "mlm_layer.bias": (1, 1, V + 1),
    }
    for i in range(c.depth_enc + c.depth_dec):
        for name, out in (("attn.q", C), ("attn.kv.A", 2 * C), ("attn.kv.B", 2 * C), ("attn.proj", C),
                          ("mlp.fc1", F), ("adaLN_modulation.1", 8 * C)):
            expected[f"blocks.{i}.{name}.weight"] = (out, C)
            expected[f"blocks.{i}.{name}.bias"] = (out,)
        expected[f"blocks.{i}.mlp.fc2.weight"] = (C, F)
        expected[f"blocks.{i}.mlp.fc2.bias"] = (C,)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected
    assert c.num_params() == sum(v.numel() for v in model.state_dict().values())


def test_published_configuration():
    c = enat.get_config("enat-l-256")
    assert (c.depth_enc, c.depth_dec, c.width, c.heads, c.tokens, c.head_dim) == (22, 2, 1024, 16, 256, 64)
    assert enat.get_config("enat-l-512").tokens == 1024 and enat.get_config("enat-l-512").grid == (32, 32)
    assert enat.get_config("e3d1-c96h3-l36-v50-k7").name == "e3d1-c96h3-l36-v50-k7"
    with pytest.raises(ValueError, match="unknown ENAT configuration"):
        enat.get_config("enat-xl")
    with pytest.raises(ValueError, match="square"):
        enat.get_config("e1d1-c64h2-l60")


def test_bad_inputs_are_refused(model, trajectory):
    labels, inputs = trajectory
    with pytest.raises(ValueError, match="tokens per row"):
        model(inputs[0][:, :10], labels)
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 1024\]"):
        model(torch.full_like(inputs[0], 1025), labels)
    with torch.no_grad():
        later = model(inputs[3], labels)
    with pytest.raises(ValueError, match="previously visible token"):
        model(inputs[1], labels, prev=later)  # tokens visible at step 3 are masked at step 1
    with pytest.raises(ValueError, match="one entry per row"):
        model(inputs[1], labels[:2])
