// The one list of CUDA SC-Attention kernel variants: the head_dims and dtypes compiled.
//
// Everything that enumerates variants is generated from the two X-macros below:
// - the AttnDtype keys (sc_attention_params.h includes this header),
// - the extern template declarations and the launchers' head_dim and dtype dispatch
//   (sc_attention.h, sc_attention_launch.cuh),
// - the adapter's supported checks and their error text (sc_attention_api.cpp),
// - one translation unit per (pass, head_dim): setup.py reads this file with
//   build_backend/cuda_variants.py and writes them at build time,
// - the build info (CUDA_SC_ATTENTION_HEAD_DIMS / _DTYPES, read by
//   enat_kernels/_variants.py for the cuda backend's capabilities),
// - the host emulator's dispatch (sc_attention_emu/emu_main.cpp, whose --variants mode
//   prints this list for the tests).
// docs/EXTENDING.md says how to add a head_dim or a dtype.  build_backend/cuda_variants.py
// parses the two #define lines with a regular expression: keep each entry on the form
// shown (one X(...) per entry, string names in double quotes).
//
// Plain C++ (no CUDA or torch headers): included by the kernels, the adapter and the emulator.
#pragma once
#include <cstring>
#include <initializer_list>
#include <string>
#include <type_traits>

// X(head_dim), ascending.  Each needs FwdCfg / BwdDqCfg / BwdDkvCfg to compile for it
// (sc_attention_kernels.cuh): a multiple of 16.
#define ENAT_SC_ATTN_HEAD_DIMS(X) X(32) X(64) X(128)

// X(AttnDtype key, element tag in sc_attention_primitives.cuh, torch dtype name, c10::ScalarType)
#define ENAT_SC_ATTN_DTYPES(X)                  \
  X(kFloat16, Fp16, "float16", Half)           \
  X(kBFloat16, Bf16, "bfloat16", BFloat16)

namespace enat_kernels::cuda {

// The element type of the 16-bit inputs and outputs, one key per listed dtype.
enum class AttnDtype {
#define ENAT_SC_ATTN_X(key, elem, name, scalar) key,
  ENAT_SC_ATTN_DTYPES(ENAT_SC_ATTN_X)
#undef ENAT_SC_ATTN_X
};

namespace sca {
#define ENAT_SC_ATTN_X(key, elem, name, scalar) struct elem;
ENAT_SC_ATTN_DTYPES(ENAT_SC_ATTN_X)
#undef ENAT_SC_ATTN_X
}  // namespace sca

// Passes an element type to a generic lambda: `using E = typename decltype(tag)::type;`.
template <class E>
struct ElementTag {
  using type = E;
};

// f(std::integral_constant<int, D>{}) for a listed head_dim D, else `unsupported`.
template <class R, class F>
constexpr R with_head_dim(int head_dim, R unsupported, F&& f) {
  switch (head_dim) {
#define ENAT_SC_ATTN_X(d) \
  case d:                 \
    return f(std::integral_constant<int, d>{});
    ENAT_SC_ATTN_HEAD_DIMS(ENAT_SC_ATTN_X)
#undef ENAT_SC_ATTN_X
    default:
      return unsupported;
  }
}

// f(ElementTag<E>{}) for the element type E of a listed dtype, else `unsupported` (an
// AttnDtype value outside the list never falls through to another dtype's kernels).
template <class R, class F>
constexpr R with_dtype(AttnDtype dtype, R unsupported, F&& f) {
  switch (dtype) {
#define ENAT_SC_ATTN_X(key, elem, name, scalar) \
  case AttnDtype::key:                          \
    return f(ElementTag<sca::elem>{});
    ENAT_SC_ATTN_DTYPES(ENAT_SC_ATTN_X)
#undef ENAT_SC_ATTN_X
  }
  return unsupported;
}

constexpr bool sc_attn_supported(int head_dim) {
  return with_head_dim(head_dim, false, [](auto) { return true; });
}

// Compile-time checks of the dispatch: each listed value reaches its own variant, and a
// value outside the lists reaches none.
#define ENAT_SC_ATTN_X(d)                                                                   \
  static_assert(with_head_dim(d, 0, [](auto k) { return int(decltype(k)::value); }) == d, \
                "head_dim dispatch");
ENAT_SC_ATTN_HEAD_DIMS(ENAT_SC_ATTN_X)
#undef ENAT_SC_ATTN_X
static_assert(!sc_attn_supported(0), "an unlisted head_dim runs nothing");
static_assert(!with_dtype(static_cast<AttnDtype>(-1), false, [](auto) { return true; }),
              "an AttnDtype value outside the list runs nothing");

// The dtype of a torch name ("float16"); false when it is not listed.
inline bool attn_dtype_from_name(const char* name, AttnDtype* dtype) {
#define ENAT_SC_ATTN_X(key, elem, tname, scalar) \
  if (std::strcmp(name, tname) == 0) {           \
    *dtype = AttnDtype::key;                     \
    return true;                                 \
  }
  ENAT_SC_ATTN_DTYPES(ENAT_SC_ATTN_X)
#undef ENAT_SC_ATTN_X
  return false;
}

// "a, b and c" for error messages.
inline std::string sc_attn_join(std::initializer_list<std::string> items) {
  std::string out;
  size_t i = 0;
  for (const std::string& item : items) {
    if (i > 0) out += i + 1 == items.size() ? " and " : ", ";
    out += item;
    ++i;
  }
  return out;
}

// "32, 64 and 128"
inline std::string sc_attn_head_dims_text() {
#define ENAT_SC_ATTN_X(d) std::to_string(d),
  return sc_attn_join({ENAT_SC_ATTN_HEAD_DIMS(ENAT_SC_ATTN_X)});
#undef ENAT_SC_ATTN_X
}

// "float16 and bfloat16"
inline std::string sc_attn_dtypes_text() {
#define ENAT_SC_ATTN_X(key, elem, name, scalar) std::string(name),
  return sc_attn_join({ENAT_SC_ATTN_DTYPES(ENAT_SC_ATTN_X)});
#undef ENAT_SC_ATTN_X
}

}  // namespace enat_kernels::cuda
