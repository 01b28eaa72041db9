"""MaskGIT-style sampling with computation reuse, as the published ENAT sampler.

``sample(model, labels, steps=8, ...)`` starts from all-masked token maps and, at each
step, predicts every masked token, keeps the most confident ones and re-masks the
``floor(L * cos(r * pi / 2))`` least confident.  Two model states are carried from
step to step (class labels and the null label), each fed back as ``prev``; the
conditional and unconditional passes run as ONE forward over 2B rows.

Everything the host needs is known before the loop: the re-masking counts come from
the schedule, hence the token counts every routing op needs; temperatures and
guidance per step and row are uploaded once.  Inside the loop nothing is read back
(no ``.item()``, no data-dependent shapes), value checks are off, so a GPU never
waits on the host and each step can be captured in a CUDA graph (``CUDAGraphSampler``).

Randomness comes from torch.Generator objects: one for the whole batch, or one per
row (then a row's tokens depend only on its own generator, not on which other rows
share its batch: what scale-out over many GPUs needs).

Rows may take different numbers of steps (``steps`` as a list): a row with fewer
steps waits fully masked and finishes with the others, so the batch is ragged (rows
with different numbers of masked tokens), which the model handles through per-row
lengths.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

import enat_kernels as ek

from .configs import ENATConfig
from .model import ENAT, TokenCounts
from .profiling import scope

# ----------------------------------------------------------------------------- schedule


def remask_count(seq_len: int, step: int, steps: int) -> int:
    """Tokens left masked after step `step` (0-based) of `steps`: floor(L * cos(r * pi / 2)), r = (step + 1) / steps."""
    return math.floor(seq_len * math.cos((step + 1) / steps * math.pi * 0.5))


def mask_schedule(seq_len: int, steps: int) -> list[int]:
    """Masked tokens in the input of each step, then after the last: [L, m_1, ..., m_{T-1}, 0]."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [seq_len] + [remask_count(seq_len, s, steps) for s in range(steps)]


@dataclass(frozen=True)
class SamplingPlan:
    """Per-row, per-step quantities of one sampling run, all computed on the host.

    Row b with T_b steps starts at global step T - T_b (T = the most steps of any row)
    and stays fully masked before.  Tables are indexed [global step][row].
    """

    seq_len: int
    steps: tuple[int, ...]
    masked_in: tuple[tuple[int, ...], ...]  # (T + 1) x B: masked tokens in the input of step s (s = T: the output)
    samp_temp: tuple[tuple[float, ...], ...]  # T x B
    mask_temp: tuple[tuple[float, ...], ...]
    guidance: tuple[tuple[float, ...], ...]
    started: tuple[tuple[bool, ...], ...]

    @property
    def total_steps(self) -> int:
        return len(self.samp_temp)

    @classmethod
    def build(cls, seq_len: int, steps: Sequence[int], cfg_scale: float, mask_temp: float, samp_temp: float) -> "SamplingPlan":
        T = max(steps)
        masked, st, mt, gd, on = [], [], [], [], []
        for s in range(T + 1):
            row_m, row_st, row_mt, row_g, row_on = [], [], [], [], []
            for Tb in steps:
                t = s - (T - Tb)  # the row's own step
                row_m.append(seq_len if t <= 0 else remask_count(seq_len, t - 1, Tb))
                if s == T:
                    continue
                r = (t + 1) / Tb
                row_on.append(t >= 0)
                row_mt.append(mask_temp * (1 - r) if t >= 0 else 0.0)
                row_st.append(max(samp_temp * (1 - r), 1e-3) if t >= 0 else 1.0)
                row_g.append(t / Tb * cfg_scale if t >= 1 else 0.0)  # r of the previous step x cfg_scale; 0 at the first
            masked.append(tuple(row_m))
            if s < T:
                st.append(tuple(row_st)), mt.append(tuple(row_mt)), gd.append(tuple(row_g)), on.append(tuple(row_on))
        return cls(seq_len, tuple(steps), tuple(masked), tuple(st), tuple(mt), tuple(gd), tuple(on))

    def counts(self, s: int) -> TokenCounts:
        """Token-count bounds of the model call at global step s."""
        L, now = self.seq_len, self.masked_in[s]
        if s == 0:
            return TokenCounts(masked=max(now), visible=max(L - m for m in now))
        before = self.masked_in[s - 1]
        return TokenCounts(
            masked=max(now),
            visible=max(L - m for m in now),
            new=max(b - m for b, m in zip(before, now)),
            prev_visible=max(L - b for b in before),
        )

    def remask(self, s: int) -> tuple[int, ...]:
        return self.masked_in[s + 1]


