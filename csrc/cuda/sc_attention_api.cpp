// Tensor adapters and CUDA dispatch-key registration of sc_attn_fwd / sc_attn_bwd.
//
// Checks the metadata the kernels rely on (TORCH_CHECK: device, dtype, ranks, shapes,
// head_dim, unit stride along head_dim, index dtypes), never the values (lengths and
// cu_seqlens are clamped in the kernels).  Allocates outputs and the backward's delta
// workspace through the caching allocator, launches on the current stream of the
// tensors' device, checks every launch.  No host synchronization, graph-capturable.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>

#include "cuda/sc_attention.h"

namespace enat_kernels {
namespace {

using cuda::AttnDtype;
using cuda::RowStrides;
using OptTensor = std::optional<at::Tensor>;

// What the inputs describe (after the checks).
struct Form {
  bool packed;
  int64_t B, H, D;
  int64_t N, Nc;    // dense: tokens of q / cond; packed: max_seqlen_q / max_seqlen_cond
  int64_t Tq, Tc;   // packed: rows of q / cond tensors
  AttnDtype dtype;
};

// The dtype key of a listed torch dtype (sc_attention_variants.h); false for any other.
bool attn_dtype(at::ScalarType t, AttnDtype* dtype) {
  switch (t) {
#define ENAT_SC_ATTN_X(key, elem, name, scalar) \
  case at::ScalarType::scalar:                  \
    *dtype = AttnDtype::key;                    \
    return true;
    ENAT_SC_ATTN_DTYPES(ENAT_SC_ATTN_X)
#undef ENAT_SC_ATTN_X
    default:
      return false;
  }
}

void check_same(const at::Tensor& x, const at::Tensor& q, const char* op, const char* name) {
  TORCH_CHECK(x.device() == q.device(), op, ": ", name, " is on ", x.device(), " but q is on ", q.device());
  TORCH_CHECK(x.scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ", x.scalar_type(), " but q has ",
              q.scalar_type());
  TORCH_CHECK(x.dim() == q.dim(), op, ": ", name, " must have ", q.dim(), " dimensions like q, got ", x.dim());
  TORCH_CHECK(x.size(-1) == q.size(-1) && x.size(-2) == q.size(-2), op, ": ", name,
              " must have q's heads and head_dim, got shape ", x.sizes());
  TORCH_CHECK(x.stride(-1) == 1 || x.size(-1) <= 1 || x.numel() == 0, op, ": ", name, " must have unit stride along head_dim");
}

void check_index(const OptTensor& t, const at::Tensor& q, int64_t size, const char* op, const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device() == q.device(), op, ": ", name, " must be on ", q.device());
  TORCH_CHECK(t->scalar_type() == at::kInt && t->dim() == 1 && t->is_contiguous(), op, ": ", name,
              " must be a contiguous int32 vector");
  TORCH_CHECK(t->size(0) == size, op, ": ", name, " must have ", size, " entries, got ", t->size(0));
}

Form check_inputs(const char* op, const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                  const at::Tensor& ks, const at::Tensor& vs, const OptTensor& cond_lens, const OptTensor& self_lens,
                  const OptTensor& cu_q, const OptTensor& cu_c, int64_t max_q, int64_t max_c) {
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor");
  Form f{};
  TORCH_CHECK(attn_dtype(q.scalar_type(), &f.dtype), op, ": the cuda backend supports ", cuda::sc_attn_dtypes_text(),
              ", got ", q.scalar_type());
  TORCH_CHECK(q.dim() == 4 || q.dim() == 3, op, ": q must be (B, N, H, D) or packed (T, H, D), got shape ",
              q.sizes());
  TORCH_CHECK(q.stride(-1) == 1 || q.size(-1) <= 1 || q.numel() == 0, op, ": q must have unit stride along head_dim");
  check_same(kc, q, op, "k_cond");
  check_same(vc, q, op, "v_cond");
  check_same(ks, q, op, "k_self");
  check_same(vs, q, op, "v_self");
  f.packed = q.dim() == 3;
  f.D = q.size(-1);
  f.H = q.size(-2);
  TORCH_CHECK(cuda::sc_attn_supported(static_cast<int>(f.D)), op, ": the cuda backend supports head_dim ",
              cuda::sc_attn_head_dims_text(), ", got ", f.D);
  TORCH_CHECK(ks.sizes() == q.sizes() && vs.sizes() == q.sizes(), op,
              ": k_self and v_self must have q's shape (the self segment is the queries' own tokens)");
  TORCH_CHECK(vc.sizes() == kc.sizes(), op, ": v_cond must have k_cond's shape");
  if (!f.packed) {
    TORCH_CHECK(!cu_q.has_value() && !cu_c.has_value(), op, ": cu_seqlens are for packed (3-d) inputs");
    f.B = q.size(0);
    f.N = q.size(1);
    f.Nc = kc.size(1);
    TORCH_CHECK(kc.size(0) == f.B, op, ": k_cond must have q's batch size");
    TORCH_CHECK(max_q == f.N && max_c == f.Nc, op, ": dense inputs need max_seqlen_q = N and max_seqlen_cond = Nc");
    check_index(self_lens, q, f.B, op, "self_lens");
    check_index(cond_lens, q, f.B, op, "cond_lens");
  } else {
    TORCH_CHECK(!cond_lens.has_value() && !self_lens.has_value(), op, ": lens are for dense (4-d) inputs");
    TORCH_CHECK(cu_q.has_value() && cu_c.has_value(), op, ": packed inputs need cu_seqlens_q and cu_seqlens_cond");
    TORCH_CHECK(cu_q->dim() == 1 && cu_q->size(0) >= 1, op, ": cu_seqlens_q must have batch + 1 >= 1 entries");
    f.B = cu_q->size(0) - 1;
    check_index(cu_q, q, f.B + 1, op, "cu_seqlens_q");
    check_index(cu_c, q, f.B + 1, op, "cu_seqlens_cond");
    f.N = max_q;
    f.Nc = max_c;
    f.Tq = q.size(0);
    f.Tc = kc.size(0);
    TORCH_CHECK(max_q >= 0 && max_c >= 0, op, ": max_seqlen_q and max_seqlen_cond must be non-negative");
  }
  TORCH_CHECK(f.B <= INT_MAX && f.H <= INT_MAX && f.N <= INT_MAX && f.Nc <= INT_MAX, op,
              ": batch, heads and sequence lengths must fit in int32");
  int major = 0;  // a host-side attribute query: no synchronization, allowed during capture
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  TORCH_CHECK(major >= 8, op, ": the cuda backend needs compute capability 8.0 or newer (mma.sync m16n8k16, ",
              "cp.async); ", q.device(), " has ", major, ".x");
  return f;
}

// The kernels move 16-byte rows: base pointer 16-byte aligned, strides of dimensions
// with more than one entry multiples of 8 elements.  Other inputs are copied.
at::Tensor rows_aligned(const at::Tensor& x) {
  if (x.numel() == 0) return x;
  bool ok = reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) ok = ok && (x.size(d) <= 1 || x.stride(d) % 8 == 0);
  if (ok) return x;
  TORCH_WARN_ONCE(
      "enat_kernels sc_attention (cuda backend): an input is not 16-byte aligned (base pointer or a stride not a "
      "multiple of 8 elements) and is copied first; views of a contiguous projection are never copied.");
  return x.clone(at::MemoryFormat::Contiguous);
}

