// SC-Attention backward kernels (dQ, then dK/dV) for head_dim 128 (float16, bfloat16).
// One file per head_dim so that ninja compiles them in parallel.
#include "cuda/sc_attention_launch.cuh"

template cudaError_t enat_kernels::cuda::sc_attn_bwd_hdim<128>(const ScAttnBwdParams&, AttnDtype, cudaStream_t);
