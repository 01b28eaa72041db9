"""enat-train under DistributedDataParallel: 2 gloo processes give the losses and EMA
weights of one process with the same global batch (up to summation order), ragged
per-row mask ratios included (each rank's loss is weighted by the global token count)."""

import json
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from enat.cli_train import parse_args, train

CFG = "e2d1-c32h2-l16-v64-k10"
STEPS = 4


def argv(data, out):
    # Dropout off: its masks come from each process's own RNG, so they cannot match one process's.
    return ["--data", str(data), "--config", CFG, "-b", "6", "--steps", str(STEPS), "--warmup", "2", "--threads", "1",
            "--ema-decay", "0.5", "--per-row-ratio", "--reuse-prob", "0.5", "--dropout", "0", "--grad-clip", "1.0",
            "--lr", "1e-2", "--log-every", "100", "--save-every", "100", "--out", str(out)]


def run(data, out):
    losses, seen = [], []

    def on_step(trainer, loss):
        losses.append(loss.item())
        seen.append(trainer.batch_indices(trainer.step - 1).tolist())

    assert train(parse_args(argv(data, out)), on_step=on_step) == 0
    return losses, seen


def _worker(rank, world, init_file, data, out, report):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        losses, seen = run(data, out)
        with open(os.path.join(report, f"rank{rank}.json"), "w") as f:
            json.dump({"losses": losses, "seen": seen}, f)
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(tmp_path):
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.integers(0, 10, (30, 1)), rng.integers(0, 64, (30, 16))], 1)
    data = tmp_path / "train.npy"
    np.save(data, rows.astype(np.int32))

    threads = torch.get_num_threads()
    try:
        single, single_seen = run(data, tmp_path / "one")
    finally:
        torch.set_num_threads(threads)

    report = tmp_path / "report"
    report.mkdir()
    mp.spawn(_worker, args=(2, str(tmp_path / "rdzv"), str(data), str(tmp_path / "two"), str(report)), nprocs=2, join=True)
    ranks = [json.loads((report / f"rank{r}.json").read_text()) for r in range(2)]

    assert ranks[0]["losses"] == ranks[1]["losses"]  # the all-reduced global loss
    np.testing.assert_allclose(ranks[0]["losses"], single, rtol=2e-5, atol=0)
    for s in range(STEPS):  # rank r holds rows [3r, 3r + 3) of the global batch
        assert ranks[0]["seen"][s] + ranks[1]["seen"][s] == single_seen[s]

    one = torch.load(tmp_path / "one" / "ckpts" / f"{STEPS}.ckpt" / "nnet_ema.pth", weights_only=True)
    two = torch.load(tmp_path / "two" / "ckpts" / f"{STEPS}.ckpt" / "nnet_ema.pth", weights_only=True)
    assert torch.count_nonzero(one["blocks.0.adaLN_modulation.1.weight"]) > 0  # trained: adaLN starts at zero
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=1e-4, atol=2e-6), (k, (one[k] - two[k]).abs().max().item())
    state = torch.load(tmp_path / "two" / "ckpts" / f"{STEPS}.ckpt" / "train_state.pth", weights_only=False)
    assert state["world_size"] == 2 and len(state["rng"]) == 2

