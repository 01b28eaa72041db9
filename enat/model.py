"""The published ENAT model on enat_kernels' routing and SC-Attention ops.

Module and parameter names follow the released checkpoints, so
``ENAT(config).load_state_dict(torch.load("nnet_ema.pth"), strict=True)`` works.

Where the published code uses boolean indexing (``x[mask]``, a device-to-host sync
that also forces every row to have the same number of masked tokens), this model
routes tokens with ``enat_kernels.mask_to_indices`` / ``gather_tokens`` /
``merge_tokens`` / ``restore_tokens``: the caller passes the token counts (a sampler
knows them from its schedule), rows may differ (padding indices are -1, per-row
lengths go to SC-Attention as ``self_lens`` / ``cond_lens``), and nothing reads data
back to the host.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import enat_kernels as ek
from enat_kernels import _validation

from . import backends as _backends
from .configs import ENATConfig, get_config
from .profiling import scope


@dataclass(frozen=True)
class TokenCounts:
    """Host-side bounds on the token subsets of one forward pass (maxima over the rows).

    masked / visible: tokens of each kind in `ids`; new: visible now but masked in
    `prev` (the tokens the encoder re-encodes); prev_visible: visible in `prev`.
    """

    masked: int
    visible: int
    new: int = 0
    prev_visible: int = 0

    @classmethod
    def from_masks(cls, masking: torch.Tensor, prev_masking: torch.Tensor | None = None) -> "TokenCounts":
        """Counts read from the masks (one device-to-host copy; samplers pass them instead)."""
        rows = [masking.sum(1), (~masking).sum(1)]
        if prev_masking is not None:
            rows += [(~masking & prev_masking).sum(1), (~prev_masking).sum(1)]
        if masking.shape[0] == 0:
            return cls(0, 0)
        most = torch.stack(rows).amax(dim=1).tolist()
        return cls(*most)


class ENATOutput:
    """What a forward pass returns; unpacks as ``logits, feat, masking`` and is a valid `prev`.

    logits: (B, L, V), or (B, Nm, V) for the masked tokens only (``logits_for="masked"``;
        row i of batch b is position ``masked_index[b, i]``, rows with index -1 are padding).
    feat: (B, L, C) features before the final norm: what the next step reuses.
    masking: (B, L) bool, True where the input was the mask token.
    masked_index, masked_lens: the masked positions (ascending, -1 padded) and counts per row.
    """

    __slots__ = ("logits", "feat", "masking", "masked_index", "masked_lens")

    def __init__(self, logits, feat, masking, masked_index, masked_lens):
        self.logits, self.feat, self.masking = logits, feat, masking
        self.masked_index, self.masked_lens = masked_index, masked_lens

    def __iter__(self):
        return iter((self.logits, self.feat, self.masking))

    def __getitem__(self, key: str):  # the published code's return_dict access: out["feat"]
        if key not in self.__slots__:
            raise KeyError(key)
        return getattr(self, key)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def _modulate_fused(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(shift[:, None], x, 1 + scale[:, None])  # one pass instead of two


class Mlp(nn.Module):
    """fc1 (C -> hidden), GELU (tanh approximation), fc2 (hidden -> C); timm's names."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, fused: bool = False):
        with scope("enat::linear"):
            h = self.fc1(x)
        with scope("enat::activation"):
            h = _gelu_tanh_inplace(h) if fused and h.device.type == "cpu" and not torch.is_grad_enabled() else self.act(h)
        with scope("enat::linear"):
            return self.fc2(h)


_GELU_C1 = 2 * math.sqrt(2 / math.pi)
_GELU_C3 = _GELU_C1 * 0.044715


