#!/usr/bin/env bash
# One command that proves the library on a GPU machine, in under 8 minutes on one
# H100/H200 with 16 cores and no network (python3 with torch, Triton, pytest,
# pytest-benchmark, ninja, nvcc and compute-sanitizer already there):
#
#   scripts/gpu_session.sh                 # every phase, in order
#   scripts/gpu_session.sh tests bench-attn   # some phases (still in the order below)
#   scripts/gpu_session.sh --dry-run       # print each phase's budget and commands, run nothing
#
# Phases, each with its own time budget (seconds, in PHASES below): a phase that fails
# or runs out of time is recorded and the next one runs.  The budgets add up to 455 s,
# the summary gets 10 more, and a global deadline (ENAT_GPU_DEADLINE_S, default 460)
# caps whatever is left, so the command ends within 8 minutes whatever happens.
#
#   build          pip install --no-build-isolation for this GPU's architecture only
#   check          import, backends() and build_info(): cuda and triton must be available
#   tests          CUDA and Triton kernels in fp16/bf16: the shared suite, opcheck, a
#                  non-default stream, CUDA-graph capture and replay, routing
#   sanitize       compute-sanitizer memcheck + racecheck on a few small cases per kernel
#   bench-attn     the four ENAT shapes (H=16 D=64 bf16), fwd and fwd+bwd: ours (cuda,
#                  triton) vs the reference ENAT attention and SDPA (flash, cuDNN) on
#                  concatenated K/V, the concatenation counted and not
#   bench-anchors  the same shapes against FlexAttention and xformers (if installed)
#   bench-routing  split/gather/restore/merge, in TB/s against the measured copy peak
#   sampling       ENAT-L 256 px sampling (250 images, 8 steps), fused vs the torch path
#
# Then, always (also in --dry-run and when only some phases were asked for), the
# summary: scripts/gpu_session_summary.py (tables through benchmarks/report.py).
#
# Output in $OUT (default /tmp/enat-gpu), at most 8 files so the whole of it can be
# carried back from a lent machine: summary.md (date, device, versions, commands,
# phase verdicts, the tables), summary.json, bench-report.md and .png (the full
# benchmark tables), console.log, and artifacts.tar.gz (every phase's log, the JUnit
# XML, the benchmark JSON and the sanitizer report; rewritten after each phase so a
# run cut short still leaves them).  The working files are in $ENAT_GPU_WORK (default:
# a fresh temporary directory).  The last screen printed is the summary.
#
# Exit status: 0 when every phase that ran passed, 1 otherwise, 2 for bad arguments.
# ENAT_GPU_BUDGET_<phase> (dashes as underscores) overrides one phase's budget.
set -uo pipefail  # not -e: a failed phase is recorded and the next one runs
cd "$(dirname "$0")/.."

# phase:budget_s.  Budget reasoning (H100/H200, 16 cores): the build compiles eight CUDA
# files for one arch in parallel (~60 s seen for two archs on 16 cores elsewhere: 105);
# the tests are sized to ~45 s of kernels plus Triton JIT (75); each sanitizer tool
# starts CUDA under instrumentation (~10 s) and runs ~12 small tests (2 x 30 + margin);
# 56 attention cases at ~1 s each with the correctness check (80); flex compiles once
# per shape and direction (35); 48 routing cases of ~0.5 s (30); three sampling runs of
# ~5 calls of ~1.5 s plus the model build (45).  The summary: a second or two (10).
PHASES=(build:105 check:15 tests:75 sanitize:70 bench-attn:80 bench-anchors:35 bench-routing:30 sampling:45)
SUMMARY_BUDGET=10

dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out="${OUT:-/tmp/enat-gpu}"
py="${PYTHON:-python3}"
deadline_s="${ENAT_GPU_DEADLINE_S:-460}"
work="${ENAT_GPU_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/enat-gpu-work.XXXXXX")}"
mkdir -p "$out" "$work"

names=()
for p in "${PHASES[@]}"; do names+=("${p%%:*}"); done
wanted=("$@")
for w in "${wanted[@]}"; do
  if [[ " ${names[*]} " != *" $w "* ]]; then
    echo "unknown phase '$w' (phases: ${names[*]})" >&2
    exit 2
  fi
done

# `-P`: the working directory (this repository) is not put on sys.path, so the installed
# enat_kernels with its compiled extensions is tested, not the uncompiled ./enat_kernels.
# --import-mode=append: benchmarks/ imports as a package without shadowing it either.
PYTEST=("$py" -P -m pytest -p no:cacheprovider -q -rfEs)
BENCH=("${PYTEST[@]}" --import-mode=append --benchmark-only --benchmark-max-time=0.1 --benchmark-min-rounds=5)
# The four ENAT shapes of benchmarks/_cases.py (the ragged variant is left out).
SHAPES="not ragged"

phase_end=0
run() {  # echo the command, then run it within what is left of the phase's budget
  echo "+ $*"
  echo "$*" >>"$work/commands.txt"
  [ "$dry" = 1 ] && return 0
  local left=$((phase_end - SECONDS))
  if [ "$left" -le 0 ]; then echo "   (no time left in this phase)"; return 124; fi
  timeout -k 5 "$left" "$@"
}

