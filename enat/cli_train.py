"""``enat-train``: train or fine-tune ENAT on VQ token features, on the fused kernels.

    enat-train --data train.npy --config e4d2-c256h4-l256 --batch-size 64 --steps 10000 --out run1
    enat-train --data features/ --init nnet_ema.pth --lr 1e-4 --warmup 500 --steps 2000 --out ft   # fine-tune
    enat-train --data train.npy --out run1 --steps 20000 --resume                                    # continue run1
    torchrun --nproc-per-node 8 -m enat.cli_train --data train.npy --batch-size 2048 --precision bf16 --out run1

Data: the published feature format, an integer .npy array with one row
``[label, tokens...]`` per image, or a directory of such files (enat/data.py).
Checkpoints: ``<out>/ckpts/<step>.ckpt/{nnet,nnet_ema,optimizer,train_state}.pth``;
``nnet_ema.pth`` is what ``enat-sample --checkpoint`` reads.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys

import torch

from . import backends as _backends
from . import training as T
from .checkpoint import CheckpointError, infer_config, read_state_dict
from .cli import _cpu_threads, _threads_error
from .configs import DEFAULT_CONFIG, get_config
from .data import DataError, TokenDataset
from .distributed import init_from_env
from .model import ENAT
from .trainer import DamagedCheckpoint, Throughput, Trainer, TrainSettings, checkpoints, init_weights

PROG = "enat-train"


def _positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


# (flag, attribute, low, high, whether low itself is allowed, whether high is): finite and in range.
_RANGES = (
    ("--lr", "lr", 0.0, math.inf, False, False),
    ("--weight-decay", "weight_decay", 0.0, math.inf, True, False),
    ("--ema-decay", "ema_decay", 0.0, 1.0, True, True),
    ("--grad-clip", "grad_clip", 0.0, math.inf, False, False),
    ("--label-drop", "label_drop", 0.0, 1.0, True, True),
    ("--reuse-prob", "reuse_prob", 0.0, 1.0, True, True),
    ("--label-smoothing", "label_smoothing", 0.0, 1.0, True, True),
    ("--dropout", "dropout", 0.0, 1.0, True, True),
)


def _range_error(flag: str, value: float, low: float, high: float, low_ok: bool, high_ok: bool) -> str | None:
    inside = (low <= value if low_ok else low < value) and (value <= high if high_ok else value < high)
    if math.isfinite(value) and inside:
        return None
    interval = f"{'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"
    return f"{flag} must be a finite number in {interval}, got {value}"


def _argument_error(args) -> str | None:
    """The first out-of-range argument or conflicting flag, as a sentence; None if all are fine."""
    values = [(flag, getattr(args, attr), *r) for flag, attr, *r in _RANGES]
    values += [(f"--betas ({i + 1})", beta, 0.0, 1.0, True, False) for i, beta in enumerate(args.betas)]
    for flag, value, *r in values:
        if value is not None and (error := _range_error(flag, value, *r)):
            return error
    if args.warmup < 0:
        return f"--warmup must be >= 0, got {args.warmup}"
    if (threads := _threads_error(args.threads)) is not None:  # enat-sample's bound: a huge count crashes OpenMP
        return threads
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        return f"--out must be a folder, but {args.out} is a file"
    if args.resume and args.overwrite:
        return "--resume continues the earlier checkpoints and --overwrite deletes them: give one"
    old = checkpoints(args.out)
    if old and not (args.resume or args.overwrite):
        return (f"{os.path.join(args.out, 'ckpts')} holds {len(old)} checkpoints of an earlier run; "
                "pass --resume to continue it or --overwrite to delete them")
    return None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Train or fine-tune ENAT on VQ token features (fused enat_kernels path).")
    p.add_argument("--data", required=True, help=".npy feature file (rows [label, tokens]) or a directory of them")
    p.add_argument("--config", default=None, help=f"configuration name (default {DEFAULT_CONFIG}, or read from --init)")
    p.add_argument(
        "--heads", type=_positive(int), default=None, help="head count when the configuration is read from --init (default width / 64)"
    )
    p.add_argument("--init", default=None, help="start from these weights (e.g. a released nnet_ema.pth) instead of from scratch")
    p.add_argument("--out", default="enat_train", help="output folder: checkpoints in OUT/ckpts (default enat_train)")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in OUT/ckpts")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the checkpoints an earlier run left in OUT/ckpts (without it, or --resume, such a run is refused)",
    )
    p.add_argument(
        "-b", "--batch-size", type=_positive(int), default=64, help="global batch, over all processes (published: 2048; default 64)"
    )
    p.add_argument("--steps", type=_positive(int), default=1000, help="total optimizer steps (published: 500k; default 1000)")
    p.add_argument("--lr", type=float, default=T.LR, help=f"peak learning rate (default {T.LR})")
    p.add_argument("--weight-decay", type=float, default=T.WEIGHT_DECAY, help=f"AdamW weight decay (default {T.WEIGHT_DECAY})")
    p.add_argument("--betas", type=float, nargs=2, default=T.BETAS, help="AdamW betas (default 0.99 0.99)")
    p.add_argument("--warmup", type=int, default=T.WARMUP_STEPS, help=f"linear warm-up steps (default {T.WARMUP_STEPS})")
    p.add_argument("--ema-decay", type=float, default=T.EMA_DECAY, help=f"EMA rate (default {T.EMA_DECAY})")
    p.add_argument("--grad-clip", type=float, default=None, help="clip the gradient norm to this value (default: off)")
    p.add_argument(
        "--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="autocast on GPUs (fp16 with loss scaling); fp32 on CPUs"
    )
    p.add_argument("--label-drop", type=float, default=T.LABEL_DROP, help=f"null-label probability (default {T.LABEL_DROP})")
    p.add_argument("--reuse-prob", type=float, default=T.REUSE_PROB, help=f"probability of a reuse step (default {T.REUSE_PROB})")
    p.add_argument("--per-row-ratio", action="store_true", help="one mask ratio per row (ragged batch) instead of one per batch")
    p.add_argument("--label-smoothing", type=float, default=T.LABEL_SMOOTHING, help=f"(default {T.LABEL_SMOOTHING})")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout after the embedding LayerNorm (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialization, sample order, masks and dropout (default 0)")
    p.add_argument(
        "--backend",
        default="auto",
        choices=("auto",) + tuple(_backends.BACKENDS),
        help="enat_kernels backend (default auto: cpu on CPUs, triton/cuda on GPUs; torch = reference path)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=_positive(int), default=None, help="CPU threads for torch")
    p.add_argument("--log-every", type=_positive(int), default=50, help="progress line every N steps (default 50)")
    p.add_argument("--save-every", type=_positive(int), default=1000, help="checkpoint every N steps, and at the end (default 1000)")
    return p


def _model_config(args):
    state = read_state_dict(args.init) if args.init else None
    if args.config is None and state is not None:
        return infer_config(state, heads=args.heads)
    return get_config(args.config or DEFAULT_CONFIG)


def _say(rank: int, *args) -> None:
    if rank == 0:
        print(*args, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return _parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    threads_before = torch.get_num_threads()
    try:
        return train(parse_args(argv))
    finally:
        torch.set_num_threads(threads_before)  # main() may be called in-process (tests)


def build_trainer(args) -> tuple[Trainer, str]:
    """The trainer of these arguments (and a sentence on where the weights come from)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if torch.distributed.is_available() and torch.distributed.is_initialized() and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    config = _model_config(args)
    data = TokenDataset(args.data, config)
    backend = _backends.fused_backend_for(device) if args.backend == "auto" else args.backend
    model = ENAT(config, backend=backend)
    origin = init_weights(model, args.init, args.seed)
    settings = TrainSettings(
        global_batch=args.batch_size,
        seed=args.seed,
        steps=args.steps,
        lr=args.lr,
        weight_decay=args.weight_decay,
        betas=tuple(args.betas),
        warmup=args.warmup,
        ema_decay=args.ema_decay,
        grad_clip=args.grad_clip,
        precision=args.precision,
        label_drop=args.label_drop,
        reuse_prob=args.reuse_prob,
        per_row_ratio=args.per_row_ratio,
        label_smoothing=args.label_smoothing,
        dropout=args.dropout,
    )
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    torch.manual_seed(args.seed + rank)  # dropout: its own stream per rank
    trainer = Trainer(model, data, settings, args.out, device)
    if args.resume and (found := checkpoints(args.out)):
        skipped = []
        for path in found:
            try:
                trainer.resume(path)
            except DamagedCheckpoint as e:
                skipped.append(str(e))
                continue
            origin = f"resumed from {path} (step {trainer.step})" + "".join(
                f"\n  note: skipped a damaged checkpoint: {why}" for why in skipped
            )
            break
        else:
            raise CheckpointError(f"--resume: no checkpoint in {os.path.join(args.out, 'ckpts')} can be loaded: " + "; ".join(skipped))
    return trainer, origin


