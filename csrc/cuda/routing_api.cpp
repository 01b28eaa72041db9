// Tensor adapters and CUDA dispatch-key registration of the token routing ops.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/routing.h"

namespace enat_kernels {
namespace {

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 3 && x.is_contiguous(), name, " must be a contiguous CUDA (B, L, C) tensor");
}

void check_idx(const at::Tensor& idx, const at::Tensor& like, const char* name) {
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 2 && idx.is_contiguous() && idx.size(0) == like.size(0) &&
                  idx.device() == like.device(),
              name, " must be a contiguous int64 (B, N) tensor on the tokens' device");
}

std::tuple<at::Tensor, at::Tensor> mask_to_indices_cuda(const at::Tensor& mask, int64_t count) {
  TORCH_CHECK(mask.is_cuda() && mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.is_contiguous(),
              "mask must be a contiguous bool CUDA (B, L) tensor");
  TORCH_CHECK(count >= 0, "count must be non-negative");
  const c10::cuda::CUDAGuard guard(mask.device());
  const int64_t B = mask.size(0), L = mask.size(1);
  at::Tensor indices = at::empty({B, count}, mask.options().dtype(at::kLong));
  at::Tensor lens = at::empty({B}, mask.options().dtype(at::kInt));
  C10_CUDA_CHECK(cuda::mask_to_indices(mask.data_ptr<bool>(), B, L, count, indices.data_ptr<int64_t>(),
                                       lens.data_ptr<int32_t>(), c10::cuda::getCurrentCUDAStream()));
  return {indices, lens};
}

at::Tensor gather_rows_cuda(const at::Tensor& x, const at::Tensor& idx) {
  check_rows(x, "x");
  check_idx(idx, x, "idx");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), N = idx.size(1);
  at::Tensor out = at::empty({B, N, x.size(2)}, x.options());
  C10_CUDA_CHECK(cuda::copy_rows(out.data_ptr(), x.data_ptr(), idx.data_ptr<int64_t>(), B, N, x.size(1), N,
                                 x.size(2) * x.element_size(), /*scatter=*/false, c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor scatter_rows_cuda(const at::Tensor& a, const at::Tensor& idx_a, const std::optional<at::Tensor>& b,
                             const std::optional<at::Tensor>& idx_b, int64_t seq_len) {
  check_rows(a, "a");
  check_idx(idx_a, a, "idx_a");
  TORCH_CHECK(idx_a.size(1) == a.size(1), "idx_a must have one entry per row of a");
  TORCH_CHECK(b.has_value() == idx_b.has_value(), "b and idx_b must both be given or both be None");
  const c10::cuda::CUDAGuard guard(a.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t B = a.size(0), row_bytes = a.size(2) * a.element_size();
  at::Tensor out = at::empty({B, seq_len, a.size(2)}, a.options());
  if (out.numel() > 0) C10_CUDA_CHECK(cudaMemsetAsync(out.data_ptr(), 0, out.nbytes(), stream));
  C10_CUDA_CHECK(cuda::copy_rows(out.data_ptr(), a.data_ptr(), idx_a.data_ptr<int64_t>(), B, a.size(1), a.size(1),
                                 seq_len, row_bytes, /*scatter=*/true, stream));
  if (b.has_value()) {
    check_rows(*b, "b");
    check_idx(*idx_b, *b, "idx_b");
    TORCH_CHECK(b->scalar_type() == a.scalar_type() && b->device() == a.device() && b->size(0) == B &&
                    b->size(2) == a.size(2),
                "b must match a in dtype, device, batch and row size");
    TORCH_CHECK(idx_b->size(1) == b->size(1), "idx_b must have one entry per row of b");
    C10_CUDA_CHECK(cuda::copy_rows(out.data_ptr(), b->data_ptr(), idx_b->data_ptr<int64_t>(), B, b->size(1),
                                   b->size(1), seq_len, row_bytes, /*scatter=*/true, stream));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(enat_kernels, CUDA, m) {
  m.impl("mask_to_indices", &mask_to_indices_cuda);
  m.impl("gather_rows", &gather_rows_cuda);
  m.impl("scatter_rows", &scatter_rows_cuda);
}

}  // namespace enat_kernels
