"""Launch configuration of the SC-Attention Triton kernels: block sizes, warps, stages.

Chosen from a small table keyed by (GPU family, head_dim, dtype) only.  Sequence
lengths are deliberately NOT part of the key: ENAT's lengths change at every
sampling step (the encoder sees ~5-50 newly revealed tokens against 0-250 cached
ones, the decoder the reverse), and a configuration that followed them would
recompile the kernels between steps, and under ``torch.compile`` would guard on the
lengths.

Why these sizes.  They were checked by compiling every entry ahead of time for sm_90 and sm_80 and reading
ptxas's report: no register spills for float16 and bfloat16 at head_dim 32, 64 and
128 with both ends of the supported Triton range (3.6 and 3.8), wgmma on Hopper,
pipelined cp.async loads and 16-byte vector loads (tests/kernels/test_triton_sc_attention.py
keeps checking a few entries this way, including the one that is tightest: sm_80,
bfloat16, head_dim 128, where a 64-query forward needs 255 registers and spills on
Triton 3.6, so that entry uses 32 queries per program).

- ENAT's attention is short and memory-bound: at Nq = 128, Nc = 128, D = 64 one
  (row, head) does ~90 FLOP per byte of Q/K/V/O, below an H100's ridge (~300), and
  the encoder with reuse has only ~32 queries per row.  BLOCK_M = 64 wastes half as
  much of the tile on missing queries as 128 would; a second query block of the
  same (row, head) is the next program, so its K/V re-reads mostly hit L2.
  BLOCK_N = 64 keys per step, fp32 accumulation, fp16/bf16 operands for tl.dot.
- Backward: 64 keys per dK/dV program with query steps of 32 (and 64 queries per dQ
  program with key steps of 32): 64 x 64 steps need ~60 % more registers on sm_90
  and spill on sm_80, where mma.sync keeps operands in registers; there the steps
  are 16 at head_dim 64 (3 programs per SM instead of 1 with 8 warps), and head_dim
  128 needs 32-key dK/dV programs with 8 warps.
- Families: "hopper" (compute capability 9.x/10.x: H100/H200/B200, >= 228 KB shared
  memory per SM) may use up to 130 KB of shared memory per program; "ampere" (every
  other GPU: A100, consumer cards with ~100 KB) stays under 64 KB and uses 8 warps
  where 4 would spill on mma.sync.  The interpreter uses the "hopper" table.
- float32 inputs use IEEE fp32 dots (``input_precision="ieee"``), not TF32: the
  accuracy rule compares with PyTorch's float32 matmul, which does not use TF32 by
  default.  These are FMA dots without tensor cores and spill registers in the
  backward: float32 is for exactness, float16/bfloat16 for speed.

Specialization rule (what keeps one compiled variant per configuration):

Triton specializes integer arguments equal to 1 or divisible by 16, and pointers
aligned to 16 bytes.  Every integer argument whose value follows the sequence
lengths is listed in ``NO_SPECIALIZE`` (applied with ``triton.jit(do_not_specialize=
...)``): the (max) sequence lengths, the packed totals and the strides of lse/delta
(which are N or Tq).  The strides of Q/K/V/O and their gradients stay specialized on
purpose: divisibility by 16 is what lets the compiler emit 16-byte vector loads, and
it does not depend on the lengths: head_dim is a multiple of 16, so a head stride,
token stride (H*D, or a multiple of it for a fused projection view) and batch stride
(N*H*D) keep the same divisibility whatever N is.  The remaining variants come from
the API, not from lengths: dense or packed, with or without cond_lens / self_lens /
dlse.  tests/kernels/test_triton_sc_attention.py computes Triton's own specialization key of
real launches at different lengths and checks it does not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import torch

# The one list of Triton SC-Attention variants: the tables, the error text below and the
# triton backend's capabilities (enat_kernels/_variants.py) all follow it.  A new
# head_dim (a power of two) needs its tile entries in _TILES_16BIT (import fails until it has them).
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FAMILIES = ("hopper", "ampere")

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
    dkdv_block_n: int  # keys per dK/dV program
    dkdv_block_m: int  # queries per dK/dV inner-loop step
    dkdv_warps: int
    dq_block_m: int  # queries per dQ program (and per delta program)
    dq_block_n: int  # keys per dQ inner-loop step
    dq_warps: int
    num_stages: int
    dot_precision: str


# Tiles of the 16-bit dtypes (tensor-core dots; float16 and bfloat16 share them).
# (family, head_dim) -> (forward: block_m, block_n, num_warps, num_stages;
#   backward: dkdv_block_n, dkdv_block_m, dkdv_warps, dq_block_m, dq_block_n, dq_warps, num_stages)
_TILES_16BIT = {
    ("hopper", 16): ((64, 64, 4, 3), (64, 32, 4, 64, 32, 4, 2)),
    ("hopper", 32): ((64, 64, 4, 3), (64, 32, 4, 64, 32, 4, 2)),
    ("hopper", 64): ((64, 64, 4, 3), (64, 32, 4, 64, 32, 4, 2)),
    ("hopper", 128): ((64, 64, 4, 3), (64, 32, 8, 64, 32, 8, 2)),
    ("ampere", 16): ((64, 64, 4, 3), (64, 32, 4, 64, 32, 4, 2)),
    ("ampere", 32): ((64, 64, 4, 3), (64, 32, 4, 64, 32, 4, 2)),
    ("ampere", 64): ((64, 64, 4, 3), (64, 16, 4, 64, 16, 4, 2)),
    # 64 queries spill on Triton 3.6 (255 registers, 4 or 8 warps)
    ("ampere", 128): ((32, 32, 4, 2), (32, 32, 8, 32, 16, 4, 2)),
}


def _tiles_fp32(family: str, head_dim: int) -> tuple:
    """IEEE fp32 FMA dots: small tiles, more warps from head_dim 64 on (any family)."""
    warps = 4 if head_dim <= 32 else 8
    return (32, 32, warps, 2), (32, 32, warps, 32, 32, warps, 1)


def _tiles_16bit(family: str, head_dim: int) -> tuple:
    return _TILES_16BIT[family, head_dim]


# Per listed dtype, no default (a new dtype needs an explicit choice): its tiles for
# (family, head_dim), and the tl.dot input precision ("tf32" is ignored for 16-bit dots).
_TILES_BY_DTYPE = {torch.float16: _tiles_16bit, torch.bfloat16: _tiles_16bit, torch.float32: _tiles_fp32}
_DOT_PRECISION = {torch.float16: "tf32", torch.bfloat16: "tf32", torch.float32: "ieee"}


def _tables() -> tuple[dict, dict]:
    """(family, head_dim, dtype) -> forward / backward tiles, for exactly the listed variants."""
    odd = [d for d in HEAD_DIMS if d < 1 or d & (d - 1)]
    if odd:  # the kernels' tl.arange(0, HEAD_DIM) takes powers of two only
        raise RuntimeError(f"sc_attention_config.HEAD_DIMS: {odd} not a power of two; the Triton kernels "
                           "index the head dimension with tl.arange(0, HEAD_DIM), which needs one")
    listed = {"_TILES_16BIT": (_TILES_16BIT, set(product(FAMILIES, HEAD_DIMS))),
              "_TILES_BY_DTYPE": (_TILES_BY_DTYPE, set(DTYPES)), "_DOT_PRECISION": (_DOT_PRECISION, set(DTYPES))}
    for name, (table, keys) in listed.items():
        if set(table) != keys:
            raise RuntimeError(f"sc_attention_config.{name}: entries missing for {keys - set(table)}, "
                               f"entries not in the list: {set(table) - keys}")
    forward, backward = {}, {}
    for family, head_dim, dtype in product(FAMILIES, HEAD_DIMS, DTYPES):
        forward[family, head_dim, dtype], backward[family, head_dim, dtype] = _TILES_BY_DTYPE[dtype](family, head_dim)
    return forward, backward


# (family, head_dim, dtype) -> (block_m, block_n, num_warps, num_stages)
# and -> (dkdv_block_n, dkdv_block_m, dkdv_warps, dq_block_m, dq_block_n, dq_warps, num_stages)
_FORWARD, _BACKWARD = _tables()

_FAMILIES: dict = {}


def gpu_family(device: torch.device) -> str:
    """Which table applies to a device ("hopper" for the interpreter's CPU tensors)."""
    if device.type != "cuda":
        return "hopper"
    from .. import _dispatch  # here: _dispatch reads this module's variant list at import

    index = _dispatch.cuda_index(device)
    family = _FAMILIES.get(index)
    if family is None:
        major = torch.cuda.get_device_capability(index)[0]
        family = _FAMILIES[index] = "hopper" if major in (9, 10) else "ampere"
    return family


def _names(items) -> str:
    return ", ".join(str(i).replace("torch.", "") for i in items)


def _key(device: torch.device, head_dim: int, dtype: torch.dtype):
    key = (gpu_family(device), int(head_dim), dtype)
    if key not in _FORWARD:
        raise ValueError(
            f"the triton SC-Attention kernels support head_dim in ({_names(HEAD_DIMS)}) and "
            f"{_names(DTYPES)}, got head_dim {head_dim} and {dtype}"
        )
    return key


def forward_config(device: torch.device, head_dim: int, dtype: torch.dtype) -> ForwardConfig:
    """The forward kernel's configuration; never depends on sequence lengths."""
    return ForwardConfig(*_FORWARD[_key(device, head_dim, dtype)], _DOT_PRECISION[dtype])


def backward_config(device: torch.device, head_dim: int, dtype: torch.dtype) -> BackwardConfig:
    """The backward kernels' configuration; never depends on sequence lengths."""
    return BackwardConfig(*_BACKWARD[_key(device, head_dim, dtype)], _DOT_PRECISION[dtype])
