// Block-level bodies of the SC-Attention kernels (forward, backward dQ, backward dK/dV).
//
// Written against sc_attention_primitives.cuh only, so the same code compiles for the
// GPU (the __global__ wrappers in sc_attention_{fwd,bwd}*.cu) and for the host emulator
// (sc_attention_emu/), which runs it thread by thread in the tests.  Each body gets the
// block's linear index and the thread's index instead of reading blockIdx/threadIdx.
//
// Shapes: every warp owns 16 rows of the block's stationary operand (queries in the
// forward and dQ kernels, keys in the dK/dV kernel) and streams tiles of the other
// operand through shared memory.  Tiles in shared memory are row-major with rows padded
// by 8 elements (16 bytes): the 8 row addresses of every ldmatrix then fall into 8
// different 16-byte bank groups, so ldmatrix is conflict-free without swizzling.
//
// Padding: rows beyond a segment's length are zero-filled in shared memory (never read
// from global memory, where they may hold NaN), logits of keys beyond the length are set
// to -inf, and the log-sum-exp of queries beyond the length to +inf in the backward, so
// their probabilities are exactly 0.  All per-row quantities are row-local, so the rows
// that are computed on zero-filled padding are simply not stored (or stored as zeros).
#pragma once
#include "cuda/sc_attention_block.cuh"

namespace enat_kernels::cuda::sca {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = __builtin_huge_valf();

// ----------------------------------------------------------------------------- tile configurations

// Forward: 4 warps x 16 query rows, K/V tiles of BN keys, double-buffered.
template <int D_>
struct FwdCfg {
  static constexpr int D = D_, kWarps = 4, kThreads = 32 * kWarps, BM = 16 * kWarps;
  static constexpr int BN = D <= 64 ? 64 : 32;
  static constexpr int LD = D + kPad;
  static constexpr int kSmemBytes = (BM + 4 * BN) * LD * 2;  // Q, 2 x (K, V)
};

// Backward dQ: like the forward, plus the dout tile and the block's delta.
template <int D_>
struct BwdDqCfg {
  static constexpr int D = D_, kWarps = 4, kThreads = 32 * kWarps, BM = 16 * kWarps;
  static constexpr int BN = D <= 64 ? 64 : 32;
  static constexpr int LD = D + kPad;
  static constexpr int kSmemBytes = (2 * BM + 4 * BN) * LD * 2 + BM * 4;  // Q, dO, 2 x (K, V), delta
};

// Backward dK/dV: 4 warps x 16 keys, query tiles of BM rows (Q, dO, lse, delta),
// double-buffered.
template <int D_>
struct BwdDkvCfg {
  static constexpr int D = D_, kWarps = 4, kThreads = 32 * kWarps, BN = 16 * kWarps;
  static constexpr int BM = D <= 64 ? 64 : 32;
  static constexpr int LD = D + kPad;
  static constexpr int kSmemBytes = (2 * BN + 4 * BM) * LD * 2 + 4 * BM * 4;  // K, V, 2 x (Q, dO, lse, delta)
};

// ----------------------------------------------------------------------------- warp-level GEMM pieces

// A fragment of the 16x16 block at (row0, col0) of a row-major shared tile.
template <int LD>
SCA_DEVICE void load_a(uint32_t (&a)[4], const uint16_t* tile, int row0, int col0, int lane) {
  const int r = row0 + (lane & 7) + ((lane >> 3) & 1) * 8;  // matrices 0/2: rows 0-7, 1/3: rows 8-15
  const int c = col0 + (lane >> 4) * 8;                      // matrices 0/1: cols 0-7, 2/3: cols 8-15
  ldmatrix_x4(a, tile + r * LD + c);
}

// B fragments of two adjacent n-tiles when the shared tile holds B transposed (row = n,
// col = k), e.g. K for S = Q K^T.  b[0..1]: n-tile n0..n0+7, b[2..3]: n0+8..n0+15.
template <int LD>
SCA_DEVICE void load_b_nk(uint32_t (&b)[4], const uint16_t* tile, int n0, int k0, int lane) {
  const int r = n0 + (lane & 7) + (lane >> 4) * 8;  // matrices 0/1: n 0-7, 2/3: n 8-15
  const int c = k0 + ((lane >> 3) & 1) * 8;         // matrices 0/2: k 0-7, 1/3: k 8-15
  ldmatrix_x4(b, tile + r * LD + c);
}

// B fragments of two adjacent n-tiles when the shared tile holds B as is (row = k,
// col = n), e.g. V for O = P V: transposing ldmatrix.  Same register order as load_b_nk.
template <int LD>
SCA_DEVICE void load_b_kn(uint32_t (&b)[4], const uint16_t* tile, int k0, int n0, int lane) {
  const int r = k0 + (lane & 7) + ((lane >> 3) & 1) * 8;  // matrices 0/2: k 0-7, 1/3: k 8-15
  const int c = n0 + (lane >> 4) * 8;                      // matrices 0/1: n 0-7, 2/3: n 8-15
  ldmatrix_x4_trans(b, tile + r * LD + c);
}

// acc (16 x 8*N8) += A (16 x K, fragments in registers) * B, B^T in a shared tile (row = n).
template <int K, int N8, int LD, class E>
SCA_DEVICE void gemm_areg_bnk(float (&acc)[N8][4], const uint32_t (&a)[K / 16][4], const uint16_t* b_tile, int lane) {
  static_assert(N8 % 2 == 0, "n-tiles come in pairs");
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
#pragma unroll
    for (int nj = 0; nj < N8 / 2; ++nj) {
      uint32_t b[4];
      load_b_nk<LD>(b, b_tile, nj * 16, kk * 16, lane);
      mma_16816<E>(acc[2 * nj], a[kk], b[0], b[1]);
      mma_16816<E>(acc[2 * nj + 1], a[kk], b[2], b[3]);
    }
  }
}

