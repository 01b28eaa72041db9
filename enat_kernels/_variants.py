"""The SC-Attention kernel variants (head_dims, dtypes) the fused GPU backends are built for.

Read from each backend's one list, never restated:

- cuda: csrc/cuda/sc_attention_variants.h, as recorded in the build info by setup.py
  (CUDA_SC_ATTENTION_HEAD_DIMS / CUDA_SC_ATTENTION_DTYPES).  Without build info (a source
  tree that was never built) the list is empty: the backend is unavailable then anyway.
- triton: HEAD_DIMS / DTYPES of enat_kernels/triton/sc_attention_config.py (importing it
  does not import triton).

The backend capability table in _dispatch.py reads these.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _extension
from .triton import sc_attention_config as _triton_config


@dataclass(frozen=True)
class Variants:
    head_dims: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]


def cuda_sc_attention() -> Variants:
    """The variants compiled into the CUDA extension's SC-Attention kernels."""
    info = _extension.build_info()
    names = info.get("CUDA_SC_ATTENTION_DTYPES", ())
    return Variants(tuple(info.get("CUDA_SC_ATTENTION_HEAD_DIMS", ())), tuple(getattr(torch, n) for n in names))


def triton_sc_attention() -> Variants:
    """The variants the Triton SC-Attention kernels have launch configurations for."""
    return Variants(tuple(_triton_config.HEAD_DIMS), tuple(_triton_config.DTYPES))


CUDA_SC_ATTENTION = cuda_sc_attention()
TRITON_SC_ATTENTION = triton_sc_attention()
