// Size arithmetic that cannot wrap: every element count, byte count and task count
// computed in csrc/ from values a caller controls (shapes, max_seqlen) goes through
// these, so an absurd input raises an error instead of sizing a buffer too small.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>

namespace enat_kernels {

inline int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  TORCH_CHECK(!__builtin_mul_overflow(a, b, &r), "enat_kernels: ", what, " overflows int64 (", a, " * ", b, ")");
  return r;
}

inline int64_t checked_add(int64_t a, int64_t b, const char* what) {
  int64_t r = 0;
  TORCH_CHECK(!__builtin_add_overflow(a, b, &r), "enat_kernels: ", what, " overflows int64 (", a, " + ", b, ")");
  return r;
}

inline int64_t checked_mul(int64_t a, int64_t b, int64_t c, const char* what) {
  return checked_mul(checked_mul(a, b, what), c, what);
}

// x rounded up to a multiple of m (m > 0, x >= 0).
inline int64_t checked_round_up(int64_t x, int64_t m, const char* what) {
  return checked_add(x, m - 1, what) / m * m;
}

}  // namespace enat_kernels
