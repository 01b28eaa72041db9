"""The accuracy rule of the tests, as flash-attn's tests apply it.

A fused result is compared with the float64 oracle; its error must stay within a small
multiple of the error that plain PyTorch (the reference run in the same low
precision) makes on the same inputs, plus a floor for cases where that error is ~0.
"""

import torch

FLOOR = {torch.float64: 1e-9, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
MULTIPLE = 3.0


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs difference over finite reference entries; infinities must match exactly."""
    x, ref = x.double().cpu(), ref.double().cpu()
    if x.shape != ref.shape:
        raise AssertionError(f"shape {tuple(x.shape)} != reference shape {tuple(ref.shape)}")
    inf = torch.isinf(ref)
    if not torch.equal(torch.isinf(x) & (x.sign() == ref.sign()), inf):
        bad = (torch.isinf(x) != inf).nonzero()[:5].tolist()
        raise AssertionError(f"infinities differ from the reference at {bad}")
    if torch.isnan(x).any():
        raise AssertionError(f"{int(torch.isnan(x).sum())} NaN entries (unwritten output or padding read as data?)")
    fin = ~inf
    return (x[fin] - ref[fin]).abs().max().item() if fin.any() else 0.0


def assert_within_pytorch_error(name: str, got, lowp, oracle, dtype, multiple: float = MULTIPLE):
    """got: tested result; lowp: reference in the same dtype; oracle: float64 reference."""
    err, base = max_err(got, oracle), max_err(lowp, oracle)
    bound = multiple * base + FLOOR[dtype]
    assert err <= bound, f"{name}: max error {err:.3e} > {multiple} x PyTorch's {base:.3e} + {FLOOR[dtype]:.1e}"
