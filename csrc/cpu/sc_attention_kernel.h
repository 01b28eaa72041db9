// SC-Attention forward and backward kernels for the CPU, written once with
// at::vec::Vectorized and compiled once per instruction set (sc_attention_isa_*.cpp
// define CPU_CAPABILITY before including this file; everything here lives in
// namespace enat_kernels::cpu_attn::CPU_CAPABILITY so the copies never collide).
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

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

#include "checked_size.h"
#include "cpu/sc_attention_cpu.h"

namespace enat_kernels::cpu_attn::CPU_CAPABILITY {

// ----------------------------------------------------------------------------- tuning

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

// ----------------------------------------------------------------------------- basics

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline int64_t round_up(int64_t x, int64_t m) { return checked_round_up(x, m, "sc_attention (cpu) size"); }

// Leading dimension for a buffer whose columns are walked (rows of St, of Qt): one
// cache line more than the row, so that consecutive rows fall into different L1 sets
// (a power-of-two row length would map a whole column onto a few sets).
template <typename acc_t>
inline int64_t skewed(int64_t row) {
  return checked_add(row, 64 / static_cast<int64_t>(sizeof(acc_t)), "sc_attention (cpu) size");
}

// Scratch memory of one worker (64-byte aligned, freed on scope exit).
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n)
      : ptr_(static_cast<T*>(c10::alloc_cpu(
            checked_mul(std::max<int64_t>(n, 1), static_cast<int64_t>(sizeof(T)), "sc_attention (cpu) scratch bytes")))) {}
  ~Scratch() { c10::free_cpu(ptr_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* get() const { return ptr_; }

 private:
  T* ptr_;
};

// Runs body(workspace, task, next_task) for task in [0, n) on the intra-op thread
// pool.  Tasks are taken from a shared counter (dynamic schedule), one ahead, so that
// a task can prefetch the inputs of the worker's next one (next_task, or -1); each
// worker builds its own workspace once.  Which thread runs a task never changes its
// result.
template <typename MakeWorkspace, typename Body>
void parallel_tasks(int64_t n, const MakeWorkspace& make_workspace, const Body& body) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto ws = make_workspace();
    int64_t t = next.fetch_add(1);
    while (t < n) {
      const int64_t t_next = next.fetch_add(1);
      body(ws, t, t_next < n ? t_next : int64_t(-1));
      t = t_next;
    }
  });
}

// Exponentials are exp2((s - max) * log2(e)): exp2's range reduction needs no
// multiplication, and the difference is taken before the scaling so that it is exact
// for scores of any magnitude.
constexpr double kLog2e = 1.4426950408889634;

// 2^x of a float vector: 2^n * p(f) with n = round(x), f = x - n in [-1/2, 1/2] and p
// a degree-5 polynomial fitted on Chebyshev nodes (relative error 2.5e-7, float's
// rounding).  Every caller passes x <= ~0 (a score minus its running max or the
// log-sum-exp).  Below -126 the result is 0 (2^-inf, the first tile's rescaling and
// padding queries, included): float's normal range ends at 2^-126, and a clamped
// 2^-126 would still weigh a value of 3e38 as 3.5.  PyTorch keeps the subnormals
// 2^-149..2^-126 (docs/ERRORS.md).  NaN stays NaN.
inline at::vec::Vectorized<float> exp2_clamped(at::vec::Vectorized<float> x_in) {
  using Vec = at::vec::Vectorized<float>;
  const Vec x = at::vec::clamp(x_in, Vec(-126.0f), Vec(126.0f));
  // Adding 1.5 * 2^23 rounds x to an integer n and leaves n + 127 (the exponent bias,
  // folded into the constant) in the low mantissa bits; << 23 turns that into 2^n.
  const Vec shifter(12582912.0f + 127.0f);
  const Vec t = x + shifter;
  const Vec f = x - (t - shifter);
  Vec poly(0.0013400432653725147f);
  poly = at::vec::fmadd(poly, f, Vec(0.009676037356257439f));
  poly = at::vec::fmadd(poly, f, Vec(0.05550327152013779f));
  poly = at::vec::fmadd(poly, f, Vec(0.2402210682630539f));
  poly = at::vec::fmadd(poly, f, Vec(0.6931471824645996f));
  poly = at::vec::fmadd(poly, f, Vec(1.0000001192092896f));
  const at::vec::Vectorized<int32_t> two_n = at::vec::cast<int32_t>(t) << at::vec::Vectorized<int32_t>(23);
  return Vec::blendv(poly * at::vec::cast<float>(two_n), Vec(0.0f), x_in < Vec(-126.0f));
}

// 2^x on a vector: the polynomial above for float, Sleef's 1-ulp exp2 for double.
template <typename acc_t>
inline at::vec::Vectorized<acc_t> vexp2(const at::vec::Vectorized<acc_t>& x) {
  if constexpr (std::is_same_v<acc_t, float>) {
    return exp2_clamped(x);
  } else {
    return x.exp2();
  }
}

