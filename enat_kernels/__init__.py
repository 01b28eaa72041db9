"""enat_kernels: fused SC-Attention and token routing for ENAT-style masked generation.

Public API:

- `sc_attention`, `sc_attention_varlen`: queries attend under one softmax to a cond
  K/V segment and their own K/V segment, read from separate tensors.
- `mask_to_indices`, `gather_tokens`, `scatter_tokens`, `restore_tokens`,
  `merge_tokens`, `split_tokens`: token routing on the device, no host sync.
- `SCAttention`: the nn.Module with ENAT's checkpoint parameter names.
- `backends()`: which backends run here and why the others do not.
- `supports(op, *tensors, backend=None)`: whether, and with which backend, an op runs
  on given inputs, without running it.
- `value_checks(enabled)`: context manager for the checks that read tensor values.

Importing never fails because the compiled extension is missing or mismatched: a
warning says why and the other backends take over.
"""

from . import _extension, _ops
from ._dispatch import BACKENDS, BackendStatus, Support, backends, supports
from ._validation import value_checks
from .attention import sc_attention, sc_attention_varlen
from .modules import SCAttention
from .reference import sc_attention_ref, sc_attention_varlen_ref
from .routing import (
    TokenSplit,
    gather_tokens,
    mask_to_indices,
    merge_tokens,
    restore_tokens,
    scatter_tokens,
    split_tokens,
)

__version__ = "0.1.0"

_extension.load()
_ops.register_compiled_ops()


def build_info() -> dict:
    """What the compiled extension was built with: torch version, CUDA archs, flags."""
    return _extension.build_info()


__all__ = [
    "BACKENDS",
    "BackendStatus",
    "SCAttention",
    "TokenSplit",
    "backends",
    "build_info",
    "gather_tokens",
    "mask_to_indices",
    "merge_tokens",
    "restore_tokens",
    "sc_attention",
    "sc_attention_ref",
    "sc_attention_varlen",
    "sc_attention_varlen_ref",
    "scatter_tokens",
    "split_tokens",
    "Support",
    "supports",
    "value_checks",
]