// acc (16 x 8*N8) += A (rows a_row0.. of a shared tile, 16 x K) * B, B^T in a shared tile.
template <int K, int N8, int LD, class E>
SCA_DEVICE void gemm_asmem_bnk(float (&acc)[N8][4], const uint16_t* a_tile, int a_row0, const uint16_t* b_tile,
                               int lane) {
  static_assert(N8 % 2 == 0, "n-tiles come in pairs");
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    uint32_t a[4];
    load_a<LD>(a, a_tile, a_row0, kk * 16, lane);
#pragma unroll
    for (int nj = 0; nj < N8 / 2; ++nj) {
      uint32_t b[4];
      load_b_nk<LD>(b, b_tile, nj * 16, kk * 16, lane);
      mma_16816<E>(acc[2 * nj], a, b[0], b[1]);
      mma_16816<E>(acc[2 * nj + 1], a, b[2], b[3]);
    }
  }
}

// acc (16 x 8*N8) += A * B where A (16 x K) is a float accumulator (C layout, K/8
// n-tiles), rounded to the element type, and B (K x 8*N8) a shared tile (row = k).
// The C layout of two adjacent n-tiles is exactly the A layout of one k-step of 16.
template <int K, int N8, int LD, class E>
SCA_DEVICE void gemm_aacc_bkn(float (&acc)[N8][4], const float (&p)[K / 8][4], const uint16_t* b_tile, int lane) {
  static_assert(N8 % 2 == 0 && K % 16 == 0, "tiles come in pairs");
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    const uint32_t a[4] = {pack2<E>(p[2 * kk][0], p[2 * kk][1]), pack2<E>(p[2 * kk][2], p[2 * kk][3]),
                           pack2<E>(p[2 * kk + 1][0], p[2 * kk + 1][1]), pack2<E>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int nj = 0; nj < N8 / 2; ++nj) {
      uint32_t b[4];
      load_b_kn<LD>(b, b_tile, kk * 16, nj * 16, lane);
      mma_16816<E>(acc[2 * nj], a, b[0], b[1]);
      mma_16816<E>(acc[2 * nj + 1], a, b[2], b[3]);
    }
  }
}