// e^(a - b), the difference taken first (exact for scores of any magnitude).
template <typename acc_t>
inline at::vec::Vectorized<acc_t> vexp_diff(const at::vec::Vectorized<acc_t>& a, const at::vec::Vectorized<acc_t>& b) {
  return vexp2<acc_t>((a - b) * at::vec::Vectorized<acc_t>(static_cast<acc_t>(kLog2e)));
}

// ----------------------------------------------------------------------------- views

// The rows one task reads or writes: (b, h) fixed, row r at base + r * stride.
template <typename T>
struct Rows {
  T* base;
  int64_t stride;
  T* operator[](int64_t r) const { return base + r * stride; }
};

template <typename T>
inline Rows<T> rows_of(const RowsView& v, int64_t b, int64_t h, int64_t first_row) {
  return {static_cast<T*>(v.data) + b * v.batch + h * v.head + first_row * v.row, v.row};
}

template <typename T>
inline Rows<T> lse_of(const LseView& v, int64_t b, int64_t h, int64_t first_row) {
  return {static_cast<T*>(v.data) + b * v.batch + h * v.head + first_row * v.row, v.row};
}

// Software prefetch, paced.  The rows of one head in a (B, N, H, D) tensor are
// H * D elements apart (often a page), a pattern the hardware prefetchers do not
// follow, so every packed tile would wait on memory.  Rows needed soon (the next key
// tile, the next task's queries) are queued here and the matmuls issue a few cache
// lines between micro-kernel calls: issued in one burst, most prefetches would find
// the core's miss buffers full and achieve little.
class Prefetcher {
 public:
  // Queue rows [0, rows) of a strided set (strides in bytes).
  void add(const void* first_row, int64_t stride, int64_t rows, int64_t row_bytes, bool for_write = false) {
    if (rows <= 0 || row_bytes <= 0) return;
    if (count_ == kCapacity) step(std::numeric_limits<int64_t>::max() / 2);  // make room: issue everything
    ranges_[(head_ + count_++) % kCapacity] = {static_cast<const char*>(first_row), stride, rows, row_bytes, for_write};
    pending_ += rows * (row_bytes / 64 + 1);
  }
  template <typename T>
  void add_rows(Rows<T> rows, int64_t first, int64_t n, int64_t D, bool for_write = false) {
    add(rows[first], rows.stride * static_cast<int64_t>(sizeof(T)), n, D * static_cast<int64_t>(sizeof(T)), for_write);
  }
  // Spread what is queued over about `steps` calls of step().
  void pace(int64_t steps) { per_step_ = std::max<int64_t>(2, pending_ / std::max<int64_t>(steps, 1) + 1); }
  void step() { step(per_step_); }

  void step(int64_t lines) {
#if defined(__GNUC__) || defined(__clang__)
    while (lines > 0 && count_ > 0) {
      const Range& r = ranges_[head_];
      const uintptr_t row = reinterpret_cast<uintptr_t>(r.p + row_ * r.stride);
      const uintptr_t end = row + r.row_bytes;
      uintptr_t a = (row & ~uintptr_t(63)) + offset_;
      for (; a < end && lines > 0; a += 64, offset_ += 64, --lines, --pending_) {
        if (r.for_write) {
          __builtin_prefetch(reinterpret_cast<const void*>(a), 1, 2);
        } else {
          __builtin_prefetch(reinterpret_cast<const void*>(a), 0, 2);
        }
      }
      if (a >= end) {  // row done
        offset_ = 0;
        if (++row_ == r.rows) {
          row_ = 0;
          head_ = (head_ + 1) % kCapacity;
          --count_;
        }
      }
    }
    if (count_ == 0) pending_ = 0;
#else
    (void)lines;
    count_ = 0;
#endif
  }

 private:
  struct Range {
    const char* p;
    int64_t stride, rows, row_bytes;
    bool for_write;
  };
  static constexpr int kCapacity = 16;
  Range ranges_[kCapacity];
  int head_ = 0, count_ = 0;
  int64_t row_ = 0, offset_ = 0, pending_ = 0, per_step_ = 2;
};

// ----------------------------------------------------------------------------- packing

// One vector of src converted to acc_t.
template <typename scalar_t, typename acc_t>
inline at::vec::Vectorized<acc_t> load_vec(const scalar_t* src) {
  using Vec = at::vec::Vectorized<acc_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return Vec::loadu(src);
  } else {
#if defined(CPU_CAPABILITY_AVX2)
    Vec v;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      at::vec::load_fp32_from_bf16(src, v);
    } else {
      at::vec::load_fp32_from_fp16(src, v);
    }
    return v;
#else
    __at_align__ acc_t tmp[Vec::size()];
    for (int64_t i = 0; i < Vec::size(); ++i) tmp[i] = static_cast<acc_t>(src[i]);
    return Vec::loadu(tmp);
#endif
  }
}

