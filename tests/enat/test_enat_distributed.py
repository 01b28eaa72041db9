"""Scale-out: 2 gloo processes give the same samples as 1 process; reruns resume by slice."""

import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from enat import ENAT
from enat.distributed import sample_many, sample_seed

CFG, N, SLICE, SEED = "e2d1-c32h2-l16-v64-k10", 7, 2, 123  # 4 slices, the last one short


def build():
    m = ENAT(CFG, backend="cpu").eval()
    m.reset_parameters(torch.Generator().manual_seed(0))
    return m


def run(out_dir, global_seed=SEED):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the cpu attention fallback, tested elsewhere
        return sample_many(build(), N, str(out_dir), global_seed=global_seed, slice_size=SLICE, steps=4, cfg_scale=2.0)


def _worker(rank, world, init_file, out_dir, report_dir):
    torch.set_num_threads(1)  # same kernels and blocking as the single-process run
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        res = run(out_dir)
        with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as f:
            json.dump({"computed": res.computed, "skipped": res.skipped,
                       "tokens": None if res.tokens is None else res.tokens.tolist()}, f)
    finally:
        dist.destroy_process_group()


def run_two_processes(tmp_path, out_dir, tag):
    report = tmp_path / f"report_{tag}"
    report.mkdir()
    mp.spawn(_worker, args=(2, str(tmp_path / f"rdzv_{tag}"), str(out_dir), str(report)), nprocs=2, join=True)
    ranks = [json.loads((report / f"rank{r}.json").read_text()) for r in range(2)]
    return ranks, np.asarray(ranks[0]["tokens"])


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(tmp_path_factory.mktemp("single"))
    finally:
        torch.set_num_threads(threads)


def test_single_process_run(single):
    assert single.tokens.shape == (N, 4, 4)
    assert single.computed == [0, 1, 2, 3] and single.skipped == []
    assert single.labels.tolist() == [i % 10 for i in range(N)]
    saved = np.load(single.path)
    assert np.array_equal(saved["tokens"], single.tokens)
    assert saved["seeds"].tolist() == [sample_seed(SEED, i) for i in range(N)]
    assert len({tuple(t.ravel()) for t in single.tokens}) == N  # per-sample seeds: all different


def test_two_processes_match_one_and_resume(single, tmp_path):
    out = tmp_path / "two"
    ranks, tokens = run_two_processes(tmp_path, out, "first")
    assert ranks[0]["computed"] == [0, 2] and ranks[1]["computed"] == [1, 3]  # slice j on rank j mod 2
    assert ranks[1]["tokens"] is None  # gathered on rank 0 only
    assert np.array_equal(tokens, single.tokens)

    # Resume: a lost slice is recomputed, the others are read back.
    os.remove(out / "slice_000001.npz")
    os.remove(out / "samples.npz")
    ranks, tokens = run_two_processes(tmp_path, out, "resume")
    assert ranks[0]["computed"] == [] and ranks[0]["skipped"] == [0, 2]
    assert ranks[1]["computed"] == [1] and ranks[1]["skipped"] == [3]
    assert np.array_equal(tokens, single.tokens)

    # Slices made with other settings are never mixed in.
    with pytest.raises(ValueError, match="made with other settings"):
        run(out, global_seed=SEED + 1)


def test_cfg_alias_and_saved_settings(tmp_path):
    """sample_many's deprecated `cfg` keyword gives the cfg_scale run; the files keep naming
    the scale "cfg", so the slice key is the hash of those saved settings."""
    import hashlib
    import warnings

    from enat.distributed import RunSettings

    kw = dict(global_seed=SEED, slice_size=SLICE, steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the cpu attention fallback, tested elsewhere
        new = sample_many(build(), 3, str(tmp_path / "new"), cfg_scale=3.0, **kw)
        with pytest.warns(DeprecationWarning, match="sample_many\\(\\): the keyword cfg is deprecated"):
            old = sample_many(build(), 3, str(tmp_path / "old"), cfg=3.0, **kw)
    assert np.array_equal(old.tokens, new.tokens)
    saved = json.loads(str(np.load(old.path)["settings"]))
    assert saved["cfg"] == 3.0 and "cfg_scale" not in saved
    settings = RunSettings(**{("cfg_scale" if k == "cfg" else k): v for k, v in saved.items()})
    assert settings.key() == hashlib.sha1(json.dumps(saved, sort_keys=True).encode()).hexdigest()[:16]
    assert str(np.load(tmp_path / "old" / "slice_000000.npz")["settings"]) == settings.key()
