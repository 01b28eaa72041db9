"""One ENAT training step (forward + backward + optimizer + EMA), ready to time, per backend.

What a step does is what ``enat-train`` does (enat.trainer.Trainer.train_step) on one
process: draw label dropout and masks, the gradient-free reuse pass of the EMA model
when the draw reuses, the trained pass, the label-smoothed loss, backward, AdamW,
warm-up schedule and EMA update.  Both paths run the same model code on the same
weights and draws: ``fused`` with this library's kernels (cpu / triton / cuda
backends), ``torch`` with the reference math.

``reuse`` fixes the draw's reuse coin (True: every step has the reuse pass, as half of
the published steps do; False: none), so a timing says which kind of step it is.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from enat.configs import get_config
from enat.model import ENAT
from enat.trainer import Trainer, TrainSettings


@dataclass(frozen=True)
class TrainShape:
    config: str
    batch: int
    reuse: bool
    smoke: bool = False

    @property
    def id(self) -> str:
        return f"{self.config}-B{self.batch}-{'reuse' if self.reuse else 'noreuse'}"

    @property
    def label(self) -> str:
        return f"{self.config}: B={self.batch}, {'reuse pass on' if self.reuse else 'no reuse pass'}"


CPU_SHAPES = [
    # The CLI's default configuration (enat-train / enat-sample on a CPU), a batch that fits a 2-core machine.
    TrainShape("e4d2-c256h4-l256", 8, reuse=True, smoke=True),
    TrainShape("e4d2-c256h4-l256", 8, reuse=False),
]
GPU_SHAPES = [
    # ENAT-L at 256 px, bf16 autocast; the published batch is 2048 over 8 GPUs (256 per GPU).
    TrainShape("enat-l-256", 64, reuse=True, smoke=True),
    TrainShape("enat-l-256", 64, reuse=False),
]


class _RandomTokens:
    """A TokenDataset stand-in: fixed random rows (speed does not depend on the data)."""

    def __init__(self, config, rows: int, device):
        g = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, config.codebook_size, (rows, config.tokens), generator=g)
        self.labels = torch.randint(0, config.num_classes, (rows,), generator=g)
        self.files = ["random"]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def get(self, indices):
        idx = torch.as_tensor(indices)
        return self.tokens[idx], self.labels[idx]

    def fingerprint(self) -> str:
        return "random"


def make_trainer(shape: TrainShape, backend: str, device: torch.device, precision: str = "fp32") -> Trainer:
    """A single-process Trainer of `shape` whose steps all reuse (or none do), same weights and draws for every backend."""
    config = get_config(shape.config)
    model = ENAT(config, backend=backend)
    model.reset_parameters(torch.Generator().manual_seed(0))  # random non-zero weights (from scratch, adaLN is zero)
    settings = TrainSettings(global_batch=shape.batch, seed=0, steps=1 << 30, warmup=10, precision=precision,
                             reuse_prob=1.0 if shape.reuse else 0.0)
    return Trainer(model, _RandomTokens(config, 4 * shape.batch, device), settings, out_dir="", device=device)


def step_call(trainer: Trainer, sync) -> callable:
    """call(i): one training step (the loss read back, so the step has finished)."""

    def call(_i: int = 0) -> float:
        loss = trainer.train_step()
        sync()
        return loss

    return call


@contextlib.contextmanager
def cuda_peak(device: torch.device):
    """Peak CUDA memory of the block, in bytes above what was allocated when it began (dict filled on exit)."""
    out = {}
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    yield out
    torch.cuda.synchronize(device)
    out["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
    out["total_peak_bytes"] = torch.cuda.max_memory_allocated(device)


def cpu_peak_rss_step(shape: TrainShape, backend: str, steps: int = 3) -> dict:
    """Peak resident memory of `steps` training steps above the process's resident size
    once the model, EMA and data exist (optimizer state and gradients included).

    The kernel's peak counter (VmHWM) is reset just before the steps (/proc/self/clear_refs),
    so imports and setup do not count.  Run it in a fresh process per path (memory
    another path freed stays resident in the allocator): see paired_training.py.
    """
    torch.manual_seed(0)
    trainer = make_trainer(shape, backend, torch.device("cpu"))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident size to the current one
    base = _status_bytes("VmRSS")
    for _ in range(steps):
        trainer.train_step()
    return {"peak_bytes": max(0, _status_bytes("VmHWM") - base), "base_bytes": base}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")