phase_build() {
  local arch
  arch="${TORCH_CUDA_ARCH_LIST:-$("$py" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 9.0)}"
  run env TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$py" -m pip install --no-build-isolation --no-deps --no-index -v .
}

phase_check() {
  run "$py" -P -c 'import enat_kernels as ek, torch
b = ek.backends(); print(b); print(ek.build_info())
print("device:", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
bad = {n: s.reason for n, s in b.items() if not s.available}
assert not bad, f"backends unavailable: {bad}"'
}

phase_tests() {
  # Four workers when pytest-xdist is there: the Triton JIT compiles of the many
  # specializations dominate this phase and run on the CPU cores in parallel.
  local par=()
  "$py" -c "import xdist" 2>/dev/null && par=(-n 4)
  run "${PYTEST[@]}" "${par[@]}" --junitxml="$work/tests.xml" --maxfail=25 \
    tests/kernels/test_cuda_sc_attention.py tests/kernels/test_triton_sc_attention.py tests/kernels/test_sc_attention.py tests/kernels/test_routing.py \
    -k "(gpu or cuda or triton) and not float32 and not float64 and not torch_compile and not emulated"
}

phase_sanitize() {
  # Per kernel: forward and backward (output-only gradient, three small ragged/view/
  # empty-cond cases), mask_to_indices + gather + scatter (split then restore), merge.
  run "$py" scripts/sanitize.py --timeout 30 --report "$work/sanitize.md" -- \
    tests/kernels/test_sc_attention.py tests/kernels/test_routing.py -p no:cacheprovider -q \
    -k "(cuda or triton) and (test_dense_output_only_gradient or (test_split_then_restore_is_identity and bfloat16) or (test_merge_equals_gathering_the_union and bfloat16))"
}

phase_bench-attn() {
  run "${BENCH[@]}" benchmarks/bench_sc_attention.py --benchmark-json="$work/bench-attn.json" \
    -k "$SHAPES and (ours:cuda or ours:triton or reference or sdpa:flash or sdpa:cudnn)"
}

phase_bench-anchors() {
  run "${BENCH[@]}" benchmarks/bench_sc_attention.py --benchmark-json="$work/bench-anchors.json" \
    -k "$SHAPES and (flex or xformers)"
}

phase_bench-routing() {
  run "${BENCH[@]}" benchmarks/bench_routing.py --benchmark-json="$work/bench-routing.json"
}

phase_sampling() {
  run "${BENCH[@]}" benchmarks/bench_sampling.py --benchmark-min-rounds=3 --benchmark-json="$work/bench-sampling.json" -k "enat-l-256"
}

archive() {  # the working files into $OUT, so a run cut short still leaves them
  [ "$dry" = 1 ] || tar -czf "$out/artifacts.tar.gz" -C "$work" . 2>/dev/null
}

[ "$dry" = 1 ] || exec > >(tee "$out/console.log") 2>&1
: >"$work/commands.txt"
printf 'phase\tstatus\trc\tseconds\tbudget\n' >"$work/phases.tsv"
echo "enat_kernels GPU session: work in $work, results in $out"
failed=0
for p in "${PHASES[@]}"; do
  name="${p%%:*}"
  budget="${p##*:}"
  override="ENAT_GPU_BUDGET_${name//-/_}"
  budget="${!override:-$budget}"
  if [ ${#wanted[@]} -gt 0 ] && [[ " ${wanted[*]} " != *" $name "* ]]; then continue; fi
  left=$((deadline_s - SECONDS))
  echo "== $name (budget ${budget} s, ${left} s left; log: $work/$name.log)"
  if [ "$dry" = 0 ] && [ "$left" -lt 5 ]; then
    printf '%s\tSKIPPED\t-\t0\t%s\n' "$name" "$budget" >>"$work/phases.tsv"
    failed=1
    continue
  fi
  [ "$left" -lt "$budget" ] && budget=$left
  start=$SECONDS
  phase_end=$((SECONDS + budget))
  if [ "$dry" = 1 ]; then
    "phase_$name"
    rc=0
  else
    "phase_$name" 2>&1 | tee "$work/$name.log"
    rc=${PIPESTATUS[0]}
  fi
  case "$rc" in
    0) status=PASS ;;
    124 | 137) status=TIMEOUT ;;
    *) status=FAIL ;;
  esac
  [ "$dry" = 1 ] && status=DRY-RUN
  [ "$rc" = 0 ] || failed=1
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - start))" "$budget" >>"$work/phases.tsv"
  archive
done

# The summary last: it reads phases.tsv and the benchmark JSON, writes $OUT's files and
# prints one screen.  It needs no GPU and runs in --dry-run too.
echo "== summary"
summary=("$py" scripts/gpu_session_summary.py --work "$work" --out "$out")
[ "$dry" = 1 ] && summary+=(--dry-run)
timeout -k 5 "$SUMMARY_BUDGET" "${summary[@]}" || failed=1
archive
exit "$failed"
