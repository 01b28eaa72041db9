"""Every way of computing SC-Attention the suite compares: this library's backends, and anchors.

A path turns one set of inputs (q, k_cond, v_cond, k_self, v_self in the library's
(B, N, H, D) layout, with optional per-row lengths) into the attention output as a
contiguous (B, Nq, H, D) tensor, the layout the next Linear reads without a copy.

Roles (the report's "ours" and "anchors"):

- ours: `enat_kernels.sc_attention` with each backend (cpu / triton / cuda, and
  torch, the library's plain-PyTorch fallback), value checks off as in a sampler.
- anchors: what a user would otherwise write.
  * reference: the published ENAT attention: concatenate K/V, matmul, softmax, matmul
    (a key mask before the softmax for ragged rows); autograd for the backward.
  * sdpa:<kernel>: torch.nn.functional.scaled_dot_product_attention on concatenated
    K/V, one kernel forced with torch.nn.attention.sdpa_kernel (flash, efficient, cudnn,
    math on GPU; the CPU default and math on CPU); ragged rows as a boolean attn_mask.
  * flex: torch.compile(flex_attention) with a block mask built once per shape from a
    mask_mod over the row lengths.
  * xformers, flash-attn: when installed (CUDA only); ragged rows through their
    variable-length forms (BlockDiagonalMask, flash_attn_varlen_func) on packed rows.

Every anchor that needs one K/V tensor comes twice: "+cat", where concatenating (and,
for the varlen forms, packing and unpacking) happens inside the timed call, and
without the suffix, where it was done beforehand for free: an upper bound on what that
anchor could reach if the model produced its K/V that way.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
import torch.nn.functional as F

from ._cases import AttnShape
from ._env import BenchEnv

OURS, ANCHOR = "ours", "anchor"


class Unsupported(Exception):
    """The path's library refuses these inputs on this device; the message says why."""


# ----------------------------------------------------------------------------- one shape


