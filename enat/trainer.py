"""The training loop behind ``enat-train``: one process or DistributedDataParallel, checkpoints, resume.

A checkpoint is a folder ``<out>/ckpts/<step>.ckpt/`` in the published layout:
``nnet.pth`` (the trained weights), ``nnet_ema.pth`` (the EMA weights, the released
checkpoints' key set: loads into ``enat-sample --checkpoint``), ``optimizer.pth``,
plus ``train_state.pth``: the step, the learning-rate schedule, the loss scaler,
the mask generator's state, each rank's torch RNG states (dropout) and the settings
a resumed run must share (seed, global batch, data) for the sample order to continue
where it stopped.  A folder is written under a temporary name and renamed when
complete, so a run killed while saving leaves the previous checkpoint as the latest.
Every file is plain data (tensors, numbers, strings, lists, dicts) and is loaded with
``weights_only=True``: resuming from a folder never runs code pickled into it.

Scale-out: every rank draws the masks and label dropout of the whole global batch
from the same generator and keeps its rows; each rank's loss is its masked tokens'
sum divided by (global masked tokens / world size), so the gradient DDP averages is
the single-process gradient of the global batch (only the summation order differs).
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

from . import training as T
from .checkpoint import CheckpointError, check_state_dict, load_checkpoint
from .configs import ENATConfig
from .data import SampleStream, TokenDataset
from .model import ENAT

_CKPT = re.compile(r"^(\d+)\.ckpt$")


@dataclass(frozen=True)
class TrainSettings:
    """Everything that shapes a run; the fields marked 'order' must match on resume."""

    global_batch: int  # order
    seed: int  # order
    steps: int
    lr: float = T.LR
    weight_decay: float = T.WEIGHT_DECAY
    betas: tuple[float, float] = T.BETAS
    warmup: int = T.WARMUP_STEPS
    ema_decay: float = T.EMA_DECAY
    grad_clip: float | None = None
    precision: str = "fp32"  # fp32, bf16, fp16 (autocast; fp16 with a loss scaler)
    label_drop: float = T.LABEL_DROP
    reuse_prob: float = T.REUSE_PROB
    per_row_ratio: bool = False
    label_smoothing: float = T.LABEL_SMOOTHING
    dropout: float = 0.1


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Trainer:
    """Model, EMA, optimizer, schedule and data order of one run (on every rank)."""

    def __init__(self, model: ENAT, data: TokenDataset, settings: TrainSettings, out_dir: str, device: torch.device):
        self.rank, self.world = _rank_world()
        s = settings
        if s.global_batch % self.world:
            raise ValueError(f"the global batch ({s.global_batch}) must be divisible by the number of processes ({self.world})")
        if s.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {s.precision!r}")
        if s.precision != "fp32" and device.type != "cuda":
            raise ValueError(f"precision {s.precision} (autocast) is for GPUs; use fp32 on {device.type}")
        self.settings, self.data, self.out_dir, self.device = s, data, out_dir, device
        self.config: ENATConfig = model.config
        model.x_embedder.dropout.p = s.dropout
        self.model = model.to(device).train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.ddp = self.model
        if self.world > 1:
            # prev_proj is used only on reuse steps, prev_embedder never: unused parameters vary per step.
            ids = [device.index] if device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(T.DDPAdapter(self.model), device_ids=ids, find_unused_parameters=True)
        self.optimizer = T.make_optimizer(self.model, s.lr, s.weight_decay, tuple(s.betas))
        self.schedule = T.warmup_schedule(self.optimizer, s.warmup)
        self.scaler = torch.amp.GradScaler(device.type, enabled=s.precision == "fp16")
        self.stream = SampleStream(len(data), s.global_batch, s.seed)
        self.generator = torch.Generator().manual_seed(s.seed)
        self.step_settings = T.StepSettings(s.label_drop, s.reuse_prob, s.per_row_ratio, s.label_smoothing)
        self.step = 0
        self.local = s.global_batch // self.world

    # ------------------------------------------------------------------ one step

    def _autocast(self):
        if self.settings.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.settings.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def batch_indices(self, step: int):
        """This rank's dataset indices at `step`."""
        return self.stream.positions(step)[self.rank * self.local : (self.rank + 1) * self.local]

    def train_step(self) -> torch.Tensor:
        """One optimizer step; returns the global batch's mean loss (a device scalar, no host read)."""
        s, lo, hi = self.settings, self.rank * self.local, (self.rank + 1) * self.local
        tokens, labels = self.data.get(self.batch_indices(self.step))
        tokens, labels = tokens.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        draw = T.draw_step(s.global_batch, self.config.tokens, self.generator, self.step_settings)
        total_masked = sum(draw.masks.masked)  # global, known on the host
        mine = draw.rows(lo, hi)
        with self._autocast():
            summed = T.step_loss(self.ddp, tokens, labels, mine, cond_model=self.ema,
                                 label_smoothing=s.label_smoothing, reduction="sum")
        # DDP averages gradients over ranks: scale so the average is d(global sum / global count).
        self.scaler.scale(summed * (self.world / total_masked)).backward()
        if s.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        T.ema_update(self.ema, self.model, s.ema_decay)
        self.step += 1
        loss = summed.detach().float()
        if self.world > 1:
            dist.all_reduce(loss)
        return loss / total_masked

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # ------------------------------------------------------------------ checkpoints

    def _state(self) -> dict:
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        ranks = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(ranks, rng)
        else:
            ranks = [rng]
        return {
            "step": self.step,
            "settings": asdict(self.settings),
            "config": self.config.name,
            "data": self.data.fingerprint(),
            "world_size": self.world,
            "generator": self.generator.get_state(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": ranks,
        }

    def save(self) -> str | None:
        """Write <out>/ckpts/<step>.ckpt (rank 0; the others wait); returns its path on rank 0."""
        state = self._state()  # collective: every rank
        path = None
        if self.rank == 0:
            root = os.path.join(self.out_dir, "ckpts")
            path = os.path.join(root, f"{self.step}.ckpt")
            tmp = path + f".tmp{os.getpid()}"
            os.makedirs(tmp, exist_ok=True)
            cpu = lambda m: {k: v.detach().cpu() for k, v in m.state_dict().items()}  # noqa: E731
            torch.save(cpu(self.model), os.path.join(tmp, "nnet.pth"))
            torch.save(cpu(self.ema), os.path.join(tmp, "nnet_ema.pth"))
            torch.save(self.optimizer.state_dict(), os.path.join(tmp, "optimizer.pth"))
            torch.save(state, os.path.join(tmp, "train_state.pth"))
            if os.path.exists(path):
                shutil.rmtree(path)
            os.replace(tmp, path)
        if self.world > 1:
            dist.barrier()
        return path

    def resume(self, path: str) -> None:
        """Continue from checkpoint folder `path` (the same settings; only --steps may differ).

        Every file is read and checked before anything is applied, so a damaged
        checkpoint (DamagedCheckpoint) leaves the trainer untouched."""
        state = _read(path, "train_state.pth", weights_only=True)
        saved = state["settings"]
        for key in ("global_batch", "seed"):
            if saved[key] != getattr(self.settings, key):
                raise ValueError(f"{path} was trained with {key} {saved[key]}, this run has {getattr(self.settings, key)}: "
                                 "the sample order would change; use the same value or another output folder")
        for key, value in asdict(self.settings).items():
            # The optimizer and schedule state would bring back the saved values: refuse rather than record others.
            if key != "steps" and key in saved and _plain(saved[key]) != _plain(value):
                raise ValueError(f"{path} was trained with {key} {_plain(saved[key])}, this run has {_plain(value)}: "
                                 "a resumed run keeps its settings (only --steps may change); use the same value or another output folder")
        if state["data"] != self.data.fingerprint():
            raise ValueError(f"{path} was trained on other data (other files or row counts); the sample order would change")
        if state["config"] != self.config.name:
            raise ValueError(f"{path} holds configuration {state['config']}, this run is {self.config.name}")
        weights = {}
        for name, module in (("nnet.pth", self.model), ("nnet_ema.pth", self.ema)):
            weights[name] = _read(path, name, weights_only=True)
            try:
                check_state_dict(module, weights[name], source=os.path.join(path, name))
            except CheckpointError as e:
                raise DamagedCheckpoint(str(e)) from e
            bad = [k for k, v in weights[name].items() if not torch.isfinite(v).all()]
            if bad:
                raise DamagedCheckpoint(f"{os.path.join(path, name)}: tensor {bad[0]!r} holds NaN or Inf")
        optimizer = _read(path, "optimizer.pth", weights_only=True)
        self.model.load_state_dict(weights["nnet.pth"])
        self.ema.load_state_dict(weights["nnet_ema.pth"])
        self.optimizer.load_state_dict(optimizer)
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        self.generator.set_state(state["generator"])
        if state["world_size"] == self.world:  # dropout continues exactly; otherwise it is reseeded
            rng = state["rng"][self.rank]
            torch.set_rng_state(rng["cpu"])
            if rng["cuda"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"], self.device)
        else:
            torch.manual_seed(self.settings.seed + self.rank)
        self.step = state["step"]


class DamagedCheckpoint(CheckpointError):
    """A checkpoint folder with a missing, truncated or unreadable file."""


def _plain(value):
    return tuple(value) if isinstance(value, list) else value


def _read(folder: str, name: str, weights_only: bool):
    path = os.path.join(folder, name)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # torch raises several types for missing, truncated or foreign files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DamagedCheckpoint(f"{path}: cannot be read ({reason})") from e
    if not isinstance(obj, dict):
        raise DamagedCheckpoint(f"{path}: expected a dict, got {type(obj).__name__}")
    return obj


def checkpoints(out_dir: str) -> list[str]:
    """The checkpoint folders in <out>/ckpts, the highest step first."""
    root = os.path.join(out_dir, "ckpts")
    if not os.path.isdir(root):
        return []
    steps = sorted((int(m.group(1)) for d in os.listdir(root) if (m := _CKPT.match(d))), reverse=True)
    return [os.path.join(root, f"{step}.ckpt") for step in steps]


def init_weights(model: ENAT, init: str | None, seed: int) -> str:
    """From-scratch initialization, or the weights of a released (or earlier) checkpoint."""
    if init is None:
        T.init_from_scratch(model, torch.Generator().manual_seed(seed))
        return "initialized from scratch"
    load_checkpoint(model, init)
    return f"fine-tuning from {init}"


class Throughput:
    """Images and tokens per second over the last interval (global: every rank's images)."""

    def __init__(self):
        self.t0, self.steps = time.perf_counter(), 0

    def tick(self) -> None:
        self.steps += 1

    def rates(self, images_per_step: int, tokens_per_image: int) -> tuple[float, float]:
        now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        images = self.steps * images_per_step / dt
        self.t0, self.steps = now, 0
        return images, images * tokens_per_image
