"""Strict checkpoint round trips and clear errors for wrong files."""

import pytest
import torch

from enat import ENAT, CheckpointError, get_config, infer_config, load_checkpoint, save_checkpoint

CFG = "e2d1-c64h2-l64"


def build(config=CFG, seed=0):
    m = ENAT(config, backend="torch").eval()
    m.reset_parameters(torch.Generator().manual_seed(seed))
    return m


def outputs(model):
    ids = torch.randint(0, 1024, (2, 64), generator=torch.Generator().manual_seed(0))
    ids[:, ::2] = 1024
    with torch.no_grad():
        first = model(ids, torch.tensor([1, 1000]))
        ids2 = ids.clone()
        ids2[:, :8] = 7
        second = model(ids2, torch.tensor([1, 1000]), prev=first)
    return second.logits, second.feat


def test_round_trip(tmp_path):
    src, dst = build(seed=1), build(seed=2)
    path = tmp_path / "nnet_ema.pth"
    save_checkpoint(src, path)
    assert not torch.equal(outputs(src)[0], outputs(dst)[0])
    load_checkpoint(dst, path)
    for a, b in zip(outputs(src), outputs(dst)):
        assert torch.equal(a, b)
    # The way the released file is used: a plain state dict, strict load.
    third = build(seed=3)
    third.load_state_dict(torch.load(path), strict=True)
    assert torch.equal(outputs(third)[0], outputs(src)[0])


def test_wrapped_and_ddp_prefixed_files_load(tmp_path):
    src = build(seed=1)
    sd = {"module." + k: v for k, v in src.state_dict().items()}
    torch.save({"state_dict": sd, "step": torch.tensor(5)}, tmp_path / "wrapped.pth")
    dst = load_checkpoint(build(seed=2), tmp_path / "wrapped.pth")
    assert torch.equal(outputs(dst)[0], outputs(src)[0])


def test_corrupted_file(tmp_path):
    path = tmp_path / "nnet_ema.pth"
    save_checkpoint(build(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(build(), path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(build(), tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(build(), tmp_path / "missing.pth")


def test_not_a_state_dict(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_checkpoint(build(), tmp_path / "list.pth")


def test_other_configuration_is_named(tmp_path):
    path = tmp_path / "big.pth"
    save_checkpoint(build("e2d1-c128h2-l64"), path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(build(), path)
    msg = str(e.value)
    assert "mis-shaped" in msg and "'x_embedder.word_embeddings.weight': (1025, 128) in the checkpoint, (1025, 64) in the model" in msg
    assert "looks like configuration e2d1-c128h2-l64" in msg


def test_missing_unexpected_and_nan_keys(tmp_path):
    sd = build().state_dict()
    missing = {k: v for k, v in sd.items() if k != "blocks.1.attn.kv.A.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\), first 'blocks.1.attn.kv.A.weight'"):
        load_checkpoint(build(), tmp_path / "missing.pth")
    extra = dict(sd, **{"blocks.3.attn.q.weight": torch.zeros(64, 64)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"1 unexpected key\(s\), first 'blocks.3.attn.q.weight'"):
        load_checkpoint(build(), tmp_path / "extra.pth")
    bad = dict(sd)
    bad["norm.weight"] = bad["norm.weight"].clone()
    bad["norm.weight"][3] = float("nan")
    torch.save(bad, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match="'norm.weight' holds NaN"):
        load_checkpoint(build(), tmp_path / "nan.pth")


def test_infer_config():
    assert infer_config(build().state_dict(), heads=2, depth_dec=1) == get_config(CFG)
    with pytest.warns(UserWarning, match=r"assuming 2 decoder blocks and 2 heads \(width / 64\)"):
        assert infer_config(build("e3d2-c128h2-l16").state_dict()).name == "e3d2-c128h2-l16"  # heads default C // 64


def test_infer_config_says_what_it_assumed():
    """A checkpoint with another split loads silently as the wrong model unless told: the
    warning names the assumption, and none is given when both were passed."""
    state = build("e2d1-c128h4-l16").state_dict()
    with pytest.warns(UserWarning, match=r"assuming 2 decoder blocks, which .*\(--config\)") as rec:
        assert infer_config(state, heads=4).name == "e1d2-c128h4-l16"  # the guess is wrong here
    assert "heads" not in str(rec[0].message)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert infer_config(state, heads=4, depth_dec=1).name == "e2d1-c128h4-l16"
