// SC-Attention for the CPU dispatch key: checks the tensors' metadata, allocates the
// outputs, describes the problem with raw pointers and strides (Problem) and runs the
// kernel compiled for the best instruction set ATen reports (AVX2, else the portable
// build; ATEN_CPU_CAPABILITY=default forces the latter).  The kernels are in
// sc_attention_kernel.h (parts in sc_attention_kernel/); the contract in
// docs/KERNEL_CONTRACT.md.
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/fill.h>
#include <ATen/ops/narrow.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/sc_attention_cpu.h"

namespace enat_kernels {
namespace {

using cpu_attn::ElemType;
using cpu_attn::LseView;
using cpu_attn::Problem;
using cpu_attn::RowsView;

ElemType elem_type(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return ElemType::kFloat;
    case at::kDouble:
      return ElemType::kDouble;
    case at::kHalf:
      return ElemType::kHalf;
    case at::kBFloat16:
      return ElemType::kBFloat16;
    default:
      TORCH_CHECK(false, "sc_attention (cpu): unsupported dtype ", t.scalar_type());
  }
}

bool use_avx2() {
#if defined(ENAT_HAVE_AVX2_KERNELS)
  static const bool avx2 = [] {
    const std::string cap = at::get_cpu_capability();
    return cap == "AVX2" || cap == "AVX512";
  }();
  return avx2;
#else
  return false;
#endif
}

void run_forward(const Problem& p) {
#if defined(ENAT_HAVE_AVX2_KERNELS)
  if (use_avx2()) return cpu_attn::AVX2::sc_attn_forward(p);
#endif
  cpu_attn::DEFAULT::sc_attn_forward(p);
}

void run_backward(const Problem& p) {
#if defined(ENAT_HAVE_AVX2_KERNELS)
  if (use_avx2()) return cpu_attn::AVX2::sc_attn_backward(p);
#endif
  cpu_attn::DEFAULT::sc_attn_backward(p);
}

// Unit stride along head_dim, which the kernels assume.  An empty tensor has no rows
// to read (the gradient of an empty sum comes as a stride-0 expand).
bool unit_stride_rows(const at::Tensor& t) { return t.numel() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1; }

// View of a dense (B, N, H, D) or packed (T, H, D) tensor.
RowsView rows_view(const at::Tensor& t) {
  RowsView v;
  v.data = t.data_ptr();
  if (t.dim() == 4) {
    v.batch = t.stride(0), v.row = t.stride(1), v.head = t.stride(2);
  } else {
    v.batch = 0, v.row = t.stride(0), v.head = t.stride(1);
  }
  return v;
}

// View of a dense (B, H, N) or packed (H, T) lse-shaped tensor.
LseView lse_view(const at::Tensor& t) {
  LseView v;
  v.data = t.data_ptr();
  if (t.dim() == 3) {
    v.batch = t.stride(0), v.head = t.stride(1), v.row = t.stride(2);
  } else {
    v.batch = 0, v.head = t.stride(0), v.row = t.stride(1);
  }
  return v;
}

const int32_t* lens_ptr(const std::optional<at::Tensor>& lens, int64_t count, const char* name) {
  if (!lens.has_value()) return nullptr;
  TORCH_CHECK(lens->scalar_type() == at::kInt && lens->dim() == 1 && lens->size(0) == count && lens->is_contiguous()
                  && lens->device().is_cpu(),
              "sc_attention (cpu): ", name, " must be a contiguous int32 CPU tensor of ", count, " entries");
  return lens->data_ptr<int32_t>();
}

// Metadata checks (the public API already made them; ops may also be called directly)
// and the shape part of the Problem.
Problem describe(const at::Tensor& q, const at::Tensor& k_cond, const at::Tensor& v_cond, const at::Tensor& k_self,
                 const at::Tensor& v_self, const std::optional<at::Tensor>& cond_lens,
                 const std::optional<at::Tensor>& self_lens, const std::optional<at::Tensor>& cu_seqlens_q,
                 const std::optional<at::Tensor>& cu_seqlens_cond, int64_t max_seqlen_q, int64_t max_seqlen_cond,
                 double scale) {
  const bool packed = q.dim() == 3;
  TORCH_CHECK(q.dim() == 4 || packed, "sc_attention (cpu): q must be (B, N, H, D) or packed (T, H, D)");
  const at::Tensor* all[] = {&q, &k_cond, &v_cond, &k_self, &v_self};
  const char* names[] = {"q", "k_cond", "v_cond", "k_self", "v_self"};
  for (int i = 0; i < 5; ++i) {
    const at::Tensor& t = *all[i];
    TORCH_CHECK(t.device().is_cpu() && t.dim() == q.dim() && t.scalar_type() == q.scalar_type(),
                "sc_attention (cpu): ", names[i], " must be a CPU tensor with q's rank and dtype");
    TORCH_CHECK(t.size(-1) == q.size(-1) && t.size(-2) == q.size(-2),
                "sc_attention (cpu): ", names[i], " must have q's heads and head_dim");
    TORCH_CHECK(unit_stride_rows(t), "sc_attention (cpu): ", names[i],
                " must have unit stride along head_dim");
  }
  TORCH_CHECK(k_self.sizes() == q.sizes() && v_self.sizes() == q.sizes(),
              "sc_attention (cpu): k_self and v_self must have q's shape");
  TORCH_CHECK(v_cond.sizes() == k_cond.sizes(), "sc_attention (cpu): v_cond must have k_cond's shape");

  TORCH_CHECK(q.size(-1) >= 1, "sc_attention (cpu): head_dim must be at least 1");

  Problem p;
  p.dtype = elem_type(q);
  p.heads = q.size(-2);
  p.head_dim = q.size(-1);
  p.scale = scale;
  if (packed) {
    TORCH_CHECK(cu_seqlens_q.has_value() && cu_seqlens_cond.has_value() && !cond_lens.has_value()
                    && !self_lens.has_value(),
                "sc_attention (cpu): the packed form takes cu_seqlens_q and cu_seqlens_cond, not lens");
    p.batch = cu_seqlens_q->numel() - 1;
    TORCH_CHECK(p.batch >= 0, "sc_attention (cpu): cu_seqlens_q must have batch + 1 entries");
    p.cu_q = lens_ptr(cu_seqlens_q, p.batch + 1, "cu_seqlens_q");
    p.cu_cond = lens_ptr(cu_seqlens_cond, p.batch + 1, "cu_seqlens_cond");
    TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_cond >= 0, "sc_attention (cpu): max_seqlen must be non-negative");
    p.q_rows = q.size(0);
    p.cond_rows = k_cond.size(0);
    // No sequence is longer than the packed rows: a larger bound (the op may be called
    // directly) would only size scratch buffers and task counts for rows that are not there.
    p.max_q = std::min(max_seqlen_q, p.q_rows);
    p.max_cond = std::min(max_seqlen_cond, p.cond_rows);
  } else {
    TORCH_CHECK(!cu_seqlens_q.has_value() && !cu_seqlens_cond.has_value(),
                "sc_attention (cpu): the dense form takes no cu_seqlens");
    p.batch = q.size(0);
    TORCH_CHECK(k_cond.size(0) == p.batch, "sc_attention (cpu): k_cond must have q's batch size");
    p.q_rows = p.max_q = q.size(1);
    p.cond_rows = p.max_cond = k_cond.size(1);
    // The bounds of dense rows are their shapes; the CUDA op sizes its grid from them and
    // refuses another value, so every backend (and the fakes) refuses it too.
    TORCH_CHECK(max_seqlen_q == p.q_rows && max_seqlen_cond == p.cond_rows,
                "sc_attention (cpu): dense inputs need max_seqlen_q = N and max_seqlen_cond = Nc");
    p.cond_lens = lens_ptr(cond_lens, p.batch, "cond_lens");
    p.self_lens = lens_ptr(self_lens, p.batch, "self_lens");
  }
  p.q = rows_view(q);
  p.k_cond = rows_view(k_cond);
  p.v_cond = rows_view(v_cond);
  p.k_self = rows_view(k_self);
  p.v_self = rows_view(v_self);
  return p;
}

