// Runs the SC-Attention kernel bodies (sc_attention_kernels.cuh) on the host through the
// emulated primitives of emu_primitives.h: every block in turn, one fiber per CUDA
// thread.  A test tool, not part of the extension (setup.py compiles only the files
// directly in csrc/cuda/); tests/kernels/test_cuda_sc_attention.py builds and drives it.
//
// Usage: sc_attn_emu DIR       (or --variants: prints the variant list of sc_attention_variants.h)
//   DIR/spec.txt    one "key value..." per line: op (fwd|bwd), dtype (a listed torch name:
//                   float16, bfloat16), head_dim,
//                   batch, heads, max_q, max_c, total_q, total_c, packed (0|1), scale,
//                   strides_{q,k_cond,v_cond,k_self,v_self} (batch token head, elements)
//   DIR/<name>.bin  raw inputs: q k_cond v_cond k_self v_self (the element span of each
//                   strided view from its first element), int32 self_lens cond_lens cu_q
//                   cu_c, and for bwd out dout lse dlse; an absent file is a null pointer
//   writes DIR/res_<name>.bin: out lse (fwd); dq dk_cond dv_cond dk_self dv_self delta (bwd).
// Outputs start as NaN (all bits set), so unwritten elements show.  Exit status 3 and a
// message on stderr for any violation the emulator detects.
#define ENAT_SC_ATTN_EMULATE 1
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <functional>

#include "cuda/sc_attention_kernels.cuh"

