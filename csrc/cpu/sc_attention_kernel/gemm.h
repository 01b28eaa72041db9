// The one matmul of the kernels: a register-blocked micro-kernel
// (C[MR x NV*W] (+)= A[MR x K] . B[K x NV*W]) and the panel loops around it.  Every
// product of the forward and backward (St, P.V, dV, dK, dQ) goes through gemm() here,
// so the register blocking, which is the kernels' performance, is tuned in one place.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/macros/Macros.h>

#include <algorithm>

#include "cpu/sc_attention_kernel/config.h"
#include "cpu/sc_attention_kernel/packing.h"

namespace enat_kernels::cpu_attn::CPU_CAPABILITY {

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

}  // namespace enat_kernels::cpu_attn::CPU_CAPABILITY