// The packed rows of one segment that no sequence owns, as runs [first, end): rows
// before cu[0] and from cu[batch] on, and, with unchecked offsets, gaps between
// sequences and rows past max_seqlen.  The kernels write only owned rows; the adapter
// fills these.  Ownership is the kernels' own (seq_extents).  Built once per op (an
// O(rows) pass) and used for every tensor of that segment.
class UnownedRows {
 public:
  // Query rows (out, lse, dq, dk_self, dv_self) or cond key rows (dk_cond, dv_cond) of
  // a packed problem.
  static UnownedRows self_rows(const Problem& p) { return {p, &cpu_attn::SeqExtents::self, p.q_rows}; }
  static UnownedRows cond_rows(const Problem& p) { return {p, &cpu_attn::SeqExtents::cond, p.cond_rows}; }

  // Sets those rows of x (row_dim: the dimension that indexes the segment's rows) to value.
  void fill(at::Tensor& x, int64_t row_dim, double value) const {
    for (const auto& [first, end] : runs_) x.narrow(row_dim, first, end - first).fill_(value);
  }

 private:
  UnownedRows(const Problem& p, cpu_attn::SeqExtent cpu_attn::SeqExtents::*segment, int64_t total) {
    std::vector<uint8_t> owned(static_cast<size_t>(total), 0);
    for (int64_t b = 0; b < p.batch; ++b) {
      const cpu_attn::SeqExtent e = cpu_attn::seq_extents(p, b).*segment;
      std::fill(owned.begin() + e.start, owned.begin() + e.start + e.owned, uint8_t{1});
    }
    for (int64_t r = 0; r < total;) {
      if (owned[r]) {
        ++r;
        continue;
      }
      int64_t end = r;
      while (end < total && !owned[end]) ++end;
      runs_.emplace_back(r, end);
      r = end;
    }
  }

