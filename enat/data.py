"""Training data: the published feature files, checked, and the order samples are visited in.

Format (the published feature extraction's): one ``.npy`` array per split, an
integer array with one row per image, ``[label, token_0, ..., token_{L-1}]`` (the VQ
code ids of the image's h x w token map, row-major).  A directory of such files is
read as their concatenation in file-name order.

``SampleStream`` fixes the order: epoch e visits the rows in a permutation drawn from
(seed, e), the epochs follow each other, and step s takes positions
``[s G, (s + 1) G)`` of that endless sequence (G = global batch), so the samples of a
step are a function of (seed, s) alone: resuming at step s neither skips nor repeats
any, and no tail is dropped at the end of an epoch.  With W processes, rank r takes
rows ``[r G/W, (r + 1) G/W)`` of each global batch.
"""

from __future__ import annotations

import glob
import hashlib
import os

import numpy as np
import torch

from .configs import ENATConfig
from .distributed import sample_seed

_CHECK_ROWS = 1 << 16  # rows checked at a time (bounded memory on memory-mapped files)


class DataError(ValueError):
    """A feature file that cannot be trained on; the message names the file (and row)."""


def feature_files(path: str | os.PathLike) -> list[str]:
    """The .npy files of `path`: the file itself, or a directory's *.npy in name order."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.npy")))
        if not files:
            raise DataError(f"{path}: directory holds no .npy feature file")
        return files
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file or directory")
    return [path]


def _open(path: str, config: ENATConfig) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # numpy raises several types for truncated or non-.npy files
        raise DataError(f"{path}: not a readable .npy array ({type(e).__name__}: {e})") from e
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a 2-D array of rows [label, tokens], got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise DataError(f"{path}: empty file (no rows)")
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{path}: expected an integer array, got dtype {arr.dtype}")
    width = 1 + config.tokens
    if arr.shape[1] != width:
        raise DataError(f"{path}: row 0 has {arr.shape[1]} entries, expected {width} (label + {config.tokens} tokens "
                        f"of configuration {config.name})")
    return arr


def _check_values(path: str, arr: np.ndarray, config: ENATConfig) -> None:
    K, V = config.num_classes, config.codebook_size
    for start in range(0, arr.shape[0], _CHECK_ROWS):
        chunk = np.asarray(arr[start : start + _CHECK_ROWS]).astype(np.int64)
        labels, tokens = chunk[:, 0], chunk[:, 1:]
        bad = (labels < 0) | (labels >= K)
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(f"{path}: row {start + i}: label {labels[i]} out of range [0, {K - 1}]")
        bad_tok = (tokens < 0) | (tokens >= V)
        if bad_tok.any():
            i = int(np.argmax(bad_tok.any(axis=1)))
            j = int(np.argmax(bad_tok[i]))
            raise DataError(f"{path}: row {start + i}: token {j} is {tokens[i, j]}, out of range [0, {V - 1}]")


class TokenDataset:
    """Rows [label, tokens] of one or more feature files, checked once when opened."""

    def __init__(self, path: str | os.PathLike, config: ENATConfig, *, check: bool = True):
        self.files = feature_files(path)
        self.config = config
        self.arrays = [_open(f, config) for f in self.files]
        if check:
            for f, a in zip(self.files, self.arrays):
                _check_values(f, a, config)
        self.offsets = np.cumsum([0] + [a.shape[0] for a in self.arrays])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def fingerprint(self) -> str:
        """Row counts and file names: a resumed run must see the same rows in the same places."""
        desc = ";".join(f"{os.path.basename(f)}:{a.shape[0]}" for f, a in zip(self.files, self.arrays))
        return hashlib.sha1(desc.encode()).hexdigest()[:16]

    def get(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (n, L) int64, labels (n,) int64) of the rows `indices`, in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        rows = np.empty((indices.shape[0], 1 + self.config.tokens), dtype=np.int64)
        which = np.searchsorted(self.offsets, indices, side="right") - 1
        for f in np.unique(which):
            sel = which == f
            local = indices[sel] - self.offsets[f]
            order = np.argsort(local, kind="stable")  # ascending reads on memory-mapped files
            got = np.empty((local.shape[0], rows.shape[1]), dtype=np.int64)
            got[order] = self.arrays[f][local[order]]
            rows[sel] = got
        t = torch.from_numpy(rows)
        return t[:, 1:].contiguous(), t[:, 0].contiguous()


class SampleStream:
    """The dataset indices of every step: epoch permutations from (seed, epoch), concatenated."""

    def __init__(self, num_rows: int, global_batch: int, seed: int):
        if num_rows < 1 or global_batch < 1:
            raise ValueError(f"num_rows and global_batch must be >= 1, got {num_rows}, {global_batch}")
        self.num_rows, self.global_batch, self.seed = num_rows, global_batch, seed
        self._perms: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch))  # a hash of (seed, epoch)
            self._perms[epoch] = torch.randperm(self.num_rows, generator=g).numpy()
        return self._perms[epoch]

    def positions(self, step: int) -> np.ndarray:
        """Dataset indices of global batch `step` (global_batch of them)."""
        start = step * self.global_batch
        pos = np.arange(start, start + self.global_batch, dtype=np.int64)
        epochs = pos // self.num_rows
        out = np.empty_like(pos)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.permutation(int(e))[pos[sel] % self.num_rows]
        return out

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.num_rows

