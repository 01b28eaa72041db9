// Tuning constants, the accumulation type and size helpers of the CPU SC-Attention
// kernels: the numbers every other part (packing, matmul, forward, backward) sizes its
// loops and buffers by, kept in one place so that they stay consistent.
//
// Like every header of this folder, it is compiled once per instruction set: include it
// only through cpu/sc_attention_kernel.h from an sc_attention_isa_*.cpp, which defines
// CPU_CAPABILITY (the namespace that keeps the copies apart).
#pragma once

#ifndef CPU_CAPABILITY
#error "include cpu/sc_attention_kernel.h from an sc_attention_isa_*.cpp, which defines CPU_CAPABILITY"
#endif

#include <cstdint>
#include <type_traits>

#include "checked_size.h"

namespace enat_kernels::cpu_attn::CPU_CAPABILITY {

// Keys per tile: a packed K and V tile (2 x kKeyTile x Dp) stays in L1/L2.
constexpr int64_t kKeyTile = 64;
// Queries per forward task (at most; fewer when there would be too few tasks for the
// threads) and per inner step of the backward.
constexpr int64_t kQueryBlock = 128;
// Query counts are padded to this multiple (the micro-kernel's widest column strip).
constexpr int64_t kQueryPad = 16;
// Rows per micro-kernel call: MR x 2 vector accumulators must fit the 16 ymm
// registers of AVX2; the portable build emulates a vector with two SSE registers.
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
constexpr int kMR = 6;
#else
constexpr int kMR = 3;
#endif

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline int64_t round_up(int64_t x, int64_t m) { return checked_round_up(x, m, "sc_attention (cpu) size"); }

// Elements of a rows x cols scratch buffer.
inline int64_t scratch_size(int64_t rows, int64_t cols) {
  return checked_mul(rows, cols, "sc_attention (cpu) scratch size");
}

// Leading dimension for a buffer whose columns are walked (rows of St, of Qt): one
// cache line more than the row, so that consecutive rows fall into different L1 sets
// (a power-of-two row length would map a whole column onto a few sets).
template <typename acc_t>
inline int64_t skewed(int64_t row) {
  return checked_add(row, 64 / static_cast<int64_t>(sizeof(acc_t)), "sc_attention (cpu) size");
}

}  // namespace enat_kernels::cpu_attn::CPU_CAPABILITY
