// Parameters of the SC-Attention kernels: plain C++ (no CUDA or torch headers), shared
// by the launchers (sc_attention.h), the kernel bodies (sc_attention_kernels.cuh) and the
// host emulator (sc_attention_emu/).
#pragma once
#include <cstdint>

#include "cuda/sc_attention_variants.h"  // AttnDtype

namespace enat_kernels::cuda {

// Element strides of a strided input.  Packed (varlen) inputs have batch = 0.
struct RowStrides {
  int64_t batch, token, head;
};

// Which rows of which sequence are valid.  Dense form: cu_q == cu_c == nullptr, row b
// has min(self_lens[b], max_q) queries (= self keys) and min(cond_lens[b], max_c) cond
// keys (a null lens pointer means all).  Packed form: the lens are null, sequence b owns
// packed rows cu_q[b] .. cu_q[b+1] (cu_c for the cond segment), lengths clamped to
// max_q / max_c and to the totals, so bad cu_seqlens never lead out of bounds.
struct SeqLayout {
  int32_t batch, heads;
  int32_t max_q, max_c;      // N, Nc (dense) or max_seqlen_q, max_seqlen_cond (packed)
  int64_t total_q, total_c;  // packed: rows of the q / cond tensors (Tq, Tc)
  const int32_t* self_lens;
  const int32_t* cond_lens;
  const int32_t* cu_q;
  const int32_t* cu_c;
};

// Inputs and outputs of the forward.  Element pointers are float16 or bfloat16 bits.
// out: contiguous (rows, H, D); lse float32: (B, H, max_q) dense or (H, Tq) packed.
struct ScAttnFwdParams {
  SeqLayout seqs;
  int32_t head_dim;
  const uint16_t *q, *k_cond, *v_cond, *k_self, *v_self;
  RowStrides q_st, kc_st, vc_st, ks_st, vs_st;
  uint16_t* out;
  float* lse;
  float scale;
};

// Inputs and outputs of the backward.  out, dout, dq, dk_*, dv_* are contiguous
// (rows, H, D); lse, dlse (nullable) and delta (a float32 workspace) are laid out as
// the forward's lse.  dq/dk/dv come back contiguous, zero on padding rows.
struct ScAttnBwdParams {
  SeqLayout seqs;
  int32_t head_dim;
  const uint16_t *q, *k_cond, *v_cond, *k_self, *v_self;
  RowStrides q_st, kc_st, vc_st, ks_st, vs_st;
  const uint16_t *out, *dout;
  const float *lse, *dlse;
  float* delta;
  uint16_t *dq, *dk_cond, *dv_cond, *dk_self, *dv_self;
  float scale;
};

// Packed form: the rows of packed tensors that no sequence owns, before cu[0] and from
// cu[batch] on (offsets clamped to [0, total]).  They get zeros in the 16-bit tensors x[i]
// (contiguous (total, row_elems); null entries skipped) and -inf in lse ((heads, total)
// float32; nullable).  The attention kernels write only owned rows.
struct UnownedRows {
  const int32_t* cu;
  int32_t batch, heads;
  int64_t total, row_elems;
  uint16_t* x[3];
  float* lse;
};

}  // namespace enat_kernels::cuda
