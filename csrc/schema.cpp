// Op schemas of the `enat_kernels` namespace, and the module init of enat_kernels._C.
//
// Kernels register per dispatch key elsewhere (csrc/cpu/*.cpp for CPU,
// csrc/cuda/*.cpp for CUDA); fake (meta) implementations and autograd are registered
// in Python (enat_kernels/_ops.py).  Layouts follow flash-attn: (batch, tokens, heads,
// head_dim) dense, (total_tokens, heads, head_dim) packed with int32 cu_seqlens.
// The full contract of each op is written in docs/KERNEL_CONTRACT.md.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(enat_kernels, m) {
  // SC-Attention forward.  Dense form: q/k_self/v_self (B, N, H, D), k_cond/v_cond
  // (B, Nc, H, D), optional int32 cond_lens/self_lens (B,), cu_seqlens None; returns
  // out (B, N, H, D) and float32 lse (B, H, N).  Packed form: q/k_self/v_self
  // (Tq, H, D), k_cond/v_cond (Tc, H, D), int32 cu_seqlens_q/cu_seqlens_cond (B+1,),
  // lens None; returns out (Tq, H, D) and lse (H, Tq).
  m.def(
      "sc_attn_fwd(Tensor q, Tensor k_cond, Tensor v_cond, Tensor k_self, Tensor v_self, "
      "Tensor? cond_lens, Tensor? self_lens, Tensor? cu_seqlens_q, Tensor? cu_seqlens_cond, "
      "SymInt max_seqlen_q, SymInt max_seqlen_cond, float scale) -> (Tensor out, Tensor lse)");
  // SC-Attention backward: gradients of the five inputs.  dlse (same shape as lse) is
  // the gradient flowing into the returned log-sum-exp, or None.
  m.def(
      "sc_attn_bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k_cond, Tensor v_cond, "
      "Tensor k_self, Tensor v_self, Tensor out, Tensor lse, Tensor? cond_lens, "
      "Tensor? self_lens, Tensor? cu_seqlens_q, Tensor? cu_seqlens_cond, "
      "SymInt max_seqlen_q, SymInt max_seqlen_cond, float scale) "
      "-> (Tensor dq, Tensor dk_cond, Tensor dv_cond, Tensor dk_self, Tensor dv_self)");

  // Token routing.  mask (B, L) bool -> indices (B, count) int64 of the True positions
  // in ascending order, padded with -1, and lens (B,) int32 = number of True per row
  // (clamped to count).
  m.def("mask_to_indices(Tensor mask, SymInt count) -> (Tensor indices, Tensor lens)");
  // x (B, L, C), idx (B, N) int64 -> (B, N, C); rows whose index is -1 come back zero.
  m.def("gather_rows(Tensor x, Tensor idx) -> Tensor");
  // out (B, seq_len, C) zero-filled, then out[b, idx_a[b, i]] = a[b, i] and likewise
  // for b; entries of -1 are skipped.  Indices must be unique across idx_a and idx_b.
  m.def("scatter_rows(Tensor a, Tensor idx_a, Tensor? b, Tensor? idx_b, SymInt seq_len) -> Tensor");
}

// enat_kernels._C is imported as a Python module (so a missing or ABI-incompatible
// build shows up as an ImportError with the linker's reason); it has no Python API.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