namespace {

using namespace enat_kernels::cuda;
namespace emu = enat_kernels::cuda::sca::emu;

std::string g_dir;
std::map<std::string, std::vector<std::string>> g_spec;

const std::vector<std::string>& spec(const std::string& key) {
  auto it = g_spec.find(key);
  if (it == g_spec.end() || it->second.empty()) emu::fail("spec.txt: missing %s", key.c_str());
  return it->second;
}
int64_t spec_i(const std::string& key, int i = 0) { return std::stoll(spec(key).at(i)); }

struct Buffer {
  char* ptr = nullptr;
  size_t bytes = 0;
};
std::map<std::string, Buffer> g_bufs;

char* alloc(size_t bytes) {
  void* p = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
  if (p == nullptr) emu::fail("out of memory");
  return static_cast<char*>(p);
}

// An input file as a read-only registered buffer, or nullptr when absent or empty.
template <class T>
const T* input(const std::string& name) {
  std::ifstream f(g_dir + "/" + name + ".bin", std::ios::binary | std::ios::ate);
  if (!f) return nullptr;
  const size_t bytes = static_cast<size_t>(f.tellg());
  if (bytes == 0) return nullptr;
  char* p = alloc(bytes);
  f.seekg(0);
  f.read(p, static_cast<std::streamsize>(bytes));
  g_bufs[name] = {p, bytes};
  emu::g_ranges.push_back({p, bytes, false, strdup(name.c_str())});
  return reinterpret_cast<const T*>(p);
}

// A NaN-filled registered output of `elems` elements of T.
template <class T>
T* output(const std::string& name, int64_t elems) {
  const size_t bytes = static_cast<size_t>(elems) * sizeof(T);
  char* p = alloc(bytes);
  std::memset(p, 0xFF, bytes);
  g_bufs["res_" + name] = {p, bytes};
  emu::g_ranges.push_back({p, bytes, true, strdup(name.c_str())});
  return reinterpret_cast<T*>(p);
}

void write_outputs() {
  for (auto& [name, buf] : g_bufs) {
    if (name.rfind("res_", 0) != 0) continue;
    std::ofstream f(g_dir + "/" + name + ".bin", std::ios::binary);
    f.write(buf.ptr, static_cast<std::streamsize>(buf.bytes));
  }
}

RowStrides strides(const std::string& name) {
  return {spec_i("strides_" + name, 0), spec_i("strides_" + name, 1), spec_i("strides_" + name, 2)};
}

// The fiber running thread `tid` of the current block.
struct Fiber {
  ucontext_t start;  // entry context (first switch only)
  jmp_buf jb;        // saved context while suspended
  bool started = false, done = false;
  std::unique_ptr<char[]> stack;
  emu::Thread thread;
};
std::function<void(int)> g_body;  // the current grid's block body, called with tid
Fiber* g_fibers = nullptr;
int g_running = 0;

void fiber_entry() {
  Fiber& F = g_fibers[g_running];
  g_body(F.thread.tid);
  if (!F.thread.open.empty()) emu::fail("cp.async issued but never committed");
  for (const auto& g : F.thread.groups)
    if (!g.empty()) emu::fail("exits with a cp.async group never waited for");
  F.done = true;
  _longjmp(emu::g_sched.main, 1);  // never returns
}

// Run fiber `tid` until it waits at a barrier or ends.
void resume(Fiber* fibers, int tid) {
  Fiber& F = fibers[tid];
  g_running = tid;
  emu::tls = &F.thread;
  emu::g_sched.current = &F.jb;
  if (_setjmp(emu::g_sched.main) == 0) {
    if (!F.started) {
      F.started = true;
      setcontext(&F.start);
    }
    _longjmp(F.jb, 1);
  }
  emu::tls = nullptr;
}

// Every block of a grid in turn; each CUDA thread a fiber, scheduled round robin.
template <class Body, class Params>
void run_grid(Body body, const Params& p, int64_t blocks, int nthreads, size_t smem_bytes) {
  constexpr size_t kStack = 256 * 1024;
  for (int64_t id = 0; id < blocks; ++id) {
    emu::Block B;
    B.id = id;
    B.nthreads = nthreads;
    B.bar.expected = nthreads;
    B.warps = std::make_unique<emu::Warp[]>(nthreads / 32);
    B.smem = alloc(smem_bytes);
    B.smem_bytes = smem_bytes;
    std::memset(B.smem, 0xFF, smem_bytes);  // uninitialized shared memory reads as NaN
    B.shadow.assign(smem_bytes / 4, emu::Shadow{});
    std::vector<Fiber> fibers(nthreads);
    g_fibers = fibers.data();
    g_body = [&](int tid) { body(p, B.smem, id, tid); };
    for (int tid = 0; tid < nthreads; ++tid) {
      Fiber& F = fibers[tid];
      F.thread.blk = &B;
      F.thread.warp = &B.warps[tid / 32];
      F.thread.tid = tid;
      F.thread.lane = tid % 32;
      F.stack = std::make_unique_for_overwrite<char[]>(kStack);
      getcontext(&F.start);
      F.start.uc_stack.ss_sp = F.stack.get();
      F.start.uc_stack.ss_size = kStack;
      F.start.uc_link = nullptr;  // fiber_entry never returns
      makecontext(&F.start, fiber_entry, 0);
    }
    for (int live = nthreads; live > 0;) {
      const uint64_t releases = emu::g_sched.releases;
      live = 0;
      for (int tid = 0; tid < nthreads; ++tid) {
        Fiber& F = fibers[tid];
        if (F.done) continue;
        resume(fibers.data(), tid);
        live += !F.done;
      }
      // A full round in which no barrier completed while threads still wait: deadlock.
      if (live > 0 && emu::g_sched.releases == releases)
        emu::fail("block %lld: deadlock, %d threads wait at a barrier or warp collective that not all reach",
                  static_cast<long long>(id), live);
    }
    std::free(B.smem);
  }
}

SeqLayout layout() {
  SeqLayout L;
  L.batch = static_cast<int32_t>(spec_i("batch"));
  L.heads = static_cast<int32_t>(spec_i("heads"));
  L.max_q = static_cast<int32_t>(spec_i("max_q"));
  L.max_c = static_cast<int32_t>(spec_i("max_c"));
  L.total_q = spec_i("total_q");
  L.total_c = spec_i("total_c");
  L.self_lens = input<int32_t>("self_lens");
  L.cond_lens = input<int32_t>("cond_lens");
  L.cu_q = input<int32_t>("cu_q");
  L.cu_c = input<int32_t>("cu_c");
  return L;
}

// Rows of the (rows, H, D) outputs of each segment.
int64_t q_rows(const SeqLayout& L) { return L.cu_q ? L.total_q : static_cast<int64_t>(L.batch) * L.max_q; }
int64_t c_rows(const SeqLayout& L) { return L.cu_q ? L.total_c : static_cast<int64_t>(L.batch) * L.max_c; }

// The part of the forward and backward parameters that describes the five inputs.
template <class Params>  // ScAttnFwdParams or ScAttnBwdParams
void fill_inputs(Params& p, int head_dim) {
  p.seqs = layout();
  p.head_dim = head_dim;
  p.q = input<uint16_t>("q");
  p.k_cond = input<uint16_t>("k_cond");
  p.v_cond = input<uint16_t>("v_cond");
  p.k_self = input<uint16_t>("k_self");
  p.v_self = input<uint16_t>("v_self");
  p.q_st = strides("q");
  p.kc_st = strides("k_cond");
  p.vc_st = strides("v_cond");
  p.ks_st = strides("k_self");
  p.vs_st = strides("v_self");
}

// The launcher's fill of rows no sequence owns (sc_attention_launch.cuh); the kernel
// uses no shared memory (the emulated block still gets a small buffer).
void run_unowned_rows(const UnownedRows& u) {
  run_grid([](const UnownedRows& uu, char*, int64_t b, int t) { sca::unowned_rows_block(uu, b, t); }, u,
           sca::unowned_rows_blocks(u), sca::kUnownedThreads, 256);
}

template <int D, class E>
void run_fwd() {
  ScAttnFwdParams p{};
  fill_inputs(p, D);
  p.scale = std::stof(spec("scale")[0]);
  const SeqLayout& L = p.seqs;
  p.out = output<uint16_t>("out", q_rows(L) * L.heads * D);
  p.lse = output<float>("lse", q_rows(L) * L.heads);
  using Cfg = sca::FwdCfg<D>;
  run_grid([](const ScAttnFwdParams& pp, char* s, int64_t b, int t) { sca::fwd_block<Cfg, E>(pp, s, b, t); }, p,
           sca::fwd_blocks<D>(L), Cfg::kThreads, Cfg::kSmemBytes);
  run_unowned_rows(sca::unowned_rows(L.cu_q, L, L.total_q, D, p.out, nullptr, nullptr, p.lse));
}

template <int D, class E>
void run_bwd() {
  ScAttnBwdParams p{};
  fill_inputs(p, D);
  p.out = input<uint16_t>("out");
  p.dout = input<uint16_t>("dout");
  p.lse = input<float>("lse");
  p.dlse = input<float>("dlse");
  p.scale = std::stof(spec("scale")[0]);
  const SeqLayout& L = p.seqs;
  p.delta = output<float>("delta", q_rows(L) * L.heads);
  p.dq = output<uint16_t>("dq", q_rows(L) * L.heads * D);
  p.dk_self = output<uint16_t>("dk_self", q_rows(L) * L.heads * D);
  p.dv_self = output<uint16_t>("dv_self", q_rows(L) * L.heads * D);
  p.dk_cond = output<uint16_t>("dk_cond", c_rows(L) * L.heads * D);
  p.dv_cond = output<uint16_t>("dv_cond", c_rows(L) * L.heads * D);
  using DqCfg = sca::BwdDqCfg<D>;
  using DkvCfg = sca::BwdDkvCfg<D>;
  run_grid([](const ScAttnBwdParams& pp, char* s, int64_t b, int t) { sca::bwd_dq_block<DqCfg, E>(pp, s, b, t); },
           p, sca::bwd_dq_blocks<D>(L), DqCfg::kThreads, DqCfg::kSmemBytes);
  run_grid([](const ScAttnBwdParams& pp, char* s, int64_t b, int t) { sca::bwd_dkv_block<DkvCfg, E>(pp, s, b, t); },
           p, sca::bwd_dkv_blocks<D>(L), DkvCfg::kThreads, DkvCfg::kSmemBytes);
  run_unowned_rows(sca::unowned_rows(L.cu_q, L, L.total_q, D, p.dq, p.dk_self, p.dv_self, nullptr));
  run_unowned_rows(sca::unowned_rows(L.cu_c, L, L.total_c, D, p.dk_cond, p.dv_cond, nullptr, nullptr));
}

// The listed variants (sc_attention_variants.h), as the launchers dispatch them: a dtype
// or head_dim outside the list fails instead of running another variant's kernels.
void run(const std::string& op, const std::string& dtype_name, int D) {
  const bool fwd = op == "fwd";
  if (!fwd && op != "bwd") emu::fail("op must be fwd or bwd, got %s", op.c_str());
  AttnDtype dtype;
  if (!attn_dtype_from_name(dtype_name.c_str(), &dtype))
    emu::fail("unsupported dtype %s (supported: %s)", dtype_name.c_str(), sc_attn_dtypes_text().c_str());
  const bool ran = with_dtype(dtype, false, [&](auto elem) {
    using E = typename decltype(elem)::type;
    return with_head_dim(D, false, [&](auto d) {
      fwd ? run_fwd<decltype(d)::value, E>() : run_bwd<decltype(d)::value, E>();
      return true;
    });
  });
  if (!ran) emu::fail("unsupported head_dim %d (supported: %s)", D, sc_attn_head_dims_text().c_str());
}

// The variant list as the preprocessor expands it, for the tests to compare with the build info.
void print_variants() {
  std::printf("head_dims");
#define ENAT_SC_ATTN_X(d) std::printf(" %d", d);
  ENAT_SC_ATTN_HEAD_DIMS(ENAT_SC_ATTN_X)
#undef ENAT_SC_ATTN_X
  std::printf("\ndtypes");
#define ENAT_SC_ATTN_X(key, elem, name, scalar) std::printf(" %s", name);
  ENAT_SC_ATTN_DTYPES(ENAT_SC_ATTN_X)
#undef ENAT_SC_ATTN_X
  std::printf("\n");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s DIR | --variants\n", argv[0]);
    return 2;
  }
  if (std::string(argv[1]) == "--variants") {
    print_variants();
    return 0;
  }
  g_dir = argv[1];
  std::ifstream f(g_dir + "/spec.txt");
  if (!f) emu::fail("cannot read %s/spec.txt", g_dir.c_str());
  for (std::string line; std::getline(f, line);) {
    std::istringstream is(line);
    std::string key, v;
    if (!(is >> key)) continue;
    auto& vals = g_spec[key];
    while (is >> v) vals.push_back(v);
  }
  run(spec("op")[0], spec("dtype")[0], static_cast<int>(spec_i("head_dim")));
  write_outputs();
  return 0;
}