class AttnCase:
    """What every path of one shape shares: lengths, masks and packing plans, built once."""

    def __init__(self, shape: AttnShape, env: BenchEnv):
        self.shape, self.env = shape, env
        self.scale = shape.D**-0.5
        self.cond_lens_list, self.self_lens_list = shape.lengths()
        dev = env.device

        def lens(values):
            return None if values is None else torch.tensor(values, dtype=torch.int32, device=dev)

        self.cond_lens, self.self_lens = lens(self.cond_lens_list), lens(self.self_lens_list)

    @property
    def Nk(self) -> int:
        return self.shape.Nc + self.shape.Nq

    def _valid(self, lens, n) -> torch.Tensor:
        ar = torch.arange(n, device=self.env.device)
        return ar[None, :] < lens.long()[:, None]

    @functools.cached_property
    def q_valid(self) -> torch.Tensor | None:
        """(B, Nq) bool, valid query rows; None when every row is full."""
        return None if self.self_lens is None else self._valid(self.self_lens, self.shape.Nq)

    @functools.cached_property
    def key_valid(self) -> torch.Tensor | None:
        """(B, Nc + Nq) bool over the concatenated keys; None when every row is full."""
        if self.self_lens is None:
            return None
        return torch.cat([self._valid(self.cond_lens, self.shape.Nc), self.q_valid], dim=1)

    def inputs(self, seed: int) -> tuple[torch.Tensor, ...]:
        """(q, k_cond, v_cond, k_self, v_self), random, the same for every path given the seed."""
        s, dev = self.shape, self.env.device
        g = torch.Generator(device=dev).manual_seed(seed)

        def rnd(n):
            return torch.randn(s.B, n, s.H, s.D, generator=g, device=dev, dtype=self.env.dtype)

        return rnd(s.Nq), rnd(s.Nc), rnd(s.Nc), rnd(s.Nq), rnd(s.Nq)

    def dout(self, seed: int) -> torch.Tensor:
        """Gradient of the output, zero on padded query rows (which carry no data)."""
        s, dev = self.shape, self.env.device
        g = torch.Generator(device=dev).manual_seed(seed + 7919)
        d = torch.randn(s.B, s.Nq, s.H, s.D, generator=g, device=dev, dtype=self.env.dtype)
        return d if self.q_valid is None else d * self.q_valid[:, :, None, None]

    def bytes_per_copy(self, backward: bool) -> int:
        s = self.shape
        rows = 3 * s.Nq + 2 * s.Nc + (s.Nq if backward else 0)
        return s.B * rows * s.H * s.D * self.env.dtype.itemsize

    # --- FlexAttention: block mask once per shape
    @functools.cached_property
    def block_mask(self):
        from torch.nn.attention.flex_attention import create_block_mask

        s, Nc = self.shape, self.shape.Nc
        full = torch.tensor([s.Nq] * s.B, device=self.env.device)
        self_lens = full if self.self_lens is None else self.self_lens
        cond_lens = torch.full_like(full, Nc) if self.cond_lens is None else self.cond_lens

        def ragged_rows(b, h, q_idx, kv_idx):
            # Keys: the first cond_lens[b] of the cond segment, then the first
            # self_lens[b] of the self segment; padded query rows see nothing.
            key_ok = torch.where(kv_idx < Nc, kv_idx < cond_lens[b], (kv_idx - Nc) < self_lens[b])
            return key_ok & (q_idx < self_lens[b])

        return create_block_mask(ragged_rows, s.B, None, s.Nq, self.Nk, device=self.env.device)

    # --- varlen forms (flash-attn, xformers): which rows of the dense tensors to pack
    @functools.cached_property
    def pack(self) -> dict:
        s, dev = self.shape, self.env.device
        lq, lc = self.self_lens_list, self.cond_lens_list
        q_rows, kv_rows = [], []
        for b in range(s.B):
            q_rows.extend(range(b * s.Nq, b * s.Nq + lq[b]))
            base = b * self.Nk
            kv_rows.extend(range(base, base + lc[b]))
            kv_rows.extend(range(base + s.Nc, base + s.Nc + lq[b]))
        kv_lens = [c + q for c, q in zip(lc, lq)]

        def cu(lens):
            return torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=dev)

        return {
            "q_rows": torch.tensor(q_rows, dtype=torch.long, device=dev),
            "kv_rows": torch.tensor(kv_rows, dtype=torch.long, device=dev),
            "cu_q": cu(lq),
            "cu_k": cu(kv_lens),
            "max_q": max(lq),
            "max_k": max(kv_lens),
            "q_seqlen": list(lq),
            "kv_seqlen": kv_lens,
        }

    def pack_q(self, x: torch.Tensor) -> torch.Tensor:
        s = self.shape
        return x.reshape(s.B * s.Nq, s.H, s.D).index_select(0, self.pack["q_rows"])

    def pack_kv(self, cond: torch.Tensor, self_: torch.Tensor) -> torch.Tensor:
        s = self.shape
        return torch.cat([cond, self_], dim=1).reshape(s.B * self.Nk, s.H, s.D).index_select(0, self.pack["kv_rows"])

    def unpack_q(self, packed: torch.Tensor) -> torch.Tensor:
        s = self.shape
        dense = packed.new_zeros(s.B * s.Nq, s.H, s.D)
        return dense.index_copy(0, self.pack["q_rows"], packed).view(s.B, s.Nq, s.H, s.D)


# ----------------------------------------------------------------------------- paths


