// SC-Attention CPU kernels for the baseline instruction set (any x86-64, aarch64,
// ...): at::vec::Vectorized picks its portable implementation.  Used when the
// machine lacks AVX2 or when ATEN_CPU_CAPABILITY=default asks for it.
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT

#include "cpu/sc_attention_kernel.h"
