"""Fake (meta) implementations and autograd of the compiled ops, registered from Python.

The schemas live in csrc/schema.cpp (namespace ``enat_kernels``); the CPU and CUDA
kernels register for their dispatch keys in C++.  Here, once for every op family:

- a fake implementation, so the ops trace under ``torch.compile`` and pass
  ``torch.library.opcheck``;
- autograd: SC-Attention's backward calls the matching backward op; the backward of a
  gather is a scatter and vice versa.

The Triton ops (enat_kernels/triton/) reuse `register_sc_attention_autograd` and
`register_routing_autograd` with their own op objects, so the autograd formulas are
written once.
"""

from __future__ import annotations

import torch

from . import _extension, _op_checks

# ----------------------------------------------------------------------------- shapes


def sc_attn_fwd_shapes(q: torch.Tensor):
    """(out shape, lse shape, lse dtype) of SC-Attention for dense or packed q."""
    return q.shape, _op_checks.lse_shape(q), _op_checks.lse_dtype(q)


# The fakes check what the C++ ops check (_op_checks.py), so a bad call fails while
# tracing as it would fail eagerly.


def sc_attn_fwd_fake(
    q, k_cond, v_cond, k_self, v_self, cond_lens, self_lens, cu_seqlens_q, cu_seqlens_cond, max_seqlen_q, max_seqlen_cond, scale
):
    _op_checks.sc_attention_inputs(
        q, k_cond, v_cond, k_self, v_self, cond_lens, self_lens, cu_seqlens_q, cu_seqlens_cond, max_seqlen_q, max_seqlen_cond
    )
    out_shape, lse_shape, lse_dtype = sc_attn_fwd_shapes(q)
    return q.new_empty(out_shape), q.new_empty(lse_shape, dtype=lse_dtype)


def sc_attn_bwd_fake(
    dout, dlse, q, k_cond, v_cond, k_self, v_self, out, lse,
    cond_lens, self_lens, cu_seqlens_q, cu_seqlens_cond, max_seqlen_q, max_seqlen_cond, scale,
):
    _op_checks.sc_attention_backward_inputs(
        dout, dlse, q, k_cond, v_cond, k_self, v_self, out, lse,
        cond_lens, self_lens, cu_seqlens_q, cu_seqlens_cond, max_seqlen_q, max_seqlen_cond,
    )
    return tuple(t.new_empty(t.shape) for t in (q, k_cond, v_cond, k_self, v_self))


def mask_to_indices_fake(mask, count):
    _op_checks.mask_to_indices_inputs(mask, count)
    B = mask.shape[0]
    return mask.new_empty((B, count), dtype=torch.int64), mask.new_empty((B,), dtype=torch.int32)


def gather_rows_fake(x, idx):
    _op_checks.gather_rows_inputs(x, idx)
    return x.new_empty((x.shape[0], idx.shape[1], x.shape[2]))


def scatter_rows_fake(a, idx_a, b, idx_b, seq_len):
    _op_checks.scatter_rows_inputs(a, idx_a, b, idx_b, seq_len)
    return a.new_empty((a.shape[0], seq_len, a.shape[2]))


# ----------------------------------------------------------------------------- autograd


def register_sc_attention_autograd(fwd_op, bwd_op, backend_of=lambda device: device.type) -> None:
    """Autograd of an SC-Attention forward op whose backward op has the sc_attn_bwd schema.

    fwd_op is registered; bwd_op (an op object) is called in the backward.  The
    backward op is a fused kernel with no derivative of its own: differentiating it
    (double backward) raises an error naming the backend (backend_of(q.device)) and
    the torch backend, which supports it, instead of silently giving zero.
    """

    def setup_context(ctx, inputs, output):
        q, k_cond, v_cond, k_self, v_self, cond_lens, self_lens, cu_q, cu_c, max_q, max_c, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k_cond, v_cond, k_self, v_self, out, lse, cond_lens, self_lens, cu_q, cu_c)
        ctx.max_q, ctx.max_c, ctx.scale = max_q, max_c, scale
        ctx.set_materialize_grads(False)  # dlse is None unless the caller used the lse

    def backward(ctx, dout, dlse):
        q, k_cond, v_cond, k_self, v_self, out, lse, cond_lens, self_lens, cu_q, cu_c = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        grads = bwd_op(
            dout.contiguous(),
            None if dlse is None else dlse.contiguous(),
            q,
            k_cond,
            v_cond,
            k_self,
            v_self,
            out,
            lse,
            cond_lens,
            self_lens,
            cu_q,
            cu_c,
            ctx.max_q,
            ctx.max_c,
            ctx.scale,
        )
        return tuple(grads) + (None,) * 7

    torch.library.register_autograd(fwd_op, backward, setup_context=setup_context)

    def bwd_setup_context(ctx, inputs, output):
        ctx.backend = backend_of(inputs[2].device)  # q

    def double_backward(ctx, *grads):
        raise RuntimeError(
            f"sc_attention (backend={ctx.backend!r}) does not support double backward (a gradient of its "
            "gradient): its backward is a fused kernel. Use backend='torch' to differentiate twice."
        )

    torch.library.register_autograd(bwd_op, double_backward, setup_context=bwd_setup_context)


def register_routing_autograd(gather_op, scatter_op) -> None:
    """gather_rows and scatter_rows are each other's backward (indices are unique).

    gather_op, scatter_op: op objects (an OpOverload or a torch.library custom op),
    registered and also called in the backward.
    """

    def gather_setup(ctx, inputs, output):
        x, idx = inputs
        ctx.save_for_backward(idx)
        ctx.seq_len = x.shape[1]

    def gather_backward(ctx, grad):
        (idx,) = ctx.saved_tensors
        return scatter_op(grad.contiguous(), idx, None, None, ctx.seq_len), None

    def scatter_setup(ctx, inputs, output):
        a, idx_a, b, idx_b, seq_len = inputs
        ctx.save_for_backward(idx_a, idx_b)
        ctx.has_b = b is not None

    def scatter_backward(ctx, grad):
        idx_a, idx_b = ctx.saved_tensors
        grad = grad.contiguous()
        grad_a = gather_op(grad, idx_a) if ctx.needs_input_grad[0] else None
        grad_b = gather_op(grad, idx_b) if ctx.has_b and ctx.needs_input_grad[2] else None
        return grad_a, None, grad_b, None, None

    torch.library.register_autograd(gather_op, gather_backward, setup_context=gather_setup)
    torch.library.register_autograd(scatter_op, scatter_backward, setup_context=scatter_setup)


# ----------------------------------------------------------------------------- registration

_registered = False


def register_compiled_ops() -> bool:
    """Register fakes and autograd for the ops of enat_kernels._C; False if it is not loaded."""
    global _registered
    if _registered:
        return True
    if _extension.cpu_extension_error() is not None:
        return False
    ns = "enat_kernels::"
    torch.library.register_fake(ns + "sc_attn_fwd", sc_attn_fwd_fake)
    torch.library.register_fake(ns + "sc_attn_bwd", sc_attn_bwd_fake)
    torch.library.register_fake(ns + "mask_to_indices", mask_to_indices_fake)
    torch.library.register_fake(ns + "gather_rows", gather_rows_fake)
    torch.library.register_fake(ns + "scatter_rows", scatter_rows_fake)
    ops = torch.ops.enat_kernels
    register_sc_attention_autograd(ops.sc_attn_fwd.default, ops.sc_attn_bwd.default)
    register_routing_autograd(ops.gather_rows.default, ops.scatter_rows.default)
    _registered = True
    return True
