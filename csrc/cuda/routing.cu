// CUDA token routing kernels.  Contract: docs/KERNEL_CONTRACT.md.
#include "cuda/routing.h"

namespace enat_kernels::cuda {
namespace {

constexpr int kScanThreads = 256;  // threads per row in mask_to_indices
constexpr int kWarps = kScanThreads / 32;

// One block per batch row.  Each pass reads kScanThreads mask entries; a warp ballot
// and a prefix over the warps' counts give every True entry its output slot, so the
// indices come out in ascending order without atomics.
__global__ void mask_to_indices_kernel(const bool* __restrict__ mask, int64_t L, int64_t count,
                                       int64_t* __restrict__ indices, int32_t* __restrict__ lens) {
  __shared__ int warp_count[kWarps];
  __shared__ int64_t base_s;
  const int64_t b = blockIdx.x;
  const bool* row = mask + b * L;
  int64_t* out = indices + b * count;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x == 0) base_s = 0;
  __syncthreads();
  for (int64_t start = 0; start < L; start += kScanThreads) {
    const int64_t p = start + threadIdx.x;
    const bool flag = p < L && row[p];
    const unsigned ballot = __ballot_sync(0xffffffffu, flag);
    if (lane == 0) warp_count[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < kWarps; ++w) {
      before += w < warp ? warp_count[w] : 0;
      total += warp_count[w];
    }
    const int64_t base = base_s;
    if (flag) {
      const int64_t slot = base + before + __popc(ballot & ((1u << lane) - 1u));
      if (slot < count) out[slot] = p;
    }
    __syncthreads();  // everyone has read base_s and warp_count
    if (threadIdx.x == 0) base_s = base + total;
    __syncthreads();
  }
  const int64_t n = base_s < count ? base_s : count;
  for (int64_t i = n + threadIdx.x; i < count; i += kScanThreads) out[i] = -1;
  if (threadIdx.x == 0) lens[b] = static_cast<int32_t>(n);
}

constexpr int kRowsPerBlock = 4;  // one warp per row

template <typename Word>
__global__ void copy_rows_kernel(Word* __restrict__ dst, const Word* __restrict__ src, const int64_t* __restrict__ idx,
                                 int64_t B, int64_t N, int64_t src_len, int64_t dst_len, int64_t row_words,
                                 bool scatter) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.y;
  if (r >= B * N) return;
  const int64_t b = r / N;
  const int64_t p = idx[r];
  if (scatter) {
    if (p < 0 || p >= dst_len) return;
    Word* d = dst + (b * dst_len + p) * row_words;
    const Word* s = src + r * row_words;
    for (int64_t w = threadIdx.x; w < row_words; w += 32) d[w] = s[w];
  } else {
    Word* d = dst + r * row_words;
    if (p < 0 || p >= src_len) {
      for (int64_t w = threadIdx.x; w < row_words; w += 32) d[w] = Word{};
      return;
    }
    const Word* s = src + (b * src_len + p) * row_words;
    for (int64_t w = threadIdx.x; w < row_words; w += 32) d[w] = s[w];
  }
}

template <typename Word>
cudaError_t launch_copy(void* dst, const void* src, const int64_t* idx, int64_t B, int64_t N, int64_t src_len,
                        int64_t dst_len, int64_t row_bytes, bool scatter, cudaStream_t stream) {
  const int64_t rows = B * N;  // <= idx.numel(): cannot overflow
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  // gridDim.x is at most 2^31 - 1: refuse rather than truncate the cast (rows left unwritten).
  if (blocks > INT32_MAX) return cudaErrorInvalidConfiguration;
  const dim3 block(32, kRowsPerBlock);
  const dim3 grid(static_cast<unsigned>(blocks));
  copy_rows_kernel<Word><<<grid, block, 0, stream>>>(static_cast<Word*>(dst), static_cast<const Word*>(src), idx, B, N,
                                                     src_len, dst_len, row_bytes / sizeof(Word), scatter);
  return cudaGetLastError();
}

bool aligned(const void* p, int64_t n) { return reinterpret_cast<uintptr_t>(p) % n == 0; }

}  // namespace

cudaError_t mask_to_indices(const bool* mask, int64_t B, int64_t L, int64_t count, int64_t* indices, int32_t* lens,
                            cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  if (B > INT32_MAX) return cudaErrorInvalidConfiguration;  // one block per row; never truncate the grid
  mask_to_indices_kernel<<<static_cast<unsigned>(B), kScanThreads, 0, stream>>>(mask, L, count, indices, lens);
  return cudaGetLastError();
}

cudaError_t copy_rows(void* dst, const void* src, const int64_t* idx, int64_t B, int64_t N, int64_t src_len,
                      int64_t dst_len, int64_t row_bytes, bool scatter, cudaStream_t stream) {
  if (B * N == 0 || row_bytes == 0) return cudaSuccess;
  // The widest word that divides the row and both base addresses.
  for (int64_t w : {16, 8, 4, 2}) {
    if (row_bytes % w == 0 && aligned(dst, w) && aligned(src, w)) {
      switch (w) {
        case 16: return launch_copy<uint4>(dst, src, idx, B, N, src_len, dst_len, row_bytes, scatter, stream);
        case 8: return launch_copy<uint2>(dst, src, idx, B, N, src_len, dst_len, row_bytes, scatter, stream);
        case 4: return launch_copy<uint32_t>(dst, src, idx, B, N, src_len, dst_len, row_bytes, scatter, stream);
        default: return launch_copy<uint16_t>(dst, src, idx, B, N, src_len, dst_len, row_bytes, scatter, stream);
      }
    }
  }
  return launch_copy<uint8_t>(dst, src, idx, B, N, src_len, dst_len, row_bytes, scatter, stream);
}

cudaError_t probe_kernel_image(int device) {
  int previous = 0;
  cudaError_t err = cudaGetDevice(&previous);
  if (err != cudaSuccess) return err;
  if (device != previous && (err = cudaSetDevice(device)) != cudaSuccess) return err;
  cudaFuncAttributes attr;
  const cudaError_t found = cudaFuncGetAttributes(&attr, mask_to_indices_kernel);
  // The error is not sticky, but it is the thread's last error: cleared, so that no
  // later launch check reports it as its own.
  if (found != cudaSuccess) cudaGetLastError();
  if (device != previous) cudaSetDevice(previous);
  return found;
}

}  // namespace enat_kernels::cuda
