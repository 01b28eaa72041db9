"""Sampling many images across processes (GPUs, machines) with torch.distributed.

Launch with torchrun (``torchrun --nproc_per_node=8 -m enat.cli ...`` or the
``enat-sample`` script); every process runs ``sample_many``.

- Sample i has label ``labels(i)`` (default i mod K: classes balanced) and its own
  generator seeded from (global seed, i): its tokens do not depend on the world size,
  on which rank made it, or on resuming.
- Samples are cut into slices of ``slice_size`` consecutive indices (one slice = one
  batch, so a slice is always computed with the same batch); rank r takes slices
  r, r + W, r + 2W, ...  Each finished slice is saved (atomically) in ``out_dir``;
  a rerun skips the slices already saved there (after checking, before computing any,
  that all were made with the same settings) and computes only the others.
- The tokens of all slices are gathered on rank 0 (through torch.distributed, so the
  machines need not share a file system), which writes ``samples.npz``.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from .model import ENAT
from .sampler import PUBLISHED_CFG_SCALE, resolve_cfg_scale, sample


def sample_seed(global_seed: int, index: int) -> int:
    """The generator seed of sample `index`: a hash of (global seed, index), 63 bits."""
    digest = hashlib.blake2b(f"enat:{int(global_seed)}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def balanced_labels(num_classes: int) -> Callable[[int], int]:
    """Sample i gets class i mod K (every class equally often over K consecutive samples)."""
    return lambda i: i % num_classes


@dataclass(frozen=True)
class RunSettings:
    """Everything a slice's tokens depend on; saved with each slice and checked on resume."""

    config: str
    num_samples: int
    slice_size: int
    global_seed: int
    steps: int
    cfg_scale: float
    mask_temp: float
    samp_temp: float
    labels: str  # description of the label rule
    weights: str  # fingerprint of the model's weights

    def record(self) -> dict:
        """The settings as saved with the slices and in samples.npz.  The file format names
        the guidance scale "cfg": slices saved by any version keep matching."""
        return {("cfg" if k == "cfg_scale" else k): v for k, v in asdict(self).items()}

    def key(self) -> str:
        return hashlib.sha1(json.dumps(self.record(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class SliceDone:
    """One computed slice, as passed to sample_many's on_slice callback."""

    index: int
    sample_indices: np.ndarray
    labels: np.ndarray
    seeds: list[int]
    tokens: np.ndarray
    seconds: float


@dataclass
class ScaleOutResult:
    tokens: np.ndarray | None  # (N, h, w) on rank 0, None on other ranks
    labels: np.ndarray | None
    computed: list[int] = field(default_factory=list)  # slices this rank computed
    skipped: list[int] = field(default_factory=list)  # slices this rank found already saved
    path: str | None = None  # samples.npz (rank 0)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the weights (sums and a few values per tensor, in float64)."""
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        t = t.detach().double().flatten()
        h.update(name.encode())
        h.update(np.asarray([t.sum().item(), t.abs().sum().item(), *t[:4].tolist()]).tobytes())
    return h.hexdigest()[:16]


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class SliceError(ValueError):
    """A saved slice that a resumed run can neither use nor recompute (other settings, a folder)."""


_SLICE_NAME = re.compile(r"slice_\d{6,}\.npz")
# Temporaries end in ".part<pid>" so that no glob for slices matches them; the second
# pattern is the older name ("slice_*.npz.tmp<pid>.npz") that a killed run may have left.
_TEMPORARY_GLOBS = ("slice_*.npz.part*", "slice_*.npz.tmp*.npz")


def _slice_path(out_dir: str, j: int) -> str:
    return os.path.join(out_dir, f"slice_{j:06d}.npz")


def saved_slices(out_dir: str) -> list[str]:
    """The slice paths in `out_dir` (not the temporaries of a run in progress or killed)."""
    return sorted(p for p in glob.glob(os.path.join(glob.escape(out_dir), "slice_*.npz"))
                  if _SLICE_NAME.fullmatch(os.path.basename(p)))


def stale_temporaries(out_dir: str) -> list[str]:
    """Half-written slices a killed run left in `out_dir`."""
    return sorted({p for pattern in _TEMPORARY_GLOBS for p in glob.glob(os.path.join(glob.escape(out_dir), pattern))})


def _load_slice(path: str, settings_key: str, indices: np.ndarray, labels: np.ndarray, grid: tuple[int, int],
                vocab: int):
    """The tokens of a saved slice, or None if it is absent or malformed (then it is
    recomputed); raises if it was made with other settings."""
    if not os.path.exists(path):
        return None
    if not os.path.isfile(path):  # never deleted: it is not something this program wrote
        raise SliceError(f"{path} is a folder (or other non-file), not a slice; move it away or use another output folder")
    try:
        with np.load(path) as z:
            key, idx, lab, tokens = str(z["settings"]), z["indices"], z["labels"], z["tokens"]
    except Exception as e:  # a truncated file from a killed run: recompute it
        return _discard(path, f"unreadable ({type(e).__name__})")
    if key != settings_key or not np.array_equal(idx, indices):
        raise SliceError(f"{path} was made with other settings (or other weights); use another output folder "
                         "or delete it to start over")
    # Settings match, so the contents must be what this run would write: anything else
    # is a damaged or edited file.
    want = (len(indices), *grid)
    if tokens.shape != want or tokens.dtype.kind not in "iu":
        return _discard(path, f"malformed (tokens {tokens.dtype} {tokens.shape}, expected integer {want})")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
        return _discard(path, f"malformed (token ids in [{tokens.min()}, {tokens.max()}], expected [0, {vocab - 1}])")
    if not np.array_equal(lab, labels):
        return _discard(path, "malformed (labels differ from the run's)")
    return tokens


def _discard(path: str, why: str) -> None:
    os.remove(path)
    print(f"enat: {path} is {why}; recomputing it", flush=True)
    return None


def _save_slice(path: str, settings_key: str, indices: np.ndarray, labels: np.ndarray, tokens: np.ndarray) -> None:
    tmp = path + f".part{os.getpid()}"
    with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
        np.savez(f, settings=np.asarray(settings_key), indices=indices, labels=labels, tokens=tokens)
    os.replace(tmp, path)  # atomic: a slice file is either complete or absent


def sample_many(
    model: ENAT,
    num_samples: int,
    out_dir: str,
    *,
    global_seed: int = 0,
    slice_size: int = 8,
    steps: int = 8,
    cfg_scale: float = PUBLISHED_CFG_SCALE,
    mask_temp: float = 1.5,
    samp_temp: float = 6.0,
    labels: Callable[[int], int] | Sequence[int] | None = None,
    backend: str | None = "model",
    sample_fn: Callable[[torch.Tensor, list[int]], torch.Tensor] | None = None,
    on_slice: Callable[["SliceDone"], None] | None = None,
    cfg: float | None = None,
) -> ScaleOutResult:
    """Generate `num_samples` token maps over all ranks of the default process group (or alone).

    Args:
        steps, cfg_scale, mask_temp, samp_temp: as enat.sample's.
        labels: class of sample i: a function of i, a sequence of N classes, or None
            (i mod K).
        sample_fn: sample_fn(labels, seeds) -> tokens (B, h, w) replaces the default call
            of enat.sample with one generator per sample (e.g. a CUDAGraphSampler).
        on_slice: called with a SliceDone after each computed slice (progress bars,
            throughput, comparisons).
        cfg: deprecated alias of cfg_scale (DeprecationWarning).

    Returns a ScaleOutResult; rank 0's holds every sample's tokens and labels in index order.
    """
    cfg_scale = resolve_cfg_scale(cfg_scale, cfg, "sample_many")
    rank, world = _rank_world()
    config = model.config
    if num_samples < 0 or slice_size < 1:
        raise ValueError(f"num_samples must be >= 0 and slice_size >= 1, got {num_samples}, {slice_size}")
    label_of, label_rule = _label_rule(labels, num_samples, config.num_classes)
    settings = RunSettings(config.name, num_samples, slice_size, global_seed, steps, cfg_scale, mask_temp, samp_temp,
                           label_rule, weights_fingerprint(model))
    os.makedirs(out_dir, exist_ok=True)
    dtype = np.int16 if config.codebook_size < 2**15 else np.int32

    local, todo = _saved_slices_of_rank(settings, label_of, out_dir, config.grid, config.codebook_size, rank, world)
    result = ScaleOutResult(None, None, skipped=list(local))

    def default_sample_fn(lab: torch.Tensor, seeds: list[int]) -> torch.Tensor:
        device = next(model.parameters()).device
        gens = [torch.Generator(device=device).manual_seed(sd) for sd in seeds]
        return sample(model, lab, steps, cfg_scale, mask_temp=mask_temp, samp_temp=samp_temp, generator=gens, backend=backend)

    for j, indices, lab, path in todo:
        local[j] = _compute_slice(sample_fn or default_sample_fn, settings, j, indices, lab, path, dtype, on_slice, result)

    # Gather every rank's slices on rank 0 (pickled numpy arrays; works with gloo and nccl).
    if world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(local, gathered, dst=0)
        if rank == 0:
            for part in gathered:
                local.update(part)
    if rank == 0:
        _write_samples(result, local, settings, label_of, out_dir, config.grid, dtype)
    if world > 1:
        dist.barrier()
    return result


def _label_rule(labels, num_samples: int, num_classes: int) -> tuple[Callable[[int], int], str]:
    """(class of sample i, a description of that rule for the run's settings)."""
    if labels is None:
        return balanced_labels(num_classes), f"i mod {num_classes}"
    if callable(labels):
        return labels, getattr(labels, "__qualname__", "callable")
    seq = [int(x) for x in labels]
    if len(seq) != num_samples:
        raise ValueError(f"labels has {len(seq)} entries for {num_samples} samples")
    return seq.__getitem__, hashlib.sha1(np.asarray(seq).tobytes()).hexdigest()[:16]


def _saved_slices_of_rank(settings: RunSettings, label_of, out_dir: str, grid, vocab: int, rank: int, world: int):
    """This rank's slices (r, r + W, ...): ({slice: tokens} of those already saved, [(slice,
    sample indices, labels, path)] of those to compute).  Every saved slice is checked
    before any is computed: a slice of other settings stops the run before it has spent time."""
    key, n, size = settings.key(), settings.num_samples, settings.slice_size
    local: dict[int, np.ndarray] = {}
    todo = []
    for j in range(rank, -(-n // size), world):
        indices = np.arange(j * size, min(n, (j + 1) * size), dtype=np.int64)
        lab = np.asarray([label_of(int(i)) for i in indices], dtype=np.int64)
        path = _slice_path(out_dir, j)
        tokens = _load_slice(path, key, indices, lab, grid, vocab)
        if tokens is not None:
            local[j] = tokens
        else:
            todo.append((j, indices, lab, path))
    return local, todo


def _compute_slice(sample_fn, settings: RunSettings, j: int, indices, lab, path: str, dtype, on_slice,
                   result: ScaleOutResult) -> np.ndarray:
    """Sample one slice (one generator per sample), save it atomically, count it in result, report it to on_slice."""
    seeds = [sample_seed(settings.global_seed, int(i)) for i in indices]
    t0 = time.perf_counter()
    out = sample_fn(torch.as_tensor(lab), seeds)
    tokens = out.cpu().numpy().astype(dtype)  # waits for the device
    seconds = time.perf_counter() - t0
    _save_slice(path, settings.key(), indices, lab, tokens)
    result.computed.append(j)
    if on_slice is not None:
        on_slice(SliceDone(j, indices, lab, seeds, tokens, seconds))
    return tokens


def _write_samples(result: ScaleOutResult, local, settings: RunSettings, label_of, out_dir: str, grid, dtype) -> None:
    """Rank 0: every slice's tokens in index order, into result and samples.npz."""
    n, size = settings.num_samples, settings.slice_size
    tokens = np.zeros((n, *grid), dtype=dtype)
    for j, t in local.items():
        tokens[j * size : j * size + t.shape[0]] = t
    all_labels = np.asarray([label_of(i) for i in range(n)], dtype=np.int64)
    seeds = np.asarray([sample_seed(settings.global_seed, i) for i in range(n)], dtype=np.uint64)
    result.path = os.path.join(out_dir, "samples.npz")
    np.savez(result.path, tokens=tokens, labels=all_labels, seeds=seeds, settings=np.asarray(json.dumps(settings.record())))
    result.tokens, result.labels = tokens, all_labels


def init_from_env(device_type: str) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); False when running alone.

    gloo on CPUs, nccl on GPUs (each process on the GPU of its LOCAL_RANK).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return dist.is_available() and dist.is_initialized()
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return True
