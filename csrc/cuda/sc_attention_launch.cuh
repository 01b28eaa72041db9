// __global__ wrappers of the SC-Attention block bodies and their launchers, included by
// one generated .cu file per (pass, head_dim) (build_backend/cuda_variants.py).
#pragma once
#include <atomic>
#include <climits>

#include "cuda/sc_attention.h"
#include "cuda/sc_attention_kernels.cuh"

namespace enat_kernels::cuda {
namespace sca {

template <class Cfg, class E>
__global__ void __launch_bounds__(Cfg::kThreads) fwd_kernel(const ScAttnFwdParams p) {
  extern __shared__ __align__(16) char smem[];
  fwd_block<Cfg, E>(p, smem, blockIdx.x, threadIdx.x);
}

template <class Cfg, class E>
__global__ void __launch_bounds__(Cfg::kThreads) bwd_dq_kernel(const ScAttnBwdParams p) {
  extern __shared__ __align__(16) char smem[];
  bwd_dq_block<Cfg, E>(p, smem, blockIdx.x, threadIdx.x);
}

template <class Cfg, class E>
__global__ void __launch_bounds__(Cfg::kThreads) bwd_dkv_kernel(const ScAttnBwdParams p) {
  extern __shared__ __align__(16) char smem[];
  bwd_dkv_block<Cfg, E>(p, smem, blockIdx.x, threadIdx.x);
}

// A template only so that every .cu file including this header may define it.
template <int kRows>
__global__ void __launch_bounds__(kUnownedThreads) unowned_rows_kernel(const UnownedRows u) {
  unowned_rows_block(u, blockIdx.x, threadIdx.x);
}

inline cudaError_t fill_unowned_rows(const UnownedRows& u, cudaStream_t stream) {
  const int64_t blocks = unowned_rows_blocks(u);
  if (blocks == 0) return cudaSuccess;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  unowned_rows_kernel<kUnownedRows><<<static_cast<unsigned>(blocks), kUnownedThreads, 0, stream>>>(u);
  return cudaGetLastError();
}

// One launch of a one-dimensional grid; nothing for an empty grid.  Dynamic shared
// memory above the default 48 KiB needs a per-kernel opt-in: set once per device (a host
// call, not stream-ordered; after the first, warm-up launch it stays out of graph captures).
// 99 KiB is the per-block opt-in limit of sm_86 / sm_89, which run the sm_80 binary.
template <class Cfg, auto Kernel, class Params>
cudaError_t launch(int64_t blocks, const Params& p, cudaStream_t stream) {
  static_assert(Cfg::kSmemBytes <= 99 * 1024, "shared memory beyond the sm_86/sm_89 limit");
  if (blocks == 0) return cudaSuccess;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  if constexpr (Cfg::kSmemBytes > 48 * 1024) {
    static std::atomic<uint64_t> opted_in{0};  // bit d: done on device d
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
    if (bit == 0 || (opted_in.load(std::memory_order_acquire) & bit) == 0) {
      err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
      if (err != cudaSuccess) return err;
      opted_in.fetch_or(bit, std::memory_order_release);
    }
  }
  Kernel<<<static_cast<unsigned>(blocks), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace sca

// The element type comes from the dtype key (sc_attention_variants.h): a dtype without
// kernels returns cudaErrorInvalidValue and launches nothing.
template <int D>
cudaError_t sc_attn_fwd_hdim(const ScAttnFwdParams& p, AttnDtype dtype, cudaStream_t stream) {
  using Cfg = sca::FwdCfg<D>;
  const int64_t blocks = sca::fwd_blocks<D>(p.seqs);
  cudaError_t err = with_dtype(dtype, cudaErrorInvalidValue, [&](auto elem) {
    using E = typename decltype(elem)::type;
    return sca::launch<Cfg, sca::fwd_kernel<Cfg, E>>(blocks, p, stream);
  });
  if (err == cudaSuccess)
    err = sca::fill_unowned_rows(sca::unowned_rows(p.seqs.cu_q, p.seqs, p.seqs.total_q, D, p.out, nullptr, nullptr, p.lse),
                                 stream);
  return err;
}

template <int D>
cudaError_t sc_attn_bwd_hdim(const ScAttnBwdParams& p, AttnDtype dtype, cudaStream_t stream) {
  using DqCfg = sca::BwdDqCfg<D>;
  using DkvCfg = sca::BwdDkvCfg<D>;
  const int64_t dq_blocks = sca::bwd_dq_blocks<D>(p.seqs), dkv_blocks = sca::bwd_dkv_blocks<D>(p.seqs);
  cudaError_t err = with_dtype(dtype, cudaErrorInvalidValue, [&](auto elem) {
    using E = typename decltype(elem)::type;
    cudaError_t e = sca::launch<DqCfg, sca::bwd_dq_kernel<DqCfg, E>>(dq_blocks, p, stream);
    if (e == cudaSuccess) e = sca::launch<DkvCfg, sca::bwd_dkv_kernel<DkvCfg, E>>(dkv_blocks, p, stream);
    return e;
  });
  const SeqLayout& L = p.seqs;
  if (err == cudaSuccess)
    err = sca::fill_unowned_rows(sca::unowned_rows(L.cu_q, L, L.total_q, D, p.dq, p.dk_self, p.dv_self, nullptr), stream);
  if (err == cudaSuccess)
    err = sca::fill_unowned_rows(sca::unowned_rows(L.cu_c, L, L.total_c, D, p.dk_cond, p.dv_cond, nullptr, nullptr),
                                 stream);
  return err;
}

}  // namespace enat_kernels::cuda
