// The walk over the keys and values of one (batch row, head), shared by the forward
// and the backward: cond segment first, then self segment, in tiles of kKeyTile rows.
// Both passes must visit the keys in the same tiles and order (the backward recomputes
// the forward's scores), so the walk is written once, here.
#pragma once

#include <algorithm>

#include "cpu/sc_attention_cpu.h"
#include "cpu/sc_attention_kernel/config.h"
#include "cpu/sc_attention_kernel/packing.h"

namespace enat_kernels::cpu_attn::CPU_CAPABILITY {

// Tile `idx` of the keys of (b, h), counting the cond segment's tiles first.
template <typename scalar_t>
struct KeyTile {
  Rows<const scalar_t> k, v;  // first row of the tile at index 0
  int segment;                // 0: cond, 1: self
  int64_t j0, nk;             // position in its segment, rows
};

// The two key/value segments of (b, h) (0: cond, 1: self), visited in this order
// under one softmax, and their tiles.  The segments are never concatenated.
template <typename scalar_t>
class KeyTiles {
 public:
  KeyTiles(const Problem& p, const SeqExtents& e, int64_t b, int64_t h)
      : seg_{{rows_of<const scalar_t>(p.k_cond, b, h, e.cond.start), rows_of<const scalar_t>(p.v_cond, b, h, e.cond.start),
              e.cond.length},
             {rows_of<const scalar_t>(p.k_self, b, h, e.self.start), rows_of<const scalar_t>(p.v_self, b, h, e.self.start),
              e.self.length}},
        first_(tiles_of(seg_[0])),
        count_(first_ + tiles_of(seg_[1])) {}

  int64_t count() const { return count_; }

  KeyTile<scalar_t> operator[](int64_t idx) const {
    const int segment = idx < first_ ? 0 : 1;
    const Segment& s = seg_[segment];
    const int64_t j0 = (segment == 0 ? idx : idx - first_) * kKeyTile;
    return {{s.k[j0], s.k.stride}, {s.v[j0], s.v.stride}, segment, j0, std::min(kKeyTile, s.length - j0)};
  }

  // Queues the key and value rows of tile idx (nothing past the last tile).
  void prefetch(Prefetcher& pf, int64_t idx, int64_t D) const {
    if (idx >= count_) return;
    const KeyTile<scalar_t> t = (*this)[idx];
    pf.add_rows(t.k, 0, t.nk, D);
    pf.add_rows(t.v, 0, t.nk, D);
  }

 private:
  struct Segment {
    Rows<const scalar_t> k, v;
    int64_t length;
  };
  static int64_t tiles_of(const Segment& s) { return (s.length + kKeyTile - 1) / kKeyTile; }

  Segment seg_[2];
  int64_t first_, count_;  // tiles of the cond segment, of both
};

// A tile's keys and values converted into row-major (nk x Dp) blocks.
template <typename scalar_t, typename acc_t>
inline void pack_key_tile(const KeyTile<scalar_t>& kv, int64_t D, int64_t Dp, acc_t* k, acc_t* v) {
  pack_rows(kv.k, kv.nk, D, Dp, acc_t(1), k);
  pack_rows(kv.v, kv.nk, D, Dp, acc_t(1), v);
}

}  // namespace enat_kernels::cpu_attn::CPU_CAPABILITY
