// The warp- and thread-level primitives the SC-Attention kernels are written in:
// tensor-core mma.sync m16n8k16, ldmatrix, cp.async, shuffles, barriers, and every
// global / shared memory access that is not a cp.async or ldmatrix.
//
// Two implementations of one interface:
// - here, for the GPU (sm_80+): inline PTX and CUDA intrinsics;
// - sc_attention_emu/emu_primitives.h, when ENAT_SC_ATTN_EMULATE is defined: a host
//   emulation (one std::thread per CUDA thread) that implements each instruction from
//   its PTX ISA description and checks bounds, alignment and shared-memory races.  The
//   kernel bodies (sc_attention_kernels.cuh) compile unchanged against either, so the
//   fragment layouts and index math are tested on machines without a GPU
//   (tests/kernels/test_cuda_sc_attention.py).
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point
// type"), with g = lane / 4, t = lane % 4, low 16 bits holding the first element:
//   A (16x16, row):  a[0] = A[g][2t..2t+1]    a[1] = A[g+8][2t..2t+1]
//                    a[2] = A[g][2t+8..2t+9]  a[3] = A[g+8][2t+8..2t+9]
//   B (16x8,  col):  b[0] = B[2t..2t+1][g]    b[1] = B[2t+8..2t+9][g]
//   C (16x8,  f32):  c[0], c[1] = C[g][2t], C[g][2t+1];  c[2], c[3] = C[g+8][2t], C[g+8][2t+1]
// ldmatrix .m8n8.x4.b16: lanes 8j..8j+7 give the row addresses of matrix j; register j
// of lane l receives row l/4, elements 2(l%4), 2(l%4)+1 of matrix j (with .trans: the
// elements [2(l%4)][l/4] and [2(l%4)+1][l/4], i.e. the transposed matrix).
#pragma once
#include <cstdint>

namespace enat_kernels::cuda::sca {

struct Fp16 {};  // element type tags: the kernels keep elements as raw 16-bit words
struct Bf16 {};

struct alignas(16) U128 {
  uint32_t w[4];
};

}  // namespace enat_kernels::cuda::sca

#if defined(ENAT_SC_ATTN_EMULATE)
#include "cuda/sc_attention_emu/emu_primitives.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define SCA_DEVICE __device__ __forceinline__

namespace enat_kernels::cuda::sca {

// ----------------------------------------------------------------------------- element conversion

// Two floats rounded to nearest-even into one 32-bit register, lo in the low 16 bits.
template <class E>
SCA_DEVICE uint32_t pack2(float lo, float hi);

template <>
SCA_DEVICE uint32_t pack2<Fp16>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <>
SCA_DEVICE uint32_t pack2<Bf16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <class E>
SCA_DEVICE float2 unpack2(uint32_t v);

template <>
SCA_DEVICE float2 unpack2<Fp16>(uint32_t v) {
  return __half22float2(*reinterpret_cast<const __half2*>(&v));
}

template <>
SCA_DEVICE float2 unpack2<Bf16>(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
}

// ----------------------------------------------------------------------------- tensor cores

// d += A (16x16) * B (16x8), fp32 accumulate.
template <class E>
SCA_DEVICE void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
SCA_DEVICE void mma_16816<Fp16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
SCA_DEVICE void mma_16816<Bf16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

SCA_DEVICE uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// Four 8x8 b16 matrices; lane l gives the address of row l % 8 of matrix l / 8.
SCA_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}

SCA_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const uint16_t* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}

// ----------------------------------------------------------------------------- async copies

// 16 bytes global -> shared, asynchronous; valid == false writes 16 zero bytes and reads
// nothing (src-size 0), src must still be a mapped address.
SCA_DEVICE void cp_async_16(uint16_t* smem, const uint16_t* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(valid ? 16 : 0)
               : "memory");
}

SCA_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Wait until at most N of this thread's committed groups are still in flight.
template <int N>
SCA_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ----------------------------------------------------------------------------- sync, shuffles, math

SCA_DEVICE void block_sync() { __syncthreads(); }

SCA_DEVICE float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }

SCA_DEVICE float fast_exp2(float x) { return exp2f(x); }  // ex2.approx under --use_fast_math; exp2(-inf) = 0
SCA_DEVICE float fast_log2(float x) { return log2f(x); }

// ----------------------------------------------------------------------------- plain memory accesses

template <class T>
SCA_DEVICE T ld_global(const T* p) {
  return *p;
}
template <class T>
SCA_DEVICE void st_global(T* p, T v) {
  *p = v;
}
template <class T>
SCA_DEVICE T ld_shared(const T* p) {
  return *p;
}
template <class T>
SCA_DEVICE void st_shared(T* p, T v) {
  *p = v;
}

}  // namespace enat_kernels::cuda::sca
#endif
