"""SC-Attention as Triton ops: ``enat_kernels::triton_sc_attn_fwd`` and ``..._bwd``.

Same schemas as the C++ ops ``sc_attn_fwd`` / ``sc_attn_bwd`` (csrc/schema.cpp), so
enat_kernels/attention.py calls them with the same arguments; the contract is
docs/KERNEL_CONTRACT.md.  Kernels: sc_attention_kernels.py; block sizes and the rule
that keeps one compiled variant per (head_dim, dtype): sc_attention_config.py.

- Forward: one kernel, online softmax over the cond segment then the self segment.
- Backward (flash-attention-2 style, no atomics, deterministic): delta = rowsum(dO * O)
  - dlse, then one kernel for dK/dV of both segments' key blocks, one for dQ.

The ops are registered with ``torch.library.triton_op`` and launch through
``torch.library.wrap_triton``, so ``torch.compile`` sees the kernels themselves.
Under ``TRITON_INTERPRET=1`` (CPU tensors, tests without a GPU) ``wrap_triton`` hands
back the interpreted kernel, which runs eagerly on real memory and cannot be traced
with fake or functional tensors; there the ops are made opaque to the compiler (fake
= the shared shape functions of enat_kernels._ops, no functional decomposition), so
torch.compile and opcheck still work, running the interpreter at run time.
"""

from __future__ import annotations

import math

import torch
import triton
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.library import triton_op
from triton.runtime.interpreter import InterpretedFunction

from .. import _op_checks, _ops
from . import launch
from .sc_attention_config import backward_config, forward_config
from .sc_attention_kernels import (
    fill_unowned_rows_kernel,
    sc_attn_bwd_dkdv_kernel,
    sc_attn_bwd_dq_kernel,
    sc_attn_bwd_preprocess_kernel,
    sc_attn_fwd_kernel,
)

LOG2E = math.log2(math.e)


# ----------------------------------------------------------------------------- launch arguments


def _strides(prefix: str, t: torch.Tensor, varlen: bool) -> dict:
    """Batch/token/head strides of a (B, N, H, D) or packed (T, H, D) tensor (batch 0 when packed)."""
    if varlen:
        return {f"stride_{prefix}b": 0, f"stride_{prefix}m": t.stride(0), f"stride_{prefix}h": t.stride(1)}
    return {f"stride_{prefix}b": t.stride(0), f"stride_{prefix}m": t.stride(1), f"stride_{prefix}h": t.stride(2)}


def _lse_strides(lse: torch.Tensor, varlen: bool) -> dict:
    # lse (and dlse, delta): (B, H, N) dense or (H, T) packed, contiguous rows.
    if varlen:
        return {"stride_lb": 0, "stride_lh": lse.stride(0)}
    return {"stride_lb": lse.stride(0), "stride_lh": lse.stride(1)}


def _geometry(q, k_cond, cu_seqlens_q, max_seqlen_q, max_seqlen_cond) -> dict:
    """Batch, heads, the lengths that size the grid, and packed totals (kernel arguments)."""
    if q.dim() == 3:
        return {
            "B": cu_seqlens_q.shape[0] - 1, "H": q.shape[1],
            "seqlen_q": max_seqlen_q, "seqlen_c": max_seqlen_cond,
            "total_q": q.shape[0], "total_c": k_cond.shape[0],
        }
    return {"B": q.shape[0], "H": q.shape[2], "seqlen_q": q.shape[1], "seqlen_c": k_cond.shape[1], "total_q": 0, "total_c": 0}


def _flags(cond_lens, self_lens, cu_seqlens_q, cu_seqlens_cond, varlen: bool) -> dict:
    return {
        "COND_LENS": cond_lens, "SELF_LENS": self_lens, "CU_Q": cu_seqlens_q, "CU_C": cu_seqlens_cond,
        "VARLEN": varlen, "HAS_COND_LENS": cond_lens is not None, "HAS_SELF_LENS": self_lens is not None,
    }


def _common(q, k_cond, v_cond, k_self, v_self, cond_lens, self_lens, cu_q, cu_c, max_q, max_c, scale, varlen):
    geo = _geometry(q, k_cond, cu_q, max_q, max_c)
    args = {
        "Q": q, "KC": k_cond, "VC": v_cond, "KS": k_self, "VS": v_self,
        **_flags(cond_lens, self_lens, cu_q, cu_c, varlen),
        **_strides("q", q, varlen), **_strides("kc", k_cond, varlen), **_strides("vc", v_cond, varlen),
        **_strides("ks", k_self, varlen), **_strides("vs", v_self, varlen),
        "H": geo["H"], "seqlen_q": geo["seqlen_q"], "seqlen_c": geo["seqlen_c"],
        "total_q": geo["total_q"], "total_c": geo["total_c"],
        "qk_scale": scale * LOG2E, "HEAD_DIM": q.shape[-1],
    }
    return geo, args


