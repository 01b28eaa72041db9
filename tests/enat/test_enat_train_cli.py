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
    return torch.load(os.path.join(out, "ckpts", f"{step}.ckpt", name), weights_only=True)


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
    state = torch.load(folder / "train_state.pth", weights_only=True)
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
    for argv in (["--batch-size", "0"], ["--steps", "-1"], ["--precision", "fp8"]):
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


def _file(path):
    path.write_text("not a folder")
    return path


# (id, extra arguments, the message after "enat-train: "; {out} is the output folder)
ARGUMENT_ERRORS = [
    ("train-lr", ["--lr", "inf"], "--lr must be a finite number in (0, inf), got inf"),
    ("train-lr-nan", ["--lr", "nan"], "--lr must be a finite number in (0, inf), got nan"),
    ("train-weight-decay", ["--weight-decay", "inf"], "--weight-decay must be a finite number in [0, inf), got inf"),
    ("train-weight-decay-negative", ["--weight-decay", "-0.1"], "--weight-decay must be a finite number in [0, inf), got -0.1"),
    ("train-betas", ["--betas", "0.9", "1.0"], "--betas (2) must be a finite number in [0, 1), got 1.0"),
    ("train-betas-nan", ["--betas", "nan", "0.9"], "--betas (1) must be a finite number in [0, 1), got nan"),
    ("train-ema-decay", ["--ema-decay", "2"], "--ema-decay must be a finite number in [0, 1], got 2.0"),
    ("train-grad-clip", ["--grad-clip", "inf"], "--grad-clip must be a finite number in (0, inf), got inf"),
    ("train-label-drop", ["--label-drop", "-0.5"], "--label-drop must be a finite number in [0, 1], got -0.5"),
    ("train-reuse-prob", ["--reuse-prob", "nan"], "--reuse-prob must be a finite number in [0, 1], got nan"),
    ("train-label-smoothing", ["--label-smoothing", "1.5"], "--label-smoothing must be a finite number in [0, 1], got 1.5"),
    ("train-dropout", ["--dropout", "inf"], "--dropout must be a finite number in [0, 1], got inf"),
    ("train-warmup", ["--warmup", "-5"], "--warmup must be >= 0, got -5"),
    ("train-threads-huge", ["--threads", "100000"], "--threads must lie in [1, 1024], got 100000"),
    (
        "train-resume-overwrite",
        ["--resume", "--overwrite"],
        "--resume continues the earlier checkpoints and --overwrite deletes them: give one",
    ),
]


@pytest.mark.parametrize("extra, message", [pytest.param(e, m, id=i) for i, e, m in ARGUMENT_ERRORS])
def test_out_of_range_arguments_are_refused(extra, message, tmp_path, capsys):
    data = tmp_path / "train.npy"
    features(data)
    assert main(args_for(data, tmp_path / "o", "--steps", "1", *extra)) == 2
    assert capsys.readouterr().err == f"enat-train: {message}\n"
    assert not (tmp_path / "o").exists()


def test_out_must_be_a_folder(tmp_path, capsys):
    """Row train-out-file."""
    data = tmp_path / "train.npy"
    features(data)
    out = _file(tmp_path / "o")
    assert main(args_for(data, out, "--steps", "1")) == 2
    assert capsys.readouterr().err == f"enat-train: --out must be a folder, but {out} is a file\n"
    assert out.read_text() == "not a folder"


def test_earlier_checkpoints_need_resume_or_overwrite(tmp_path, capsys):
    """Row train-earlier-checkpoints; --overwrite deletes them and starts over."""
    data = tmp_path / "train.npy"
    features(data)
    out = tmp_path / "o"
    assert main(args_for(data, out, "--steps", "6")) == 0  # saves 3.ckpt and 6.ckpt
    capsys.readouterr()
    assert main(args_for(data, out, "--steps", "3", "--seed", "4")) == 2
    assert capsys.readouterr().err == (
        f"enat-train: {out / 'ckpts'} holds 2 checkpoints of an earlier run; pass --resume to continue it or --overwrite to delete them\n"
    )
    assert sorted(os.listdir(out / "ckpts")) == ["3.ckpt", "6.ckpt"]
    assert main(args_for(data, out, "--steps", "3", "--seed", "4", "--overwrite")) == 0
    assert sorted(os.listdir(out / "ckpts")) == ["3.ckpt"]
    assert ckpt(out, 3, "train_state.pth")["settings"]["seed"] == 4


