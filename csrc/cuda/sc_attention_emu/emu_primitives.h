// Host emulation of the primitives of sc_attention_primitives.cuh, for testing the
// SC-Attention kernel bodies without a GPU (included there when ENAT_SC_ATTN_EMULATE is
// defined; built by tests/kernels/test_cuda_sc_attention.py with a plain C++ compiler).
//
// Every CUDA thread of a block is a cooperative fiber (ucontext) of one OS thread; a
// fiber runs until it waits at a barrier, so execution is deterministic.  Each
// instruction is implemented from its description in the PTX ISA, independently of how
// the kernels use it:
// - mma.sync m16n8k16: the warp's 32 lanes deposit their fragments, every lane rebuilds
//   A (16x16), B (16x8) from the documented fragment layout and computes its C entries;
// - ldmatrix (.trans): lanes deposit row addresses; each lane gathers its elements;
// - cp.async: queued per thread, the bytes land when cp.async.wait_group retires the group;
// - shuffles, __syncthreads: barriers over the warp / the block.
// It also checks what the hardware would not report: shared-memory accesses out of the
// block's allocation or misaligned, reads of shared memory never written, reads of
// cp.async data not yet waited for, read/write races between threads without a barrier
// in between, global accesses outside the registered tensors, and barriers or warp
// collectives that not all threads reach (a deadlock).  Any violation prints a message
// and exits the process with status 3.
#pragma once
#include <setjmp.h>
#include <ucontext.h>

#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#define SCA_DEVICE inline

struct float2 {
  float x, y;
};