  std::vector<std::pair<int64_t, int64_t>> runs_;
};

at::ScalarType lse_dtype(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

std::vector<int64_t> lse_shape(const at::Tensor& q) {
  if (q.dim() == 4) return {q.size(0), q.size(2), q.size(1)};
  return {q.size(1), q.size(0)};
}

std::tuple<at::Tensor, at::Tensor> sc_attn_fwd_cpu(const at::Tensor& q, const at::Tensor& k_cond,
                                                   const at::Tensor& v_cond, const at::Tensor& k_self,
                                                   const at::Tensor& v_self, const std::optional<at::Tensor>& cond_lens,
                                                   const std::optional<at::Tensor>& self_lens,
                                                   const std::optional<at::Tensor>& cu_seqlens_q,
                                                   const std::optional<at::Tensor>& cu_seqlens_cond,
                                                   int64_t max_seqlen_q, int64_t max_seqlen_cond, double scale) {
  Problem p = describe(q, k_cond, v_cond, k_self, v_self, cond_lens, self_lens, cu_seqlens_q, cu_seqlens_cond,
                       max_seqlen_q, max_seqlen_cond, scale);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty(lse_shape(q), q.options().dtype(lse_dtype(q)));
  p.out = rows_view(out);
  p.lse = lse_view(lse);
  if (out.numel() > 0) run_forward(p);
  if (q.dim() == 3) {
    const UnownedRows unowned = UnownedRows::self_rows(p);
    unowned.fill(out, 0, 0.0);
    unowned.fill(lse, 1, -std::numeric_limits<double>::infinity());
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sc_attn_bwd_cpu(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q, const at::Tensor& k_cond,
    const at::Tensor& v_cond, const at::Tensor& k_self, const at::Tensor& v_self, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& cond_lens, const std::optional<at::Tensor>& self_lens,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_cond,
    int64_t max_seqlen_q, int64_t max_seqlen_cond, double scale) {
  Problem p = describe(q, k_cond, v_cond, k_self, v_self, cond_lens, self_lens, cu_seqlens_q, cu_seqlens_cond,
                       max_seqlen_q, max_seqlen_cond, scale);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type()
                  && out.scalar_type() == q.scalar_type() && dout.device().is_cpu() && out.device().is_cpu(),
              "sc_attention backward (cpu): dout and out must be CPU tensors shaped like q, in q's dtype");
  TORCH_CHECK(unit_stride_rows(dout) && unit_stride_rows(out),
              "sc_attention backward (cpu): dout and out must have unit stride along head_dim");
  const auto shape = lse_shape(q);
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(shape) && lse.scalar_type() == lse_dtype(q) && lse.device().is_cpu(),
              "sc_attention backward (cpu): lse must be the forward's log-sum-exp");
  at::Tensor dlse_acc;
  if (dlse.has_value()) {
    TORCH_CHECK(dlse->sizes() == at::IntArrayRef(shape) && dlse->device().is_cpu(),
                "sc_attention backward (cpu): dlse must be shaped like lse");
    dlse_acc = dlse->to(lse_dtype(q));  // any strides: read through lse_view
  }

  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk_cond = at::empty(k_cond.sizes(), k_cond.options());
  at::Tensor dv_cond = at::empty(v_cond.sizes(), v_cond.options());
  at::Tensor dk_self = at::empty(k_self.sizes(), k_self.options());
  at::Tensor dv_self = at::empty(v_self.sizes(), v_self.options());
  p.out = rows_view(out);
  p.lse = lse_view(lse);
  p.dout = rows_view(dout);
  if (dlse_acc.defined()) p.dlse = lse_view(dlse_acc);
  p.dq = rows_view(dq);
  p.dk_cond = rows_view(dk_cond);
  p.dv_cond = rows_view(dv_cond);
  p.dk_self = rows_view(dk_self);
  p.dv_self = rows_view(dv_self);
  if (p.batch > 0 && p.heads > 0 && p.head_dim > 0) run_backward(p);
  if (q.dim() == 3) {
    const UnownedRows unowned_self = UnownedRows::self_rows(p), unowned_cond = UnownedRows::cond_rows(p);
    for (at::Tensor* g : {&dq, &dk_self, &dv_self}) unowned_self.fill(*g, 0, 0.0);
    for (at::Tensor* g : {&dk_cond, &dv_cond}) unowned_cond.fill(*g, 0, 0.0);
  }
  return {dq, dk_cond, dv_cond, dk_self, dv_self};
}

}  // namespace

TORCH_LIBRARY_IMPL(enat_kernels, CPU, m) {
  m.impl("sc_attn_fwd", &sc_attn_fwd_cpu);
  m.impl("sc_attn_bwd", &sc_attn_bwd_cpu);
}

}  // namespace enat_kernels
