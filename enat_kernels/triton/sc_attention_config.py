"""Launch configuration of the SC-Attention Triton kernels: block sizes, warps, stages.

Chosen from a small table keyed by (head_dim, dtype) only.  Sequence lengths are
deliberately NOT part of the key: ENAT's lengths change at every sampling step
(the encoder sees ~5-50 newly revealed tokens against 0-250 cached ones, the decoder
the reverse), and a configuration that followed them would recompile the kernels
between steps, and under ``torch.compile`` would guard on the lengths.

Why these sizes (they have not been measured on a GPU yet, see benchmarks/):

- ENAT's attention is short and memory-bound: at Nq = 128, Nc = 128, D = 64 one
  (row, head) does ~90 FLOP per byte of Q/K/V/O, below an H100's ridge (~300), and
  the encoder with reuse has only ~32 queries per row.  BLOCK_M = 64 wastes half as
  much of the tile on missing queries as 128 would; a second query block of the
  same (row, head) is the next program, so its K/V re-reads mostly hit L2.
- BLOCK_N = 64 keys per step, fp32 accumulation, fp16/bf16 operands for tl.dot.
- float32 inputs use IEEE fp32 dots (``input_precision="ieee"``), not TF32: the
  accuracy rule compares with PyTorch's float32 matmul, which does not use TF32 by
  default.  Tiles are smaller (32) because fp32 tiles take twice the shared memory.
- The backward keeps K/V (and their fp32 gradients) resident per program; at
  head_dim 128 that is 2 x 64 x 128 fp32 accumulators, hence 8 warps for dK/dV and
  query steps of 32.

Specialization rule (what keeps one compiled variant per configuration):

Triton specializes integer arguments equal to 1 or divisible by 16, and pointers
aligned to 16 bytes.  Every integer argument whose value follows the sequence
lengths is listed in ``NO_SPECIALIZE`` (applied with ``triton.jit(do_not_specialize=
...)``): the (max) sequence lengths, the packed totals and the strides of lse/delta
(which are N or Tq).  The strides of Q/K/V/O and their gradients stay specialized on
purpose: divisibility by 16 is what lets the compiler emit 16-byte vector loads, and
it does not depend on the lengths: head_dim is a multiple of 16, so a head stride,
token stride (H*D, or a multiple of it for a fused projection view) and batch stride
(N*H*D) keep the same divisibility whatever N is.  tests/test_triton_sc_attention.py
computes Triton's own specialization key of real launches at different lengths and
checks it does not change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Integer kernel arguments that vary with the sequence lengths (never specialized).
NO_SPECIALIZE = ("seqlen_q", "seqlen_c", "total_q", "total_c", "stride_lb", "stride_lh")


@dataclass(frozen=True)
class ForwardConfig:
    block_m: int  # queries per program
    block_n: int  # keys per inner-loop step
    num_warps: int
    num_stages: int
    dot_precision: str


@dataclass(frozen=True)
class BackwardConfig:
    block_m: int  # queries per dQ program and per dK/dV inner step (and per delta program)
    block_n: int  # keys per dK/dV program and per dQ inner step
    dkdv_warps: int
    dq_warps: int
    num_stages: int
    dot_precision: str


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit dots


# (head_dim, fp32?) -> (block_m, block_n, num_warps, num_stages)
_FORWARD = {
    (16, False): (64, 64, 4, 3),
    (32, False): (64, 64, 4, 3),
    (64, False): (64, 64, 4, 3),
    (128, False): (64, 64, 4, 3),
    (16, True): (32, 32, 4, 2),
    (32, True): (32, 32, 4, 2),
    (64, True): (32, 32, 4, 2),
    (128, True): (32, 32, 4, 2),
}

# (head_dim, fp32?) -> (block_m, block_n, dkdv_warps, dq_warps, num_stages)
_BACKWARD = {
    (16, False): (64, 64, 4, 4, 2),
    (32, False): (64, 64, 4, 4, 2),
    (64, False): (64, 64, 4, 4, 2),
    (128, False): (32, 64, 8, 4, 2),
    (16, True): (32, 32, 4, 4, 1),
    (32, True): (32, 32, 4, 4, 1),
    (64, True): (32, 32, 4, 4, 1),
    (128, True): (32, 32, 8, 4, 1),
}


def _key(head_dim: int, dtype: torch.dtype):
    key = (int(head_dim), dtype == torch.float32)
    if key not in _FORWARD or dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(
            f"the triton SC-Attention kernels support head_dim in (16, 32, 64, 128) and "
            f"float16/bfloat16/float32, got head_dim {head_dim} and {dtype}"
        )
    return key


def forward_config(head_dim: int, dtype: torch.dtype) -> ForwardConfig:
    """The forward kernel's configuration; depends on head_dim and dtype only."""
    return ForwardConfig(*_FORWARD[_key(head_dim, dtype)], _precision(dtype))


def backward_config(head_dim: int, dtype: torch.dtype) -> BackwardConfig:
    """The backward kernels' configuration; depends on head_dim and dtype only."""
    return BackwardConfig(*_BACKWARD[_key(head_dim, dtype)], _precision(dtype))
