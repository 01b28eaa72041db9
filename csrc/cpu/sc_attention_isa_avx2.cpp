// SC-Attention CPU kernels compiled for AVX2 + FMA (x86-64 only), chosen at run time
// by sc_attention_cpu.cpp when ATen reports AVX2 or better.
//
// setup.py compiles every file with the same baseline flags, so the instruction set
// is raised here with a target pragma instead of -mavx2.  Note on instruction sets:
// inline functions of headers first included after the pragma would be emitted with
// AVX2 code under the same (weak) symbol names as the baseline copies in other
// files, and the linker may keep either.  So every header that is not
// instruction-set specific is included *before* the pragma (compiled for the
// baseline); only at::vec (whose names carry the CPU_CAPABILITY namespace) and this
// file's kernels (namespace enat_kernels::cpu_attn::AVX2) are compiled for AVX2.
#include "cpu/sc_attention_cpu.h"

#if defined(ENAT_HAVE_AVX2_KERNELS)

// Baseline headers: everything sc_attention_kernel.h (with its parts in
// sc_attention_kernel/) and at::vec pull in, minus at::vec.
#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/Load.h>
#include <c10/util/MathConstants.h>
#include <c10/util/TypeCast.h>
#include <c10/util/complex.h>
#include <c10/util/copysign.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cassert>
#include <climits>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <ostream>
#include <type_traits>

#include "checked_size.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#endif

// GCC's C++ front end does not define the ISA macros for a target pragma; sleef.h
// (included by at::vec) declares its AVX functions only under them.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif

#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2

// at::vec's bfloat16 helpers return __m256 from lambdas, which GCC flags as an ABI
// change; every caller here is compiled for AVX2 too.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include "cpu/sc_attention_kernel.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#endif  // ENAT_HAVE_AVX2_KERNELS
