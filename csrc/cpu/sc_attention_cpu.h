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

// Where one sequence's rows are in one segment (its queries, which are also its self
// keys, or its cond keys), with the lengths clamped so that no value of the length
// tensors can lead outside the inputs.  Shared by the kernels and the adapter (which
// fills the packed rows no sequence owns), so both agree on what a sequence owns.
struct SeqExtent {
  int64_t start;   // first row in the tensor: the packed row cu[b], or 0 in the dense form
  int64_t length;  // valid rows [start, start + length)
  int64_t owned;   // output rows [start, start + owned) the sequence writes: dense, every
                   // row of its batch row (padding included); packed, its valid rows
};

// Both segments of sequence b.
struct SeqExtents {
  SeqExtent self;  // queries, self keys and values
  SeqExtent cond;  // cond keys and values
};

// Sequence b's extent in a segment of `rows` rows per batch row (dense, with optional
// lengths) or in all (packed: cu set, sequences at most max_len long).
inline SeqExtent seq_extent(const int32_t* cu, const int32_t* lens, int64_t rows, int64_t max_len, int64_t b) {
  auto clamp = [](int64_t x, int64_t lo, int64_t hi) { return std::min(std::max(x, lo), hi); };
  if (cu != nullptr) {
    const int64_t start = clamp(cu[b], 0, rows);
    const int64_t length = std::min(clamp(cu[b + 1], start, rows) - start, max_len);
    return {start, length, length};
  }
  return {0, lens != nullptr ? clamp(lens[b], 0, rows) : rows, rows};
}

inline SeqExtents seq_extents(const Problem& p, int64_t b) {
  return {seq_extent(p.cu_q, p.self_lens, p.q_rows, p.max_q, b),
          seq_extent(p.cu_cond, p.cond_lens, p.cond_rows, p.max_cond, b)};
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
