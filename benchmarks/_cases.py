"""The shapes benchmarked on each device (ENAT-L sampling steps, and CPU-sized ones).

ENAT-L: H = 16 heads of D = 64.  On a GPU in bf16, the shapes of its sampling steps:
the 256 px decoder step (masked queries attending to the visible tokens), the encoder
with computation reuse (a few newly revealed tokens attending to the cached ones), the
512 px decoder step and the 512 px first step (nothing visible yet, no cond segment).
On the CPU in float32, batch 8, the 256 px equivalents.  One extra "ragged" shape per
device has rows of different lengths (the project's extension over the published
code), to price masking in the anchors that need it.

`smoke` marks the reduced set that runs under --benchmark-disable (CI smoke mode: one
untimed call per case), with the batch cut to SMOKE_BATCH so each file takes seconds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import _env
from ._env import ON_GPU

SMOKE_BATCH = 2

H, D = 16, 64


@dataclass(frozen=True)
class AttnShape:
    name: str
    B: int
    Nq: int
    Nc: int
    H: int = H
    D: int = D
    ragged: bool = False
    smoke: bool = False

    @property
    def id(self) -> str:
        return f"{self.name}-B{self.B}-Nq{self.Nq}-Nc{self.Nc}"

    @property
    def label(self) -> str:
        tail = ", ragged rows" if self.ragged else ""
        return f"{self.name}: B={self.B} Nq={self.Nq} Nc={self.Nc} H={self.H} D={self.D}{tail}"

    def lengths(self) -> tuple[list[int] | None, list[int] | None]:
        """(cond_lens, self_lens) as host lists; None for full rows.

        Ragged: each row keeps between half and all of its tokens (at least one key per
        row, so no anchor meets a fully masked row); row 0 is full, so the dense shape
        is tight.  Fixed seed: every path sees the same lengths.
        """
        if not self.ragged:
            return None, None
        g = torch.Generator().manual_seed(1234)
        lq = torch.randint(max(self.Nq // 2, 1), self.Nq + 1, (self.B,), generator=g)
        lc = torch.randint(self.Nc // 2, self.Nc + 1, (self.B,), generator=g) if self.Nc else torch.zeros(self.B, dtype=torch.long)
        lq[0], lc[0] = self.Nq, self.Nc
        return lc.tolist(), lq.tolist()


GPU_ATTN = [
    AttnShape("dec256", B=500, Nq=128, Nc=128, smoke=True),
    AttnShape("enc256-reuse", B=500, Nq=32, Nc=224),
    AttnShape("dec512", B=64, Nq=512, Nc=512),
    AttnShape("first512", B=64, Nq=1024, Nc=0),
    AttnShape("dec256-ragged", B=500, Nq=128, Nc=128, ragged=True, smoke=True),
]

CPU_ATTN = [
    AttnShape("dec256", B=8, Nq=128, Nc=128, smoke=True),
    AttnShape("enc256-reuse", B=8, Nq=32, Nc=224),
    AttnShape("first256", B=8, Nq=256, Nc=0),
    AttnShape("dec256-ragged", B=8, Nq=128, Nc=128, ragged=True, smoke=True),
]

ATTN_SHAPES = GPU_ATTN if ON_GPU else CPU_ATTN


@dataclass(frozen=True)
class RouteShape:
    """A mid-sampling step: L tokens, n_vis visible (n_new of them newly revealed), the rest masked."""

    name: str
    B: int
    L: int
    C: int
    n_vis: int
    n_new: int
    smoke: bool = False

    @property
    def id(self) -> str:
        return f"{self.name}-B{self.B}-L{self.L}-C{self.C}"

    @property
    def label(self) -> str:
        return f"{self.name}: B={self.B} L={self.L} C={self.C} visible={self.n_vis} (new {self.n_new}) masked={self.L - self.n_vis}"


GPU_ROUTE = [
    RouteShape("step256", B=500, L=256, C=1024, n_vis=128, n_new=32, smoke=True),
    RouteShape("step512", B=64, L=1024, C=1024, n_vis=512, n_new=128),
]

CPU_ROUTE = [
    RouteShape("step256", B=8, L=256, C=1024, n_vis=128, n_new=32, smoke=True),
]

ROUTE_SHAPES = GPU_ROUTE if ON_GPU else CPU_ROUTE


def active(shapes) -> list:
    """The shapes to run: all of them, or under --benchmark-disable the smoke ones, small."""
    if not _env.SMOKE:
        return list(shapes)
    return [dataclasses.replace(s, B=min(s.B, SMOKE_BATCH)) for s in shapes if s.smoke]