def _gelu_tanh_inplace(h: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation, written as h * sigmoid(2k (h + 0.044715 h^3)).

    The same function (0.5 (1 + tanh z) = sigmoid(2z)); on CPUs about twice as fast
    as ATen's gelu(approximate="tanh"), whose vectorized tanh is several times slower
    than its sigmoid (measured on AVX2).  Overwrites h (the fc1 output, used once).
    """
    z = torch.addcmul(torch.tensor(_GELU_C1, dtype=h.dtype), h, h, value=_GELU_C3)
    return h.mul_(z.mul_(h).sigmoid_())


class TokenEmbedding(nn.Module):
    """``x_embedder``: LayerNorm(word + position embeddings), eps 1e-6, dropout in training."""

    def __init__(self, vocab: int, dim: int, tokens: int, dropout: float = 0.1):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim)
        self.position_embeddings = nn.Embedding(tokens, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=1e-6)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids):
        x = self.word_embeddings(ids) + self.position_embeddings.weight[: ids.shape[1]]
        return self.dropout(self.LayerNorm(x))


class LabelEmbedding(nn.Module):
    """``y_embedder``: one row per class plus the null class used for guidance."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, labels):
        return self.embedding_table(labels)


class PrevProj(nn.Module):
    """``prev_proj(z) = z + MLP(LayerNorm(z))``: adapts the previous step's features for reuse."""

    def __init__(self, dim: int, mlp_ratio: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio * dim)

    def forward(self, z, fused: bool = False):
        with scope("enat::norm_mod"):
            h = self.norm(z)
        return z + self.mlp(h, fused)


class MlmLayer(nn.Module):
    """The head's layers: ``ln(GELU_erf(fc(h)))`` then a product with the tied word embeddings."""

    def __init__(self, dim: int, vocab: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.gelu = nn.GELU()
        self.ln = nn.LayerNorm(dim)  # eps 1e-5
        self.bias = nn.Parameter(torch.zeros(1, 1, vocab))

    def forward(self, h, word_embeddings, num_codes: int):
        with scope("enat::linear"):
            h = self.fc(h)
        with scope("enat::activation"):
            h = self.gelu(h)
        with scope("enat::norm_mod"):
            h = self.ln(h)
        with scope("enat::linear"):
            # Only the first V columns are kept (the mask token is never predicted): skip the rest.
            return F.linear(h, word_embeddings[:num_codes], self.bias[0, 0, :num_codes])


class ENATBlock(nn.Module):
    """A DiT-style adaLN block whose attention is SC-Attention.

    Two ways through it, same math:
    - reference (backend "torch"): the published formulas op by op;
    - fused (every other backend): q and kv.B (both read the same normalized input)
      in one GEMM, modulation and gated residuals as single addcmul passes, and the
      cond segment's LayerNorm taken from the caller (it is the same tensor for all
      encoder blocks, and for all decoder blocks), so it is computed once per forward;
      on CPUs at inference, the MLP's GELU in its sigmoid form (see _gelu_tanh_inplace).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm1_ = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = ek.SCAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio * dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 8 * dim))
        self._qkv_cache = None  # (key, weight, bias): q and kv.B stacked for the fused path

    def modulation(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The 8 chunks, in order: shift_msa, scale_msa, shift_msa_, scale_msa_, gate_msa, shift_mlp, scale_mlp, gate_mlp."""
        with scope("enat::linear"):
            return self.adaLN_modulation(c).chunk(8, dim=1)

    def _qkv_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[W_q; W_kvB] and [b_q; b_kvB], rebuilt only when those parameters change."""
        q, kv = self.attn.q, self.attn.kv["B"]
        params = (q.weight, q.bias, kv.weight, kv.bias)
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return torch.cat([q.weight, kv.weight]), torch.cat([q.bias, kv.bias])  # differentiable, not cached
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)
        if self._qkv_cache is None or self._qkv_cache[0] != key:
            self._qkv_cache = (key, torch.cat([q.weight, kv.weight]).detach(), torch.cat([q.bias, kv.bias]).detach())
        return self._qkv_cache[1], self._qkv_cache[2]

    def _attention(self, a, b, x_lens, cond_lens, fused: bool, backend):
        """SC-Attention of queries a over (cond segment b, self segment a), then proj."""
        B, N, C = a.shape
        H, D = self.attn.num_heads, self.attn.head_dim
        with scope("enat::linear"):
            if fused:
                q, k_self, v_self = F.linear(a, *self._qkv_weight()).view(B, N, 3, H, D).unbind(2)
            else:
                q = self.attn.q(a).view(B, N, H, D)
                k_self, v_self = self.attn.kv["B"](a).view(B, N, 2, H, D).unbind(2)  # K first, V second
            k_cond = v_cond = None
            if b is not None:
                k_cond, v_cond = self.attn.kv["A"](b).view(B, b.shape[1], 2, H, D).unbind(2)
        with scope("enat::attention"):
            o = ek.sc_attention(q, k_cond, v_cond, k_self, v_self, cond_lens=cond_lens, self_lens=x_lens, backend=backend)
        with scope("enat::linear"):
            return self.attn.proj(o.reshape(B, N, C))

    def forward(self, x, mod, cond=None, *, x_lens=None, cond_lens=None, cond_normed=None, fused: bool = False, backend=None):
        """x (B, N, C) queries; cond (B, Nc, C) or None; mod = self.modulation(c).

        cond_normed: LayerNorm(cond) if the caller has it (fused path).  backend: the
        SC-Attention backend (None: enat_kernels chooses).
        """
        shift_msa, scale_msa, shift_msa_, scale_msa_, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        modulate = _modulate_fused if fused else _modulate
        with scope("enat::norm_mod"):
            a = modulate(self.norm1(x), shift_msa, scale_msa)
            b = None
            if cond is not None:
                b = modulate(self.norm1_(cond) if cond_normed is None else cond_normed, shift_msa_, scale_msa_)
        y = self._attention(a, b, x_lens, cond_lens, fused, backend)
        with scope("enat::norm_mod"):
            x = torch.addcmul(x, gate_msa[:, None], y) if fused else x + gate_msa[:, None] * y
            h = modulate(self.norm2(x), shift_mlp, scale_mlp)
        y = self.mlp(h, fused)
        with scope("enat::norm_mod"):
            return torch.addcmul(x, gate_mlp[:, None], y) if fused else x + gate_mlp[:, None] * y


class ENAT(nn.Module):
    """ENAT: encoder over visible tokens (re-encoding only newly revealed ones when the
    previous step's features are reused), decoder over masked tokens, tied MLM head.

    Args:
        config: an ENATConfig or a configuration name (enat.configs).
        backend: the enat_kernels backend of every routing and attention call ("cpu",
            "cuda", "triton", "torch" or None for automatic); see enat.backends.
    """

    def __init__(self, config: ENATConfig | str, *, backend: str | None = None):
        super().__init__()
        if not isinstance(config, (str, ENATConfig)):
            raise TypeError(f"config must be an ENATConfig or a configuration name (str), got {type(config).__name__}")
        config = get_config(config) if isinstance(config, str) else config
        self.config = config
        C, V = config.width, config.codebook_size
        self.x_embedder = TokenEmbedding(V + 1, C, config.tokens)
        self.y_embedder = LabelEmbedding(config.num_classes, C)
        self.prev_embedder = Mlp(C, config.mlp_ratio * C)  # in the checkpoints, unused by the model
        self.prev_proj = PrevProj(C, config.mlp_ratio)
        self.blocks = nn.ModuleList(ENATBlock(C, config.heads, config.mlp_ratio) for _ in range(config.depth_enc + config.depth_dec))
        self.norm = nn.LayerNorm(C)  # eps 1e-5
        self.mlm_layer = MlmLayer(C, V + 1)
        self.backend = _backends.check_backend_name(backend)
        self.reset_parameters()

    # ------------------------------------------------------------------ setup

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random weights (the published initialization, except that adaLN is not zeroed:
        zero modulation would make every block an identity and random outputs meaningless).
        """

        def xavier(w):
            bound = (6.0 / (w.shape[0] + w.shape[1])) ** 0.5
            w.uniform_(-bound, bound, generator=generator)

        for m in self.modules():
            if isinstance(m, nn.Linear):
                xavier(m.weight)
                m.bias.normal_(0.0, 0.02, generator=generator)  # non-zero so tests see every bias
            elif isinstance(m, nn.Embedding):
                m.weight.normal_(0.0, 0.02, generator=generator)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                m.weight.normal_(1.0, 0.1, generator=generator)
                m.bias.normal_(0.0, 0.1, generator=generator)
        # The tied head multiplies by this table: scale it so random logits are O(1), not O(0.02).
        self.x_embedder.word_embeddings.weight.normal_(0.0, 3.0 / self.config.width**0.5, generator=generator)
        for blk in self.blocks:
            blk.adaLN_modulation[1].weight.mul_(0.5)
        self.mlm_layer.bias.normal_(0.0, 0.1, generator=generator)

    @property
    def encoder(self):
        return self.blocks[: self.config.depth_enc]

    @property
    def decoder(self):
        return self.blocks[self.config.depth_enc :]

    def set_backend(self, backend: str | None) -> "ENAT":
        self.backend = _backends.check_backend_name(backend)
        return self

    @contextlib.contextmanager
    def using_backend(self, backend: str | None):
        """Temporarily switch the backend of every op (e.g. to time the reference path)."""
        old = self.backend
        self.set_backend(backend)
        try:
            yield self
        finally:
            self.backend = old

    def resolved_backends(self, device=None, dtype=None) -> _backends.ResolvedBackends:
        p = self.x_embedder.word_embeddings.weight
        return _backends.resolve(self.backend, torch.device(device or p.device), dtype or p.dtype, self.config.head_dim)

    # ------------------------------------------------------------------ forward

    def modulation(self, labels: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """adaLN chunks of every block for these labels (they depend on nothing else,
        so a sampler computes them once for all its steps)."""
        c = self.y_embedder(labels.reshape(-1))
        return [blk.modulation(c) for blk in self.blocks]

    def _shared_norm(self, cond: torch.Tensor, fused: bool):
        """LayerNorm(cond) for every block that reads this cond segment (fused path only)."""
        if not fused:
            return None
        with scope("enat::norm_mod"):
            return F.layer_norm(cond, cond.shape[-1:], eps=1e-6)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) of features h (..., C): norm, MLM layer, tied (detached) word embeddings."""
        w = self.x_embedder.word_embeddings.weight.detach()
        with scope("enat::norm_mod"):
            h = self.norm(h)
        return self.mlm_layer(h, w, self.config.codebook_size)

    def _check_inputs(self, ids, labels, prev):
        config = self.config
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            got = f"{getattr(ids, 'dtype', type(ids))} {tuple(getattr(ids, 'shape', ()))}"
            raise TypeError(f"ids must be an integer (batch, tokens) tensor (int64 or int32), got {got}")
        if ids.shape[1] != config.tokens:
            raise ValueError(f"ids has {ids.shape[1]} tokens per row but configuration {config.name} has {config.tokens}")
        if labels.reshape(-1).shape[0] != ids.shape[0]:
            raise ValueError(f"labels must have one entry per row of ids ({ids.shape[0]}), got shape {tuple(labels.shape)}")
        if prev is not None:
            if tuple(prev["feat"].shape) != (ids.shape[0], config.tokens, config.width) or tuple(prev["masking"].shape) != tuple(ids.shape):
                raise ValueError(
                    f"prev must come from a forward pass on the same batch: feat {tuple(prev['feat'].shape)}, "
                    f"masking {tuple(prev['masking'].shape)}, ids {tuple(ids.shape)}"
                )
        if _validation.value_checks_enabled() and ids.numel():
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi > config.mask_id:
                raise ValueError(f"ids must lie in [0, {config.mask_id}] ({config.mask_id} = mask token), got min {lo} max {hi}")

    def _encode_fresh(self, x, masking, counts, routing, enc, run) -> ek.TokenSplit:
        """Encoding without reuse: split x by the mask, every visible token (false_tokens) through the encoder."""
        with scope("enat::routing"):
            split = ek.split_tokens(x, masking, counts.masked, counts.visible, backend=routing)
        vis = split.false_tokens
        if counts.visible > 0:
            for blk, m in enc:
                vis = blk(vis, m, x_lens=split.false_lens, **run)
        return split._replace(false_tokens=vis)

    def _encode_with_reuse(self, x, masking, prev, counts, routing, enc, run) -> ek.TokenSplit:
        """Encoding with reuse: only the newly revealed tokens go through the encoder, attending
        to the previous step's visible features (projected by prev_proj), which stand in for
        the rest of the visible set.  Returns the split as `_encode_fresh` does."""
        prev_masking = prev["masking"]
        with scope("enat::routing"):
            msk_idx, msk_len = ek.mask_to_indices(masking, counts.masked, backend=routing)
            msk = ek.gather_tokens(x, msk_idx, backend=routing)
            old_idx, old_len = ek.mask_to_indices(~prev_masking, counts.prev_visible, backend=routing)
            old = ek.gather_tokens(prev["feat"].detach(), old_idx, backend=routing)
            new_idx, new_len = ek.mask_to_indices(~masking & prev_masking, counts.new, backend=routing)
            new = ek.gather_tokens(x, new_idx, backend=routing)
        cond = self.prev_proj(old, run["fused"]).to(x.dtype)
        if counts.new > 0:
            cond_normed = self._shared_norm(cond, run["fused"])
            for blk, m in enc:
                new = blk(new, m, cond, x_lens=new_len, cond_lens=old_len, cond_normed=cond_normed, **run)
        with scope("enat::routing"):
            # Visible set in position order: encoder output where newly revealed, reused features elsewhere.
            vis, vis_idx = ek.merge_tokens(new, new_idx, cond, old_idx, backend=routing)
        return ek.TokenSplit(msk, msk_idx, msk_len, vis, vis_idx, new_len + old_len)

    def _decode(self, split: ek.TokenSplit, dec, run) -> torch.Tensor:
        """Decoding: the masked tokens (true_tokens) through the decoder, attending to the encoded
        visible set (false_tokens)."""
        msk, vis = split.true_tokens, split.false_tokens
        vis_normed = self._shared_norm(vis, run["fused"])
        for blk, m in dec:
            msk = blk(msk, m, vis, x_lens=split.true_lens, cond_lens=split.false_lens, cond_normed=vis_normed, **run)
        return msk

    def visible_features(self, ids: torch.Tensor, labels: torch.Tensor, *, counts: TokenCounts | None = None) -> ENATOutput:
        """What a later step reuses from a step on `ids` (without reuse itself): embedding and encoder only.

        Returns an ENATOutput whose feat (B, L, C) equals ``forward(ids, labels).feat`` at the
        visible positions and is zero at the masked ones (the decoder and head do not run:
        reuse reads only the visible rows of ``prev.feat``); logits is None.
        """
        self._check_inputs(ids, labels, None)
        config = self.config
        masking = ids == config.mask_id
        counts = TokenCounts.from_masks(masking) if counts is None else counts
        with scope("enat::embed"):
            x = self.x_embedder(ids)
        be = _backends.resolve(self.backend, x.device, x.dtype, config.head_dim)
        c = self.y_embedder(labels.reshape(-1))
        enc = [(blk, blk.modulation(c)) for blk in self.encoder]
        split = self._encode_fresh(x, masking, counts, be.routing, enc, dict(fused=be.requested != "torch", backend=be.attention))
        with scope("enat::routing"):
            feat = ek.scatter_tokens(split.false_tokens, split.false_indices, config.tokens, backend=be.routing)
        return ENATOutput(None, feat, masking, split.true_indices, split.true_lens)

    def forward(
        self,
        ids: torch.Tensor,
        labels: torch.Tensor,
        prev=None,
        *,
        counts: TokenCounts | None = None,
        logits_for: str = "all",
        modulation: list | None = None,
    ) -> ENATOutput:
        """One ENAT step.

        Args:
            ids: (B, L) token ids; the mask token is V (config.codebook_size).
            labels: (B,) or (B, 1) class labels; K (config.num_classes) is the null class.
            prev: the previous step's output (or a dict with "feat" and "masking") to
                reuse; every token visible in prev must be visible in ids.
            counts: host-side bounds of the token subsets (TokenCounts); read from the
                masks (a device-to-host sync) when omitted.
            logits_for: "all" (B, L, V) logits, or "masked" (B, Nm, V) for the masked
                tokens only, which is all a sampler needs.
            modulation: precomputed self.modulation(labels), to skip recomputing it.
        """
        if logits_for not in ("all", "masked"):
            raise ValueError(f"logits_for must be 'all' or 'masked', got {logits_for!r}")
        self._check_inputs(ids, labels, prev)
        config = self.config
        masking = ids == config.mask_id
        prev_masking = None if prev is None else prev["masking"]
        if counts is None:
            counts = TokenCounts.from_masks(masking, prev_masking)
        if prev is not None and _validation.value_checks_enabled() and bool((~prev_masking & masking).any()):
            raise ValueError("prev has a visible token that is masked in ids; reuse needs every previously visible token to stay visible")

        with scope("enat::embed"):
            x = self.x_embedder(ids)
        be = _backends.resolve(self.backend, x.device, x.dtype, config.head_dim)
        mod = self.modulation(labels) if modulation is None else modulation
        enc, dec = list(zip(self.encoder, mod[: config.depth_enc])), list(zip(self.decoder, mod[config.depth_enc :]))
        run = dict(fused=be.requested != "torch", backend=be.attention)

        if prev is None:
            split = self._encode_fresh(x, masking, counts, be.routing, enc, run)
        else:
            split = self._encode_with_reuse(x, masking, prev, counts, be.routing, enc, run)
        msk = self._decode(split, dec, run)

        with scope("enat::routing"):
            feat = ek.restore_tokens(split.false_tokens, split.false_indices, msk, split.true_indices, config.tokens, backend=be.routing)
        logits = self.head(feat if logits_for == "all" else msk)
        return ENATOutput(logits, feat, masking, split.true_indices, split.true_lens)