def train(args, on_step=None) -> int:
    """Run `args` (parsed enat-train arguments); on_step(trainer, loss) after every step (tests)."""
    error = _argument_error(args)
    if error is not None:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 2
    device_type = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).split(":")[0]
    if device_type == "cpu":
        torch.set_num_threads(_cpu_threads(args.threads)[0])
    joined = torch.distributed.is_available() and torch.distributed.is_initialized()
    distributed = init_from_env(device_type)
    try:
        return _train(args, on_step, distributed)
    finally:
        if distributed and not joined:  # the group this call created (torchrun), not a caller's
            torch.distributed.destroy_process_group()


def _train(args, on_step, distributed: bool) -> int:
    rank = torch.distributed.get_rank() if distributed else 0
    try:
        trainer, origin = build_trainer(args)
    except (DataError, CheckpointError, ValueError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    config, s = trainer.config, trainer.settings
    _say(rank, f"{PROG}: {config.name} ({config.num_params() / 1e6:.1f}M parameters), {origin}")
    _say(
        rank,
        f"  data: {len(trainer.data)} rows from {len(trainer.data.files)} file(s); global batch {s.global_batch} "
        f"over {trainer.world} process(es); {trainer.device}, {s.precision}, backend "
        f"{trainer.model.resolved_backends().describe()}",
    )
    if args.overwrite:
        if rank == 0:
            shutil.rmtree(os.path.join(args.out, "ckpts"), ignore_errors=True)
        if distributed:
            torch.distributed.barrier()
    if trainer.step >= s.steps:
        _say(rank, f"  already at step {trainer.step} >= --steps {s.steps}: nothing to do")
        return 0
    meter, running, n, unchecked = Throughput(), None, 0, []
    while trainer.step < s.steps:
        loss = trainer.train_step()
        meter.tick()
        running = loss if running is None else running + loss
        n += 1
        unchecked.append(loss)
        if on_step is not None:
            on_step(trainer, loss)
        last = trainer.step == s.steps
        logs, saves = trainer.step % args.log_every == 0 or last, trainer.step % args.save_every == 0 or last
        if logs or saves:  # checked only here: a host read every step would stall the GPU queue
            bad = _first_nonfinite(unchecked, trainer.step)
            if bad is not None:
                print(
                    f"{PROG}: the loss is {bad[1]} at step {bad[0]}; stopped without saving "
                    "(lower --lr, set --grad-clip, or resume from the last checkpoint)",
                    file=sys.stderr,
                )
                return 1
            unchecked = []
        if logs:
            images, tokens = meter.rates(s.global_batch, config.tokens)
            _say(
                rank,
                f"  step {trainer.step}/{s.steps}  loss {running.item() / n:.4f}  lr {trainer.lr:.3g}  "
                f"{tokens:,.0f} tokens/s  {images:.1f} images/s  epoch {trainer.stream.epoch_of(trainer.step):.2f}",
            )
            running, n = None, 0
        if saves:
            path = trainer.save()
            _say(rank, f"  saved {path}")
    return 0


def _first_nonfinite(losses: list[torch.Tensor], step: int) -> tuple[int, float] | None:
    """(step, loss) of the first non-finite loss among `losses`, the last of which is `step`'s."""
    values = torch.stack(losses).cpu()
    bad = (~torch.isfinite(values)).nonzero()
    if len(bad) == 0:
        return None
    i = int(bad[0])
    return step - len(losses) + 1 + i, values[i].item()


if __name__ == "__main__":
    sys.exit(main())