RowStrides strides(const at::Tensor& x, bool packed) {
  if (packed) return {0, x.stride(0), x.stride(1)};
  return {x.stride(0), x.stride(1), x.stride(2)};
}

const uint16_t* ptr(const at::Tensor& x) { return static_cast<const uint16_t*>(x.data_ptr()); }
uint16_t* mut_ptr(at::Tensor& x) { return static_cast<uint16_t*>(x.data_ptr()); }
const int32_t* idx_ptr(const OptTensor& t) { return t.has_value() ? t->data_ptr<int32_t>() : nullptr; }

cuda::SeqLayout layout(const Form& f, const OptTensor& cond_lens, const OptTensor& self_lens, const OptTensor& cu_q,
                       const OptTensor& cu_c) {
  cuda::SeqLayout L{};
  L.batch = static_cast<int32_t>(f.B);
  L.heads = static_cast<int32_t>(f.H);
  L.max_q = static_cast<int32_t>(f.N);
  L.max_c = static_cast<int32_t>(f.Nc);
  L.total_q = f.Tq;
  L.total_c = f.Tc;
  L.self_lens = idx_ptr(self_lens);
  L.cond_lens = idx_ptr(cond_lens);
  L.cu_q = idx_ptr(cu_q);
  L.cu_c = idx_ptr(cu_c);
  return L;
}

