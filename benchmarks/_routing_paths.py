"""Every way of moving token subsets the suite compares, for the four routing operations.

The operations of one ENAT sampling step (x: (B, L, C) tokens, `vis` the visible
mask, `new` the newly revealed subset of it, `prev` = vis & ~new the cached one):

- split:   x, vis          -> x[vis], x[~vis] as (B, n, C) each
- gather:  x, new          -> x[new] as (B, n_new, C)
- restore: visible, masked rows and their positions -> the (B, L, C) sequence
- merge:   new rows and cached rows with their positions -> the visible rows in
  position order (the encoder output joined to the reused cond tokens)

Roles (the report's "ours" and "anchors"):

- ours: enat_kernels.split_tokens / mask_to_indices + gather_tokens / restore_tokens /
  merge_tokens on each backend, value checks off as in a sampler.
- anchors:
  * bool-mask: what the published ENAT code does: x[mask].reshape(B, -1, C) and, to
    restore, index assignment through the mask (both synchronize with the host).
  * index_select: positions from a stable sort of the mask (no host sync), rows moved
    with index_select / index_copy_ on the flattened (B * L, C) view.
  * gather: the same positions, rows moved with torch.gather / scatter_.

Inputs that a sampler carries from an earlier operation (the positions of each subset)
are given to restore and merge, to every path alike; masks are given to all.
Anchors write restore and merge outputs into torch.empty, since the subsets cover
every row: a shortcut the general ops of the library cannot take.
"""

from __future__ import annotations

import contextlib

import torch

from ._cases import RouteShape
from ._env import BenchEnv

OURS, ANCHOR = "ours", "anchor"
OPS = ("split", "gather", "restore", "merge")


class RouteCase:
    """One shape: the masks and positions (shared by all copies), and random token copies."""

    def __init__(self, shape: RouteShape, env: BenchEnv):
        self.shape, self.env = shape, env
        s, dev = shape, env.device
        g = torch.Generator().manual_seed(4321)
        order = torch.stack([torch.randperm(s.L, generator=g) for _ in range(s.B)])  # per-row random order
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(s.L).expand(s.B, -1))
        self.vis = (rank < s.n_vis).to(dev)
        self.new = (rank < s.n_new).to(dev)
        self.prev = self.vis & ~self.new
        self.n_prev = s.n_vis - s.n_new

        def positions(mask):  # ascending positions of the True entries, (B, count)
            return mask.nonzero()[:, 1].reshape(s.B, -1)

        self.idx_vis, self.idx_msk = positions(self.vis), positions(~self.vis)
        self.idx_new, self.idx_prev = positions(self.new), positions(self.prev)

    def tokens(self, seed: int, n: int | None = None) -> torch.Tensor:
        s, dev = self.shape, self.env.device
        g = torch.Generator(device=dev).manual_seed(seed)
        return torch.randn(s.B, s.L if n is None else n, s.C, generator=g, device=dev, dtype=self.env.dtype)

    def inputs(self, op: str, seed: int) -> tuple:
        """The tensors an op starts from, for input copy `seed`."""
        x = self.tokens(seed)
        if op in ("split", "gather"):
            return (x,)
        if op == "restore":  # the split of x
            return x[self.vis].reshape(x.shape[0], -1, x.shape[2]), x[~self.vis].reshape(x.shape[0], -1, x.shape[2])
        if op == "merge":  # the encoder's new rows, and the cached ones
            return x[self.new].reshape(x.shape[0], -1, x.shape[2]), x[self.prev].reshape(x.shape[0], -1, x.shape[2])
        raise ValueError(op)

    def expected(self, op: str, seed: int):
        """What every path must produce, from boolean indexing of the input copy."""
        x = self.tokens(seed)
        B, C = x.shape[0], x.shape[2]
        if op == "split":
            return x[self.vis].reshape(B, -1, C), x[~self.vis].reshape(B, -1, C)
        if op == "gather":
            return (x[self.new].reshape(B, -1, C),)
        if op == "restore":
            return (x,)
        if op == "merge":
            return (x[self.vis].reshape(B, -1, C),)
        raise ValueError(op)

    def bytes_per_copy(self) -> int:
        s = self.shape
        return s.B * s.L * s.C * self.env.dtype.itemsize


def _flat(idx: torch.Tensor, width: int) -> torch.Tensor:
    """Positions per row (B, n) -> indices into the flattened (B * width) rows."""
    return (idx + width * torch.arange(idx.shape[0], device=idx.device)[:, None]).reshape(-1)


def _sorted_positions(mask: torch.Tensor) -> torch.Tensor:
    """Each row's True positions ascending, then its False positions (no host sync)."""
    return torch.sort((~mask).to(torch.uint8), dim=1, stable=True).indices


