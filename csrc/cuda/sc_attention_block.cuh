// The prologue the SC-Attention kernels share: which sequence, head and rows a thread
// block handles, when it has nothing to compute, where its rows lie in memory, and the
// K/V tiles a query block streams with their key mask.
//
// The forward and dQ kernels are query-stationary (a block = BM queries of one
// (sequence, head)) and stream the same K/V tiles: the cond segment's, then the self
// segment's, each read from its own tensor with its own strides.  The dK/dV kernel is
// key-stationary (a block = BN keys of one segment).  These facts are written once so
// that the three kernels cannot come to disagree on them; flash-attention keeps the same
// kind of facts in one BlockInfo per block.  Every function is force-inlined and every
// struct is a handful of scalars, so after inlining they are the same registers the
// kernels would hold in locals.
//
// Like the kernel bodies, this compiles against sc_attention_primitives.cuh only, for the
// GPU and for the host emulator (sc_attention_emu/).
#pragma once
#include "cuda/sc_attention_params.h"
#include "cuda/sc_attention_primitives.cuh"

namespace enat_kernels::cuda::sca {

constexpr int kPad = 8;  // elements of padding per shared-memory row

template <class T>
SCA_DEVICE T min_(T a, T b) {
  return a < b ? a : b;
}
template <class T>
SCA_DEVICE T max_(T a, T b) {
  return a < b ? b : a;
}
SCA_DEVICE int cdiv(int a, int b) { return (a + b - 1) / b; }

// ----------------------------------------------------------------------------- sequence extents

// One sequence (batch row) in one segment.
struct SeqExtent {
  int64_t start;     // first row of the sequence in the input tensors: packed row, 0 dense
  int64_t out_row0;  // row of token 0 in the contiguous (rows, H, D) outputs / dout / out
  int length;        // valid rows, clamped into bounds
  int owned;         // output rows the sequence owns: dense max_len (padding is zeroed), packed length
};

// Sequence b of the segment described by lens (dense, nullable) or cu (packed, nullable).
// Packed offsets are clamped to [0, total] and the length to max_len, so that bad
// cu_seqlens or lengths give wrong numbers, never an access out of bounds.
SCA_DEVICE SeqExtent seq_extent(const int32_t* lens, const int32_t* cu, int b, int max_len, int64_t total) {
  SeqExtent s;
  if (cu != nullptr) {
    const int64_t lo = min_<int64_t>(max_<int64_t>(ld_global(cu + b), 0), total);
    const int64_t n = static_cast<int64_t>(ld_global(cu + b + 1)) - lo;
    const int64_t len = min_<int64_t>(min_<int64_t>(max_<int64_t>(n, 0), max_len), total - lo);
    s.start = lo;
    s.out_row0 = lo;
    s.length = static_cast<int>(len);
    s.owned = s.length;
  } else {
    s.start = 0;
    s.out_row0 = static_cast<int64_t>(b) * max_len;
    s.length = lens != nullptr ? min_(max_(ld_global(lens + b), 0), max_len) : max_len;
    s.owned = max_len;
  }
  return s;
}

// Sequence b's queries (which are also its self keys) and its cond keys.
SCA_DEVICE SeqExtent query_extent(const SeqLayout& L, int b) {
  return seq_extent(L.self_lens, L.cu_q, b, L.max_q, L.total_q);
}
SCA_DEVICE SeqExtent cond_extent(const SeqLayout& L, int b) {
  return seq_extent(L.cond_lens, L.cu_c, b, L.max_c, L.total_c);
}

// Head h of row 0 of sequence `s` in a strided input.
SCA_DEVICE const uint16_t* seq_base(const uint16_t* x, const RowStrides& st, int b, const SeqExtent& s, int h) {
  return x + b * st.batch + s.start * st.token + h * st.head;
}

// Head h of row 0 of sequence `s` in a contiguous (rows, H, D) tensor.
template <class Ptr>
SCA_DEVICE Ptr out_base(Ptr x, const SeqExtent& s, int h, int H, int D) {
  return x + (s.out_row0 * H + h) * D;
}

// Offset of row 0 of sequence b's lse (and delta, dlse) entries for head h.
SCA_DEVICE int64_t lse_base(const SeqLayout& L, int b, int h, const SeqExtent& q) {
  return L.cu_q != nullptr ? h * L.total_q + q.out_row0 : (static_cast<int64_t>(b) * L.heads + h) * L.max_q;
}

// ----------------------------------------------------------------------------- block coordinates

// The blocks of one (sequence, head) are adjacent in the one-dimensional grid, so that
// blocks reading the same K/V (or Q/dO) rows run together and hit L2:
// block = (b * heads + h) * tiles + tile.
struct BlockCoord {
  int tile, h, b;
};

SCA_DEVICE BlockCoord block_coord(int64_t block, int tiles, int heads) {
  const int tile = static_cast<int>(block % tiles);
  const int64_t bh = block / tiles;
  return {tile, static_cast<int>(bh % heads), static_cast<int>(bh / heads)};
}

// A block of the query-stationary kernels (forward, dQ): queries m0 .. m0 + BM - 1 of
// sequence b, head h.  All its predicates are block-uniform, so early exits never split
// a block before a barrier.
template <int BM>
struct QueryBlock {
  int b, h, m0;
  SeqExtent q, c;  // the sequence's queries (= self keys) and cond keys

