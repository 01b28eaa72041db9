"""The pieces of ENAT's training step, as public functions.

What the published step computes (one batch of true token maps and labels):

1. label dropout: each label becomes the null class K with probability 0.15
   (``drop_labels``), so the same model learns the unconditional prediction that
   classifier-free guidance needs;
2. masking: one ratio r ~ Beta(12, 3) for the batch, ``clamp(round(L r), 1, L - 1)``
   positions masked per row by a random permutation; with probability 0.5 the step
   also reuses: ``round(n_visible u)`` more visible positions (u ~ U(0, 1)) are masked
   for a first, gradient-free pass whose features the trained pass receives as
   ``prev`` (``sample_masks``);
3. the loss: label-smoothed (0.1) cross-entropy over the masked positions (``loss``);
4. AdamW (lr 4e-4, weight decay 0.03, betas (0.99, 0.99)), a linear warm-up over 5000
   steps, then an EMA of the weights with rate 0.9999 (``make_optimizer``,
   ``warmup_schedule``, ``ema_update``).

The published code masks the same number of tokens in every row (its boolean
selections are reshaped to (B, n, C)).  ``sample_masks(..., per_row=True)`` gives
each row its own ratio instead: the model routes tokens with per-row lengths, so a
ragged batch costs what its longest row costs and needs no padding logic here.

Randomness (masks, label dropout) comes from a ``torch.Generator`` on the CPU, so a
step is reproducible and the host knows every token count without reading the
device.  Scale-out draws the masks of the whole global batch on every rank from the
same generator and keeps its own rows (``MaskDraw.rows``), which makes a multi-process
step compute what one process computes on the global batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .model import ENAT, ENATOutput, TokenCounts

# Published training settings (README.md, "What a step computes").
LABEL_DROP = 0.15
MASK_RATIO_BETA = (12, 3)
REUSE_PROB = 0.5
LABEL_SMOOTHING = 0.1
LR, WEIGHT_DECAY, BETAS = 4e-4, 0.03, (0.99, 0.99)
WARMUP_STEPS = 5000
EMA_DECAY = 0.9999


def unwrap(model: nn.Module) -> ENAT:
    """The ENAT inside a DistributedDataParallel (or similar ``.module``) wrapper."""
    while not isinstance(model, ENAT) and hasattr(model, "module"):
        model = model.module
    if not isinstance(model, ENAT):
        raise TypeError(f"model must be an ENAT model (or a wrapper of one), got {type(model).__name__}")
    return model


class DDPAdapter(nn.Module):
    """ENAT whose forward returns a dict, for DistributedDataParallel.

    DDP looks for the output's tensors (to find the parameters a step did not use:
    prev_proj on steps without reuse) in dicts, lists and dataclasses, not inside an
    ENATOutput; wrap the model in this before DDP.  ``loss`` accepts either.
    """

    def __init__(self, model: ENAT):
        super().__init__()
        self.module = model

    def forward(self, *args, **kwargs) -> dict:
        out = self.module(*args, **kwargs)
        return {k: getattr(out, k) for k in ENATOutput.__slots__}


def fsdp_shard(model: ENAT, **fully_shard_kwargs) -> ENAT:
    """Shard the model's parameters over the default process group with FSDP2 (``fully_shard``).

    The path for a model that does not fit one device (DDP keeps a full copy per
    process).  Each block is its own unit, then the rest of the model.  The model calls
    some parameters outside ``forward`` (adaLN ``modulation``, which is computed once per
    step and reused, and ``visible_features``, the reuse pass of the fused path):
    those methods are registered so FSDP gathers the parameters for them too.  Returns
    the model (now holding DTensor shards); use it with ``loss`` as an unsharded one.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for blk in model.blocks:
        fully_shard(blk, **fully_shard_kwargs)
        register_fsdp_forward_method(blk, "modulation")
    fully_shard(model, **fully_shard_kwargs)
    register_fsdp_forward_method(model, "visible_features")
    return model


# ----------------------------------------------------------------------------- initialization