// dst[0:D] = scale * src[0:D] converted to acc_t, dst[D:Dp] = 0.
template <typename scalar_t, typename acc_t>
inline void load_row(const scalar_t* src, int64_t D, int64_t Dp, acc_t scale, acc_t* dst) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  int64_t d = 0;
  for (; d + W <= D; d += W) (load_vec<scalar_t, acc_t>(src + d) * Vec(scale)).store(dst + d);
  for (; d < D; ++d) dst[d] = static_cast<acc_t>(src[d]) * scale;
  for (; d < Dp; ++d) dst[d] = acc_t(0);
}

// n rows into a row-major (n x Dp) block.
template <typename scalar_t, typename acc_t>
inline void pack_rows(Rows<const scalar_t> src, int64_t n, int64_t D, int64_t Dp, acc_t scale, acc_t* dst) {
  for (int64_t r = 0; r < n; ++r) load_row(src[r], D, Dp, scale, dst + r * Dp);
}

// n rows transposed into a (D x ld) block, columns n..ld zero.  W rows at a time are
// converted into tmp (W x Dp) and transposed in W x W register blocks.
template <typename scalar_t, typename acc_t>
inline void pack_transposed(Rows<const scalar_t> src, int64_t n, int64_t D, int64_t Dp, int64_t ld, acc_t scale,
                            acc_t* dst, acc_t* tmp) {
  constexpr int W = at::vec::Vectorized<acc_t>::size();
  int64_t r0 = 0;
  for (; r0 + W <= n; r0 += W) {
    for (int r = 0; r < W; ++r) load_row(src[r0 + r], D, Dp, scale, tmp + r * Dp);
    int64_t d = 0;
    for (; d + W <= D; d += W) at::vec::transpose_mxn<acc_t, W, W>(tmp + d, Dp, dst + d * ld + r0, ld);
    for (; d < D; ++d) {
      for (int r = 0; r < W; ++r) dst[d * ld + r0 + r] = tmp[r * Dp + d];
    }
  }
  for (int64_t r = r0; r < n; ++r) {
    const scalar_t* s = src[r];
    for (int64_t d = 0; d < D; ++d) dst[d * ld + r] = static_cast<acc_t>(s[d]) * scale;
  }
  for (int64_t d = 0; d < D; ++d) {
    for (int64_t r = n; r < ld; ++r) dst[d * ld + r] = acc_t(0);
  }
}

// dst[0:D] = scale * src[0:D] converted to scalar_t.
template <typename scalar_t, typename acc_t>
inline void store_row(const acc_t* src, int64_t D, acc_t scale, scalar_t* dst) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  int64_t d = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (; d + W <= D; d += W) (Vec::loadu(src + d) * Vec(scale)).store(dst + d);
  } else {
    for (; d + 2 * W <= D; d += 2 * W) {
      at::vec::convert_from_float<scalar_t>(Vec::loadu(src + d) * Vec(scale), Vec::loadu(src + d + W) * Vec(scale))
          .store(dst + d);
    }
  }
  for (; d < D; ++d) dst[d] = static_cast<scalar_t>(src[d] * scale);
}

template <typename scalar_t>
inline void zero_rows(Rows<scalar_t> dst, int64_t from, int64_t to, int64_t D) {
  for (int64_t r = from; r < to; ++r) std::memset(static_cast<void*>(dst[r]), 0, D * sizeof(scalar_t));
}

// ----------------------------------------------------------------------------- matmul

enum class Init { kZero, kLoad, kLoadScaled };

// C[0:MR, 0:NV*W] = init + sum_k A(r, k) * B[k, 0:NV*W], with A(r, k) = A[r*a_row + k*a_k]
// broadcast from memory and B, C row-major.  init: 0, C, or C scaled per row by
// row_scale[r] (the online softmax's rescaling folded into the accumulator load).
//
// col_max (optional): col_max[0:NV*W] = max(col_max, max over the MR rows of C), the
// online softmax's tile max computed while C is still in registers.
template <typename acc_t, int MR, int NV, Init INIT>
C10_ALWAYS_INLINE void micro_kernel(int64_t K, const acc_t* A, int64_t a_row, int64_t a_k, const acc_t* B, int64_t ldb,
                         acc_t* C, int64_t ldc, const acc_t* row_scale, acc_t* col_max) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int W = Vec::size();
  Vec acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      if constexpr (INIT == Init::kZero) {
        acc[r][v] = Vec(acc_t(0));
      } else if constexpr (INIT == Init::kLoad) {
        acc[r][v] = Vec::loadu(C + r * ldc + v * W);
      } else {
        acc[r][v] = Vec::loadu(C + r * ldc + v * W) * Vec(row_scale[r]);
      }
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    const acc_t* a = A + k * a_k;
    const acc_t* b = B + k * ldb;
    Vec bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = Vec::loadu(b + v * W);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const Vec ar(a[r * a_row]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(ar, bv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v].store(C + r * ldc + v * W);
  }
  if (col_max != nullptr) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      Vec mx = Vec::loadu(col_max + v * W);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) mx = at::vec::clamp_min(mx, acc[r][v]);
      mx.store(col_max + v * W);
    }
  }
}