  // False: every row of the block lies beyond the rows the sequence owns; nothing to write.
  SCA_DEVICE bool owns_rows() const { return m0 < q.owned; }
  // Only padding rows (dense form): the block writes their zeros and exits.
  SCA_DEVICE bool padding_only() const { return m0 >= q.length; }
  SCA_DEVICE int owned_end() const { return min_(m0 + BM, q.owned); }
};

template <int BM>
SCA_DEVICE QueryBlock<BM> query_block(const SeqLayout& L, int64_t block) {
  const BlockCoord bc = block_coord(block, cdiv(L.max_q, BM), L.heads);
  return {bc.b, bc.h, bc.tile * BM, query_extent(L, bc.b), cond_extent(L, bc.b)};
}

// A block of the key-stationary dK/dV kernel: keys k0 .. k0 + BN - 1 of one segment of
// sequence b, head h.  Per (sequence, head), the cond segment's key blocks come first in
// the grid, then the self segment's.
template <int BN>
struct KeyBlock {
  int b, h, k0;
  bool cond;       // the keys are cond keys (else self keys)
  SeqExtent q, k;  // the sequence's queries, and the segment the keys belong to

  SCA_DEVICE bool owns_rows() const { return k0 < k.owned; }
  // Padding keys, or no query attends to them: the gradients are zeros.
  SCA_DEVICE bool zero_gradient() const { return k0 >= k.length || q.length == 0; }
  SCA_DEVICE int owned_end() const { return min_(k0 + BN, k.owned); }
};

template <int BN>
SCA_DEVICE KeyBlock<BN> key_block(const SeqLayout& L, int64_t block) {
  const int n_cond_blocks = cdiv(L.max_c, BN);
  const BlockCoord bc = block_coord(block, n_cond_blocks + cdiv(L.max_q, BN), L.heads);
  const SeqExtent q = query_extent(L, bc.b), c = cond_extent(L, bc.b);
  const bool cond = bc.tile < n_cond_blocks;
  // k is a copy: a reference to either local would put both in local memory.
  return {bc.b, bc.h, (cond ? bc.tile : bc.tile - n_cond_blocks) * BN, cond, q, cond ? c : q};
}

// Row stride of a contiguous (rows, H, D) tensor (out, dout, the gradients).
SCA_DEVICE int64_t out_row_stride(const SeqLayout& L, int D) { return static_cast<int64_t>(L.heads) * D; }

// ----------------------------------------------------------------------------- tiles in shared memory

// cp.async rows [row0, row0 + ROWS) of a head (row i at src + i * token_stride, D
// contiguous elements) into a shared tile with row stride D + kPad.  Rows at or beyond
// `len` are zero-filled without touching global memory.  Callers ensure len >= 1 when
// row0 < len, so row 0 of the sequence is a mapped dummy source for the zero fills.
template <int ROWS, int D, int NT>
SCA_DEVICE void load_tile(uint16_t* tile, const uint16_t* src, int64_t token_stride, int row0, int len, int tid) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static_assert((ROWS * kChunks) % NT == 0, "tile chunks must split evenly over the threads");
#pragma unroll
  for (int i = 0; i < ROWS * kChunks / NT; ++i) {
    const int c = tid + i * NT;
    const int r = c / kChunks, ch = c % kChunks;
    const bool valid = row0 + r < len;
    const uint16_t* g = src + (valid ? static_cast<int64_t>(row0 + r) * token_stride : 0) + ch * 8;
    cp_async_16(tile + r * (D + kPad) + ch * 8, g, valid);
  }
}

// The BM query rows of a query block (from Q, or from a Q-shaped strided input).
template <int BM, int D, int NT>
SCA_DEVICE void load_query_tile(uint16_t* tile, const uint16_t* x, const RowStrides& st, const QueryBlock<BM>& qb,
                                int tid) {
  load_tile<BM, D, NT>(tile, seq_base(x, st, qb.b, qb.q, qb.h), st.token, qb.m0, qb.q.length, tid);
}

// Zero rows [r0, r1) of head h of a contiguous (rows, H, D) output (row 0 at `base`):
// what a block that covers only padding rows writes.
template <int D, int NT>
SCA_DEVICE void zero_rows(uint16_t* base, int64_t row_stride, int r0, int r1, int tid) {
  constexpr int kChunks = D / 8;
  const U128 zero = {{0u, 0u, 0u, 0u}};
  for (int c = tid; c < (r1 - r0) * kChunks; c += NT) {
    const int r = r0 + c / kChunks, ch = c % kChunks;
    st_global(reinterpret_cast<U128*>(base + r * row_stride + ch * 8), zero);
  }
}

// ----------------------------------------------------------------------------- K/V segments

