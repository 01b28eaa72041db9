// SC-Attention forward kernels for head_dim 32 (float16, bfloat16).  One file per
// head_dim so that ninja compiles them in parallel.
#include "cuda/sc_attention_launch.cuh"

template cudaError_t enat_kernels::cuda::sc_attn_fwd_hdim<32>(const ScAttnFwdParams&, AttnDtype, cudaStream_t);