def forward_launch(q, k_cond, v_cond, k_self, v_self, cond_lens, self_lens, cu_seqlens_q, cu_seqlens_cond,
                   max_seqlen_q, max_seqlen_cond, scale, out, lse):
    """(grid, kwargs) of the forward kernel; grid[0] == 0 when there is no query row."""
    varlen = q.dim() == 3
    cfg = forward_config(q.device, q.shape[-1], q.dtype)
    geo, args = _common(q, k_cond, v_cond, k_self, v_self, cond_lens, self_lens, cu_seqlens_q, cu_seqlens_cond,
                        max_seqlen_q, max_seqlen_cond, scale, varlen)
    args.update(
        OUT=out, LSE=lse, **_strides("o", out, varlen), **_lse_strides(lse, varlen),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, DOT_PRECISION=cfg.dot_precision,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    grid = (triton.cdiv(geo["seqlen_q"], cfg.block_m) * geo["H"] * geo["B"],)
    return grid, args


def backward_launches(dout, dlse, q, k_cond, v_cond, k_self, v_self, out, lse, cond_lens, self_lens,
                      cu_seqlens_q, cu_seqlens_cond, max_seqlen_q, max_seqlen_cond, scale, delta, grads):
    """((grid, kwargs) of the delta, dK/dV and dQ kernels); a grid of 0 means skip."""
    varlen = q.dim() == 3
    cfg = backward_config(q.device, q.shape[-1], q.dtype)
    dq, dk_cond, dv_cond, dk_self, dv_self = grads
    geo, common = _common(q, k_cond, v_cond, k_self, v_self, cond_lens, self_lens, cu_seqlens_q, cu_seqlens_cond,
                          max_seqlen_q, max_seqlen_cond, scale, varlen)
    common.update(
        DOUT=dout, LSE=lse, DELTA=delta, **_strides("do", dout, varlen), **_lse_strides(lse, varlen),
        sm_scale=scale, DOT_PRECISION=cfg.dot_precision, num_stages=cfg.num_stages,
    )
    rows = geo["H"] * geo["B"]
    pre = {
        "OUT": out, "DOUT": dout, "DLSE": dlse, "DELTA": delta, "SELF_LENS": self_lens, "CU_Q": cu_seqlens_q,
        **_strides("o", out, varlen), **_strides("do", dout, varlen), **_lse_strides(lse, varlen),
        "H": geo["H"], "seqlen_q": geo["seqlen_q"], "total_q": geo["total_q"],
        "HEAD_DIM": q.shape[-1], "BLOCK_M": cfg.dq_block_m,
        "VARLEN": varlen, "HAS_SELF_LENS": self_lens is not None, "HAS_DLSE": dlse is not None,
        "num_warps": 4,
    }
    dkdv = {
        **common, "DKC": dk_cond, "DVC": dv_cond, "DKS": dk_self, "DVS": dv_self,
        **_strides("dkc", dk_cond, varlen), **_strides("dvc", dv_cond, varlen),
        **_strides("dks", dk_self, varlen), **_strides("dvs", dv_self, varlen),
        "BLOCK_M": cfg.dkdv_block_m, "BLOCK_N": cfg.dkdv_block_n, "num_warps": cfg.dkdv_warps,
    }
    dqa = {
        **common, "DQ": dq, **_strides("dq", dq, varlen),
        "BLOCK_M": cfg.dq_block_m, "BLOCK_N": cfg.dq_block_n, "num_warps": cfg.dq_warps,
    }
    q_blocks = triton.cdiv(geo["seqlen_q"], cfg.dq_block_m)
    key_blocks = triton.cdiv(geo["seqlen_c"], cfg.dkdv_block_n) + triton.cdiv(geo["seqlen_q"], cfg.dkdv_block_n)
    return ((q_blocks * rows,), pre), ((key_blocks * rows,), dkdv), ((q_blocks * rows,), dqa)


def fill_unowned_rows(cu_seqlens: torch.Tensor, tensors: list, value: float, rows_last: bool = False) -> None:
    """Set the rows of packed tensors that no sequence owns (docs/KERNEL_CONTRACT.md) to
    `value`: contiguous (T, H, D) tensors, or one (H, T) lse-shaped tensor (rows_last)."""
    x = tensors[0]
    total = x.shape[-1] if rows_last else x.shape[0]
    width = x.shape[0] if rows_last else math.prod(x.shape[1:])
    if total == 0 or width == 0:
        return
    stride_r, stride_c = (1, x.stride(0)) if rows_last else (width, 1)
    block_w = min(triton.next_power_of_2(width), 256)
    block_r = max(1, min(4096 // block_w, 128))
    ptrs = list(tensors) + [None] * (3 - len(tensors))
    launch(fill_unowned_rows_kernel, (triton.cdiv(total, block_r), triton.cdiv(width, block_w)), x.device,
           X0=ptrs[0], X1=ptrs[1], X2=ptrs[2], CU=cu_seqlens, batch=cu_seqlens.shape[0] - 1, total=total,
           width=width, stride_r=stride_r, stride_c=stride_c, value=value, BLOCK_R=block_r, BLOCK_W=block_w)


# ----------------------------------------------------------------------------- ops


def _check_supported(q: torch.Tensor) -> None:
    # Metadata only (no sync): a clear error instead of a kernel compiled for a dtype it cannot handle.
    forward_config(q.device, q.shape[-1], q.dtype)


# The schemas are inferred from the annotations (torch before 2.14 ignores triton_op's
# schema= argument), so one schema holds on every supported torch; their argument lists
# are those of csrc/schema.cpp (tests/kernels/test_triton_sc_attention.py checks they match).
Tensor = torch.Tensor
OptTensor = torch.Tensor | None


@triton_op("enat_kernels::triton_sc_attn_fwd", mutates_args=())
def sc_attn_fwd(q: Tensor, k_cond: Tensor, v_cond: Tensor, k_self: Tensor, v_self: Tensor,
                cond_lens: OptTensor, self_lens: OptTensor, cu_seqlens_q: OptTensor, cu_seqlens_cond: OptTensor,
                max_seqlen_q: int, max_seqlen_cond: int, scale: float) -> tuple[Tensor, Tensor]:
    _op_checks.sc_attention_inputs(q, k_cond, v_cond, k_self, v_self, cond_lens, self_lens, cu_seqlens_q,
                                   cu_seqlens_cond, max_seqlen_q, max_seqlen_cond)
    _check_supported(q)
    out_shape, lse_shape, lse_dtype = _ops.sc_attn_fwd_shapes(q)
    out = torch.empty(out_shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(lse_shape, dtype=lse_dtype, device=q.device)
    grid, args = forward_launch(q, k_cond, v_cond, k_self, v_self, cond_lens, self_lens, cu_seqlens_q,
                                cu_seqlens_cond, max_seqlen_q, max_seqlen_cond, scale, out, lse)
    if grid[0] > 0:
        launch(sc_attn_fwd_kernel, grid, q.device, **args)
    if q.dim() == 3:
        fill_unowned_rows(cu_seqlens_q, [out], 0.0)
        fill_unowned_rows(cu_seqlens_q, [lse], float("-inf"), rows_last=True)
    return out, lse


@triton_op("enat_kernels::triton_sc_attn_bwd", mutates_args=())
def sc_attn_bwd(dout: Tensor, dlse: OptTensor, q: Tensor, k_cond: Tensor, v_cond: Tensor, k_self: Tensor,
                v_self: Tensor, out: Tensor, lse: Tensor, cond_lens: OptTensor, self_lens: OptTensor,
                cu_seqlens_q: OptTensor, cu_seqlens_cond: OptTensor, max_seqlen_q: int, max_seqlen_cond: int,
                scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _op_checks.sc_attention_backward_inputs(dout, dlse, q, k_cond, v_cond, k_self, v_self, out, lse, cond_lens,
                                            self_lens, cu_seqlens_q, cu_seqlens_cond, max_seqlen_q, max_seqlen_cond)
    _check_supported(q)
    inputs = (q, k_cond, v_cond, k_self, v_self)
    if (max_seqlen_q if q.dim() == 3 else q.shape[1]) == 0 or q.numel() == 0:
        # No query attends to anything: every gradient is zero (the cond ones may be non-empty).
        return tuple(torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in inputs)
    grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in inputs]
    # The kernels index lse, dlse and delta with one set of strides (lse's).
    lse = lse.contiguous()
    dlse = None if dlse is None else dlse.contiguous()
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    pre, dkdv, dq = backward_launches(dout, dlse, q, k_cond, v_cond, k_self, v_self, out, lse, cond_lens,
                                      self_lens, cu_seqlens_q, cu_seqlens_cond, max_seqlen_q, max_seqlen_cond,
                                      scale, delta, grads)
    launch(sc_attn_bwd_preprocess_kernel, pre[0], q.device, **pre[1])
    launch(sc_attn_bwd_dkdv_kernel, dkdv[0], q.device, **dkdv[1])
    launch(sc_attn_bwd_dq_kernel, dq[0], q.device, **dq[1])
    if q.dim() == 3:
        fill_unowned_rows(cu_seqlens_q, [grads[0], grads[3], grads[4]], 0.0)
        fill_unowned_rows(cu_seqlens_cond, [grads[1], grads[2]], 0.0)
    return tuple(grads)


def _not_decomposed(mode, op, types, args, kwargs):
    # Keep the op as one node under FunctionalTensorMode (what triton_op does for export).
    return mode.__torch_dispatch__(op, types, args, kwargs)


INTERPRETED = isinstance(sc_attn_fwd_kernel, InterpretedFunction)
if INTERPRETED:
    sc_attn_fwd.register_fake(_ops.sc_attn_fwd_fake)
    sc_attn_bwd.register_fake(_ops.sc_attn_bwd_fake)
    sc_attn_fwd.register_torch_dispatch(FunctionalTensorMode, _not_decomposed)
    sc_attn_bwd.register_torch_dispatch(FunctionalTensorMode, _not_decomposed)

_ops.register_sc_attention_autograd(sc_attn_fwd, sc_attn_bwd, backend_of=lambda device: "triton")

OPS = {"sc_attn_fwd": sc_attn_fwd, "sc_attn_bwd": sc_attn_bwd}
