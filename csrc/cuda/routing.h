// Launchers of the CUDA token routing kernels (routing.cu).  Plain pointers and a
// stream, no torch headers, so routing.cu compiles quickly; routing_api.cpp adapts
// tensors and registers the ops.  Each returns the launch's cudaError_t.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

namespace enat_kernels::cuda {

// mask (B, L) bool -> indices (B, count) int64 ascending then -1, lens (B,) int32.
cudaError_t mask_to_indices(const bool* mask, int64_t B, int64_t L, int64_t count, int64_t* indices,
                            int32_t* lens, cudaStream_t stream);

// Gather (scatter = false): dst row (b, i) <- src row (b, idx[b, i]) or zeros for an
//   index outside [0, src_len).  dst has B x N rows, src B x src_len.
// Scatter (scatter = true): dst row (b, idx[b, i]) <- src row (b, i), skipping indices
//   outside [0, dst_len).  src has B x N rows, dst B x dst_len.
// Rows are row_bytes long; 16-byte words are used when row_bytes and both base
// pointers are 16-byte aligned, narrower words otherwise.
cudaError_t copy_rows(void* dst, const void* src, const int64_t* idx, int64_t B, int64_t N, int64_t src_len,
                      int64_t dst_len, int64_t row_bytes, bool scatter, cudaStream_t stream);

// Whether this build has a kernel image (machine code, or PTX the driver can compile)
// for `device`: cudaFuncGetAttributes on one kernel, with `device` current for the
// call.  cudaSuccess when it has; cudaErrorNoKernelImageForDevice (or
// cudaErrorInvalidDeviceFunction) when the arch list missed the device.  Every kernel
// of the extension is compiled with the same arch list, so one kernel answers for all.
cudaError_t probe_kernel_image(int device);

}  // namespace enat_kernels::cuda
