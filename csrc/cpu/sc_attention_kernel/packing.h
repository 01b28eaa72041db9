// Moving rows between the caller's tensors and the kernels' packed buffers: strided
// row views, software prefetch of the rows needed next, conversion to the
// accumulation type on the way in (packing, transposing) and back on the way out.
// Separate from the arithmetic because it is where the memory layout (strides, dtype,
// alignment, cache behaviour) is handled; the matmuls see only packed, padded buffers.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <type_traits>

#include "cpu/sc_attention_cpu.h"
#include "cpu/sc_attention_kernel/config.h"

namespace enat_kernels::cpu_attn::CPU_CAPABILITY {

// ----------------------------------------------------------------------------- views

// The rows one task reads or writes: (b, h) fixed, row r at base + r * stride.
template <typename T>
struct Rows {
  T* base;
  int64_t stride;
  T* operator[](int64_t r) const { return base + r * stride; }
};

// Rows of (b, h) from first_row on, in a RowsView (token rows) or an LseView
// (per-query scalars): both address (b, h, row) the same way.
template <typename T, typename View>
inline Rows<T> rows_of(const View& v, int64_t b, int64_t h, int64_t first_row) {
  return {static_cast<T*>(v.data) + b * v.batch + h * v.head + first_row * v.row, v.row};
}

// ----------------------------------------------------------------------------- prefetch

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
      // A new element type needs its own conversion here, not the fp16 one.
      static_assert(std::is_same_v<scalar_t, c10::Half>, "load_vec: no conversion for this element type");
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

}  // namespace enat_kernels::cpu_attn::CPU_CAPABILITY