template <int N8>
SCA_DEVICE void zero_acc(float (&acc)[N8][4]) {
#pragma unroll
  for (int j = 0; j < N8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
}

// Store rows of a 16 x D accumulator (this warp's rows row0 .. row0 + 15 of the block)
// times `mul` into a contiguous (rows, H, D) output; rows at or beyond `length` get
// zeros, rows at or beyond `owned` are not this sequence's and are left alone.
template <int D, class E>
SCA_DEVICE void store_acc_rows(uint16_t* base, int64_t row_stride, const float (&acc)[D / 8][4], float mul0, float mul1,
                               int row0, int length, int owned, int lane) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + acc_row(r, lane);
    if (row >= owned) continue;
    const bool valid = row < length;  // padding rows: explicit zeros, whatever was computed there
    const float mul = r == 0 ? mul0 : mul1;
    uint16_t* dst = base + row * row_stride + 2 * (lane & 3);
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      st_global(reinterpret_cast<uint32_t*>(dst + n * 8),
                valid ? pack2<E>(acc[n][2 * r] * mul, acc[n][2 * r + 1] * mul) : 0u);
  }
}

// ----------------------------------------------------------------------------- forward

template <class Cfg, class E>
SCA_DEVICE void fwd_block(const ScAttnFwdParams& p, char* smem, int64_t block, int tid) {
  constexpr int D = Cfg::D, BM = Cfg::BM, BN = Cfg::BN, LD = Cfg::LD, NT = Cfg::kThreads;
  const SeqLayout& L = p.seqs;
  const int warp = tid >> 5, lane = tid & 31;
  const QueryBlock<BM> qb = query_block<BM>(L, block);
  const int m0 = qb.m0;
  if (!qb.owns_rows()) return;
  const int64_t out_stride = out_row_stride(L, D);
  uint16_t* out = out_base(p.out, qb.q, qb.h, L.heads, D);
  float* lse = p.lse + lse_base(L, qb.b, qb.h, qb.q);
  if (qb.padding_only()) {  // zeros, lse -inf
    const int r1 = qb.owned_end();
    zero_rows<D, NT>(out, out_stride, m0, r1, tid);
    for (int r = m0 + tid; r < r1; r += NT) st_global(lse + r, -kInf);
    return;
  }

  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem);
  uint16_t* sK = sQ + BM * LD;  // [2][BN][LD]
  uint16_t* sV = sK + 2 * BN * LD;
  const KvStream<BN, D, NT> kv = kv_stream<BN, D, NT>(p, qb, sK, sV);

  load_query_tile<BM, D, NT>(sQ, p.q, p.q_st, qb, tid);
  kv.load(0, tid);
  cp_async_commit();

  const float scale_log2 = p.scale * kLog2e;
  uint32_t qf[D / 16][4];
  float o[D / 8][4];
  zero_acc(o);
  float m[2] = {-kInf, -kInf};  // running max of the scaled logits (log2 units), rows g and g + 8
  float l[2] = {0.f, 0.f};      // running sum of exp2(logit - m), this thread's columns only

  for (int t = 0; t < kv.count; ++t) {
    kv.advance(t, tid);  // tile t (and Q) landed
    if (t == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) load_a<LD>(qf[kk], sQ, warp * 16, kk * 16, lane);
    }

    float s[BN / 8][4];
    zero_acc(s);
    gemm_areg_bnk<D, BN / 8, LD, E>(s, qf, kv.k_tile(t), lane);

    const KeyMask keys = kv.mask(t);
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = keys.valid(j, e, lane) ? s[j][e] * scale_log2 : -kInf;

    // Online softmax, one row pair at a time.  A row whose keys so far are all masked
    // keeps m = -inf; m_use = 0 then makes every exp2 exactly 0 instead of NaN.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -kInf;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) mx = max_(mx, max_(s[j][2 * r], s[j][2 * r + 1]));
      mx = max_(mx, shfl_xor(mx, 1));  // the 4 lanes of a quad share a row
      mx = max_(mx, shfl_xor(mx, 2));
      const float m_new = max_(m[r], mx);
      const float m_use = m_new == -kInf ? 0.f : m_new;
      const float alpha = fast_exp2(m[r] - m_use);
      m[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        s[j][2 * r] = fast_exp2(s[j][2 * r] - m_use);
        s[j][2 * r + 1] = fast_exp2(s[j][2 * r + 1] - m_use);
        sum += s[j][2 * r] + s[j][2 * r + 1];
      }
      l[r] = l[r] * alpha + sum;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        o[n][2 * r] *= alpha;
        o[n][2 * r + 1] *= alpha;
      }
    }

    gemm_aacc_bkn<BN, D / 8, LD, E>(o, s, kv.v_tile(t), lane);
    block_sync();  // everyone is done with buffer t & 1 before it is refilled
  }

  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += shfl_xor(l[r], 1);
    l[r] += shfl_xor(l[r], 2);
    inv[r] = l[r] > 0.f ? 1.f / l[r] : 0.f;
  }
  store_acc_rows<D, E>(out, out_stride, o, inv[0], inv[1], m0 + warp * 16, qb.q.length, qb.q.owned, lane);
  if ((lane & 3) == 0) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = m0 + warp * 16 + acc_row(r, lane);
      if (row < qb.q.owned)
        st_global(lse + row, row < qb.q.length && l[r] > 0.f ? (m[r] + fast_log2(l[r])) * kLn2 : -kInf);
    }
  }
}