# ----------------------------------------------------------------------------- noise


def gumbel(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """Standard Gumbel noise, float32, from uniform draws of `generator`.

    u is clamped away from 0 so the noise stays finite (it lies in [-4.5, 16.7]).
    """
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    return u.clamp_(min=torch.finfo(torch.float32).tiny).log_().neg_().log_().neg_()  # -log(-log u), in place


def _noise(generator, rows: Sequence[int], width: int | None, batch: int, n: int, device, active: Sequence[bool]):
    """(batch, n[, width]) Gumbel noise: one draw for the batch from a single generator,
    or, with one generator per row, rows[b] slots from row b's generator (zeros elsewhere)."""
    tail = () if width is None else (width,)
    if not isinstance(generator, (list, tuple)):
        return gumbel((batch, n) + tail, generator, device)
    out = torch.zeros((batch, n) + tail, device=device)
    for b, (g, m, on) in enumerate(zip(generator, rows, active)):
        if on and m:
            out[b, :m] = gumbel((m,) + tail, g, device)
    return out


# ----------------------------------------------------------------------------- one step


@dataclass
class StepInfo:
    """Passed to a sampling callback after each step (tensors stay on the device)."""

    step: int
    ids: torch.Tensor  # (B, L) input of the next step (mask token where re-masked)
    sampled: torch.Tensor  # (B, L) this step's prediction at every position


def _check_generator(generator, batch: int, device):
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(f"generator: a list needs one torch.Generator per row ({batch}), got {len(generator)}")
        gens = list(generator)
    else:
        gens = [generator]
    for g in gens:
        if g is not None and not isinstance(g, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, a list of them, or None; got {type(g).__name__}")
        if g is not None and g.device.type != device.type:
            raise ValueError(f"generator is on {g.device} but the model runs on {device}")


class _Sampler:
    """One sampling run's static parts (plan, device tables, labels) and its step function."""

    def __init__(self, model: ENAT, labels, steps, cfg_scale, mask_temp, samp_temp, generator, batch_guidance, head):
        config: ENATConfig = model.config
        p = next(model.parameters())
        self.model, self.device, self.config = model, p.device, config
        labels = torch.as_tensor(labels, dtype=torch.int64, device=self.device).reshape(-1)
        B = labels.shape[0]
        if isinstance(steps, int):
            steps = [steps] * B
        steps = [int(s) for s in steps]
        if len(steps) != B or min(steps, default=1) < 1:
            raise ValueError(f"steps must be a positive int or one positive int per row ({B}), got {steps}")
        if B and (int(labels.min()) < 0 or int(labels.max()) > config.num_classes):  # once, before the loop
            raise ValueError(f"labels must lie in [0, {config.num_classes}] ({config.num_classes} = null class)")
        if head not in ("masked", "all"):
            raise ValueError(f"head must be 'masked' or 'all', got {head!r}")
        _check_generator(generator, B, self.device)
        self.B, self.generator, self.batch_guidance, self.head = B, generator, batch_guidance, head
        # The reference path (backend "torch") runs the published formulas op by op; the
        # others run the same math in fewer passes (as the model's fused path does).
        self.fused = model.backend != "torch"
        self.plan = SamplingPlan.build(config.tokens, steps, cfg_scale, mask_temp, samp_temp)

        def table(rows, dtype=torch.float32):
            return torch.tensor(rows, dtype=dtype).reshape(len(rows), B).to(self.device)

        self.samp_temp, self.mask_temp = table(self.plan.samp_temp), table(self.plan.mask_temp)
        self.guidance = table(self.plan.guidance)
        self.remask = table([self.plan.remask(s) for s in range(self.plan.total_steps)], torch.int64)
        self.labels = labels
        null = torch.full_like(labels, config.null_label)
        self.labels2 = torch.cat([labels, null])
        self.positions = torch.arange(config.tokens, device=self.device)

    def loop(self, callback=None) -> torch.Tensor:
        """Every step, from all-masked maps to all-revealed tokens (B, h, w); no host reads."""
        ids, state, mods = self.initial_ids(), None, self.modulation()
        sampled = ids
        for s in range(self.plan.total_steps):
            ids, sampled, state = self.step(s, ids, state, mods)
            if callback is not None:
                callback(StepInfo(s, ids, sampled))
        return sampled.reshape(self.B, *self.config.grid)

    def initial_ids(self) -> torch.Tensor:
        return torch.full((self.B, self.config.tokens), self.config.mask_id, dtype=torch.int64, device=self.device)

    def modulation(self):
        """adaLN chunks for (labels, null): the same at every step, computed once per run."""
        if self.batch_guidance:
            return self.model.modulation(self.labels2)
        return self.model.modulation(self.labels), self.model.modulation(self.labels2[self.B :])

    def forward(self, s: int, ids, state, mods):
        """Guided masked-token logits (B, Nm, V) of step s, the masked positions, the new state."""
        m, B, counts = self.model, self.B, self.plan.counts(s)
        if self.batch_guidance:
            out = m(torch.cat([ids, ids]), self.labels2, prev=state, counts=counts, logits_for=self.head, modulation=mods)
            cond, uncond, new_state = out.logits[:B], out.logits[B:], out
            idx = out.masked_index[:B]
        else:
            prev_c, prev_u = state if state is not None else (None, None)
            out_c = m(ids, self.labels, prev=prev_c, counts=counts, logits_for=self.head, modulation=mods[0])
            out_u = m(ids, self.labels2[B:], prev=prev_u, counts=counts, logits_for=self.head, modulation=mods[1])
            cond, uncond, new_state, idx = out_c.logits, out_u.logits, (out_c, out_u), out_c.masked_index
        if self.head == "all":  # the sampler only needs the masked positions
            routing = m.resolved_backends(self.device, cond.dtype).routing
            cond = ek.gather_tokens(cond, idx, backend=routing)
            uncond = ek.gather_tokens(uncond, idx, backend=routing)
        with scope("enat::sampling"):
            g = self.guidance[s][:, None, None]
            if self.fused:  # one pass: uncond + (1 + g)(cond - uncond)
                guided = torch.lerp(uncond.float(), cond.float(), 1 + g)
            else:
                guided = cond.float() + g * (cond.float() - uncond.float())
        return guided, idx, new_state

    def step(self, s: int, ids, state, mods):
        """One sampling step: returns (next ids, sampled ids, new state)."""
        routing = self.model.resolved_backends(self.device).routing
        logits, idx, state = self.forward(s, ids, state, mods)
        with scope("enat::sampling"):
            ids, sampled = self._choose(s, ids, logits, idx, routing)
        return ids, sampled, state

    def _choose(self, s: int, ids, logits, idx, routing):
        """Sample the masked tokens from guided logits (B, Nm, V), then re-mask the least confident."""
        plan, L = self.plan, self.config.tokens
        B, Nm, V = logits.shape
        rows, on, temp = plan.masked_in[s], plan.started[s], self.samp_temp[s][:, None, None]
        # Categorical(logp / T_samp) by the Gumbel-max trick: argmax(logp / T + G).
        noise = _noise(self.generator, rows, V, B, Nm, self.device, on)
        if self.fused:
            # logp = logits - lse differs from logits by a per-row constant: the argmax
            # needs no log-softmax, and the picked log-prob is one gather minus lse.
            lse = torch.logsumexp(logits, dim=-1)
            pick = torch.argmax(noise.addcdiv_(logits, temp), dim=-1)  # (B, Nm)
            pick_logp = torch.gather(logits, 2, pick[:, :, None])[:, :, 0] - lse
        else:
            logp = torch.log_softmax(logits, dim=-1)
            pick = torch.argmax(logp / temp + noise, dim=-1)
            pick_logp = torch.gather(logp, 2, pick[:, :, None])[:, :, 0]
        confidence = pick_logp + self.mask_temp[s][:, None] * _noise(self.generator, rows, None, B, Nm, self.device, on)
        # Back to positions; -1 slots (padding of shorter rows) are skipped by the scatter.
        masking = ids == self.config.mask_id
        pick_full = ek.scatter_tokens(pick, idx, L, backend=routing)
        conf_full = ek.scatter_tokens(confidence, idx, L, backend=routing)
        sampled = torch.where(masking, pick_full, ids)
        conf_full = torch.where(masking, conf_full, torch.full_like(conf_full, math.inf))  # visible: never re-masked
        # Re-mask the remask[b] least confident of each row (rank < count; counts differ per row when ragged).
        order = torch.argsort(conf_full, dim=-1, stable=True)
        below = self.positions[None, :] < self.remask[s][:, None]
        remasked = torch.zeros_like(masking).scatter_(1, order, below)
        return torch.where(remasked, torch.full_like(sampled, self.config.mask_id), sampled), sampled


# ----------------------------------------------------------------------------- public API

PUBLISHED_CFG_SCALE = 2.5  # ImageNet 256 px; enat.sampling_settings(config) has each configuration's


def resolve_cfg_scale(cfg_scale: float, cfg: float | None, caller: str, stacklevel: int = 3) -> float:
    """The guidance scale of a call that may use the deprecated keyword ``cfg``.

    ``cfg`` is the deprecated spelling of ``cfg_scale`` (``cfg`` names an ENATConfig
    elsewhere); it works, with a DeprecationWarning pointing `stacklevel` frames up
    (the caller's caller).  Both at once, with different values, is a TypeError; a
    scale that is not finite, a ValueError.
    """
    if cfg is not None:
        if cfg_scale != PUBLISHED_CFG_SCALE and cfg_scale != cfg:
            raise TypeError(f"{caller}() got cfg_scale={cfg_scale} and its deprecated alias cfg={cfg}: give cfg_scale only")
        warnings.warn(f"{caller}(): the keyword cfg is deprecated, use cfg_scale", DeprecationWarning, stacklevel=stacklevel)
        cfg_scale = cfg
    # NaN or inf turns every guided logit into NaN, and sampling then returns token 0
    # everywhere without a word (enat-sample refuses them too).
    if not math.isfinite(cfg_scale):
        raise ValueError(f"{caller}(): cfg_scale must be a finite number, got {cfg_scale}")
    return cfg_scale


@torch.no_grad()
def sample(
    model: ENAT,
    labels,
    steps: int | Sequence[int] = 8,
    cfg_scale: float = PUBLISHED_CFG_SCALE,
    *,
    mask_temp: float = 1.5,
    samp_temp: float = 6.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    backend: str | None = "model",
    batch_guidance: bool = True,
    head: str = "masked",
    callback: Callable[[StepInfo], None] | None = None,
    cfg: float | None = None,
) -> torch.Tensor:
    """Sample token maps for class `labels` with ENAT's reuse sampler.

    Args:
        model: an ENAT model (in eval mode; its device and dtype are used).
        labels: (B,) class ids (config.num_classes = the null class, i.e. unconditional).
        steps: sampling steps (8 published), or one count per row (a ragged batch).
        cfg_scale: classifier-free guidance scale (2.5 published at 256 px, 3.5 at 512 px).
        mask_temp, samp_temp: masking and sampling temperatures (1.5 and 6 at 256 px).
        generator: a torch.Generator for the batch, or a list with one per row (a row's
            result then depends only on its own generator), or None (global RNG).
        backend: enat_kernels backend for this call ("cpu", "cuda", "triton", "torch",
            None = automatic); default: the model's own setting.
        batch_guidance: run the conditional and unconditional passes as one forward of
            2B rows (True) or as two forwards (False); same results.
        head: "masked" computes logits only where tokens are masked (all that sampling
            reads); "all" computes them for every position as the published code does.
        callback: called with a StepInfo after every step (may read the tensors; the
            sampler itself never does).
        cfg: deprecated alias of cfg_scale (DeprecationWarning).

    Returns:
        tokens (B, h, w) int64 on the model's device, every token revealed.
    """
    cfg_scale = resolve_cfg_scale(cfg_scale, cfg, "sample", stacklevel=4)  # + torch.no_grad's wrapper
    if model.training:
        raise ValueError("sample() needs the model in eval mode (model.eval()): dropout would perturb it")
    ctx = model.using_backend(model.backend if backend == "model" else backend)
    with ctx, ek.value_checks(False):
        run = _Sampler(model, labels, steps, cfg_scale, mask_temp, samp_temp, generator, batch_guidance, head)
        return run.loop(callback)


class CUDAGraphSampler:
    """Sampling with every step captured once in a CUDA graph, then replayed.

    For repeated batches of the same size and settings on a GPU (launch overhead
    dominates small batches).  The generators (one, or one per row) are created here
    and registered with the graphs; ``__call__(labels, seeds)`` reseeds them, copies
    the labels into the static buffer and replays the steps.  Arguments as `sample`'s
    (``cfg`` is the deprecated alias of ``cfg_scale``).

    Its tests need a CUDA device (README, "Status" says where it has run).  The loop it
    captures is the same `_Sampler.step` that `sample` runs (no host syncs, value
    checks off), which the CPU tests cover.
    """

    def __init__(self, model: ENAT, batch_size: int, steps: int | Sequence[int] = 8, cfg_scale: float = PUBLISHED_CFG_SCALE, *,
                 mask_temp: float = 1.5, samp_temp: float = 6.0, per_row_generators: bool = True,
                 backend: str | None = "model", batch_guidance: bool = True, head: str = "masked", warmup: int = 1,
                 cfg: float | None = None):
        cfg_scale = resolve_cfg_scale(cfg_scale, cfg, "CUDAGraphSampler")
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, it is on {device}")
        self.model, self.backend = model, model.backend if backend == "model" else backend
        n_gen = batch_size if per_row_generators else 1
        self.generators = [torch.Generator(device=device) for _ in range(n_gen)]
        gen = self.generators if per_row_generators else self.generators[0]
        labels = torch.zeros(batch_size, dtype=torch.int64, device=device)
        with model.using_backend(self.backend), ek.value_checks(False), torch.no_grad():
            self.run = _Sampler(model, labels, steps, cfg_scale, mask_temp, samp_temp, gen, batch_guidance, head)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up (lazy initializations must not be captured)
                for _ in range(warmup):
                    self.run.loop()
            torch.cuda.current_stream().wait_stream(stream)
            self.graphs, pool = [], torch.cuda.graph_pool_handle()
            self.ids0 = self.run.initial_ids()
            ids, state = self.ids0, None
            for s in range(self.run.plan.total_steps):
                graph = torch.cuda.CUDAGraph()
                for g in self.generators:
                    graph.register_generator_state(g)
                with torch.cuda.graph(graph, pool=pool):
                    if s == 0:
                        self.mods = self.run.modulation()
                    ids, self.sampled, state = self.run.step(s, ids, state, self.mods)
                self.graphs.append(graph)

    @torch.no_grad()
    def __call__(self, labels, seeds: Sequence[int]) -> torch.Tensor:
        labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        if labels.shape[0] != self.run.B or len(seeds) != len(self.generators):
            raise ValueError(f"expected {self.run.B} labels and {len(self.generators)} seeds")
        self.run.labels.copy_(labels, non_blocking=True)
        self.run.labels2[: self.run.B].copy_(labels, non_blocking=True)
        for g, seed in zip(self.generators, seeds):
            g.manual_seed(int(seed))
        for graph in self.graphs:
            graph.replay()
        h, w = self.model.config.grid
        return self.sampled.reshape(-1, h, w).clone()