// The five attention inputs as the kernels read them (rows 16-byte aligned), and the
// part of the forward and backward parameter structs that describes them.
struct Inputs {
  at::Tensor q, kc, vc, ks, vs;
  Inputs(const at::Tensor& q_, const at::Tensor& kc_, const at::Tensor& vc_, const at::Tensor& ks_,
         const at::Tensor& vs_)
      : q(rows_aligned(q_)), kc(rows_aligned(kc_)), vc(rows_aligned(vc_)), ks(rows_aligned(ks_)),
        vs(rows_aligned(vs_)) {}

  template <typename Params>  // cuda::ScAttnFwdParams or cuda::ScAttnBwdParams
  void fill(Params& p, const Form& f, const OptTensor& cond_lens, const OptTensor& self_lens, const OptTensor& cu_q,
            const OptTensor& cu_c) const {
    p.seqs = layout(f, cond_lens, self_lens, cu_q, cu_c);
    p.head_dim = static_cast<int32_t>(f.D);
    p.q = ptr(q);
    p.k_cond = ptr(kc);
    p.v_cond = ptr(vc);
    p.k_self = ptr(ks);
    p.v_self = ptr(vs);
    p.q_st = strides(q, f.packed);
    p.kc_st = strides(kc, f.packed);
    p.vc_st = strides(vc, f.packed);
    p.ks_st = strides(ks, f.packed);
    p.vs_st = strides(vs, f.packed);
  }
};

std::vector<int64_t> lse_shape(const Form& f) {
  if (f.packed) return {f.H, f.Tq};
  return {f.B, f.H, f.N};
}

