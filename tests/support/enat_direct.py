"""A direct, unfused implementation of the published ENAT model, written for the tests only.

It reads the model's state dict and follows the published code's style: boolean
indexing (every row must have the same number of masked tokens), plain attention
over concatenated keys, formulas written out (LayerNorm, GELU, SiLU by hand).  It
shares no code with enat/ or enat_kernels/.
"""

from __future__ import annotations

import math

import torch


def layer_norm(x, weight=None, bias=None, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight + bias
    return y


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def gelu_erf(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def silu(x):
    return x * torch.sigmoid(x)


class DirectENAT:
    """attn_scale (head_dim -> scale) and chunk_order (a permutation of the 8 adaLN
    chunks) exist so the guard tests can build a deliberately wrong variant."""

    def __init__(self, state_dict, depth_enc, depth_dec, heads, codebook_size, *, attn_scale=None, chunk_order=None):
        self.p = {k: v.detach() for k, v in state_dict.items()}
        self.ne, self.nd, self.H, self.V = depth_enc, depth_dec, heads, codebook_size
        self.attn_scale = attn_scale or (lambda D: D**-0.5)
        self.chunk_order = tuple(range(8)) if chunk_order is None else tuple(chunk_order)

    def lin(self, x, name):
        return x @ self.p[name + ".weight"].T + self.p[name + ".bias"]

    def mlp(self, x, name):
        return self.lin(gelu_tanh(self.lin(x, name + ".fc1")), name + ".fc2")

    def block(self, i, x, c, cond=None):
        p, B, C, H = f"blocks.{i}.", x.shape[0], x.shape[2], self.H
        D = C // H
        chunks = self.lin(silu(c), p + "adaLN_modulation.1").chunk(8, dim=1)
        chunks = [chunks[j] for j in self.chunk_order]
        shift_msa, scale_msa, shift_msa_, scale_msa_, gate_msa, shift_mlp, scale_mlp, gate_mlp = (t[:, None] for t in chunks)
        a = layer_norm(x) * (1 + scale_msa) + shift_msa
        q = self.lin(a, p + "attn.q").reshape(B, -1, H, D)
        kv = self.lin(a, p + "attn.kv.B").reshape(B, -1, 2, H, D)
        if cond is not None:
            b = layer_norm(cond) * (1 + scale_msa_) + shift_msa_
            kv = torch.cat([self.lin(b, p + "attn.kv.A").reshape(B, -1, 2, H, D), kv], dim=1)
        k, v = kv[:, :, 0], kv[:, :, 1]
        s = torch.einsum("bihd,bjhd->bhij", q, k) * self.attn_scale(D)
        o = torch.einsum("bhij,bjhd->bihd", torch.softmax(s, dim=-1), v).reshape(B, -1, C)
        x = x + gate_msa * self.lin(o, p + "attn.proj")
        h = layer_norm(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.mlp(h, p + "mlp")

    def __call__(self, ids, labels, prev=None):
        """-> (logits (B, L, V), feat (B, L, C), masking); prev = (feat, masking) of the last call."""
        p, V = self.p, self.V
        B, L = ids.shape
        C = p["norm.weight"].shape[0]
        masking = ids == V
        x = p["x_embedder.word_embeddings.weight"][ids] + p["x_embedder.position_embeddings.weight"][:L]
        x = layer_norm(x, p["x_embedder.LayerNorm.weight"], p["x_embedder.LayerNorm.bias"], 1e-6)
        c = p["y_embedder.embedding_table.weight"][labels]
        vis = x[~masking].reshape(B, -1, C)
        msk = x[masking].reshape(B, -1, C)
        if prev is None:
            if vis.shape[1]:
                for i in range(self.ne):
                    vis = self.block(i, vis, c)
        else:
            prev_feat, prev_masking = prev
            assert not (masking & ~prev_masking).any(), "a previously visible token is masked again"
            cond = prev_feat[~prev_masking].reshape(B, -1, C)
            cond = cond + self.mlp(layer_norm(cond, p["prev_proj.norm.weight"], p["prev_proj.norm.bias"]), "prev_proj.mlp")
            new = x[~masking & prev_masking].reshape(B, -1, C)
            if new.shape[1]:
                for i in range(self.ne):
                    new = self.block(i, new, c, cond)
            full = torch.zeros_like(x)
            full[~masking & prev_masking] = new.reshape(-1, C)
            full[~prev_masking] = cond.reshape(-1, C)
            vis = full[~masking].reshape(B, -1, C)
        for i in range(self.ne, self.ne + self.nd):
            msk = self.block(i, msk, c, vis)
        feat = torch.zeros_like(x)
        feat[~masking] = vis.reshape(-1, C)
        feat[masking] = msk.reshape(-1, C)
        h = layer_norm(feat, p["norm.weight"], p["norm.bias"], 1e-5)
        h = gelu_erf(self.lin(h, "mlm_layer.fc"))
        h = layer_norm(h, p["mlm_layer.ln.weight"], p["mlm_layer.ln.bias"], 1e-5)
        logits = h @ p["x_embedder.word_embeddings.weight"].T + p["mlm_layer.bias"]
        return logits[..., :V], feat, masking
