// Vector exponentials of the online softmax: the only transcendental functions the
// kernels evaluate, in their hottest loops.  Separate because their accuracy and range
// (what happens below 2^-126, for NaN, for huge scores) are a numerical contract of
// their own (docs/ERRORS.md), independent of how tiles are packed or multiplied.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#include "cpu/sc_attention_kernel/config.h"

namespace enat_kernels::cpu_attn::CPU_CAPABILITY {

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

}  // namespace enat_kernels::cpu_attn::CPU_CAPABILITY