namespace enat_kernels::cuda::sca {
namespace emu {

[[noreturn]] inline void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// Cooperative scheduling: fibers yield to the scheduler only while waiting at a barrier.
// makecontext creates a fiber's stack; switches use _setjmp/_longjmp, which (unlike
// swapcontext) do not save the signal mask with a system call.
struct Scheduler {
  jmp_buf main;
  jmp_buf* current = nullptr;  // the running fiber's saved context
  uint64_t releases = 0;       // barriers completed so far (progress, for deadlock detection)
};
inline Scheduler g_sched;

inline void yield_to_scheduler() {
  if (_setjmp(*g_sched.current) == 0) _longjmp(g_sched.main, 1);
}

struct Barrier {
  int expected = 0, arrived = 0;
  uint64_t generation = 0;
  void arrive_and_wait() {
    const uint64_t g = generation;
    if (++arrived == expected) {
      arrived = 0;
      ++generation;
      ++g_sched.releases;
      return;
    }
    while (generation == g) yield_to_scheduler();
  }
};

struct Warp {
  Barrier bar{32};
  const uint16_t* ptr[32];
  uint32_t a[32][4], b[32][2];
  float f[32];
};

// Shadow state of one 4-byte word of shared memory, for the race checks.
struct Shadow {
  static constexpr int kPending = 1 << 30;
  bool written = false, r_multi = false;
  int w_tid = -1, w_lo = -1, w_hi = -1;  // last write: thread, epochs it may land in
  int r_tid = -1, r_epoch = -1;          // last read in epoch r_epoch (r_multi: by several threads)
};

struct Block {
  int64_t id = 0;
  int nthreads = 0;
  Barrier bar;
  std::unique_ptr<Warp[]> warps;
  char* smem = nullptr;
  size_t smem_bytes = 0;
  std::vector<Shadow> shadow;
};

struct PendingCopy {
  uint16_t* dst;
  const uint16_t* src;
  bool valid;
};

struct Thread {
  Block* blk;
  Warp* warp;
  int tid, lane;
  int epoch = 0;  // barriers passed: equal across the block between two barriers
  std::vector<PendingCopy> open;  // issued, not committed
  std::vector<std::vector<PendingCopy>> groups;  // committed, oldest first
};

inline thread_local Thread* tls = nullptr;

// Global memory the kernel may touch: the tensors the runner registered.
struct Range {
  const char* lo;
  size_t bytes;
  bool writable;
  const char* name;
};
inline std::vector<Range> g_ranges;

inline void fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  if (tls != nullptr) std::fprintf(stderr, "[block %lld thread %d] ", (long long)tls->blk->id, tls->tid);
  std::vfprintf(stderr, fmt, ap);
  std::fputc('\n', stderr);
  va_end(ap);
  std::fflush(stderr);
  std::_Exit(3);
}

inline void check_global(const void* p, size_t bytes, bool write, const char* what) {
  const char* c = static_cast<const char*>(p);
  if (reinterpret_cast<uintptr_t>(p) % (bytes >= 16 ? 16 : bytes) != 0) fail("%s: misaligned global address", what);
  for (const Range& r : g_ranges)
    if (c >= r.lo && c + bytes <= r.lo + r.bytes) {
      if (write && !r.writable) fail("%s: write into input tensor %s", what, r.name);
      return;
    }
  fail("%s: global %s of %zu bytes at %p is outside every tensor", what, write ? "write" : "read", bytes, p);
}

inline size_t smem_word(const void* p, size_t bytes, size_t align, const char* what) {
  Block& B = *tls->blk;
  const char* c = static_cast<const char*>(p);
  if (c < B.smem || c + bytes > B.smem + B.smem_bytes)
    fail("%s: shared access [%td, %td) outside the block's %zu bytes", what, c - B.smem, c + bytes - B.smem,
         B.smem_bytes);
  if ((c - B.smem) % align != 0) fail("%s: shared address %td not %zu-byte aligned", what, c - B.smem, align);
  return static_cast<size_t>(c - B.smem) / 4;
}

inline void on_read(const void* p, size_t bytes, size_t align, const char* what) {
  Thread& T = *tls;
  const size_t w0 = smem_word(p, bytes, align, what);
  for (size_t w = w0; w < w0 + (bytes + 3) / 4; ++w) {
    Shadow& s = T.blk->shadow[w];
    if (!s.written) fail("%s: reads shared word %zu that was never written", what, w);
    if (s.w_hi == Shadow::kPending) fail("%s: reads shared word %zu before its cp.async was waited for", what, w);
    if (s.w_tid != T.tid && s.w_lo <= T.epoch && T.epoch <= s.w_hi)
      fail("%s: race on shared word %zu: written by thread %d without a barrier before this read", what, w, s.w_tid);
    if (s.r_epoch == T.epoch) {
      if (s.r_tid != T.tid) s.r_multi = true;
    } else {
      s.r_epoch = T.epoch;
      s.r_tid = T.tid;
      s.r_multi = false;
    }
  }
}

inline void on_write(const void* p, size_t bytes, size_t align, bool pending, const char* what) {
  Thread& T = *tls;
  const size_t w0 = smem_word(p, bytes, align, what);
  for (size_t w = w0; w < w0 + bytes / 4; ++w) {
    Shadow& s = T.blk->shadow[w];
    if (s.r_epoch == T.epoch && (s.r_multi || s.r_tid != T.tid))
      fail("%s: race on shared word %zu: read by thread %d without a barrier before this write", what, w, s.r_tid);
    if (s.written && s.w_hi == Shadow::kPending) fail("%s: overwrites shared word %zu of a pending cp.async", what, w);
    if (s.written && s.w_tid != T.tid && s.w_hi >= T.epoch)
      fail("%s: race on shared word %zu: also written by thread %d without a barrier", what, w, s.w_tid);
    s.written = true;
    s.w_tid = T.tid;
    s.w_lo = T.epoch;
    s.w_hi = pending ? Shadow::kPending : T.epoch;
  }
}

// ----------------------------------------------------------------------------- number formats

inline uint32_t f2u(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float u2f(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE binary16, round to nearest even.
inline uint16_t float_to_half(float f) {
  uint32_t x = f2u(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7FFFFFFFu;
  if (x >= 0x7F800000u) return static_cast<uint16_t>(sign | (x > 0x7F800000u ? 0x7E00u : 0x7C00u));
  if (x >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 rounds to inf
  if (x < 0x38800000u) {  // below 2^-14: subnormal, in units of 2^-24 (exact scaling, RNE rint)
    const uint32_t r = static_cast<uint32_t>(std::nearbyint(u2f(x) * 16777216.0f));
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t h = ((((x >> 23) - 127 + 15) << 10) | ((x & 0x7FFFFFu) >> 13));
  const uint32_t rem = x & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return static_cast<uint16_t>(sign | h);
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
  if (e == 0) return u2f(sign) + (sign ? -1.f : 1.f) * static_cast<float>(m) * (1.f / 16777216.f);
  if (e == 31) return u2f(sign | 0x7F800000u | (m << 13));
  return u2f(sign | ((e + 112) << 23) | (m << 13));
}

inline uint16_t float_to_bf16(float f) {
  const uint32_t x = f2u(f);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);
}

inline float bf16_to_float(uint16_t h) { return u2f(static_cast<uint32_t>(h) << 16); }

template <class E>
float to_float(uint16_t h);
template <>
inline float to_float<Fp16>(uint16_t h) {
  return half_to_float(h);
}
template <>
inline float to_float<Bf16>(uint16_t h) {
  return bf16_to_float(h);
}
template <class E>
uint16_t from_float(float f);
template <>
inline uint16_t from_float<Fp16>(float f) {
  return float_to_half(f);
}
template <>
inline uint16_t from_float<Bf16>(float f) {
  return float_to_bf16(f);
}

}  // namespace emu

// ----------------------------------------------------------------------------- the primitives

template <class E>
inline uint32_t pack2(float lo, float hi) {
  return static_cast<uint32_t>(emu::from_float<E>(lo)) | (static_cast<uint32_t>(emu::from_float<E>(hi)) << 16);
}

template <class E>
inline float2 unpack2(uint32_t v) {
  return {emu::to_float<E>(static_cast<uint16_t>(v & 0xFFFFu)), emu::to_float<E>(static_cast<uint16_t>(v >> 16))};
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, d += A * B.
template <class E>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::Thread& T = *emu::tls;
  emu::Warp& W = *T.warp;
  const int lane = T.lane;
  for (int i = 0; i < 4; ++i) W.a[lane][i] = a[i];
  W.b[lane][0] = b0;
  W.b[lane][1] = b1;
  W.bar.arrive_and_wait();
  // PTX ISA: A element (row, col) is a_i of lane groupID * 4 + threadID_in_group with
  // row = groupID (+8 for a2,a3,a6,a7), col = 2 * threadID_in_group + (i & 1) (+8 for i >= 4);
  // a_{2j}, a_{2j+1} share register j, a_{2j} in the low half.
  auto A = [&](int r, int k) {
    const uint32_t reg = W.a[(r % 8) * 4 + (k % 8) / 2][(r >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
    return emu::to_float<E>(static_cast<uint16_t>(k % 2 ? reg >> 16 : reg & 0xFFFFu));
  };
  // B element (row k, col n) is b_i of lane n * 4 + threadID_in_group with
  // k = 2 * threadID_in_group + (i & 1) (+8 for b2, b3).
  auto B = [&](int k, int n) {
    const uint32_t reg = W.b[n * 4 + (k % 8) / 2][k >= 8 ? 1 : 0];
    return emu::to_float<E>(static_cast<uint16_t>(k % 2 ? reg >> 16 : reg & 0xFFFFu));
  };
  const int g = lane >> 2, t = lane & 3;
  float out[4];
  for (int i = 0; i < 4; ++i) {  // C: row = groupID (+8 for c2, c3), col = 2 * threadID_in_group + (i & 1)
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    double acc = 0.0;
    for (int k = 0; k < 16; ++k) acc += static_cast<double>(A(row, k)) * B(k, col);
    out[i] = static_cast<float>(static_cast<double>(d[i]) + acc);
  }
  W.bar.arrive_and_wait();  // everyone has read the fragments before they are overwritten
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lanes 8j..8j+7 give the rows of matrix j.
inline void ldmatrix_impl(uint32_t (&r)[4], const uint16_t* row, bool trans) {
  emu::Thread& T = *emu::tls;
  emu::Warp& W = *T.warp;
  const int lane = T.lane;
  emu::smem_word(row, 16, 16, "ldmatrix row address");
  W.ptr[lane] = row;
  W.bar.arrive_and_wait();
  for (int j = 0; j < 4; ++j) {
    if (!trans) {  // lane l: row l / 4, elements 2 (l % 4), 2 (l % 4) + 1
      const uint16_t* p = W.ptr[8 * j + lane / 4] + 2 * (lane % 4);
      emu::on_read(p, 4, 4, "ldmatrix");
      std::memcpy(&r[j], p, 4);
    } else {  // lane l: elements [2 (l % 4)][l / 4] and [2 (l % 4) + 1][l / 4]
      const uint16_t* p0 = W.ptr[8 * j + 2 * (lane % 4)] + lane / 4;
      const uint16_t* p1 = W.ptr[8 * j + 2 * (lane % 4) + 1] + lane / 4;
      emu::on_read(p0, 2, 2, "ldmatrix.trans");
      emu::on_read(p1, 2, 2, "ldmatrix.trans");
      r[j] = static_cast<uint32_t>(*p0) | (static_cast<uint32_t>(*p1) << 16);
    }
  }
  W.bar.arrive_and_wait();
}

inline void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* row) { ldmatrix_impl(r, row, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const uint16_t* row) { ldmatrix_impl(r, row, true); }

inline void cp_async_16(uint16_t* smem, const uint16_t* gmem, bool valid) {
  if (valid) emu::check_global(gmem, 16, false, "cp.async source");
  emu::on_write(smem, 16, 16, /*pending=*/true, "cp.async");
  emu::tls->open.push_back({smem, gmem, valid});
}

inline void cp_async_commit() {
  emu::Thread& T = *emu::tls;
  T.groups.push_back(std::move(T.open));
  T.open.clear();
}

template <int N>
inline void cp_async_wait() {
  emu::Thread& T = *emu::tls;
  while (T.groups.size() > static_cast<size_t>(N)) {
    for (const emu::PendingCopy& c : T.groups.front()) {
      if (c.valid)
        std::memcpy(c.dst, c.src, 16);
      else
        std::memset(c.dst, 0, 16);
          const size_t w0 = emu::smem_word(c.dst, 16, 16, "cp.async landing");
      for (size_t w = w0; w < w0 + 4; ++w) T.blk->shadow[w].w_hi = T.epoch;  // landed in this epoch
    }
    T.groups.erase(T.groups.begin());
  }
}

inline void block_sync() {
  emu::tls->blk->bar.arrive_and_wait();
  ++emu::tls->epoch;
}

inline float shfl_xor(float v, int mask) {
  emu::Thread& T = *emu::tls;
  emu::Warp& W = *T.warp;
  W.f[T.lane] = v;
  W.bar.arrive_and_wait();
  const float r = W.f[T.lane ^ mask];
  W.bar.arrive_and_wait();
  return r;
}

inline float fast_exp2(float x) { return std::exp2(x); }
inline float fast_log2(float x) { return std::log2(x); }

template <class T>
inline T ld_global(const T* p) {
  emu::check_global(p, sizeof(T), false, "global load");
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
template <class T>
inline void st_global(T* p, T v) {
  emu::check_global(p, sizeof(T), true, "global store");
  std::memcpy(p, &v, sizeof(T));
}
template <class T>
inline T ld_shared(const T* p) {
  emu::on_read(p, sizeof(T), sizeof(T), "shared load");
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
template <class T>
inline void st_shared(T* p, T v) {
  emu::on_write(p, sizeof(T), sizeof(T), false, "shared store");
  std::memcpy(p, &v, sizeof(T));
}

}  // namespace enat_kernels::cuda::sca