@torch.no_grad()
def init_from_scratch(model: nn.Module, generator: torch.Generator | None = None) -> ENAT:
    """The published initialization for training from scratch.

    Every Linear xavier-uniform with zero bias, the label table normal(std 0.02), each
    block's adaLN output Linear zeroed (weight and bias: every block starts as the
    identity).  The published description leaves the rest open; here the word and position tables are
    normal(std 0.02), LayerNorms weight 1 / bias 0 and the head's bias 0.
    """
    m = unwrap(model)
    for mod in m.modules():
        if isinstance(mod, nn.Linear):
            bound = math.sqrt(6.0 / (mod.weight.shape[0] + mod.weight.shape[1]))
            mod.weight.uniform_(-bound, bound, generator=generator)
            mod.bias.zero_()
        elif isinstance(mod, nn.Embedding):
            mod.weight.normal_(0.0, 0.02, generator=generator)
        elif isinstance(mod, nn.LayerNorm) and mod.elementwise_affine:
            mod.weight.fill_(1.0)
            mod.bias.zero_()
    for blk in m.blocks:
        blk.adaLN_modulation[1].weight.zero_()
        blk.adaLN_modulation[1].bias.zero_()
    m.mlm_layer.bias.zero_()
    return m


# ----------------------------------------------------------------------------- masks and labels


@dataclass(frozen=True)
class MaskDraw:
    """Masks of one training step, and their token counts (known on the host).

    masking (B, L) bool: positions to predict.  prev_masking (B, L) bool or None: the
    masks of the reuse pass (a superset of masking per row), None when the step does
    not reuse.  masked / prev_masked: per-row counts.
    """

    masking: torch.Tensor
    prev_masking: torch.Tensor | None
    masked: tuple[int, ...]
    prev_masked: tuple[int, ...] | None

    def rows(self, start: int, stop: int) -> "MaskDraw":
        """The draw restricted to rows [start, stop) (a rank's share of a global batch)."""
        pm = None if self.prev_masking is None else self.prev_masking[start:stop]
        pc = None if self.prev_masked is None else self.prev_masked[start:stop]
        return MaskDraw(self.masking[start:stop], pm, self.masked[start:stop], pc)

    def to(self, device) -> "MaskDraw":
        pm = None if self.prev_masking is None else self.prev_masking.to(device, non_blocking=True)
        return MaskDraw(self.masking.to(device, non_blocking=True), pm, self.masked, self.prev_masked)

    def counts(self) -> TokenCounts:
        """Bounds for the trained forward (with reuse: new and previously visible tokens too)."""
        return _counts(self.masking.shape[1], self.masked, self.prev_masked)

    def prev_counts(self) -> TokenCounts:
        """Bounds for the gradient-free reuse pass."""
        return _counts(self.masking.shape[1], self.prev_masked, None)


def _counts(L: int, masked, prev_masked) -> TokenCounts:
    if not masked:
        return TokenCounts(0, 0)
    if prev_masked is None:
        return TokenCounts(max(masked), L - min(masked))
    return TokenCounts(max(masked), L - min(masked), max(p - m for p, m in zip(prev_masked, masked)), L - min(prev_masked))


def _beta_integer(a: int, b: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """n draws of Beta(a, b) for integer a, b: the a-th smallest of a + b - 1 uniforms (exact)."""
    u = torch.rand(n, a + b - 1, generator=generator, dtype=torch.float64)
    return u.sort(dim=1).values[:, a - 1]


def _check_generator(generator) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator (masks are drawn on the host), got one on {generator.device}")


def sample_masks(
    batch: int,
    seq_len: int,
    generator: torch.Generator,
    *,
    per_row: bool = False,
    reuse_prob: float = REUSE_PROB,
    ratio_beta: tuple[int, int] = MASK_RATIO_BETA,
) -> MaskDraw:
    """The masks of one training step, drawn as the published code does (on the CPU).

    Args:
        batch, seq_len: B and L.
        generator: a CPU torch.Generator; the draw depends on nothing else.
        per_row: one mask ratio (and one reuse fraction u) per row instead of one per
            batch: rows then mask different numbers of tokens (a ragged batch).
        reuse_prob: probability that the step reuses (draws prev_masking).
        ratio_beta: integer parameters (a, b) of the Beta distribution of the ratio.

    Row b masks ``n_b = clamp(round(L r_b), 1, L - 1)`` positions: the first n_b of a
    random permutation of the positions.  With reuse, prev_masking masks the first
    ``n_b + round((L - n_b) u_b)`` of the same permutation: n_b plus a uniformly
    random subset of the visible positions.
    """
    _check_generator(generator)
    if batch < 0 or seq_len < 2:
        raise ValueError(f"batch must be >= 0 and seq_len >= 2, got {batch}, {seq_len}")
    if not 0.0 <= reuse_prob <= 1.0:
        raise ValueError(f"reuse_prob must lie in [0, 1], got {reuse_prob}")
    a, b = ratio_beta
    if not all(isinstance(v, int) and v >= 1 for v in (a, b)):
        raise ValueError(f"ratio_beta must be two positive integers, got {ratio_beta}")
    draws = batch if per_row else 1
    ratio = _beta_integer(a, b, draws, generator).expand(batch)
    n = torch.round(seq_len * ratio).clamp_(1, seq_len - 1).long()
    order = torch.rand(batch, seq_len, generator=generator).argsort(dim=1)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(seq_len).expand(batch, seq_len).contiguous())
    masking = rank < n[:, None]
    reuse = bool(torch.rand((), generator=generator) < reuse_prob)
    prev_masking, prev_n = None, None
    if reuse:
        u = torch.rand(draws, generator=generator, dtype=torch.float64).expand(batch)
        prev_n = n + torch.round((seq_len - n) * u).long()
        prev_masking = rank < prev_n[:, None]
        prev_n = tuple(prev_n.tolist())
    return MaskDraw(masking, prev_masking, tuple(n.tolist()), prev_n)


