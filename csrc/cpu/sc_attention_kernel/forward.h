// The forward kernel: one task per (batch row, head, block of queries), an online
// softmax over the key tiles of both segments, out and lse written for every row the
// sequence owns.  Separate from the backward, which shares only the building blocks
// (packing, gemm, the key-tile walk, the exponential) and has its own task split.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstring>
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
struct ForwardWorkspace {
  Scratch<acc_t> qt, st, o, k, v, m, m_new, l, alpha, tmp;
  Prefetcher pf;
  ForwardWorkspace(int64_t D, int64_t Dp)
      : qt(scratch_size(D, skewed<acc_t>(kQueryBlock))), st(kKeyTile * skewed<acc_t>(kQueryBlock)),
        o(scratch_size(kQueryBlock, Dp)), k(scratch_size(kKeyTile, Dp)), v(scratch_size(kKeyTile, Dp)),
        m(kQueryBlock), m_new(kQueryBlock), l(kQueryBlock), alpha(kQueryBlock),
        tmp(scratch_size(at::vec::Vectorized<acc_t>::size(), Dp)) {}
};

// Online softmax over one tile of St (nk keys x Mq queries, leading dimension ld),
// given per query the running max m and the new max m_new (max of m and the tile,
// computed by the St matmul): alpha = exp(m - m_new), St <- exp(St - m_new), the
// running sum l <- alpha * l + sum of the tile, m <- m_new.
template <typename acc_t>
inline void softmax_tile(acc_t* st, int64_t nk, int64_t Mq, int64_t ld, acc_t* m, const acc_t* m_new, acc_t* l,
                         acc_t* alpha) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  for (int64_t i = 0; i < Mq; i += W) {
    const Vec mx = Vec::loadu(m_new + i);
    const Vec a = vexp_diff<acc_t>(Vec::loadu(m + i), mx);  // 0 on the first tile (m = -inf)
    Vec sum(acc_t(0));
    for (int64_t j = 0; j < nk; ++j) {
      const Vec p = vexp_diff<acc_t>(Vec::loadu(st + j * ld + i), mx);
      p.store(st + j * ld + i);
      sum = sum + p;
    }
    at::vec::fmadd(Vec::loadu(l + i), a, sum).store(l + i);
    mx.store(m + i);
    a.store(alpha + i);
  }
}

// One forward task: (b, h) and its block of query rows [r0, r1), the first nq valid.
struct ForwardTask {
  int64_t b, h, r0, r1, nq;
  SeqExtents e;
};

inline ForwardTask forward_task(const Problem& p, int64_t block, int64_t blocks, int64_t t) {
  ForwardTask f;
  f.b = t / (blocks * p.heads);
  f.h = (t / blocks) % p.heads;
  f.e = seq_extents(p, f.b);
  f.r0 = (t % blocks) * block;
  f.r1 = std::min(f.r0 + block, f.e.self.owned);
  f.nq = std::max<int64_t>(std::min(f.r1, f.e.self.length) - f.r0, 0);
  return f;
}

// Queries and first key tile of a forward task.
template <typename scalar_t>
inline void prefetch_forward_task(Prefetcher& pf, const Problem& p, const ForwardTask& f) {
  if (f.nq == 0) return;
  pf.add_rows(rows_of<const scalar_t>(p.q, f.b, f.h, f.e.self.start + f.r0), 0, f.nq, p.head_dim);
  KeyTiles<scalar_t>(p, f.e, f.b, f.h).prefetch(pf, 0, p.head_dim);
}