// One group of MR rows of C across N columns (full-width micro-kernels, then one of
// width W if N is an odd number of vectors).
template <typename acc_t, int MR, Init INIT>
inline void row_panel(int64_t N, int64_t K, const acc_t* A, int64_t a_row, int64_t a_k, const acc_t* B, int64_t ldb,
                      acc_t* C, int64_t ldc, const acc_t* row_scale, acc_t* col_max) {
  constexpr int64_t W = at::vec::Vectorized<acc_t>::size();
  int64_t n0 = 0;
  for (; n0 + 2 * W <= N; n0 += 2 * W) {
    micro_kernel<acc_t, MR, 2, INIT>(K, A, a_row, a_k, B + n0, ldb, C + n0, ldc, row_scale,
                                     col_max ? col_max + n0 : nullptr);
  }
  if (n0 < N) {
    micro_kernel<acc_t, MR, 1, INIT>(K, A, a_row, a_k, B + n0, ldb, C + n0, ldc, row_scale,
                                     col_max ? col_max + n0 : nullptr);
  }
}

// Columns per panel: the block of B a panel reads (K x NC) stays in L1 (16 KiB)
// while every row group of C passes over it.
template <typename acc_t>
inline int64_t panel_cols(int64_t K) {
  constexpr int64_t W2 = 2 * at::vec::Vectorized<acc_t>::size();
  return std::max<int64_t>(W2, 16 * 1024 / (static_cast<int64_t>(sizeof(acc_t)) * std::max<int64_t>(K, 1)) / W2 * W2);
}

// Row panels gemm runs for C[M x N] with inner dimension K (to pace the prefetcher).
template <typename acc_t>
inline int64_t gemm_steps(int64_t M, int64_t N, int64_t K) {
  const int64_t nc = panel_cols<acc_t>(K);
  return (M + kMR - 1) / kMR * ((N + nc - 1) / nc);
}

// C[M x N] (+)= A(M x K) . B[K x N]; N a multiple of the vector width, B and C
// row-major with leading dimensions ldb, ldc; A element (r, k) at A[r*a_row + k*a_k].
// row_scale (kLoadScaled): per row of C; col_max (optional): per column of C, see
// micro_kernel.  pf: advanced by one step after every row panel.
template <typename acc_t, Init INIT>
void gemm(Prefetcher& pf, int64_t M, int64_t N, int64_t K, const acc_t* A, int64_t a_row, int64_t a_k, const acc_t* B,
          int64_t ldb, acc_t* C, int64_t ldc, const acc_t* row_scale = nullptr, acc_t* col_max = nullptr) {
  static_assert(kMR <= 6, "add cases below");
  const int64_t NC = panel_cols<acc_t>(K);
  // Rows split into groups of equal size (+-1) rather than kMR, kMR, ..., remainder:
  // a thin last group would waste most of its micro-kernels.
  const int64_t groups = (M + kMR - 1) / kMR;
  for (int64_t n0 = 0; n0 < N; n0 += NC) {
    const int64_t nc = std::min(NC, N - n0);
    acc_t* cm = col_max ? col_max + n0 : nullptr;
    for (int64_t g = 0, m0 = 0; g < groups; ++g) {
      const int64_t mr = M / groups + (g < M % groups ? 1 : 0);
      const acc_t* a = A + m0 * a_row;
      acc_t* c = C + m0 * ldc + n0;
      const acc_t* rs = row_scale ? row_scale + m0 : nullptr;
      switch (mr) {
#define ENAT_PANEL_CASE(R)                                                                          \
  case R:                                                                                           \
    if constexpr (R <= kMR) row_panel<acc_t, R, INIT>(nc, K, a, a_row, a_k, B + n0, ldb, c, ldc, rs, cm); \
    break;
        ENAT_PANEL_CASE(1)
        ENAT_PANEL_CASE(2)
        ENAT_PANEL_CASE(3)
        ENAT_PANEL_CASE(4)
        ENAT_PANEL_CASE(5)
        ENAT_PANEL_CASE(6)
#undef ENAT_PANEL_CASE
        default:
          break;
      }
      pf.step();
      m0 += mr;
    }
  }
}

// ----------------------------------------------------------------------------- forward

// The two key/value segments of (b, h), visited in this order under one softmax.
template <typename scalar_t>
struct Segment {
  Rows<const scalar_t> k, v;
  int64_t len;
};

template <typename scalar_t>
inline void segments_of(const Problem& p, const Extent& e, int64_t b, int64_t h, Segment<scalar_t> seg[2]) {
  seg[0] = {rows_of<const scalar_t>(p.k_cond, b, h, e.c_start), rows_of<const scalar_t>(p.v_cond, b, h, e.c_start), e.c_len};
  seg[1] = {rows_of<const scalar_t>(p.k_self, b, h, e.q_start), rows_of<const scalar_t>(p.v_self, b, h, e.q_start), e.q_len};
}

