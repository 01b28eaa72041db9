// Launchers of the CUDA SC-Attention kernels (sc_attention_fwd*.cu, sc_attention_bwd*.cu).
// Plain pointers, strides and a stream, no torch headers, so the .cu files compile
// quickly; sc_attention_api.cpp adapts tensors and registers the ops.  The contract
// (what is computed, padding, empty cases) is docs/KERNEL_CONTRACT.md; the design,
// tiling and the compiler's resource report are in csrc/cuda/NOTES.md.
//
// Algorithm (flash-attention 2 style, tensor cores mma.sync m16n8k16, fp32 accumulate):
// - forward: one thread block per 64 query rows of one (sequence, head).  K/V tiles of
//   the cond segment, then of the self segment, each read from its own tensor, stream
//   through shared memory (cp.async, double-buffered) into one online softmax.
// - backward, two kernels, no atomics, deterministic:
//   1. dQ: query-stationary like the forward; also computes
//      delta_i = sum_d dout_i * out_i - dlse_i and stores it for kernel 2.
//   2. dK/dV: key-stationary, one block per 64-key tile of either segment, streaming
//      the query tiles (Q, dout, lse, delta).
//   Each gradient element is written by exactly one thread: no atomics, results are
//   bitwise reproducible run to run.
//
// Supported: the dtypes and head_dims listed in sc_attention_variants.h, sm_80 and newer.  Inputs need
// a 16-byte aligned base pointer and batch/token/head strides that are multiples of 8
// elements (unit stride along head_dim); the adapter copies inputs that are not.
#pragma once
#include <cuda_runtime.h>

#include "cuda/sc_attention_params.h"

namespace enat_kernels::cuda {

// Per head_dim launchers, one generated .cu file each (compiled in parallel).  Each returns the
// first failing launch's cudaError_t, cudaSuccess without launching when there is no
// work.  Stream-ordered, no host synchronization, capturable in a CUDA graph.  The
// backward launches its two kernels on `stream` in order (dQ writes delta, dK/dV reads it).
template <int D>
cudaError_t sc_attn_fwd_hdim(const ScAttnFwdParams& p, AttnDtype dtype, cudaStream_t stream);
template <int D>
cudaError_t sc_attn_bwd_hdim(const ScAttnBwdParams& p, AttnDtype dtype, cudaStream_t stream);

}  // namespace enat_kernels::cuda

// The explicit instantiation of one launcher, for the generated per-variant translation
// units (build_backend/cuda_variants.py writes them).  Declared `extern` here for every
// listed head_dim, so no other translation unit instantiates them again.
#define ENAT_SC_ATTN_FWD_INSTANCE(D)                                                       \
  template cudaError_t enat_kernels::cuda::sc_attn_fwd_hdim<D>(                            \
      const enat_kernels::cuda::ScAttnFwdParams&, enat_kernels::cuda::AttnDtype, cudaStream_t);
#define ENAT_SC_ATTN_BWD_INSTANCE(D)                                                       \
  template cudaError_t enat_kernels::cuda::sc_attn_bwd_hdim<D>(                            \
      const enat_kernels::cuda::ScAttnBwdParams&, enat_kernels::cuda::AttnDtype, cudaStream_t);
#define ENAT_SC_ATTN_X(D) extern ENAT_SC_ATTN_FWD_INSTANCE(D) extern ENAT_SC_ATTN_BWD_INSTANCE(D)
ENAT_SC_ATTN_HEAD_DIMS(ENAT_SC_ATTN_X)
#undef ENAT_SC_ATTN_X

namespace enat_kernels::cuda {

// Dispatch on head_dim (the list in sc_attention_variants.h); cudaErrorInvalidValue for
// a head_dim or dtype without kernels.
inline cudaError_t sc_attn_fwd(const ScAttnFwdParams& p, AttnDtype dtype, cudaStream_t stream) {
  return with_head_dim(p.head_dim, cudaErrorInvalidValue,
                       [&](auto d) { return sc_attn_fwd_hdim<decltype(d)::value>(p, dtype, stream); });
}

inline cudaError_t sc_attn_bwd(const ScAttnBwdParams& p, AttnDtype dtype, cudaStream_t stream) {
  return with_head_dim(p.head_dim, cudaErrorInvalidValue,
                       [&](auto d) { return sc_attn_bwd_hdim<decltype(d)::value>(p, dtype, stream); });
}

}  // namespace enat_kernels::cuda