def _merge_ranks(idx_a: torch.Tensor, idx_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each row of two ascending, disjoint position sets lands in their merged order."""
    ar_a = torch.arange(idx_a.shape[1], device=idx_a.device)
    ar_b = torch.arange(idx_b.shape[1], device=idx_b.device)
    return ar_a + torch.searchsorted(idx_b, idx_a), ar_b + torch.searchsorted(idx_a, idx_b)


class RoutePath:
    name: str
    role: str
    family: str

    def __str__(self) -> str:
        return self.name

    def unavailable(self, case: RouteCase) -> str | None:
        return None

    def context(self):
        return contextlib.nullcontext()

    def run(self, op: str, case: RouteCase, *t: torch.Tensor) -> tuple:
        return getattr(self, op)(case, *t)

    def extra(self) -> dict:
        return {}


class BoolMask(RoutePath):
    name, role, family = "bool-mask", ANCHOR, "bool-mask"

    def split(self, case, x):
        B, _, C = x.shape
        return x[case.vis].reshape(B, -1, C), x[~case.vis].reshape(B, -1, C)

    def gather(self, case, x):
        return (x[case.new].reshape(x.shape[0], -1, x.shape[2]),)

    def restore(self, case, vis, msk):
        B, _, C = vis.shape
        out = vis.new_empty(B, case.shape.L, C)
        out[case.vis] = vis.reshape(-1, C)
        out[~case.vis] = msk.reshape(-1, C)
        return (out,)

    def merge(self, case, new, prev):
        B, _, C = new.shape
        full = new.new_empty(B, case.shape.L, C)
        full[case.new] = new.reshape(-1, C)
        full[case.prev] = prev.reshape(-1, C)
        return (full[case.vis].reshape(B, -1, C),)


class _IndexAnchor(RoutePath):
    """An anchor on explicit indices: positions from a sort of the mask, then one
    take (gather) or put (scatter) per subset; subclasses supply _take and _put."""

    role, family = ANCHOR, "index"

    def _take(self, x, idx):
        raise NotImplementedError

    def _put(self, out, idx, src):
        raise NotImplementedError

    def split(self, case, x):
        order, n = _sorted_positions(case.vis), case.shape.n_vis
        return self._take(x, order[:, :n]), self._take(x, order[:, n:])

    def gather(self, case, x):
        return (self._take(x, _sorted_positions(case.new)[:, : case.shape.n_new]),)

    def restore(self, case, vis, msk):
        out = vis.new_empty(vis.shape[0], case.shape.L, vis.shape[2])
        self._put(out, case.idx_vis, vis)
        self._put(out, case.idx_msk, msk)
        return (out,)

    def merge(self, case, new, prev):
        r_new, r_prev = _merge_ranks(case.idx_new, case.idx_prev)
        out = new.new_empty(new.shape[0], case.shape.n_vis, new.shape[2])
        self._put(out, r_new, new)
        self._put(out, r_prev, prev)
        return (out,)


class IndexSelect(_IndexAnchor):
    name = "index_select"

    def _take(self, x, idx):
        B, L, C = x.shape
        return x.reshape(B * L, C).index_select(0, _flat(idx, L)).view(B, idx.shape[1], C)

    def _put(self, out, idx, src):
        B, L, C = out.shape
        out.view(B * L, C).index_copy_(0, _flat(idx, L), src.reshape(-1, C))


class Gather(_IndexAnchor):
    name = "gather"

    def _take(self, x, idx):
        return torch.gather(x, 1, idx[:, :, None].expand(-1, -1, x.shape[2]))

    def _put(self, out, idx, src):
        out.scatter_(1, idx[:, :, None].expand(-1, -1, out.shape[2]), src)


class Ours(RoutePath):
    role, family = OURS, "enat_kernels"

    def __init__(self, backend: str):
        self.backend = backend
        self.name = f"ours:{backend}"

    def unavailable(self, case):
        import enat_kernels

        dt = case.env.device.type
        if self.backend == "triton" and dt == "cpu":
            return "Triton on CPU tensors runs in its interpreter: timings would say nothing about the kernel"
        return enat_kernels.supports("gather_tokens", device=dt, backend=self.backend).reason or None

    def context(self):
        import enat_kernels

        return enat_kernels.value_checks(False)

    def split(self, case, x):
        import enat_kernels as ek

        r = ek.split_tokens(x, case.vis, case.shape.n_vis, backend=self.backend)
        return r.true_tokens, r.false_tokens

    def gather(self, case, x):
        import enat_kernels as ek

        idx, _ = ek.mask_to_indices(case.new, case.shape.n_new, backend=self.backend)
        return (ek.gather_tokens(x, idx, backend=self.backend),)

    def restore(self, case, vis, msk):
        import enat_kernels as ek

        return (ek.restore_tokens(vis, case.idx_vis, msk, case.idx_msk, case.shape.L, backend=self.backend),)

    def merge(self, case, new, prev):
        import enat_kernels as ek

        merged, _ = ek.merge_tokens(new, case.idx_new, prev, case.idx_prev, backend=self.backend)
        return (merged,)

    def extra(self):
        return {"value_checks": "off"}


def routing_paths(device_type: str) -> list[RoutePath]:
    """All paths for a device, ours first.  Unavailable ones skip themselves with a reason."""
    backends = ("cuda", "triton", "torch") if device_type == "cuda" else ("cpu", "torch")
    return [Ours(b) for b in backends] + [BoolMask(), IndexSelect(), Gather()]