class AttnPath:
    """One way of computing SC-Attention.  Subclasses override what differs."""

    name: str
    role: str
    family: str
    concat_counted: bool | None = None  # None: no concatenation involved
    canonical_leaves = True  # prepare() returns (q, k_cond, v_cond, k_self, v_self)

    def __str__(self) -> str:
        return self.name

    def unavailable(self, case: AttnCase, backward: bool) -> str | None:
        """None when the path can run here, else the reason it is skipped."""
        return None

    def context(self):
        return contextlib.nullcontext()

    def prepare(self, case: AttnCase, x: tuple) -> tuple:
        """The tensors the timed call starts from (work done here is not timed)."""
        return x

    def forward(self, case: AttnCase, *t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dense_out(self, case: AttnCase, out: torch.Tensor) -> torch.Tensor:
        """The output as (B, Nq, H, D), for the correctness check (not timed)."""
        return out

    def path_dout(self, case: AttnCase, dout: torch.Tensor) -> torch.Tensor:
        """The (B, Nq, H, D) output gradient in this path's output layout."""
        return dout

    def extra(self, case: AttnCase) -> dict:
        return {}


class Ours(AttnPath):
    role, family = OURS, "enat_kernels"

    def __init__(self, backend: str):
        self.backend = backend
        self.name = f"ours:{backend}"

    def unavailable(self, case, backward):
        import enat_kernels

        dt = case.env.device.type
        if self.backend == "triton" and dt == "cpu":
            return "Triton on CPU tensors runs in its interpreter: timings would say nothing about the kernel"
        # The answer covers the backward op too (supports checks the whole op family).
        answer = enat_kernels.supports("sc_attention", device=dt, dtype=case.env.dtype, head_dim=case.shape.D, backend=self.backend)
        return answer.reason or None

    def context(self):
        import enat_kernels

        return enat_kernels.value_checks(False)

    def forward(self, case, q, kc, vc, ks, vs):
        import enat_kernels

        return enat_kernels.sc_attention(
            q, kc, vc, ks, vs, cond_lens=case.cond_lens, self_lens=case.self_lens, scale=case.scale, backend=self.backend
        )

    def extra(self, case):
        return {"value_checks": "off"}


class Reference(AttnPath):
    """The published ENAT attention (timm style); a key mask added for ragged rows."""

    name, role, family, concat_counted = "reference", ANCHOR, "reference", True

    def forward(self, case, q, kc, vc, ks, vs):
        k = torch.cat([kc, ks], dim=1).transpose(1, 2)
        v = torch.cat([vc, vs], dim=1).transpose(1, 2)
        attn = (q.transpose(1, 2) @ k.transpose(-2, -1)) * case.scale
        if case.key_valid is not None:
            attn = attn.masked_fill(~case.key_valid[:, None, None, :], float("-inf"))
        attn = attn.softmax(dim=-1)
        return (attn @ v).transpose(1, 2).contiguous()


class _ConcatAnchor(AttnPath):
    """An anchor computing on one K/V tensor: concatenated in the timed call (+cat) or before."""

    role = ANCHOR
    label: str

    def __init__(self, concat_counted: bool):
        self.concat_counted = concat_counted
        self.name = self.label + ("+cat" if concat_counted else "")
        self.canonical_leaves = concat_counted

    def prepare(self, case, x):
        if self.concat_counted:
            return x
        q, kc, vc, ks, vs = x
        return q, torch.cat([kc, ks], dim=1), torch.cat([vc, vs], dim=1)

    def forward(self, case, *t):
        if self.concat_counted:
            q, kc, vc, ks, vs = t
            return self.attend(case, q, torch.cat([kc, ks], dim=1), torch.cat([vc, vs], dim=1))
        return self.attend(case, *t)

    def attend(self, case, q, k, v):
        """Attention of q (B, Nq, H, D) over k, v (B, Nc + Nq, H, D) -> (B, Nq, H, D) contiguous."""
        raise NotImplementedError


_SDPA_KERNELS = {
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "cudnn": "CUDNN_ATTENTION",
    "math": "MATH",
}


class Sdpa(_ConcatAnchor):
    family = "sdpa"

    def __init__(self, kernel: str, concat_counted: bool):
        self.kernel = kernel
        self.label = f"sdpa:{kernel}"
        super().__init__(concat_counted)

    def context(self):
        if self.kernel == "default":
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([getattr(SDPBackend, _SDPA_KERNELS[self.kernel])])

    def attend(self, case, q, k, v):
        mask = None if case.key_valid is None else case.key_valid[:, None, None, :]
        args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        try:
            out = F.scaled_dot_product_attention(*args, attn_mask=mask, scale=case.scale)
        except RuntimeError as e:
            if "No available kernel" not in str(e):
                raise
            with warnings.catch_warnings(record=True) as caught:  # torch says why in warnings
                warnings.simplefilter("always")
                try:
                    F.scaled_dot_product_attention(*args, attn_mask=mask, scale=case.scale)
                except RuntimeError:
                    pass
            why = "; ".join(str(w.message).split("\n")[0] for w in caught) or str(e).split("\n")[0]
            raise Unsupported(f"SDPA's {self.kernel} kernel refuses these inputs: {why}") from None
        return out.transpose(1, 2).contiguous()


_FLEX_COMPILED = None


def _flex_fn(compiled: bool):
    """flex_attention, compiled once per session (its docs: eager is an unfused fallback)."""
    global _FLEX_COMPILED
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    if _FLEX_COMPILED is None:
        import torch._dynamo

        # One graph per shape and direction: keep them all, and never fall back to
        # eager silently when the limit is reached.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.fail_on_recompile_limit_hit = True
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


class Flex(_ConcatAnchor):
    family, label = "flex", "flex"

    def unavailable(self, case, backward):
        try:
            import torch.nn.attention.flex_attention  # noqa: F401
        except ImportError as e:
            return f"torch {torch.__version__} has no FlexAttention ({e})"
        return None

    def compiled(self, case) -> bool:
        # Under --benchmark-disable (one untimed call, CI) compiling each shape would
        # take most of the run; eager flex checks the same mask_mod and call.
        return not case.env.smoke

    def attend(self, case, q, k, v):
        fn = _flex_fn(self.compiled(case))
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
                out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=case.block_mask, scale=case.scale)
        except NotImplementedError as e:  # e.g. no backward on CPU
            raise Unsupported(f"FlexAttention: {str(e).splitlines()[0]}") from None
        return out.transpose(1, 2).contiguous()

    def extra(self, case):
        return {"compiled": self.compiled(case)}