template <typename scalar_t>
void forward_kernel(const Problem& p) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int64_t W = at::vec::Vectorized<acc_t>::size();
  const int64_t B = p.batch, H = p.heads, D = p.head_dim, Dp = round_up(D, W);
  // Smaller query blocks when (b, h) pairs alone would leave threads idle.  The
  // result of a query does not depend on its block (its lane sees the same operations).
  int64_t block = kQueryBlock;
  auto blocks_of = [&](int64_t qb) { return round_up(p.max_q, qb) / qb; };
  const int64_t pairs = checked_mul(B, H, "sc_attention (cpu) task count");
  while (block > 2 * kQueryPad && checked_mul(pairs, blocks_of(block), "sc_attention (cpu) task count") < 2 * at::get_num_threads()) {
    block /= 2;
  }
  const int64_t blocks = blocks_of(block);
  const acc_t scale = static_cast<acc_t>(p.scale);

  auto task = [&](ForwardWorkspace<acc_t>& ws, int64_t t, int64_t t_next) {
    const ForwardTask f = forward_task(p, block, blocks, t);
    const int64_t b = f.b, h = f.h, r0 = f.r0, nq = f.nq;
    Rows<scalar_t> out = rows_of<scalar_t>(p.out, b, h, f.e.self.start);
    Rows<acc_t> lse = rows_of<acc_t>(p.lse, b, h, f.e.self.start);

    // Padded query rows: out = 0, lse = -inf.
    for (int64_t r = std::max(r0, f.e.self.length); r < f.r1; ++r) {
      std::memset(static_cast<void*>(out[r]), 0, D * sizeof(scalar_t));
      *lse[r] = -std::numeric_limits<acc_t>::infinity();
    }
    if (nq == 0) return;

    const int64_t Mq = round_up(nq, kQueryPad), ld = skewed<acc_t>(Mq);
    acc_t *qt = ws.qt.get(), *st = ws.st.get(), *o = ws.o.get(), *kt = ws.k.get(), *vt = ws.v.get();
    acc_t *m = ws.m.get(), *m_new = ws.m_new.get(), *l = ws.l.get(), *alpha = ws.alpha.get();
    pack_transposed(rows_of<const scalar_t>(p.q, b, h, f.e.self.start + r0), nq, D, Dp, ld, scale, qt, ws.tmp.get());
    std::fill(m, m + Mq, -std::numeric_limits<acc_t>::infinity());
    std::fill(l, l + Mq, acc_t(0));
    std::fill(o, o + nq * Dp, acc_t(0));

    const KeyTiles<scalar_t> key_tiles(p, f.e, b, h);
    const int64_t tiles = key_tiles.count();
    Prefetcher& pf = ws.pf;
    for (int64_t idx = 0; idx < tiles; ++idx) {
      // While this tile computes: the next tile, or at the last one the output rows
      // and the worker's next task.
      key_tiles.prefetch(pf, idx + 1, D);
      if (idx + 1 == tiles) {
        pf.add_rows(out, r0, nq, D, /*for_write=*/true);
        if (t_next >= 0) prefetch_forward_task<scalar_t>(pf, p, forward_task(p, block, blocks, t_next));
      }
      const KeyTile<scalar_t> kv = key_tiles[idx];
      const int64_t nk = kv.nk;
      pf.pace(gemm_steps<acc_t>(nk, Mq, D) + gemm_steps<acc_t>(nq, Dp, nk));
      pack_key_tile(kv, D, Dp, kt, vt);
      // St = K . Qt (nk x Mq) and its column max, then softmax, then O = alpha * O + P^T V.
      std::copy(m, m + Mq, m_new);
      gemm<acc_t, Init::kZero>(pf, nk, Mq, D, kt, Dp, 1, qt, ld, st, ld, nullptr, m_new);
      softmax_tile(st, nk, Mq, ld, m, m_new, l, alpha);
      gemm<acc_t, Init::kLoadScaled>(pf, nq, Dp, nk, st, 1, ld, vt, Dp, o, Dp, alpha);
    }

    // Every valid query sees at least its own key, so l > 0.
    for (int64_t i = 0; i < nq; ++i) {
      store_row(o + i * Dp, D, acc_t(1) / l[i], out[r0 + i]);
      *lse[r0 + i] = m[i] + std::log(l[i]);
    }
  };

  parallel_tasks(checked_mul(pairs, blocks, "sc_attention (cpu) task count"), [&] { return ForwardWorkspace<acc_t>(D, Dp); },
                 task);
}

}  // namespace enat_kernels::cpu_attn::CPU_CAPABILITY
