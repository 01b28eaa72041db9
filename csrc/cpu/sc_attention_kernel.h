// SC-Attention forward and backward kernels for the CPU, written once with
// at::vec::Vectorized and compiled once per instruction set (sc_attention_isa_*.cpp
// define CPU_CAPABILITY before including this file; everything here and in
// sc_attention_kernel/ lives in namespace enat_kernels::cpu_attn::CPU_CAPABILITY so the
// copies never collide).  This file holds the overview and the entry points; the
// parts are in sc_attention_kernel/:
//
//   config.h     tuning constants (tile sizes, micro-kernel rows), accumulation type
//   tasks.h      dynamic task schedule on the thread pool, per-worker scratch
//   vec_math.h   vector exponentials of the online softmax
//   packing.h    strided row views, paced software prefetch, packing and storing rows
//   gemm.h       the register-blocked micro-kernel and the matmul around it
//   key_tiles.h  the walk over both key segments in tiles, shared by both passes
//   forward.h    the forward kernel
//   backward.h   the backward kernel
//
// Algorithm (flash-attention style, one online softmax over both segments):
//
//   Work is split into tasks; each task owns whole output rows, so no two tasks
//   write the same element and nothing needs atomics.
//   - forward:  task = (batch row, head, block of up to kQueryBlock queries); blocks
//     shrink (down to 32) when there are fewer than two tasks per thread.
//   - backward: task = (batch row, head).  dK/dV of a key are sums over all queries
//     of its (b, h), dQ of a query a sum over all keys, so a whole (b, h) per task
//     keeps every accumulation inside one task, in a fixed order.  The cost: the
//     backward has at most B * H parallel tasks (one thread when B * H = 1).
//   Tasks are handed out dynamically (an atomic counter) because ragged rows make
//   their costs uneven.  Every element is computed by the same sequence of
//   operations whatever the task split, the thread count or the schedule, so
//   forward and backward are bitwise deterministic, run to run and across thread
//   counts.  Nothing is nondeterministic; no atomics touch floating-point data.
//
//   Layouts.  The queries of a task are packed once, scaled by scale and
//   transposed (Qt: D x Mq, Mq = queries rounded up to 16), so S is computed
//   transposed, St = K . Qt (keys x queries): the key rows are the broadcast operand
//   of the matmul micro-kernel, and the softmax statistics of a query live in one
//   vector lane, updated for a whole tile with elementwise vector ops (no horizontal
//   reductions); the tile's max comes out of the St matmul's epilogue.  Scores, their
//   running max and lse stay in natural units and exponentials are taken as
//   exp2((s - max) * log2(e)): the backward recomputes exactly the forward's scores, so
//   s - lse is exact even where scores are huge (scale = 1e30), which a base-2 lse
//   converted back and forth would not be.  Keys
//   and values are visited in tiles of kKeyTile rows, cond segment first, then self
//   segment, each tile packed (converted to the accumulation type, rows padded with
//   zeros to Dp = D rounded up to the vector width) so it stays in L1 and a
//   power-of-two token stride cannot alias the cache.  The two segments are never
//   concatenated: they are two loops over tiles feeding the same running
//   (max, sum, output) state.  The next tile's rows are prefetched while the current
//   one computes (see Prefetcher).
//
//   All matmuls go through one register-blocked micro-kernel
//   (C[MR x NV*W] (+)= A[MR x K] . B[K x NV*W], 6 x 16 floats on AVX2) with A read
//   element-wise through (row, k) strides, so transposed operands (P^T, dS^T) cost
//   nothing extra.
//
//   Accumulation is in float32 (float64 for float64 inputs).  Padding rows (beyond
//   the lengths) are never read; padded query rows get out = 0 and lse = -inf; all
//   gradient rows beyond the lengths are written as zeros.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "cpu/sc_attention_cpu.h"
#include "cpu/sc_attention_kernel/backward.h"
#include "cpu/sc_attention_kernel/forward.h"

namespace enat_kernels::cpu_attn::CPU_CAPABILITY {

template <template <typename> class Fn>
void dispatch(const Problem& p) {
  switch (p.dtype) {
    case ElemType::kFloat:
      return Fn<float>::run(p);
    case ElemType::kDouble:
      return Fn<double>::run(p);
    case ElemType::kHalf:
      return Fn<c10::Half>::run(p);
    case ElemType::kBFloat16:
      return Fn<c10::BFloat16>::run(p);
  }
}

template <typename scalar_t>
struct Forward {
  static void run(const Problem& p) { forward_kernel<scalar_t>(p); }
};
template <typename scalar_t>
struct Backward {
  static void run(const Problem& p) { backward_kernel<scalar_t>(p); }
};

void sc_attn_forward(const Problem& p) { dispatch<Forward>(p); }
void sc_attn_backward(const Problem& p) { dispatch<Backward>(p); }

}  // namespace enat_kernels::cpu_attn::CPU_CAPABILITY