def drop_labels(labels: torch.Tensor, num_classes: int, generator: torch.Generator, p: float = LABEL_DROP) -> torch.Tensor:
    """Each label replaced by the null class `num_classes` with probability p (drawn on the CPU)."""
    _check_generator(generator)
    drop = torch.rand(labels.shape, generator=generator) < p
    return _null_where(drop, labels, num_classes)


def _null_where(drop: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.where(drop.to(labels.device), torch.full_like(labels, num_classes), labels)


# ----------------------------------------------------------------------------- the loss


def _mask_ids(tokens: torch.Tensor, masking: torch.Tensor, mask_id: int) -> torch.Tensor:
    return tokens.masked_fill(masking, mask_id)


def loss(
    model: nn.Module,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    masking: torch.Tensor,
    prev_masking: torch.Tensor | None = None,
    *,
    cond_model: nn.Module | None = None,
    label_smoothing: float = LABEL_SMOOTHING,
    counts: MaskDraw | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Label-smoothed cross-entropy of the model's predictions at the masked positions.

    Args:
        model: an ENAT model (or a DistributedDataParallel of one).
        tokens: (B, L) true token ids in [0, V).
        labels: (B,) class labels (K = the null class).
        masking: (B, L) bool, the positions to predict (masked in the model's input).
        prev_masking: (B, L) bool, a superset of masking per row, or None.  When given,
            cond_model runs without gradient on the tokens masked by prev_masking and
            its output is the `prev` the model reuses.
        cond_model: the model of that pass (published: the EMA model); default `model`.
            On the fused backends only its embedding and encoder run (``ENAT.visible_features``);
            the torch backend runs its whole forward, as the published code does.
        label_smoothing: as torch.nn.functional.cross_entropy's.
        counts: the MaskDraw the masks come from, whose host-side counts spare the
            device-to-host reads of the masks (optional).
        reduction: "mean" over every masked position of the batch (the published loss),
            or "sum".
    """
    m = unwrap(model)
    config = m.config
    if tokens.dim() != 2 or tuple(masking.shape) != tuple(tokens.shape) or masking.dtype != torch.bool:
        raise ValueError(f"masking must be a bool tensor shaped like tokens {tuple(tokens.shape)}, "
                         f"got {masking.dtype} {tuple(masking.shape)}")
    if prev_masking is not None and (tuple(prev_masking.shape) != tuple(tokens.shape) or prev_masking.dtype != torch.bool):
        raise ValueError(f"prev_masking must be a bool tensor shaped like tokens {tuple(tokens.shape)}, "
                         f"got {prev_masking.dtype} {tuple(prev_masking.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if counts is not None:
        fwd_counts, prev_counts = counts.counts(), counts.prev_counts()
    else:
        fwd_counts = TokenCounts.from_masks(masking, prev_masking)
        prev_counts = None if prev_masking is None else TokenCounts.from_masks(prev_masking)
    prev = None
    if prev_masking is not None:
        cond = m if cond_model is None else unwrap(cond_model)
        prev_ids = _mask_ids(tokens, prev_masking, config.mask_id)
        with torch.no_grad():
            if cond.backend == "torch":  # the published computation: a whole forward pass
                prev = cond(prev_ids, labels, counts=prev_counts, logits_for="masked")
            else:  # the same visible features without the decoder and head, whose outputs reuse never reads
                prev = cond.visible_features(prev_ids, labels, counts=prev_counts)
    out = model(_mask_ids(tokens, masking, config.mask_id), labels, prev=prev, counts=fwd_counts, logits_for="masked")
    idx = out["masked_index"]  # (B, Nm), -1 where a row has fewer masked tokens
    target = torch.gather(tokens, 1, idx.clamp(min=0)).masked_fill(idx < 0, -100)
    logits = out["logits"].flatten(0, 1)
    if logits.dtype in (torch.float16, torch.bfloat16):  # the loss in float32 (autocast's rule for softmax)
        logits = logits.float()
    return F.cross_entropy(logits, target.flatten(), ignore_index=-100,
                           label_smoothing=label_smoothing, reduction=reduction)


# ----------------------------------------------------------------------------- optimizer, schedule, EMA


def make_optimizer(model: nn.Module, lr: float = LR, weight_decay: float = WEIGHT_DECAY,
                   betas: tuple[float, float] = BETAS, **kwargs) -> torch.optim.AdamW:
    """AdamW over every trainable parameter, with the published settings as defaults.

    torch's fused implementation (one kernel over all parameters, the same update) where
    it runs: floating-point parameters on CPUs and CUDA GPUs; pass fused= or foreach= to choose.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if "fused" not in kwargs and "foreach" not in kwargs:
        kwargs["fused"] = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, **kwargs)


def warmup_factor(step: int, warmup_steps: int = WARMUP_STEPS) -> float:
    """Learning-rate factor after `step` optimizer steps: linear from 0 to 1 over warmup_steps, then 1."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int = WARMUP_STEPS) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then constant (call .step() after every optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_factor(s, warmup_steps))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float = EMA_DECAY) -> None:
    """ema <- decay * ema + (1 - decay) * model, for every parameter; buffers copied."""
    src, dst = unwrap(model), unwrap(ema)
    e_params, m_params = list(dst.parameters()), list(src.parameters())
    if len(e_params) != len(m_params):
        raise ValueError("ema and model must have the same parameters")
    torch._foreach_lerp_(e_params, [p.detach() for p in m_params], 1.0 - decay)
    for eb, mb in zip(dst.buffers(), src.buffers()):
        eb.copy_(mb)


# ----------------------------------------------------------------------------- one step's loss


@dataclass(frozen=True)
class StepSettings:
    """The randomized parts of a step (published values as defaults)."""

    label_drop: float = LABEL_DROP
    reuse_prob: float = REUSE_PROB
    per_row_ratio: bool = False
    label_smoothing: float = LABEL_SMOOTHING


@dataclass(frozen=True)
class StepDraw:
    """What one step draws from its generator for a (global) batch: label dropout and masks."""

    drop: torch.Tensor  # (B,) bool: label replaced by the null class
    masks: MaskDraw

    def rows(self, start: int, stop: int) -> "StepDraw":
        return StepDraw(self.drop[start:stop], self.masks.rows(start, stop))

    def labels(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        return _null_where(self.drop, labels, num_classes)


def draw_step(batch: int, seq_len: int, generator: torch.Generator, settings: StepSettings = StepSettings()) -> StepDraw:
    """The random draws of one step for a batch of `batch` rows (every rank draws the global batch)."""
    _check_generator(generator)
    drop = torch.rand(batch, generator=generator) < settings.label_drop
    masks = sample_masks(batch, seq_len, generator, per_row=settings.per_row_ratio, reuse_prob=settings.reuse_prob)
    return StepDraw(drop, masks)


def step_loss(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor, draw: StepDraw, *,
              cond_model: nn.Module | None = None, label_smoothing: float = LABEL_SMOOTHING,
              reduction: str = "mean") -> torch.Tensor:
    """The loss of one step on (tokens, labels) with the draws of `draw` (rows already selected)."""
    m = unwrap(model)
    masks = draw.masks.to(tokens.device)
    return loss(model, tokens, draw.labels(labels, m.config.num_classes), masks.masking, masks.prev_masking,
                cond_model=cond_model, label_smoothing=label_smoothing, counts=masks, reduction=reduction)
