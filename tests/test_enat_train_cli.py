"""The enat-train command, in-process on a tiny configuration: checkpoints in the published
layout, resume (same weights as an uninterrupted run, every sample once per epoch),
fine-tuning, the data checks and argument errors."""

import os
import re

import numpy as np
import pytest
import torch

from enat import ENAT, load_checkpoint, save_checkpoint
from enat.cli import main as sample_main
from enat.cli_train import main, parse_args, train
from enat.data import DataError, SampleStream, TokenDataset

CFG = "e2d1-c32h2-l16-v64-k10"  # 16 tokens, 64 codes, 10 classes
ROWS = 20


def features(path, rows=ROWS, seed=0, dtype=np.int32):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, rows)
    tokens = rng.integers(0, 64, (rows, 16))
    arr = np.concatenate([labels[:, None], tokens], 1).astype(dtype)
    np.save(path, arr)
    return arr


def args_for(data, out, *extra):
    return ["--data", str(data), "--config", CFG, "-b", "6", "--warmup", "2", "--threads", "1",
            "--log-every", "2", "--save-every", "3", "--out", str(out), *extra]


def run(argv, record=None):
    """train() with a per-step record of (step, dataset indices, loss)."""
    def on_step(trainer, loss):
        if record is not None:
            record.append((trainer.step, trainer.batch_indices(trainer.step - 1).tolist(), loss.item()))
    return train(parse_args(argv), on_step=on_step)


def ckpt(out, step, name):
    return torch.load(os.path.join(out, "ckpts", f"{step}.ckpt", name), weights_only=False)