// Tile `idx` of the keys of (b, h), counting the cond segment's tiles first.
template <typename scalar_t>
struct KeyTile {
  Rows<const scalar_t> k, v;  // first row of the tile at index 0
  int segment;                // 0: cond, 1: self
  int64_t j0, nk;             // position in its segment, rows
};

template <typename scalar_t>
inline int64_t num_tiles(const Segment<scalar_t>& s) { return (s.len + kKeyTile - 1) / kKeyTile; }

template <typename scalar_t>
inline KeyTile<scalar_t> key_tile(const Segment<scalar_t> seg[2], int64_t idx) {
  const int64_t first = num_tiles(seg[0]);
  const Segment<scalar_t>& s = idx < first ? seg[0] : seg[1];
  const int64_t j0 = (idx < first ? idx : idx - first) * kKeyTile;
  return {{s.k[j0], s.k.stride}, {s.v[j0], s.v.stride}, idx < first ? 0 : 1, j0, std::min(kKeyTile, s.len - j0)};
}

template <typename scalar_t>
inline void prefetch_tile(Prefetcher& pf, const Segment<scalar_t> seg[2], int64_t idx, int64_t D) {
  if (idx >= num_tiles(seg[0]) + num_tiles(seg[1])) return;
  const KeyTile<scalar_t> t = key_tile(seg, idx);
  pf.add_rows(t.k, 0, t.nk, D);
  pf.add_rows(t.v, 0, t.nk, D);
}

template <typename acc_t>
struct ForwardWorkspace {
  Scratch<acc_t> qt, st, o, k, v, m, m_new, l, alpha, tmp;
  Prefetcher pf;
  ForwardWorkspace(int64_t D, int64_t Dp)
      : qt(size(D, skewed<acc_t>(kQueryBlock))), st(kKeyTile * skewed<acc_t>(kQueryBlock)), o(size(kQueryBlock, Dp)),
        k(size(kKeyTile, Dp)), v(size(kKeyTile, Dp)), m(kQueryBlock), m_new(kQueryBlock), l(kQueryBlock),
        alpha(kQueryBlock), tmp(size(at::vec::Vectorized<acc_t>::size(), Dp)) {}
  static int64_t size(int64_t rows, int64_t cols) { return checked_mul(rows, cols, "sc_attention (cpu) scratch size"); }
};

// Online softmax over one tile of St (nk keys x Mq queries, leading dimension ld),
// given per query the running max m and the new max m_new (max of m and the tile,
// computed by the St matmul): alpha = exp(m - m_new), St <- exp(St - m_new), the
// running sum l <- alpha * l + sum of the tile, m <- m_new.
template <typename acc_t>
inline void softmax_tile(acc_t* st, int64_t nk, int64_t Mq, int64_t ld, acc_t* m, const acc_t* m_new, acc_t* l,
                         acc_t* alpha) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  for (int64_t i = 0; i < Mq; i += W) {
    const Vec mx = Vec::loadu(m_new + i);
    const Vec a = vexp_diff<acc_t>(Vec::loadu(m + i), mx);  // 0 on the first tile (m = -inf)
    Vec sum(acc_t(0));
    for (int64_t j = 0; j < nk; ++j) {
      const Vec p = vexp_diff<acc_t>(Vec::loadu(st + j * ld + i), mx);
      p.store(st + j * ld + i);
      sum = sum + p;
    }
    at::vec::fmadd(Vec::loadu(l + i), a, sum).store(l + i);
    mx.store(m + i);
    a.store(alpha + i);
  }
}

// One forward task: (b, h) and its block of query rows [r0, r1), the first nq valid.
struct ForwardTask {
  int64_t b, h, r0, r1, nq;
  Extent e;
};

inline ForwardTask forward_task(const Problem& p, int64_t block, int64_t blocks, int64_t t) {
  ForwardTask f;
  f.b = t / (blocks * p.heads);
  f.h = (t / blocks) % p.heads;
  f.e = extent_of(p, f.b);
  f.r0 = (t % blocks) * block;
  f.r1 = std::min(f.r0 + block, f.e.q_owned);
  f.nq = std::max<int64_t>(std::min(f.r1, f.e.q_len) - f.r0, 0);
  return f;
}

// Queries and first key tile of a forward task.
template <typename scalar_t>
inline void prefetch_forward_task(Prefetcher& pf, const Problem& p, const ForwardTask& f) {
  if (f.nq == 0) return;
  pf.add_rows(rows_of<const scalar_t>(p.q, f.b, f.h, f.e.q_start + f.r0), 0, f.nq, p.head_dim);
  Segment<scalar_t> seg[2];
  segments_of(p, f.e, f.b, f.h, seg);
  prefetch_tile(pf, seg, 0, p.head_dim);
}