std::tuple<at::Tensor, at::Tensor> sc_attn_fwd_cuda(const at::Tensor& q, const at::Tensor& k_cond,
                                                    const at::Tensor& v_cond, const at::Tensor& k_self,
                                                    const at::Tensor& v_self, const OptTensor& cond_lens,
                                                    const OptTensor& self_lens, const OptTensor& cu_seqlens_q,
                                                    const OptTensor& cu_seqlens_cond, int64_t max_seqlen_q,
                                                    int64_t max_seqlen_cond, double scale) {
  constexpr const char* op = "sc_attn_fwd (cuda)";
  const Form f = check_inputs(op, q, k_cond, v_cond, k_self, v_self, cond_lens, self_lens, cu_seqlens_q,
                              cu_seqlens_cond, max_seqlen_q, max_seqlen_cond);
  const c10::cuda::CUDAGuard guard(q.device());
  const Inputs in(q, k_cond, v_cond, k_self, v_self);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty(lse_shape(f), q.options().dtype(at::kFloat));

  cuda::ScAttnFwdParams p{};
  in.fill(p, f, cond_lens, self_lens, cu_seqlens_q, cu_seqlens_cond);
  p.out = mut_ptr(out);
  p.lse = lse.data_ptr<float>();
  p.scale = static_cast<float>(scale);
  C10_CUDA_CHECK(cuda::sc_attn_fwd(p, f.dtype, c10::cuda::getCurrentCUDAStream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sc_attn_bwd_cuda(
    const at::Tensor& dout, const OptTensor& dlse, const at::Tensor& q, const at::Tensor& k_cond,
    const at::Tensor& v_cond, const at::Tensor& k_self, const at::Tensor& v_self, const at::Tensor& out,
    const at::Tensor& lse, const OptTensor& cond_lens, const OptTensor& self_lens, const OptTensor& cu_seqlens_q,
    const OptTensor& cu_seqlens_cond, int64_t max_seqlen_q, int64_t max_seqlen_cond, double scale) {
  constexpr const char* op = "sc_attn_bwd (cuda)";
  const Form f = check_inputs(op, q, k_cond, v_cond, k_self, v_self, cond_lens, self_lens, cu_seqlens_q,
                              cu_seqlens_cond, max_seqlen_q, max_seqlen_cond);
  TORCH_CHECK(out.sizes() == q.sizes() && dout.sizes() == q.sizes(), op, ": out and dout must have q's shape");
  TORCH_CHECK(out.scalar_type() == q.scalar_type() && dout.scalar_type() == q.scalar_type(), op,
              ": out and dout must have q's dtype");
  TORCH_CHECK(out.device() == q.device() && dout.device() == q.device(), op, ": out and dout must be on q's device");
  const std::vector<int64_t> lshape = lse_shape(f);
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(lshape) && lse.scalar_type() == at::kFloat && lse.device() == q.device(),
              op, ": lse must be float32 of shape ", at::IntArrayRef(lshape), " on q's device");
  if (dlse.has_value())
    TORCH_CHECK(dlse->sizes() == at::IntArrayRef(lshape) && dlse->device() == q.device(), op,
                ": dlse must have lse's shape and device");
  const c10::cuda::CUDAGuard guard(q.device());
  const Inputs in(q, k_cond, v_cond, k_self, v_self);
  const at::Tensor out_c = rows_aligned(out.contiguous()), dout_c = rows_aligned(dout.contiguous());
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor dlse_c = dlse.has_value() ? dlse->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk_cond = at::empty(k_cond.sizes(), q.options());
  at::Tensor dv_cond = at::empty(v_cond.sizes(), q.options());
  at::Tensor dk_self = at::empty(k_self.sizes(), q.options());
  at::Tensor dv_self = at::empty(v_self.sizes(), q.options());
  at::Tensor delta = at::empty(lshape, q.options().dtype(at::kFloat));  // written by the dQ kernel

  cuda::ScAttnBwdParams p{};
  in.fill(p, f, cond_lens, self_lens, cu_seqlens_q, cu_seqlens_cond);
  p.out = ptr(out_c);
  p.dout = ptr(dout_c);
  p.lse = lse_c.data_ptr<float>();
  p.dlse = dlse.has_value() ? dlse_c.data_ptr<float>() : nullptr;
  p.delta = delta.data_ptr<float>();
  p.dq = mut_ptr(dq);
  p.dk_cond = mut_ptr(dk_cond);
  p.dv_cond = mut_ptr(dv_cond);
  p.dk_self = mut_ptr(dk_self);
  p.dv_self = mut_ptr(dv_self);
  p.scale = static_cast<float>(scale);
  C10_CUDA_CHECK(cuda::sc_attn_bwd(p, f.dtype, c10::cuda::getCurrentCUDAStream()));
  return {dq, dk_cond, dv_cond, dk_self, dv_self};
}

}  // namespace

TORCH_LIBRARY_IMPL(enat_kernels, CUDA, m) {
  m.impl("sc_attn_fwd", &sc_attn_fwd_cuda);
  m.impl("sc_attn_bwd", &sc_attn_bwd_cuda);
}

}  // namespace enat_kernels