class _VarlenAnchor(_ConcatAnchor):
    """flash-attn / xformers: dense calls for full rows, their varlen forms for ragged rows."""

    module: str

    def unavailable(self, case, backward):
        try:
            self.lib()
        except ImportError as e:
            return f"{self.label} is not installed ({e})"
        if case.env.device.type != "cuda":
            return f"{self.label} runs on CUDA tensors only"
        if case.env.dtype not in (torch.float16, torch.bfloat16):
            return f"{self.label} supports float16 and bfloat16 only"
        return None

    def lib(self):
        return __import__(self.module, fromlist=["_"])

    def prepare(self, case, x):
        if self.concat_counted or case.q_valid is None:
            return super().prepare(case, x)
        q, kc, vc, ks, vs = x
        return case.pack_q(q), case.pack_kv(kc, ks), case.pack_kv(vc, vs)

    def forward(self, case, *t):
        if case.q_valid is None:
            return super().forward(case, *t)
        if self.concat_counted:
            q, kc, vc, ks, vs = t
            packed = self.attend_packed(case, case.pack_q(q), case.pack_kv(kc, ks), case.pack_kv(vc, vs))
            return case.unpack_q(packed)
        return self.attend_packed(case, *t)

    def dense_out(self, case, out):
        return out if (case.q_valid is None or self.concat_counted) else case.unpack_q(out)

    def path_dout(self, case, dout):
        return dout if (case.q_valid is None or self.concat_counted) else case.pack_q(dout)

    def attend_packed(self, case, q, k, v):
        """Packed rows q (Tq, H, D), k, v (Tk, H, D) -> (Tq, H, D)."""
        raise NotImplementedError


class FlashAttn(_VarlenAnchor):
    family, label, module = "flash-attn", "flash-attn", "flash_attn"

    def attend(self, case, q, k, v):
        return self.lib().flash_attn_func(q, k, v, softmax_scale=case.scale)

    def attend_packed(self, case, q, k, v):
        p = case.pack
        return self.lib().flash_attn_varlen_func(q, k, v, p["cu_q"], p["cu_k"], p["max_q"], p["max_k"], softmax_scale=case.scale)


class Xformers(_VarlenAnchor):
    family, label, module = "xformers", "xformers", "xformers.ops"

    def attend(self, case, q, k, v):
        return self._call(q, k, v, None, case.scale)

    def attend_packed(self, case, q, k, v):
        bias = self._block_diagonal(case)
        return self._call(q[None], k[None], v[None], bias, case.scale)[0]

    def _call(self, q, k, v, bias, scale):
        try:
            return self.lib().memory_efficient_attention(q, k, v, attn_bias=bias, scale=scale)
        except NotImplementedError as e:  # no operator for these inputs
            raise Unsupported(f"xformers: {str(e).splitlines()[0]}") from None

    @staticmethod
    def _block_diagonal(case):
        if "xformers_bias" not in case.pack:
            from xformers.ops.fmha.attn_bias import BlockDiagonalMask

            case.pack["xformers_bias"] = BlockDiagonalMask.from_seqlens(case.pack["q_seqlen"], case.pack["kv_seqlen"])
        return case.pack["xformers_bias"]


def attention_paths(device_type: str) -> list[AttnPath]:
    """All paths for a device, ours first.  Unavailable ones skip themselves with a reason."""
    gpu = device_type == "cuda"
    ours = [Ours(b) for b in (("cuda", "triton", "torch") if gpu else ("cpu", "torch"))]
    kernels = ("flash", "efficient", "cudnn", "math") if gpu else ("default", "math")
    anchors: list[AttnPath] = [Reference()]
    for counted in (True, False):
        anchors += [Sdpa(k, counted) for k in kernels]
        anchors += [Flex(counted), FlashAttn(counted), Xformers(counted)]
    return ours + anchors
