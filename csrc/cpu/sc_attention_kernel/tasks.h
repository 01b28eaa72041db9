// Running the kernels' tasks on the intra-op thread pool, and per-worker scratch
// memory: the scheduling that makes the results independent of the thread count,
// apart from the arithmetic that runs inside a task.
#pragma once

#include <ATen/Parallel.h>
#include <c10/core/impl/alloc_cpu.h>

#include <algorithm>
#include <atomic>

#include "cpu/sc_attention_kernel/config.h"

namespace enat_kernels::cpu_attn::CPU_CAPABILITY {

// Scratch memory of one worker (64-byte aligned, freed on scope exit).
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n)
      : ptr_(static_cast<T*>(c10::alloc_cpu(
            checked_mul(std::max<int64_t>(n, 1), static_cast<int64_t>(sizeof(T)), "sc_attention (cpu) scratch bytes")))) {}
  ~Scratch() { c10::free_cpu(ptr_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  T* get() const { return ptr_; }

 private:
  T* ptr_;
};

// Runs body(workspace, task, next_task) for task in [0, n) on the intra-op thread
// pool.  Tasks are taken from a shared counter (dynamic schedule), one ahead, so that
// a task can prefetch the inputs of the worker's next one (next_task, or -1); each
// worker builds its own workspace once.  Which thread runs a task never changes its
// result.
template <typename MakeWorkspace, typename Body>
void parallel_tasks(int64_t n, const MakeWorkspace& make_workspace, const Body& body) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto ws = make_workspace();
    int64_t t = next.fetch_add(1);
    while (t < n) {
      const int64_t t_next = next.fetch_add(1);
      body(ws, t, t_next < n ? t_next : int64_t(-1));
      t = t_next;
    }
  });
}

}  // namespace enat_kernels::cpu_attn::CPU_CAPABILITY
