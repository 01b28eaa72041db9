"""nn.Module wrappers of the ops (kept apart from the ops, as Liger-Kernel does)."""

from __future__ import annotations

import torch
from torch import nn

from ._dispatch import check_backend_name
from .attention import sc_attention


def _check_tokens(name: str, z, dim: int) -> None:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
    if z.dim() != 3 or z.shape[-1] != dim:
        raise ValueError(f"{name} must have shape (batch, tokens, {dim}), got {tuple(z.shape)}")


class SCAttention(nn.Module):
    """ENAT's SC-Attention layer: `q`, `kv.A` (cond segment), `kv.B` (self segment), `proj`.

    Parameter names match the released ENAT checkpoints (``attn.q.weight``,
    ``attn.kv.A.weight``, ...).  ``forward(x, cond=None)`` takes inputs already
    normalized and modulated: x (B, N, C) gives the queries and the self segment,
    cond (B, Nc, C) the cond segment (None: plain self-attention over x).  Each kv
    Linear gives 2C outputs read as (2, H, D), keys first.
    """

    def __init__(self, dim: int, num_heads: int, *, backend: str | None = None):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or isinstance(num_heads, bool) or not isinstance(num_heads, int):
            raise TypeError(f"dim and num_heads must be ints, got {type(dim).__name__} and {type(num_heads).__name__}")
        if dim < 1 or num_heads < 1:
            raise ValueError(f"dim and num_heads must be positive, got dim={dim}, num_heads={num_heads}")
        if dim % num_heads != 0:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.backend = check_backend_name(backend)  # a misspelled name fails here, not at the first call
        self.q = nn.Linear(dim, dim)
        self.kv = nn.ModuleDict({"A": nn.Linear(dim, 2 * dim), "B": nn.Linear(dim, 2 * dim)})
        self.proj = nn.Linear(dim, dim)

    def _kv(self, linear: nn.Linear, z: torch.Tensor):
        B, N, _ = z.shape
        # Views into one (B, N, 2, H, D) output: no copy, head_dim stays unit-stride.
        return linear(z).view(B, N, 2, self.num_heads, self.head_dim).unbind(2)

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor | None = None,
        *,
        x_lens: torch.Tensor | None = None,
        cond_lens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        _check_tokens("x", x, self.dim)
        if cond is not None:
            _check_tokens("cond", cond, self.dim)
            if cond.shape[0] != x.shape[0]:
                raise ValueError(f"cond has batch {cond.shape[0]} but x has batch {x.shape[0]}")
        B, N, C = x.shape
        q = self.q(x).view(B, N, self.num_heads, self.head_dim)
        k_self, v_self = self._kv(self.kv["B"], x)
        k_cond = v_cond = None
        if cond is not None:
            k_cond, v_cond = self._kv(self.kv["A"], cond)
        o = sc_attention(q, k_cond, v_cond, k_self, v_self, cond_lens=cond_lens, self_lens=x_lens, backend=self.backend)
        return self.proj(o.reshape(B, N, C))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, backend={self.backend}"
