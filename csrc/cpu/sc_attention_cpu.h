// SC-Attention on the CPU: the problem description shared by the op adapter
// (sc_attention_cpu.cpp, which knows about at::Tensor) and the kernels
// (sc_attention_kernel.h, compiled once per instruction set in sc_attention_isa_*.cpp,
// which see only raw pointers and strides).
//
// Nothing here includes ATen: the kernel translation units stay small and free of
// at::Tensor's inline functions (see the note on instruction sets in
// sc_attention_isa_avx2.cpp).
#pragma once

#include <algorithm>
#include <cstdint>

namespace enat_kernels::cpu_attn {

enum class ElemType : int { kFloat, kDouble, kHalf, kBFloat16 };

// Rows of a dense (B, N, H, D) or packed (T, H, D) tensor with unit stride along D:
// element d of (batch b, token row r, head h) is at data + b*batch + r*row + h*head + d
// (strides in elements; batch is 0 for the packed form).
struct RowsView {
  void* data = nullptr;
  int64_t batch = 0, row = 0, head = 0;
};

// Per-query scalars (lse, dlse): (b, h, i) at data + b*batch + h*head + i*row, in the
// accumulation type (float, or double for float64 inputs).
struct LseView {
  void* data = nullptr;
  int64_t batch = 0, head = 0, row = 0;
};

struct Problem {
  ElemType dtype = ElemType::kFloat;
  int64_t batch = 0, heads = 0, head_dim = 0;
  double scale = 1.0;

  // Sequence extents.  Dense: q_rows = N and cond_rows = Nc rows per batch row, with
  // optional lengths (clamped to [0, N] / [0, Nc]).  Packed: q_rows = Tq and
  // cond_rows = Tc rows in all, sequence b owning cu[b]..cu[b+1] (clamped into the
  // tensor, lengths capped by max_q / max_cond).
  int64_t q_rows = 0, cond_rows = 0;
  int64_t max_q = 0, max_cond = 0;
  const int32_t* self_lens = nullptr;  // dense, optional
  const int32_t* cond_lens = nullptr;  // dense, optional
  const int32_t* cu_q = nullptr;       // packed: both set
  const int32_t* cu_cond = nullptr;

  RowsView q, k_cond, v_cond, k_self, v_self;
  RowsView out;  // forward: written; backward: the forward's output (read)
  LseView lse;   // forward: written; backward: read

  // Backward only.
  RowsView dout;
  LseView dlse;  // data == nullptr: no gradient flows into lse
  RowsView dq, dk_cond, dv_cond, dk_self, dv_self;
};

// Where sequence b's rows are, with lengths clamped so that no value of the length
// tensors can lead outside the inputs.  Shared by the kernels and the adapter (which
// fills the packed rows no sequence owns), so both agree on what a sequence owns.
struct Extent {
  int64_t q_start, q_len, q_owned;  // queries (= self keys): rows [q_start, q_start + q_owned), first q_len valid
  int64_t c_start, c_len, c_owned;  // cond keys
};

inline Extent extent_of(const Problem& p, int64_t b) {
  auto clamp = [](int64_t x, int64_t lo, int64_t hi) { return std::min(std::max(x, lo), hi); };
  Extent e{};
  if (p.cu_q != nullptr) {
    e.q_start = clamp(p.cu_q[b], 0, p.q_rows);
    e.q_owned = e.q_len = std::min(clamp(p.cu_q[b + 1], e.q_start, p.q_rows) - e.q_start, p.max_q);
    e.c_start = clamp(p.cu_cond[b], 0, p.cond_rows);
    e.c_owned = e.c_len = std::min(clamp(p.cu_cond[b + 1], e.c_start, p.cond_rows) - e.c_start, p.max_cond);
  } else {
    e.q_start = e.c_start = 0;
    e.q_owned = p.q_rows;
    e.c_owned = p.cond_rows;
    e.q_len = p.self_lens ? clamp(p.self_lens[b], 0, p.q_rows) : p.q_rows;
    e.c_len = p.cond_lens ? clamp(p.cond_lens[b], 0, p.cond_rows) : p.cond_rows;
  }
  return e;
}

// One entry per instruction set; sc_attention_cpu.cpp picks one at run time.
#define ENAT_DECLARE_SC_ATTN_KERNELS(ISA)  \
  namespace ISA {                          \
  void sc_attn_forward(const Problem& p);  \
  void sc_attn_backward(const Problem& p); \
  }

ENAT_DECLARE_SC_ATTN_KERNELS(DEFAULT)
#if defined(__x86_64__) || defined(_M_X64)
#if defined(__GNUC__) || defined(__clang__)
#define ENAT_HAVE_AVX2_KERNELS 1
ENAT_DECLARE_SC_ATTN_KERNELS(AVX2)
#endif
#endif

}  // namespace enat_kernels::cpu_attn