template <typename scalar_t>
void forward_kernel(const Problem& p) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int64_t W = at::vec::Vectorized<acc_t>::size();
  const int64_t B = p.batch, H = p.heads, D = p.head_dim, Dp = round_up(D, W);
  // Smaller query blocks when (b, h) pairs alone would leave threads idle.  The
  // result of a query does not depend on its block (its lane sees the same operations).
  int64_t block = kQueryBlock;
  auto blocks_of = [&](int64_t qb) { return round_up(p.max_q, qb) / qb; };
  const int64_t pairs = checked_mul(B, H, "sc_attention (cpu) task count");
  while (block > 2 * kQueryPad && checked_mul(pairs, blocks_of(block), "sc_attention (cpu) task count") < 2 * at::get_num_threads()) {
    block /= 2;
  }
  const int64_t blocks = blocks_of(block);
  const acc_t scale = static_cast<acc_t>(p.scale);

  auto task = [&](ForwardWorkspace<acc_t>& ws, int64_t t, int64_t t_next) {
    const ForwardTask f = forward_task(p, block, blocks, t);
    const int64_t b = f.b, h = f.h, r0 = f.r0, nq = f.nq;
    Rows<scalar_t> out = rows_of<scalar_t>(p.out, b, h, f.e.q_start);
    Rows<acc_t> lse = lse_of<acc_t>(p.lse, b, h, f.e.q_start);

    // Padded query rows: out = 0, lse = -inf.
    for (int64_t r = std::max(r0, f.e.q_len); r < f.r1; ++r) {
      std::memset(static_cast<void*>(out[r]), 0, D * sizeof(scalar_t));
      *lse[r] = -std::numeric_limits<acc_t>::infinity();
    }
    if (nq == 0) return;

    const int64_t Mq = round_up(nq, kQueryPad), ld = skewed<acc_t>(Mq);
    acc_t *qt = ws.qt.get(), *st = ws.st.get(), *o = ws.o.get(), *kt = ws.k.get(), *vt = ws.v.get();
    acc_t *m = ws.m.get(), *m_new = ws.m_new.get(), *l = ws.l.get(), *alpha = ws.alpha.get();
    pack_transposed(rows_of<const scalar_t>(p.q, b, h, f.e.q_start + r0), nq, D, Dp, ld, scale, qt, ws.tmp.get());
    std::fill(m, m + Mq, -std::numeric_limits<acc_t>::infinity());
    std::fill(l, l + Mq, acc_t(0));
    std::fill(o, o + nq * Dp, acc_t(0));

    Segment<scalar_t> seg[2];
    segments_of(p, f.e, b, h, seg);
    const int64_t tiles = num_tiles(seg[0]) + num_tiles(seg[1]);
    Prefetcher& pf = ws.pf;
    for (int64_t idx = 0; idx < tiles; ++idx) {
      // While this tile computes: the next tile, or at the last one the output rows
      // and the worker's next task.
      prefetch_tile(pf, seg, idx + 1, D);
      if (idx + 1 == tiles) {
        pf.add_rows(out, r0, nq, D, /*for_write=*/true);
        if (t_next >= 0) prefetch_forward_task<scalar_t>(pf, p, forward_task(p, block, blocks, t_next));
      }
      const KeyTile<scalar_t> kv = key_tile(seg, idx);
      const int64_t nk = kv.nk;
      pf.pace(gemm_steps<acc_t>(nk, Mq, D) + gemm_steps<acc_t>(nq, Dp, nk));
      pack_rows(kv.k, nk, D, Dp, acc_t(1), kt);
      pack_rows(kv.v, nk, D, Dp, acc_t(1), vt);
      // St = K . Qt (nk x Mq) and its column max, then softmax, then O = alpha * O + P^T V.
      std::copy(m, m + Mq, m_new);
      gemm<acc_t, Init::kZero>(pf, nk, Mq, D, kt, Dp, 1, qt, ld, st, ld, nullptr, m_new);
      softmax_tile(st, nk, Mq, ld, m, m_new, l, alpha);
      gemm<acc_t, Init::kLoadScaled>(pf, nq, Dp, nk, st, 1, ld, vt, Dp, o, Dp, alpha);
    }

    // Every valid query sees at least its own key, so l > 0.
    for (int64_t i = 0; i < nq; ++i) {
      store_row(o + i * Dp, D, acc_t(1) / l[i], out[r0 + i]);
      *lse[r0 + i] = m[i] + std::log(l[i]);
    }
  };

  parallel_tasks(checked_mul(pairs, blocks, "sc_attention (cpu) task count"), [&] { return ForwardWorkspace<acc_t>(D, Dp); },
                 task);
}

// ----------------------------------------------------------------------------- backward