// ----------------------------------------------------------------------------- backward: dQ (and delta)

template <class Cfg, class E>
SCA_DEVICE void bwd_dq_block(const ScAttnBwdParams& p, char* smem, int64_t block, int tid) {
  constexpr int D = Cfg::D, BM = Cfg::BM, BN = Cfg::BN, LD = Cfg::LD, NT = Cfg::kThreads;
  const SeqLayout& L = p.seqs;
  const int warp = tid >> 5, lane = tid & 31;
  const QueryBlock<BM> qb = query_block<BM>(L, block);
  const int m0 = qb.m0;
  if (!qb.owns_rows()) return;
  const int64_t row_stride = out_row_stride(L, D);
  uint16_t* dq = out_base(p.dq, qb.q, qb.h, L.heads, D);
  if (qb.padding_only()) {
    zero_rows<D, NT>(dq, row_stride, m0, qb.owned_end(), tid);
    return;
  }
  const int64_t lse_off = lse_base(L, qb.b, qb.h, qb.q);

  uint16_t* sQ = reinterpret_cast<uint16_t*>(smem);
  uint16_t* sdO = sQ + BM * LD;
  uint16_t* sK = sdO + BM * LD;  // [2][BN][LD]
  uint16_t* sV = sK + 2 * BN * LD;
  float* sDelta = reinterpret_cast<float*>(sV + 2 * BN * LD);  // [BM]
  const KvStream<BN, D, NT> kv = kv_stream<BN, D, NT>(p, qb, sK, sV);

  load_query_tile<BM, D, NT>(sQ, p.q, p.q_st, qb, tid);
  load_tile<BM, D, NT>(sdO, out_base(p.dout, qb.q, qb.h, L.heads, D), row_stride, m0, qb.q.length, tid);
  kv.load(0, tid);
  cp_async_commit();

  const float scale_log2 = p.scale * kLog2e;
  float lse2[2] = {kInf, kInf}, dlt[2] = {0.f, 0.f};  // per row pair: lse in log2 units (+inf on padding: P = 0), delta
  float dqa[D / 8][4];
  zero_acc(dqa);

  for (int t = 0; t < kv.count; ++t) {
    kv.advance(t, tid);  // tile t (and Q, dO) landed
    if (t == 0) {
      // delta_i = sum_d dout_i * out_i - dlse_i, TPR threads per row, stored for the
      // dK/dV kernel (which runs next on the same stream) and in shared memory.
      constexpr int TPR = NT / BM;
      static_assert(NT % BM == 0 && 32 % TPR == 0 && (D / 8) % TPR == 0, "delta split");
      const int r = tid / TPR, part = tid % TPR, row = m0 + r;
      float acc = 0.f;
      if (row < qb.q.length) {
        const uint16_t* o_row = out_base(p.out, qb.q, qb.h, L.heads, D) + row * row_stride;
        for (int c = part; c < D / 8; c += TPR) {
          const U128 ov = ld_global(reinterpret_cast<const U128*>(o_row + c * 8));
          const U128 gv = ld_shared(reinterpret_cast<const U128*>(sdO + r * LD + c * 8));
#pragma unroll
          for (int w = 0; w < 4; ++w) {
            const float2 x = unpack2<E>(ov.w[w]), y = unpack2<E>(gv.w[w]);
            acc += x.x * y.x + x.y * y.y;
          }
        }
      }
#pragma unroll
      for (int off = 1; off < TPR; off <<= 1) acc += shfl_xor(acc, off);
      if (part == 0) {
        float d = 0.f;
        if (row < qb.q.length) {
          d = acc - (p.dlse != nullptr ? ld_global(p.dlse + lse_off + row) : 0.f);
          st_global(p.delta + lse_off + row, d);
        }
        st_shared(sDelta + r, d);
      }
      block_sync();
#pragma unroll
      for (int rr = 0; rr < 2; ++rr) {
        const int local = warp * 16 + acc_row(rr, lane);
        const bool valid = m0 + local < qb.q.length;
        lse2[rr] = valid ? ld_global(p.lse + lse_off + m0 + local) * kLog2e : kInf;
        dlt[rr] = ld_shared(sDelta + local);
      }
    }
    const uint16_t* cK = kv.k_tile(t);

    // P = exp2(S * scale * log2e - lse * log2e); keys beyond the segment get P = 0.
    float s[BN / 8][4];
    zero_acc(s);
    gemm_asmem_bnk<D, BN / 8, LD, E>(s, sQ, warp * 16, cK, lane);
    const KeyMask keys = kv.mask(t);
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        s[j][e] = keys.valid(j, e, lane) ? fast_exp2(s[j][e] * scale_log2 - lse2[e >> 1]) : 0.f;
    // dP = dO V^T, then dS = P * (dP - delta), kept in dp.
    float dp[BN / 8][4];
    zero_acc(dp);
    gemm_asmem_bnk<D, BN / 8, LD, E>(dp, sdO, warp * 16, kv.v_tile(t), lane);
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[j][e] = s[j][e] * (dp[j][e] - dlt[e >> 1]);
    // dQ += dS K
    gemm_aacc_bkn<BN, D / 8, LD, E>(dqa, dp, cK, lane);
    block_sync();
  }
  store_acc_rows<D, E>(dq, row_stride, dqa, p.scale, p.scale, m0 + warp * 16, qb.q.length, qb.q.owned, lane);
}

