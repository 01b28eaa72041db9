"""The enat-sample command, run in-process on a tiny configuration."""

import os

import numpy as np
import pytest
import torch

from enat import ENAT, save_checkpoint
from enat.cli import main
from enat.vq import VQDecoder, read_png

TINY = ["--config", "e2d1-c32h2-l16-v64-k10", "-n", "3", "-b", "2", "--steps", "4", "--quiet"]


def test_random_weights_compare(tmp_path, capsys):
    assert main(TINY + ["--compare", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "RANDOM weights (no --checkpoint)" in out
    assert "fused (cpu):" in out and "reference (torch):" in out and "speedup:" in out
    assert "% identical tokens" in out
    tokens = np.load(tmp_path / "slices" / "samples.npz")["tokens"]
    assert tokens.shape == (3, 4, 4) and tokens.max() < 64
    assert np.array_equal(np.load(tmp_path / "tokens.npy"), tokens)
    _, text = read_png(tmp_path / "tokens_token_maps.png")
    assert "NOT decoded images" in text["Title"] and "TOKEN MAPS" in out


def test_rerun_recomputes_with_overwrite_keeps_with_resume(tmp_path, capsys):
    assert main(TINY + ["--out", str(tmp_path)]) == 0
    first = np.load(tmp_path / "slices" / "samples.npz")["tokens"]
    capsys.readouterr()
    assert main(TINY + ["--out", str(tmp_path), "--resume"]) == 0
    assert "already saved" in capsys.readouterr().out
    assert main(TINY + ["--out", str(tmp_path), "--overwrite"]) == 0  # computed again, same tokens
    assert "images/s" in capsys.readouterr().out
    assert np.array_equal(np.load(tmp_path / "slices" / "samples.npz")["tokens"], first)


def test_checkpoint_and_vq_decoder(tmp_path, capsys):
    model = ENAT("e1d2-c32h2-l16-v64-k10")
    save_checkpoint(model, tmp_path / "nnet_ema.pth")
    vq = VQDecoder(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32, n_embed=64, embed_dim=32)
    torch.save({"state_dict": vq.state_dict()}, tmp_path / "vq.ckpt")
    args = ["-n", "2", "-b", "2", "--steps", "3", "--quiet", "--heads", "2", "--out", str(tmp_path / "o"),
            "--checkpoint", str(tmp_path / "nnet_ema.pth"), "--vq-checkpoint", str(tmp_path / "vq.ckpt")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "e1d2-c32h2-l16-v64-k10" in out  # read from the checkpoint (2 decoder blocks as ENAT-L, heads given)
    assert f"weights from {tmp_path / 'nnet_ema.pth'}" in out
    pixels, _ = read_png(tmp_path / "o" / "sample_000001.png")
    assert pixels.shape == (8, 8, 3)  # 4 x 4 tokens, 2x upsampling in this small decoder


def test_bad_checkpoint_is_reported(tmp_path, capsys):
    (tmp_path / "bad.pth").write_bytes(b"\x00" * 100)
    assert main(TINY + ["--checkpoint", str(tmp_path / "bad.pth"), "--out", str(tmp_path)]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--backend", "nope"])
    assert not os.path.exists(tmp_path / "slices")


@pytest.mark.parametrize(
    "damage, note",
    [
        (lambda z: {**z, "tokens": z["tokens"][:1]}, "malformed (tokens int16 (1, 4, 4), expected integer (2, 4, 4))"),
        (lambda z: {**z, "tokens": np.full_like(z["tokens"], 30000)}, "malformed (token ids in [30000, 30000], expected [0, 63])"),
        (lambda z: {**z, "tokens": z["tokens"].reshape(2, 16)}, "malformed (tokens int16 (2, 16), expected integer (2, 4, 4))"),
        (lambda z: {**z, "tokens": z["tokens"].astype(np.float32)}, "malformed (tokens float32 (2, 4, 4), expected integer (2, 4, 4))"),
        (lambda z: {**z, "labels": z["labels"] + 1}, "malformed (labels differ from the run's)"),
    ],
    ids=["rows", "ids", "shape", "dtype", "labels"],
)
def test_resume_recomputes_malformed_slices(tmp_path, capsys, damage, note):
    """A saved slice with the run's settings but edited contents is recomputed, never trusted."""
    assert main(TINY + ["--out", str(tmp_path)]) == 0
    first = np.load(tmp_path / "slices" / "samples.npz")["tokens"]
    path = tmp_path / "slices" / "slice_000000.npz"
    with np.load(path) as z:
        edited = damage(dict(z))
    np.savez(path, **edited)
    capsys.readouterr()
    assert main(TINY + ["--out", str(tmp_path), "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"{path} is {note}; recomputing it" in out and "images/s" in out
    assert np.array_equal(np.load(tmp_path / "slices" / "samples.npz")["tokens"], first)


@pytest.mark.parametrize("threads", [0, -1, 1025, 100000])
def test_cpu_threads_bounds(threads):
    """The check enat-sample and enat-train share: torch.set_num_threads crashes (OpenMP) with huge counts."""
    from enat.cli import MAX_THREADS, _cpu_threads

    assert _cpu_threads(MAX_THREADS)[0] == MAX_THREADS and _cpu_threads(3)[0] == 3
    with pytest.raises(ValueError, match=rf"--threads must lie in \[1, {MAX_THREADS}\], got {threads}"):
        _cpu_threads(threads)


def test_cfg_flag_is_an_alias_of_cfg_scale(tmp_path, capsys):
    """--cfg (the flag's other spelling) and --cfg-scale set the same guidance scale."""
    tokens = {}
    for flag in ("--cfg-scale", "--cfg"):
        out = tmp_path / flag.strip("-")
        assert main(TINY + [flag, "50", "--out", str(out)]) == 0
        assert "cfg_scale 50.0," in capsys.readouterr().out
        tokens[flag] = np.load(out / "slices" / "samples.npz")["tokens"]
    assert main(TINY + ["--out", str(tmp_path / "default")]) == 0
    default = np.load(tmp_path / "default" / "slices" / "samples.npz")["tokens"]
    assert np.array_equal(tokens["--cfg"], tokens["--cfg-scale"]) and not np.array_equal(tokens["--cfg"], default)
