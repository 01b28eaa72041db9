"""Forward + backward of an SC-Attention function, and the comparison with the oracle.

The error budget of a fused backend is the error plain PyTorch makes in the same dtype
(enat_kernels.reference); for the ``torch`` backend, whose result is that reference
itself, the budget comes from the independent oracle run in the same dtype.
"""

import torch

import enat_kernels as ek
from enat_kernels.reference import sc_attention_ref
from support.attention_cases import make_inputs, sc_attention_oracle
from support.tolerances import assert_within_pytorch_error

# What forward_backward returns, in order.
NAMES = ("out", "lse", "dq", "dk_cond", "dv_cond", "dk_self", "dv_self")


def forward_backward(fn, inputs, dout, dlse):
    """Run fn(*inputs) -> (out, lse) on fresh leaves; return out, lse and the five input
    gradients (zeros for an input the result does not depend on)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out, lse = fn(*leaves)
    outputs, grads_in = [out], [dout.to(out.dtype)]
    if dlse is not None:
        # lse is -inf on padded rows; its gradient there must not matter.
        outputs.append(lse)
        grads_in.append(dlse.to(lse.dtype))
    grads = torch.autograd.grad(outputs, leaves, grads_in, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
    return [out.detach(), lse.detach()] + [g.detach() for g in grads]


def lowp_and_oracle(backend, ref, independent, inputs, dout, dlse):
    """The error budget's low-precision run and the float64 oracle's results."""
    lowp = forward_backward(independent if backend == "torch" else ref, inputs, dout, dlse)
    oracle = forward_backward(independent, [t.double() for t in inputs], dout.double(), None if dlse is None else dlse.double())
    return lowp, oracle


def compare(results, lowp, oracle, dtype, names=NAMES):
    """Each result within the accuracy rule of support/tolerances.py, in the dtype of the low-precision run."""
    for name, got, lp, ref in zip(names, results, lowp, oracle):
        assert got.dtype == lp.dtype or name == "lse", f"{name}: dtype {got.dtype}, expected {lp.dtype}"
        assert_within_pytorch_error(name, got, lp, ref, dtype)


def check_dense_against_oracle(backend, case, dtype, dev, gen):
    """Output, lse and the five gradients (with dlse) of `backend` on `case`, against
    the float64 reference, within the accuracy rule of support/tolerances.py."""
    q, kc, vc, ks, vs, cl, sl = make_inputs(case, dtype, dev, gen)
    B, N, H, _ = q.shape
    dout = torch.randn(q.shape, generator=gen).to(dev, dtype)
    dlse = torch.randn(B, H, N, generator=gen).to(dev)

    def fused(*x):
        return ek.sc_attention(*x, cond_lens=cl, self_lens=sl, scale=case.scale, return_lse=True, backend=backend)

    def ref(*x):
        return sc_attention_ref(*x, cond_lens=cl, self_lens=sl, scale=case.scale)

    def independent(*x):
        return sc_attention_oracle(*x, cond_lens=cl, self_lens=sl, scale=case.scale)

    inputs = (q, kc, vc, ks, vs)
    got = forward_backward(fused, inputs, dout, dlse)
    lowp, oracle = lowp_and_oracle(backend, ref, independent, inputs, dout, dlse)
    assert got[0].is_contiguous() and got[0].shape == q.shape
    assert got[1].shape == (B, H, N)
    compare(got, lowp, oracle, dtype)
