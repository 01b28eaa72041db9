// The backward kernel: one task per (batch row, head), so that every dK, dV and dQ sum
// stays inside one task in a fixed order (deterministic without atomics); per key tile
// it recomputes the forward's probabilities from lse and accumulates the three
// gradients.  Separate from the forward: a different task split, workspace and loop
// nest over the same building blocks.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <limits>

#include "cpu/sc_attention_cpu.h"
#include "cpu/sc_attention_kernel/config.h"
#include "cpu/sc_attention_kernel/gemm.h"
#include "cpu/sc_attention_kernel/key_tiles.h"
#include "cpu/sc_attention_kernel/packing.h"
#include "cpu/sc_attention_kernel/tasks.h"
#include "cpu/sc_attention_kernel/vec_math.h"

namespace enat_kernels::cpu_attn::CPU_CAPABILITY {

template <typename acc_t>
struct BackwardWorkspace {
  // Query side of one (b, h), packed once: Qt and dOt transposed (D x Mq), Q and dO
  // as rows (Mq x Dp), per-query lse and dlse - delta, the dQ accumulator.
  Scratch<acc_t> qt, dot, q, dout, lse, c, dq;
  // Key side of one tile, and the tile's St / dPt (kKeyTile x kQueryBlock).
  Scratch<acc_t> k, v, dk, dv, st, dpt, tmp;
  Prefetcher pf;
  BackwardWorkspace(int64_t max_q, int64_t D, int64_t Dp)
      : qt(scratch_size(D, skewed<acc_t>(round_up(max_q, kQueryPad)))),
        dot(scratch_size(D, skewed<acc_t>(round_up(max_q, kQueryPad)))), q(scratch_size(max_q, Dp)),
        dout(scratch_size(max_q, Dp)), lse(round_up(max_q, kQueryPad)), c(round_up(max_q, kQueryPad)),
        dq(scratch_size(max_q, Dp)), k(scratch_size(kKeyTile, Dp)), v(scratch_size(kKeyTile, Dp)),
        dk(scratch_size(kKeyTile, Dp)), dv(scratch_size(kKeyTile, Dp)), st(kKeyTile * skewed<acc_t>(kQueryBlock)),
        dpt(kKeyTile * skewed<acc_t>(kQueryBlock)), tmp(scratch_size(at::vec::Vectorized<acc_t>::size(), Dp)) {}
};

// For a tile (nk keys x Mb queries, leading dimension ld): P = exp(S - lse) into st,
// dS = P * (dP + c) into dpt, c = dlse - delta per query.
template <typename acc_t>
inline void softmax_backward_tile(acc_t* st, acc_t* dpt, int64_t nk, int64_t Mb, int64_t ld, const acc_t* lse,
                                  const acc_t* c) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  for (int64_t j = 0; j < nk; ++j) {
    acc_t* s = st + j * ld;
    acc_t* dp = dpt + j * ld;
    for (int64_t i = 0; i < Mb; i += W) {
      const Vec pv = vexp_diff<acc_t>(Vec::loadu(s + i), Vec::loadu(lse + i));
      pv.store(s + i);
      (pv * (Vec::loadu(dp + i) + Vec::loadu(c + i))).store(dp + i);
    }
  }
}

// Queries, their output and output gradient rows, and the first key tile of task t.
template <typename scalar_t>
inline void prefetch_backward_task(Prefetcher& pf, const Problem& p, int64_t t) {
  const int64_t h = t % p.heads, b = t / p.heads;
  const SeqExtents e = seq_extents(p, b);
  if (e.self.length == 0) return;
  for (const RowsView* v : {&p.q, &p.dout, &p.out}) {
    pf.add_rows(rows_of<const scalar_t>(*v, b, h, e.self.start), 0, e.self.length, p.head_dim);
  }
  KeyTiles<scalar_t>(p, e, b, h).prefetch(pf, 0, p.head_dim);
}