template <typename acc_t>
struct BackwardWorkspace {
  // Query side of one (b, h), packed once: Qt and dOt transposed (D x Mq), Q and dO
  // as rows (Mq x Dp), per-query lse and dlse - delta, the dQ accumulator.
  Scratch<acc_t> qt, dot, q, dout, lse, c, dq;
  // Key side of one tile, and the tile's St / dPt (kKeyTile x kQueryBlock).
  Scratch<acc_t> k, v, dk, dv, st, dpt, tmp;
  Prefetcher pf;
  BackwardWorkspace(int64_t max_q, int64_t D, int64_t Dp)
      : qt(size(D, skewed<acc_t>(round_up(max_q, kQueryPad)))), dot(size(D, skewed<acc_t>(round_up(max_q, kQueryPad)))),
        q(size(max_q, Dp)), dout(size(max_q, Dp)), lse(round_up(max_q, kQueryPad)), c(round_up(max_q, kQueryPad)),
        dq(size(max_q, Dp)), k(size(kKeyTile, Dp)), v(size(kKeyTile, Dp)), dk(size(kKeyTile, Dp)),
        dv(size(kKeyTile, Dp)), st(kKeyTile * skewed<acc_t>(kQueryBlock)), dpt(kKeyTile * skewed<acc_t>(kQueryBlock)),
        tmp(size(at::vec::Vectorized<acc_t>::size(), Dp)) {}
  static int64_t size(int64_t rows, int64_t cols) { return checked_mul(rows, cols, "sc_attention (cpu) scratch size"); }
};

// For a tile (nk keys x Mb queries, leading dimension ld): P = exp(S - lse) into st,
// dS = P * (dP + c) into dpt, c = dlse - delta per query.
template <typename acc_t>
inline void softmax_backward_tile(acc_t* st, acc_t* dpt, int64_t nk, int64_t Mb, int64_t ld, const acc_t* lse,
                                  const acc_t* c) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  for (int64_t j = 0; j < nk; ++j) {
    acc_t* s = st + j * ld;
    acc_t* dp = dpt + j * ld;
    for (int64_t i = 0; i < Mb; i += W) {
      const Vec pv = vexp_diff<acc_t>(Vec::loadu(s + i), Vec::loadu(lse + i));
      pv.store(s + i);
      (pv * (Vec::loadu(dp + i) + Vec::loadu(c + i))).store(dp + i);
    }
  }
}

// Queries, their output and output gradient rows, and the first key tile of task t.
template <typename scalar_t>
inline void prefetch_backward_task(Prefetcher& pf, const Problem& p, int64_t t) {
  const int64_t h = t % p.heads, b = t / p.heads;
  const Extent e = extent_of(p, b);
  if (e.q_len == 0) return;
  for (const RowsView* v : {&p.q, &p.dout, &p.out}) {
    pf.add_rows(rows_of<const scalar_t>(*v, b, h, e.q_start), 0, e.q_len, p.head_dim);
  }
  Segment<scalar_t> seg[2];
  segments_of(p, e, b, h, seg);
  prefetch_tile(pf, seg, 0, p.head_dim);
}