def test_resume_continues_exactly(tmp_path, capsys):
    data = tmp_path / "train.npy"
    features(data)
    straight, parts = [], []
    assert run(args_for(data, tmp_path / "a", "--steps", "7"), straight) == 0
    assert run(args_for(data, tmp_path / "b", "--steps", "3"), parts) == 0
    assert run(args_for(data, tmp_path / "b", "--steps", "7", "--resume"), parts) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and re.search(r"step 4/7 +loss [0-9.]+ +lr [0-9.e-]+ +[0-9,]+ tokens/s +[0-9.]+ images/s", out)
    assert [r[0] for r in parts] == list(range(1, 8))
    assert [r[1] for r in parts] == [r[1] for r in straight]
    assert [r[2] for r in parts] == [r[2] for r in straight]  # same masks, dropout, weights: same losses
    for name in ("nnet.pth", "nnet_ema.pth"):
        a, b = ckpt(tmp_path / "a", 7, name), ckpt(tmp_path / "b", 7, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    oa, ob = ckpt(tmp_path / "a", 7, "optimizer.pth"), ckpt(tmp_path / "b", 7, "optimizer.pth")
    assert all(torch.equal(oa["state"][i]["exp_avg"], ob["state"][i]["exp_avg"]) for i in oa["state"])
    # Every sample exactly once per epoch (7 steps x 6 = 42 = 2 epochs of 20, and 2 more).
    seen = [i for r in parts for i in r[1]]
    assert sorted(seen[:20]) == list(range(20)) and sorted(seen[20:40]) == list(range(20))
    assert seen[:20] != list(range(20))  # shuffled


def test_sample_stream_is_a_function_of_the_step():
    s = SampleStream(10, 4, seed=3)
    order = np.concatenate([s.positions(k) for k in range(10)])  # 40 = 4 epochs
    for e in range(4):
        assert sorted(order[10 * e : 10 * (e + 1)].tolist()) == list(range(10))
    assert not np.array_equal(order[:10], order[10:20])  # each epoch its own permutation
    fresh = SampleStream(10, 4, seed=3)
    assert np.array_equal(fresh.positions(7), order[28:32])


def test_checkpoint_layout_loads_into_the_model_and_enat_sample(tmp_path, capsys):
    data = tmp_path / "train.npy"
    features(data)
    assert main(args_for(data, tmp_path / "r", "--steps", "3")) == 0
    folder = tmp_path / "r" / "ckpts" / "3.ckpt"
    assert sorted(os.listdir(folder)) == ["nnet.pth", "nnet_ema.pth", "optimizer.pth", "train_state.pth"]
    ema = torch.load(folder / "nnet_ema.pth", weights_only=True)
    model = ENAT(CFG)
    assert set(ema) == set(model.state_dict())  # the published key set, no "module." prefix
    load_checkpoint(model, folder / "nnet_ema.pth")
    state = torch.load(folder / "train_state.pth", weights_only=False)
    assert state["step"] == 3 and state["config"] == CFG and len(state["rng"]) == 1
    capsys.readouterr()
    assert sample_main(["--checkpoint", str(folder / "nnet_ema.pth"), "--config", CFG, "-n", "2", "-b", "2",
                        "--steps", "2", "--quiet", "--out", str(tmp_path / "s")]) == 0
    assert f"weights from {folder / 'nnet_ema.pth'}" in capsys.readouterr().out


def test_fine_tune_from_a_checkpoint(tmp_path, capsys):
    data = tmp_path / "train.npy"
    features(data)
    start = ENAT(CFG)
    start.reset_parameters(torch.Generator().manual_seed(9))
    save_checkpoint(start, tmp_path / "released.pth")
    argv = ["--data", str(data), "--init", str(tmp_path / "released.pth"), "--heads", "2", "--steps", "1", "--lr", "1e-9",
            "--warmup", "0", "--threads", "1", "--out", str(tmp_path / "ft"), "-b", "4"]
    assert main(argv) == 0
    assert f"fine-tuning from {tmp_path / 'released.pth'}" in capsys.readouterr().out
    tuned = ckpt(tmp_path / "ft", 1, "nnet.pth")
    for k, v in start.state_dict().items():
        assert torch.allclose(tuned[k], v, atol=1e-6), k  # started from those weights (lr ~ 0)


def test_directory_of_feature_files(tmp_path):
    (tmp_path / "d").mkdir()
    a = features(tmp_path / "d" / "part0.npy", rows=5, seed=1)
    b = features(tmp_path / "d" / "part1.npy", rows=7, seed=2, dtype=np.int16)
    ds = TokenDataset(tmp_path / "d", ENAT(CFG).config)
    assert len(ds) == 12
    tokens, labels = ds.get(np.array([11, 0, 5, 4]))
    rows = np.concatenate([a, b])[[11, 0, 5, 4]]
    assert np.array_equal(tokens.numpy(), rows[:, 1:]) and np.array_equal(labels.numpy(), rows[:, 0])


def _bad(name, make):
    return pytest.param(make, id=name)


def _write(arr):
    def make(path):
        np.save(path, arr)
    return make


def _bad_token(path):
    arr = features(path)
    arr[5, 1 + 7] = 64
    np.save(path, arr)


def _negative_token(path):
    arr = features(path)
    arr[2, 1 + 3] = -1
    np.save(path, arr)


def _bad_label(path):
    arr = features(path)
    arr[3, 0] = 10
    np.save(path, arr)


def _not_npy(path):
    with open(path, "wb") as f:
        f.write(b"not an array")


DATA_ERRORS = [
    ("data-token-range", _bad_token, "row 5: token 7 is 64, out of range [0, 63]"),
    ("data-token-negative", _negative_token, "row 2: token 3 is -1, out of range [0, 63]"),
    ("data-label-range", _bad_label, "row 3: label 10 out of range [0, 9]"),
    ("data-row-length", _write(np.zeros((4, 16), dtype=np.int32)), "row 0 has 16 entries, expected 17 (label + 16 tokens"),
    ("data-empty", _write(np.zeros((0, 17), dtype=np.int32)), "empty file (no rows)"),
    ("data-dtype", _write(np.zeros((4, 17), dtype=np.float32)), "expected an integer array, got dtype float32"),
    ("data-rank", _write(np.zeros(17, dtype=np.int32)), "expected a 2-D array of rows [label, tokens], got shape (17,)"),
    ("data-unreadable", _not_npy, "not a readable .npy array"),
]


@pytest.mark.parametrize("make, message", [pytest.param(m, msg, id=i) for i, m, msg in DATA_ERRORS])
def test_bad_data_is_rejected_naming_file_and_row(make, message, tmp_path, capsys):
    path = tmp_path / "bad.npy"
    make(path)
    assert main(args_for(path, tmp_path / "o", "--steps", "1")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"enat-train: {path}: ") and message in err, err
    with pytest.raises(DataError, match=re.escape(message)):
        TokenDataset(path, ENAT(CFG).config)


MISSING_ERRORS = [
    ("data-missing", lambda p: p / "nothing.npy", "no such file or directory"),
    ("data-empty-directory", lambda p: p, "directory holds no .npy feature file"),
]


@pytest.mark.parametrize("where, message", [pytest.param(w, m, id=i) for i, w, m in MISSING_ERRORS])
def test_missing_data(where, message, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(args_for(where(tmp_path / "empty"), tmp_path / "o", "--steps", "1")) == 2
    assert message in capsys.readouterr().err


def test_argument_errors(tmp_path, capsys):
    data = tmp_path / "train.npy"
    features(data)
    for argv in (["--batch-size", "0"], ["--steps", "-1"], ["--ema-decay", "2"], ["--precision", "fp8"]):
        with pytest.raises(SystemExit) as e:
            main(args_for(data, tmp_path / "o", *argv))
        assert e.value.code == 2
        assert "enat-train: error:" in capsys.readouterr().err
    assert main(args_for(data, tmp_path / "o", "--precision", "bf16", "--device", "cpu")) == 2
    assert "enat-train: precision bf16 (autocast) is for GPUs" in capsys.readouterr().err
    assert main(args_for(data, tmp_path / "o", "--config", "e2d1-c32h2-l64")) == 2
    assert "row 0 has 17 entries, expected 65" in capsys.readouterr().err
    # Resuming with settings that change the sample order is refused.
    assert main(args_for(data, tmp_path / "r", "--steps", "3")) == 0
    assert main(args_for(data, tmp_path / "r", "--steps", "4", "--resume", "--seed", "1")) == 2
    assert "was trained with seed 0, this run has 1" in capsys.readouterr().err