// ----------------------------------------------------------------------------- backward: dK, dV

template <class Cfg, class E>
SCA_DEVICE void bwd_dkv_block(const ScAttnBwdParams& p, char* smem, int64_t block, int tid) {
  constexpr int D = Cfg::D, BM = Cfg::BM, BN = Cfg::BN, LD = Cfg::LD, NT = Cfg::kThreads;
  const SeqLayout& L = p.seqs;
  const int warp = tid >> 5, lane = tid & 31;
  const KeyBlock<BN> kb = key_block<BN>(L, block);
  const SeqExtent& qs = kb.q;
  const int k0 = kb.k0;
  if (!kb.owns_rows()) return;
  const int64_t row_stride = out_row_stride(L, D);
  uint16_t* dk = out_base(kb.cond ? p.dk_cond : p.dk_self, kb.k, kb.h, L.heads, D);
  uint16_t* dv = out_base(kb.cond ? p.dv_cond : p.dv_self, kb.k, kb.h, L.heads, D);
  if (kb.zero_gradient()) {
    const int r1 = kb.owned_end();
    zero_rows<D, NT>(dk, row_stride, k0, r1, tid);
    zero_rows<D, NT>(dv, row_stride, k0, r1, tid);
    return;
  }
  const int64_t lse_off = lse_base(L, kb.b, kb.h, qs);

  uint16_t* sK = reinterpret_cast<uint16_t*>(smem);
  uint16_t* sV = sK + BN * LD;
  uint16_t* sQ = sV + BN * LD;      // [2][BM][LD]
  uint16_t* sdO = sQ + 2 * BM * LD;  // [2][BM][LD]
  float* sLse = reinterpret_cast<float*>(sdO + 2 * BM * LD);  // [2][BM], log2 units, +inf on padding
  float* sDelta = sLse + 2 * BM;                                // [2][BM]

  const uint16_t* q = seq_base(p.q, p.q_st, kb.b, qs, kb.h);
  const uint16_t* dout = out_base(p.dout, qs, kb.h, L.heads, D);
  auto load_q = [&](int t, int buf) {
    const int q0 = t * BM;
    load_tile<BM, D, NT>(sQ + buf * BM * LD, q, p.q_st.token, q0, qs.length, tid);
    load_tile<BM, D, NT>(sdO + buf * BM * LD, dout, row_stride, q0, qs.length, tid);
    for (int i = tid; i < BM; i += NT) {
      const bool valid = q0 + i < qs.length;
      st_shared(sLse + buf * BM + i, valid ? ld_global(p.lse + lse_off + q0 + i) * kLog2e : kInf);
      st_shared(sDelta + buf * BM + i, valid ? ld_global(p.delta + lse_off + q0 + i) : 0.f);
    }
  };

  // One load per segment, in two branches: a single load from a selected KvSegment changes
  // the register allocation (nvcc 13.0: -17 to +3 registers), which no GPU has timed.
  if (kb.cond)
    load_kv_tile<BN, D, NT>(sK, sV, cond_kv(p, kb.b, kb.k, kb.h), k0, tid);
  else
    load_kv_tile<BN, D, NT>(sK, sV, self_kv(p, kb.b, kb.k, kb.h), k0, tid);
  load_q(0, 0);
  cp_async_commit();

  const float scale_log2 = p.scale * kLog2e;
  float dka[D / 8][4], dva[D / 8][4];
  zero_acc(dka);
  zero_acc(dva);
  const int n_qtiles = cdiv(qs.length, BM);  // >= 1
  for (int t = 0; t < n_qtiles; ++t) {
    if (t + 1 < n_qtiles) load_q(t + 1, (t + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();
    block_sync();
    const uint16_t* cQ = sQ + (t & 1) * BM * LD;
    const uint16_t* cdO = sdO + (t & 1) * BM * LD;
    const float* cLse = sLse + (t & 1) * BM;
    const float* cDelta = sDelta + (t & 1) * BM;

    // P^T (this warp's 16 keys x BM queries) = exp2(K Q^T * scale * log2e - lse[query])
    float pt[BM / 8][4];
    zero_acc(pt);
    gemm_asmem_bnk<D, BM / 8, LD, E>(pt, sK, warp * 16, cQ, lane);
#pragma unroll
    for (int j = 0; j < BM / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        pt[j][e] = fast_exp2(pt[j][e] * scale_log2 - ld_shared(cLse + acc_col(j, e, lane)));
    // dV += P^T dO
    gemm_aacc_bkn<BM, D / 8, LD, E>(dva, pt, cdO, lane);
    // dS^T = P^T * (V dO^T - delta[query]), kept in dpt
    float dpt[BM / 8][4];
    zero_acc(dpt);
    gemm_asmem_bnk<D, BM / 8, LD, E>(dpt, sV, warp * 16, cdO, lane);
#pragma unroll
    for (int j = 0; j < BM / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        dpt[j][e] = pt[j][e] * (dpt[j][e] - ld_shared(cDelta + acc_col(j, e, lane)));
    // dK += dS^T Q
    gemm_aacc_bkn<BM, D / 8, LD, E>(dka, dpt, cQ, lane);
    block_sync();
  }
  store_acc_rows<D, E>(dk, row_stride, dka, p.scale, p.scale, k0 + warp * 16, kb.k.length, kb.k.owned, lane);
  store_acc_rows<D, E>(dv, row_stride, dva, 1.f, 1.f, k0 + warp * 16, kb.k.length, kb.k.owned, lane);
}

// ----------------------------------------------------------------------------- rows no sequence owns

constexpr int kUnownedRows = 16, kUnownedThreads = 128;  // rows and threads per block

// Zeros (and -inf in lse) in the unowned rows among block `block`'s kUnownedRows rows.
// Reads the two bounding offsets on the device, so the host never syncs; a block whose
// rows are all owned (nearly all of them) returns after those two loads.
SCA_DEVICE void unowned_rows_block(const UnownedRows& u, int64_t block, int tid) {
  const int64_t lo = min_<int64_t>(max_<int64_t>(ld_global(u.cu), 0), u.total);
  const int64_t hi = max_<int64_t>(min_<int64_t>(max_<int64_t>(ld_global(u.cu + u.batch), 0), u.total), lo);
  const int64_t r0 = block * kUnownedRows, r1 = min_<int64_t>(r0 + kUnownedRows, u.total);
  if (r0 >= lo && r1 <= hi) return;
  for (int64_t r = r0; r < r1; ++r) {
    if (r >= lo && r < hi) continue;
#pragma unroll
    for (int i = 0; i < 3; ++i) {
      if (u.x[i] == nullptr) continue;
      for (int64_t e = tid; e < u.row_elems; e += kUnownedThreads) st_global<uint16_t>(u.x[i] + r * u.row_elems + e, 0);
    }
    if (u.lse != nullptr)
      for (int h = tid; h < u.heads; h += kUnownedThreads) st_global(u.lse + h * u.total + r, -kInf);
  }
}

// The fill of packed q-rows (out and lse; dq, dk_self, dv_self) or cond rows (dk_cond,
// dv_cond); no rows (cu null) in the dense form.
inline UnownedRows unowned_rows(const int32_t* cu, const SeqLayout& L, int64_t total, int head_dim, uint16_t* x0,
                                uint16_t* x1, uint16_t* x2, float* lse) {
  UnownedRows u{};
  u.cu = cu;
  u.batch = L.batch;
  u.heads = L.heads;
  u.total = cu != nullptr ? total : 0;
  u.row_elems = static_cast<int64_t>(L.heads) * head_dim;
  u.x[0] = x0, u.x[1] = x1, u.x[2] = x2;
  u.lse = lse;
  return u;
}

inline int64_t unowned_rows_blocks(const UnownedRows& u) { return (u.total + kUnownedRows - 1) / kUnownedRows; }

// ----------------------------------------------------------------------------- grids

// Blocks of each kernel (one-dimensional grids; 0 means nothing to launch).
template <int D>
int64_t fwd_blocks(const SeqLayout& L) {
  return static_cast<int64_t>(L.batch) * L.heads * ((L.max_q + FwdCfg<D>::BM - 1) / FwdCfg<D>::BM);
}
template <int D>
int64_t bwd_dq_blocks(const SeqLayout& L) {
  return static_cast<int64_t>(L.batch) * L.heads * ((L.max_q + BwdDqCfg<D>::BM - 1) / BwdDqCfg<D>::BM);
}
template <int D>
int64_t bwd_dkv_blocks(const SeqLayout& L) {
  constexpr int BN = BwdDkvCfg<D>::BN;
  return static_cast<int64_t>(L.batch) * L.heads * ((L.max_c + BN - 1) / BN + (L.max_q + BN - 1) / BN);
}

}  // namespace enat_kernels::cuda::sca