template <typename scalar_t>
void backward_kernel(const Problem& p) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int64_t W = at::vec::Vectorized<acc_t>::size();
  const int64_t B = p.batch, H = p.heads, D = p.head_dim, Dp = round_up(D, W);
  const acc_t scale = static_cast<acc_t>(p.scale);
  const RowsView dk_views[2] = {p.dk_cond, p.dk_self}, dv_views[2] = {p.dv_cond, p.dv_self};

  auto task = [&](BackwardWorkspace<acc_t>& ws, int64_t t, int64_t t_next) {
    const int64_t h = t % H, b = t / H;
    const Extent e = extent_of(p, b);
    const int64_t nq = e.q_len, Mq = round_up(nq, kQueryPad), ldq = skewed<acc_t>(Mq);
    Segment<scalar_t> seg[2];
    segments_of(p, e, b, h, seg);
    const int64_t seg_start[2] = {e.c_start, e.q_start}, seg_owned[2] = {e.c_owned, e.q_owned};
    Rows<scalar_t> dk_out[2], dv_out[2];
    for (int si = 0; si < 2; ++si) {
      dk_out[si] = rows_of<scalar_t>(dk_views[si], b, h, seg_start[si]);
      dv_out[si] = rows_of<scalar_t>(dv_views[si], b, h, seg_start[si]);
    }

    // Query side, packed once for all key tiles.
    acc_t *qt = ws.qt.get(), *dot = ws.dot.get(), *q = ws.q.get(), *dout = ws.dout.get();
    acc_t *lse = ws.lse.get(), *c = ws.c.get(), *dq = ws.dq.get();
    if (nq > 0) {
      const Rows<const scalar_t> q_rows = rows_of<const scalar_t>(p.q, b, h, e.q_start);
      const Rows<const scalar_t> do_rows = rows_of<const scalar_t>(p.dout, b, h, e.q_start);
      const Rows<const scalar_t> o_rows = rows_of<const scalar_t>(p.out, b, h, e.q_start);
      const Rows<const acc_t> lse_rows = lse_of<const acc_t>(p.lse, b, h, e.q_start);
      pack_transposed(q_rows, nq, D, Dp, ldq, scale, qt, ws.tmp.get());
      pack_transposed(do_rows, nq, D, Dp, ldq, acc_t(1), dot, ws.tmp.get());
      pack_rows(q_rows, nq, D, Dp, scale, q);
      pack_rows(do_rows, nq, D, Dp, acc_t(1), dout);
      for (int64_t i = 0; i < nq; ++i) {
        acc_t delta = 0;
        for (int64_t d = 0; d < D; ++d) delta += dout[i * Dp + d] * static_cast<acc_t>(o_rows[i][d]);
        lse[i] = *lse_rows[i];
        c[i] = (p.dlse.data ? *lse_of<const acc_t>(p.dlse, b, h, e.q_start)[i] : acc_t(0)) - delta;
      }
      // Padding queries: P = exp(S - inf) = 0, so they add nothing to dK, dV.
      std::fill(lse + nq, lse + Mq, std::numeric_limits<acc_t>::infinity());
      std::fill(c + nq, c + Mq, acc_t(0));
      std::fill(dq, dq + nq * Dp, acc_t(0));
    }

    // Key tiles (none without queries: then every key gradient is zero).
    acc_t *kt = ws.k.get(), *vt = ws.v.get(), *dk = ws.dk.get(), *dv = ws.dv.get();
    acc_t *st = ws.st.get(), *dpt = ws.dpt.get();
    const int64_t tiles = nq > 0 ? num_tiles(seg[0]) + num_tiles(seg[1]) : 0;
    Prefetcher& pf = ws.pf;
    for (int64_t idx = 0; idx < tiles; ++idx) {
      const KeyTile<scalar_t> kv = key_tile(seg, idx);
      const int64_t nk = kv.nk, j0 = kv.j0;
      // While this tile computes: its gradient rows, the next tile, and at the last
      // tile the worker's next task.
      pf.add_rows(dk_out[kv.segment], j0, nk, D, /*for_write=*/true);
      pf.add_rows(dv_out[kv.segment], j0, nk, D, /*for_write=*/true);
      prefetch_tile(pf, seg, idx + 1, D);
      if (idx + 1 == tiles && t_next >= 0) prefetch_backward_task<scalar_t>(pf, p, t_next);
      pf.pace((nq + kQueryBlock - 1) / kQueryBlock *
              (2 * gemm_steps<acc_t>(nk, kQueryBlock, D) + 2 * gemm_steps<acc_t>(nk, Dp, kQueryBlock) +
               gemm_steps<acc_t>(kQueryBlock, Dp, nk)));
      pack_rows(kv.k, nk, D, Dp, acc_t(1), kt);
      pack_rows(kv.v, nk, D, Dp, acc_t(1), vt);
      std::fill(dk, dk + nk * Dp, acc_t(0));
      std::fill(dv, dv + nk * Dp, acc_t(0));
      for (int64_t i0 = 0; i0 < nq; i0 += kQueryBlock) {
        const int64_t nb = std::min(kQueryBlock, nq - i0), Mb = round_up(nb, kQueryPad), ldb = skewed<acc_t>(Mb);
        gemm<acc_t, Init::kZero>(pf, nk, Mb, D, kt, Dp, 1, qt + i0, ldq, st, ldb);    // St = K . Qt
        gemm<acc_t, Init::kZero>(pf, nk, Mb, D, vt, Dp, 1, dot + i0, ldq, dpt, ldb);  // dPt = V . dOt
        softmax_backward_tile(st, dpt, nk, Mb, ldb, lse + i0, c + i0);
        gemm<acc_t, Init::kLoad>(pf, nk, Dp, nb, st, ldb, 1, dout + i0 * Dp, Dp, dv, Dp);  // dV += P^T dO
        gemm<acc_t, Init::kLoad>(pf, nk, Dp, nb, dpt, ldb, 1, q + i0 * Dp, Dp, dk, Dp);    // dK += dS^T (scale Q)
        gemm<acc_t, Init::kLoad>(pf, nb, Dp, nk, dpt, 1, ldb, kt, Dp, dq + i0 * Dp, Dp);   // dQ += dS K
      }
      for (int64_t j = 0; j < nk; ++j) {
        store_row(dk + j * Dp, D, acc_t(1), dk_out[kv.segment][j0 + j]);
        store_row(dv + j * Dp, D, acc_t(1), dv_out[kv.segment][j0 + j]);
      }
    }
    for (int si = 0; si < 2; ++si) {
      const int64_t len = nq > 0 ? seg[si].len : 0;
      zero_rows(dk_out[si], len, seg_owned[si], D);
      zero_rows(dv_out[si], len, seg_owned[si], D);
    }

    Rows<scalar_t> dq_out = rows_of<scalar_t>(p.dq, b, h, e.q_start);
    for (int64_t i = 0; i < nq; ++i) store_row(dq + i * Dp, D, scale, dq_out[i]);
    zero_rows(dq_out, nq, e.q_owned, D);
  };

  const int64_t max_q = p.cu_q ? p.max_q : p.q_rows;
  parallel_tasks(checked_mul(B, H, "sc_attention (cpu) task count"), [&] { return BackwardWorkspace<acc_t>(max_q, D, Dp); },
                 task);
}

// ----------------------------------------------------------------------------- entry

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