// Row 0 (head h) of one segment's K and V inputs, their token strides and the segment's
// length: all that a K/V tile load needs.
struct KvSegment {
  const uint16_t *k, *v;
  int64_t k_stride, v_stride;
  int length;
};

// The cond (or self) segment of sequence b, head h; `s` is the segment's extent.
// Params: ScAttnFwdParams or ScAttnBwdParams.
template <class Params>
SCA_DEVICE KvSegment cond_kv(const Params& p, int b, const SeqExtent& s, int h) {
  return {seq_base(p.k_cond, p.kc_st, b, s, h), seq_base(p.v_cond, p.vc_st, b, s, h), p.kc_st.token, p.vc_st.token,
          s.length};
}
template <class Params>
SCA_DEVICE KvSegment self_kv(const Params& p, int b, const SeqExtent& s, int h) {
  return {seq_base(p.k_self, p.ks_st, b, s, h), seq_base(p.v_self, p.vs_st, b, s, h), p.ks_st.token, p.vs_st.token,
          s.length};
}

// cp.async keys [k0, k0 + ROWS) of a segment's K and V into two shared tiles (keys at or
// beyond the length zero-filled).
template <int ROWS, int D, int NT>
SCA_DEVICE void load_kv_tile(uint16_t* sK, uint16_t* sV, const KvSegment& s, int k0, int tid) {
  load_tile<ROWS, D, NT>(sK, s.k, s.k_stride, k0, s.length, tid);
  load_tile<ROWS, D, NT>(sV, s.v, s.v_stride, k0, s.length, tid);
}

// ----------------------------------------------------------------------------- accumulator positions

// Where this lane's elements of a warp's 16 x (8 * N8) fp32 accumulator lie (the C layout
// of mma.m16n8k16, sc_attention_primitives.cuh): element e of n-tile j is at row
// acc_row(e >> 1, lane) and column acc_col(j, e, lane) of the warp's tile.
SCA_DEVICE int acc_row(int half, int lane) { return (lane >> 2) + 8 * half; }
SCA_DEVICE int acc_col(int j, int e, int lane) { return j * 8 + 2 * (lane & 3) + (e & 1); }

// Keys of a tile at or beyond their segment's length take no part (the tile holds zeros
// there, which would otherwise get a finite logit).
struct KeyMask {
  int k0, length;  // first key of the tile within its segment, segment length

  SCA_DEVICE bool valid(int j, int e, int lane) const { return k0 + acc_col(j, e, lane) < length; }
};

// ----------------------------------------------------------------------------- the K/V stream of a query block

// The K/V tiles of BN keys a query block streams through one double buffer: the cond
// segment's tiles, then the self segment's.  Tile t lands in buffer t & 1 of sK and sV
// (each [2][BN][D + kPad]).
template <int BN, int D, int NT>
struct KvStream {
  KvSegment cond, self;
  int n_cond;  // tiles of the cond segment
  int count;   // all tiles; >= 1 when the block has a valid query (its own key is one)
  uint16_t *sK, *sV;

  // Selected field by field: `t < n_cond ? cond : self` would select a reference to either
  // member and put the whole stream in local memory.
  SCA_DEVICE KvSegment segment(int t) const {
    const bool c = t < n_cond;
    return {c ? cond.k : self.k, c ? cond.v : self.v, c ? cond.k_stride : self.k_stride,
            c ? cond.v_stride : self.v_stride, c ? cond.length : self.length};
  }
  SCA_DEVICE int first_key(int t) const { return (t < n_cond ? t : t - n_cond) * BN; }
  SCA_DEVICE KeyMask mask(int t) const { return {first_key(t), t < n_cond ? cond.length : self.length}; }
  SCA_DEVICE void load(int t, int tid) const {
    const int buf = t & 1;
    load_kv_tile<BN, D, NT>(sK + buf * BN * (D + kPad), sV + buf * BN * (D + kPad), segment(t), first_key(t), tid);
  }
  // At the top of iteration t: start loading tile t + 1 into the other buffer, then wait
  // until tile t (and whatever was committed with tile 0) has landed for the whole block.
  SCA_DEVICE void advance(int t, int tid) const {
    if (t + 1 < count) load(t + 1, tid);
    cp_async_commit();
    cp_async_wait<1>();
    block_sync();
  }
  SCA_DEVICE const uint16_t* k_tile(int t) const { return sK + (t & 1) * BN * (D + kPad); }
  SCA_DEVICE const uint16_t* v_tile(int t) const { return sV + (t & 1) * BN * (D + kPad); }
};

template <int BN, int D, int NT, class Params, int BM>
SCA_DEVICE KvStream<BN, D, NT> kv_stream(const Params& p, const QueryBlock<BM>& qb, uint16_t* sK, uint16_t* sV) {
  const int n_cond = cdiv(qb.c.length, BN);
  return {cond_kv(p, qb.b, qb.c, qb.h), self_kv(p, qb.b, qb.q, qb.h), n_cond, n_cond + cdiv(qb.q.length, BN), sK, sV};
}

}  // namespace enat_kernels::cuda::sca