@pytest.mark.parametrize(
    "extra, key, saved, given",
    [
        (["--lr", "1e-3"], "lr", "0.0004", "0.001"),
        (["--warmup", "1"], "warmup", "2", "1"),
        (["--weight-decay", "0.01"], "weight_decay", "0.03", "0.01"),
        (["--betas", "0.9", "0.99"], "betas", "(0.99, 0.99)", "(0.9, 0.99)"),
        (["--ema-decay", "0.5"], "ema_decay", "0.9999", "0.5"),
        (["--dropout", "0"], "dropout", "0.1", "0.0"),
    ],
)
def test_resume_refuses_other_settings(extra, key, saved, given, tmp_path, capsys):
    data = tmp_path / "train.npy"
    features(data)
    assert main(args_for(data, tmp_path / "r", "--steps", "3")) == 0
    capsys.readouterr()
    assert main(args_for(data, tmp_path / "r", "--steps", "6", "--resume", *extra)) == 2
    err = capsys.readouterr().err
    assert f"was trained with {key} {saved}, this run has {given}: a resumed run keeps its settings" in err, err
    assert sorted(os.listdir(tmp_path / "r" / "ckpts")) == ["3.ckpt"]


def _truncate(folder, name):
    path = folder / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _remove(folder, name):
    os.remove(folder / name)


def _nan(folder, name):
    if name == "train_state.pth" or name == "optimizer.pth":
        return _truncate(folder, name)
    state = torch.load(folder / name, weights_only=True)
    key = sorted(state)[len(state) // 2]
    state[key].view(-1)[0] = float("nan")
    torch.save(state, folder / name)


class _RunsCodeWhenLoaded:
    """Pickles as a call of open(marker, "w"): a loader that runs pickled code creates marker."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _code(folder, name):
    torch.save({"payload": _RunsCodeWhenLoaded(folder.parent / "code-ran")}, folder / name)


@pytest.mark.parametrize("damage", [_truncate, _remove, _nan, _code])
@pytest.mark.parametrize("name", ["optimizer.pth", "train_state.pth", "nnet.pth", "nnet_ema.pth"])
def test_resume_skips_a_damaged_latest_checkpoint(damage, name, tmp_path, capsys):
    data = tmp_path / "train.npy"
    features(data)
    straight, parts = [], []
    assert run(args_for(data, tmp_path / "a", "--steps", "9"), straight) == 0
    assert run(args_for(data, tmp_path / "b", "--steps", "6"), parts) == 0
    latest = tmp_path / "b" / "ckpts" / "6.ckpt"
    damage(latest, name)
    capsys.readouterr()
    del parts[3:]  # steps 4..6 are trained again from 3.ckpt
    assert run(args_for(data, tmp_path / "b", "--steps", "9", "--resume"), parts) == 0
    out = capsys.readouterr().out
    assert f"resumed from {tmp_path / 'b' / 'ckpts' / '3.ckpt'} (step 3)" in out, out
    why = "holds NaN or Inf" if damage is _nan and name.startswith("nnet") else "cannot be read"
    assert re.search(f"note: skipped a damaged checkpoint: {re.escape(str(latest / name))}: .*{why}", out), out
    assert [r[2] for r in parts] == [r[2] for r in straight]  # continued exactly from step 3
    assert not (latest.parent / "code-ran").exists()  # every file is loaded as data only


def test_resume_with_no_loadable_checkpoint_is_an_error(tmp_path, capsys):
    """Row train-resume-damaged."""
    data = tmp_path / "train.npy"
    features(data)
    out = tmp_path / "o"
    assert main(args_for(data, out, "--steps", "6")) == 0
    _truncate(out / "ckpts" / "6.ckpt", "optimizer.pth")
    _remove(out / "ckpts" / "3.ckpt", "nnet.pth")
    capsys.readouterr()
    assert main(args_for(data, out, "--steps", "9", "--resume")) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"enat-train: --resume: no checkpoint in {out / 'ckpts'} can be loaded: "
        f"{out / 'ckpts' / '6.ckpt' / 'optimizer.pth'}: cannot be read"
    ), err
    assert f"{out / 'ckpts' / '3.ckpt' / 'nnet.pth'}: cannot be read" in err and "Traceback" not in err


def test_nonfinite_loss_stops_without_saving(tmp_path, capsys):
    """Row train-loss-not-finite: weights poisoned after step 4 make step 5's loss NaN."""
    data = tmp_path / "train.npy"
    features(data)
    out = tmp_path / "o"

    def poison(trainer, loss):
        if trainer.step == 4:
            with torch.no_grad():
                for p in trainer.model.parameters():
                    p.fill_(float("nan"))

    assert train(parse_args(args_for(data, out, "--steps", "9", "--log-every", "100")), on_step=poison) == 1
    err = capsys.readouterr().err
    assert err.startswith("enat-train: the loss is nan at step 5; stopped without saving"), err
    assert sorted(os.listdir(out / "ckpts")) == ["3.ckpt"]


EXTRA_ERRORS = ["train-out-file", "train-earlier-checkpoints", "train-resume-settings", "train-resume-damaged", "train-loss-not-finite"]
