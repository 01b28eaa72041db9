// Token routing on the CPU: mask_to_indices, gather_rows, scatter_rows.
//
// Rows are moved as raw bytes (memcpy), so one kernel serves every dtype; work is
// split over (batch x rows) with at::parallel_for.  Contract: docs/KERNEL_CONTRACT.md.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstring>

namespace enat_kernels {
namespace {

// Rows per parallel task: enough work to amortize scheduling, few enough to balance.
constexpr int64_t kGrainRows = 64;

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), name, " must be a contiguous (B, L, C) tensor");
}

void check_idx(const at::Tensor& idx, const char* name, int64_t batch) {
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 2 && idx.is_contiguous() && idx.size(0) == batch,
              name, " must be a contiguous int64 (B, N) tensor");
}

std::tuple<at::Tensor, at::Tensor> mask_to_indices_cpu(const at::Tensor& mask, int64_t count) {
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.is_contiguous(),
              "mask must be a contiguous bool (B, L) tensor");
  TORCH_CHECK(count >= 0, "count must be non-negative");
  const int64_t B = mask.size(0), L = mask.size(1);
  at::Tensor indices = at::empty({B, count}, mask.options().dtype(at::kLong));
  at::Tensor lens = at::empty({B}, mask.options().dtype(at::kInt));
  const bool* m = mask.data_ptr<bool>();
  int64_t* out = indices.data_ptr<int64_t>();
  int32_t* len = lens.data_ptr<int32_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const bool* row = m + b * L;
      int64_t* o = out + b * count;
      int64_t n = 0;
      for (int64_t p = 0; p < L && n < count; ++p) {
        if (row[p]) o[n++] = p;
      }
      len[b] = static_cast<int32_t>(n);
      for (int64_t i = n; i < count; ++i) o[i] = -1;
    }
  });
  return {indices, lens};
}

at::Tensor gather_rows_cpu(const at::Tensor& x, const at::Tensor& idx) {
  check_rows(x, "x");
  const int64_t B = x.size(0), L = x.size(1);
  check_idx(idx, "idx", B);
  const int64_t N = idx.size(1);
  at::Tensor out = at::empty({B, N, x.size(2)}, x.options());
  const int64_t row_bytes = x.size(2) * x.element_size();
  // Nothing to copy; an empty tensor's data pointer may be null, which memcpy/memset
  // must never see, even for 0 bytes.
  if (row_bytes == 0 || out.numel() == 0) return out;
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t* ix = idx.data_ptr<int64_t>();
  at::parallel_for(0, B * N, kGrainRows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / N, p = ix[r];
      if (p >= 0 && p < L) {
        std::memcpy(dst + r * row_bytes, src + (b * L + p) * row_bytes, row_bytes);
      } else {
        std::memset(dst + r * row_bytes, 0, row_bytes);
      }
    }
  });
  return out;
}

void scatter_into(char* dst, int64_t seq_len, const at::Tensor& src, const at::Tensor& idx, int64_t row_bytes) {
  const int64_t B = src.size(0), N = src.size(1);
  if (row_bytes == 0 || B * N == 0 || seq_len == 0) return;  // nothing to copy (pointers may be null)
  const char* s = static_cast<const char*>(src.data_ptr());
  const int64_t* ix = idx.data_ptr<int64_t>();
  at::parallel_for(0, B * N, kGrainRows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t b = r / N, p = ix[r];
      if (p >= 0 && p < seq_len) std::memcpy(dst + (b * seq_len + p) * row_bytes, s + r * row_bytes, row_bytes);
    }
  });
}

at::Tensor scatter_rows_cpu(const at::Tensor& a, const at::Tensor& idx_a, const std::optional<at::Tensor>& b,
                            const std::optional<at::Tensor>& idx_b, int64_t seq_len) {
  check_rows(a, "a");
  const int64_t B = a.size(0);
  check_idx(idx_a, "idx_a", B);
  TORCH_CHECK(idx_a.size(1) == a.size(1), "idx_a must have one entry per row of a");
  TORCH_CHECK(b.has_value() == idx_b.has_value(), "b and idx_b must both be given or both be None");
  at::Tensor out = at::zeros({B, seq_len, a.size(2)}, a.options());
  const int64_t row_bytes = a.size(2) * a.element_size();
  char* dst = static_cast<char*>(out.data_ptr());
  scatter_into(dst, seq_len, a, idx_a, row_bytes);
  if (b.has_value()) {
    check_rows(*b, "b");
    check_idx(*idx_b, "idx_b", B);
    TORCH_CHECK(b->scalar_type() == a.scalar_type() && b->size(0) == B && b->size(2) == a.size(2),
                "b must match a in dtype, batch and row size");
    TORCH_CHECK(idx_b->size(1) == b->size(1), "idx_b must have one entry per row of b");
    scatter_into(dst, seq_len, *b, *idx_b, row_bytes);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(enat_kernels, CPU, m) {
  m.impl("mask_to_indices", &mask_to_indices_cpu);
  m.impl("gather_rows", &gather_rows_cpu);
  m.impl("scatter_rows", &scatter_rows_cpu);
}

}  // namespace enat_kernels