template <typename scalar_t>
void backward_kernel(const Problem& p) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int64_t W = at::vec::Vectorized<acc_t>::size();
  const int64_t B = p.batch, H = p.heads, D = p.head_dim, Dp = round_up(D, W);
  const acc_t scale = static_cast<acc_t>(p.scale);
  const RowsView dk_views[2] = {p.dk_cond, p.dk_self}, dv_views[2] = {p.dv_cond, p.dv_self};

  auto task = [&](BackwardWorkspace<acc_t>& ws, int64_t t, int64_t t_next) {
    const int64_t h = t % H, b = t / H;
    const SeqExtents e = seq_extents(p, b);
    const int64_t nq = e.self.length, Mq = round_up(nq, kQueryPad), ldq = skewed<acc_t>(Mq);
    const SeqExtent key_extents[2] = {e.cond, e.self};  // in KeyTile::segment order
    Rows<scalar_t> dk_out[2], dv_out[2];
    for (int si = 0; si < 2; ++si) {
      dk_out[si] = rows_of<scalar_t>(dk_views[si], b, h, key_extents[si].start);
      dv_out[si] = rows_of<scalar_t>(dv_views[si], b, h, key_extents[si].start);
    }

    // Query side, packed once for all key tiles.
    acc_t *qt = ws.qt.get(), *dot = ws.dot.get(), *q = ws.q.get(), *dout = ws.dout.get();
    acc_t *lse = ws.lse.get(), *c = ws.c.get(), *dq = ws.dq.get();
    if (nq > 0) {
      const Rows<const scalar_t> q_rows = rows_of<const scalar_t>(p.q, b, h, e.self.start);
      const Rows<const scalar_t> do_rows = rows_of<const scalar_t>(p.dout, b, h, e.self.start);
      const Rows<const scalar_t> o_rows = rows_of<const scalar_t>(p.out, b, h, e.self.start);
      const Rows<const acc_t> lse_rows = rows_of<const acc_t>(p.lse, b, h, e.self.start);
      pack_transposed(q_rows, nq, D, Dp, ldq, scale, qt, ws.tmp.get());
      pack_transposed(do_rows, nq, D, Dp, ldq, acc_t(1), dot, ws.tmp.get());
      pack_rows(q_rows, nq, D, Dp, scale, q);
      pack_rows(do_rows, nq, D, Dp, acc_t(1), dout);
      for (int64_t i = 0; i < nq; ++i) {
        acc_t delta = 0;
        for (int64_t d = 0; d < D; ++d) delta += dout[i * Dp + d] * static_cast<acc_t>(o_rows[i][d]);
        lse[i] = *lse_rows[i];
        c[i] = (p.dlse.data ? *rows_of<const acc_t>(p.dlse, b, h, e.self.start)[i] : acc_t(0)) - delta;
      }
      // Padding queries: P = exp(S - inf) = 0, so they add nothing to dK, dV.
      std::fill(lse + nq, lse + Mq, std::numeric_limits<acc_t>::infinity());
      std::fill(c + nq, c + Mq, acc_t(0));
      std::fill(dq, dq + nq * Dp, acc_t(0));
    }

    // Key tiles (none without queries: then every key gradient is zero).
    acc_t *kt = ws.k.get(), *vt = ws.v.get(), *dk = ws.dk.get(), *dv = ws.dv.get();
    acc_t *st = ws.st.get(), *dpt = ws.dpt.get();
    const KeyTiles<scalar_t> key_tiles(p, e, b, h);
    const int64_t tiles = nq > 0 ? key_tiles.count() : 0;
    Prefetcher& pf = ws.pf;
    for (int64_t idx = 0; idx < tiles; ++idx) {
      const KeyTile<scalar_t> kv = key_tiles[idx];
      const int64_t nk = kv.nk, j0 = kv.j0;
      // While this tile computes: its gradient rows, the next tile, and at the last
      // tile the worker's next task.
      pf.add_rows(dk_out[kv.segment], j0, nk, D, /*for_write=*/true);
      pf.add_rows(dv_out[kv.segment], j0, nk, D, /*for_write=*/true);
      key_tiles.prefetch(pf, idx + 1, D);
      if (idx + 1 == tiles && t_next >= 0) prefetch_backward_task<scalar_t>(pf, p, t_next);
      pf.pace((nq + kQueryBlock - 1) / kQueryBlock *
              (2 * gemm_steps<acc_t>(nk, kQueryBlock, D) + 2 * gemm_steps<acc_t>(nk, Dp, kQueryBlock) +
               gemm_steps<acc_t>(kQueryBlock, Dp, nk)));
      pack_key_tile(kv, D, Dp, kt, vt);
      std::fill(dk, dk + nk * Dp, acc_t(0));
      std::fill(dv, dv + nk * Dp, acc_t(0));
      for (int64_t i0 = 0; i0 < nq; i0 += kQueryBlock) {
        const int64_t nb = std::min(kQueryBlock, nq - i0), Mb = round_up(nb, kQueryPad), ldb = skewed<acc_t>(Mb);
        gemm<acc_t, Init::kZero>(pf, nk, Mb, D, kt, Dp, 1, qt + i0, ldq, st, ldb);    // St = K . Qt
        gemm<acc_t, Init::kZero>(pf, nk, Mb, D, vt, Dp, 1, dot + i0, ldq, dpt, ldb);  // dPt = V . dOt
        softmax_backward_tile(st, dpt, nk, Mb, ldb, lse + i0, c + i0);
        gemm<acc_t, Init::kLoad>(pf, nk, Dp, nb, st, ldb, 1, dout + i0 * Dp, Dp, dv, Dp);  // dV += P^T dO
        gemm<acc_t, Init::kLoad>(pf, nk, Dp, nb, dpt, ldb, 1, q + i0 * Dp, Dp, dk, Dp);    // dK += dS^T (scale Q)
        gemm<acc_t, Init::kLoad>(pf, nb, Dp, nk, dpt, 1, ldb, kt, Dp, dq + i0 * Dp, Dp);   // dQ += dS K
      }
      for (int64_t j = 0; j < nk; ++j) {
        store_row(dk + j * Dp, D, acc_t(1), dk_out[kv.segment][j0 + j]);
        store_row(dv + j * Dp, D, acc_t(1), dv_out[kv.segment][j0 + j]);
      }
    }
    for (int si = 0; si < 2; ++si) {
      const int64_t written = nq > 0 ? key_extents[si].length : 0;
      zero_rows(dk_out[si], written, key_extents[si].owned, D);
      zero_rows(dv_out[si], written, key_extents[si].owned, D);
    }

    Rows<scalar_t> dq_out = rows_of<scalar_t>(p.dq, b, h, e.self.start);
    for (int64_t i = 0; i < nq; ++i) store_row(dq + i * Dp, D, scale, dq_out[i]);
    zero_rows(dq_out, nq, e.self.owned, D);
  };

  const int64_t max_q = p.cu_q ? p.max_q : p.q_rows;
  parallel_tasks(checked_mul(B, H, "sc_attention (cpu) task count"), [&] { return BackwardWorkspace<acc_t>(max_q, D, Dp); },
                 task);
}

}  // namespace enat_kernels::cpu_attn::CPU_CAPABILITY
