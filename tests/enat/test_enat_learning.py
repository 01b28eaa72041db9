"""ENAT learns: enat-train on a tiny synthetic token dataset whose labels determine the
tokens, then samples from the EMA weights follow the labels.

Data: 4 classes, 16 codes, 4 x 4 token maps; class k uses only codes 4k..4k+3 (laid
out in diagonal stripes with a random offset per image).  A model that ignores the
label cannot do better than 1 in 4 for "a sampled token is in its class's codes"; the
trained model, sampled with the null-label guidance it learned from label dropout,
must get most of them right.  Runs 160 CPU steps (about 10 s on an idle 2-core machine).
"""

import glob

import numpy as np
import torch

from enat import ENAT, load_checkpoint, sample
from enat.cli_train import parse_args, train

CFG = "e2d1-c64h2-l16-v16-k4"
K, SIDE, STEPS = 4, 4, 160


def dataset(path, rows=256, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, rows)
    r, c = np.meshgrid(np.arange(SIDE), np.arange(SIDE), indexing="ij")
    offset = rng.integers(0, 4, rows)
    tokens = 4 * labels[:, None] + ((r + c).ravel()[None, :] + offset[:, None]) % 4
    np.save(path, np.concatenate([labels[:, None], tokens], 1).astype(np.int16))


def in_class(model, seed=0):
    """Fraction of sampled tokens that lie in the codes of the row's class."""
    labels = torch.arange(32) % K
    with torch.no_grad():
        out = sample(model.eval(), labels, steps=4, cfg_scale=1.0, generator=torch.Generator().manual_seed(seed))
    return (out.reshape(32, -1) // 4 == labels[:, None]).float().mean().item()


def test_training_lowers_the_loss_and_samples_follow_the_labels(tmp_path):
    dataset(tmp_path / "train.npy")
    losses = []
    args = parse_args(["--data", str(tmp_path / "train.npy"), "--config", CFG, "-b", "32", "--steps", str(STEPS),
                       "--lr", "2e-3", "--warmup", "20", "--ema-decay", "0.9", "--threads", "1", "--log-every", "1000",
                       "--save-every", "1000", "--out", str(tmp_path / "run")])
    threads = torch.get_num_threads()
    try:
        assert train(args, on_step=lambda trainer, loss: losses.append(loss.item())) == 0
    finally:
        torch.set_num_threads(threads)
    first, last = np.mean(losses[:10]), np.mean(losses[-25:])
    assert abs(first - np.log(16)) < 0.2  # from scratch: uniform predictions over 16 codes
    assert last < first - 0.6, (first, last)  # knowing the class alone gives ~1.8 with label smoothing

    untrained = ENAT(CFG)
    trained = ENAT(CFG)
    load_checkpoint(trained, glob.glob(str(tmp_path / "run" / "ckpts" / f"{STEPS}.ckpt" / "nnet_ema.pth"))[0])
    before, after = in_class(untrained), in_class(trained)
    assert before < 0.45, before  # chance: 0.25
    assert after > 0.85, after
