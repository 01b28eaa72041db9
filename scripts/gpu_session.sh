#!/usr/bin/env bash
# Everything that can only be done on a GPU machine, in phases that each fit a
# 10-minute command: build, the GPU tests, the benchmarks, the sanitizer.  Logs and
# results go to $OUT (default /tmp/enat-gpu); copy the results into benchmarks/results/
# and commit them with the date, device, command and versions they carry.
#
#   scripts/gpu_session.sh build      # pip install --no-build-isolation . for this GPU's architecture
#   scripts/gpu_session.sh test       # the suites that run CUDA kernels (Triton, CUDA C++, routing, model)
#   scripts/gpu_session.sh bench      # pytest-benchmark suite + report, then paired rounds (attention, training step)
#   scripts/gpu_session.sh sanitize   # compute-sanitizer memcheck + racecheck (scripts/sanitize.py)
#   scripts/gpu_session.sh all        # the four in order (longer than one 10-minute command)
#   scripts/gpu_session.sh --dry-run all   # print the commands only
#
# Written on a machine without a GPU: the commands are the ones each part's README
# gives, but this script itself has not yet run on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out="${OUT:-/tmp/enat-gpu}"
py="${PYTHON:-python3}"
mkdir -p "$out"

run() {  # echo, then run unless --dry-run; output also to $out/<phase>.log
  echo "+ $*"
  [ "$dry" = 1 ] || "$@"
}

phase_build() {
  local arch
  # Only this GPU's architecture: a fraction of the default list's compile time.
  arch="${TORCH_CUDA_ARCH_LIST:-$($py -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo "8.0;9.0")}"
  run env TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="${MAX_JOBS:-16}" "$py" -m pip install --no-build-isolation --no-deps -v .
  # From outside the tree, so the installed package is imported.
  run bash -c "cd / && $py -c 'import enat_kernels as ek; print(ek.backends()); print(ek.build_info())'"
}

# -P (Python 3.11+): the working directory is not put first on sys.path, so the
# installed enat_kernels (with its compiled extensions) is imported, not ./enat_kernels.
phase_test() {
  run "$py" -P -m pytest -q -rs -p no:cacheprovider --import-mode=append --junitxml="$out/tests.xml" \
    tests/test_sc_attention.py tests/test_cuda_sc_attention.py tests/test_triton_sc_attention.py \
    tests/test_routing.py tests/test_determinism.py tests/test_randomized.py tests/test_compile.py \
    tests/test_enat_backends.py tests/test_enat_sampler.py
}

phase_bench() {
  run "$py" -P -m pytest benchmarks/ --benchmark-only -rs -p no:cacheprovider --import-mode=append \
    --benchmark-json="$out/bench.json"
  run "$py" benchmarks/report.py "$out/bench.json" --out-dir "$out" \
    --command "python -m pytest benchmarks/ --benchmark-only --benchmark-json=bench.json -rs"
  run "$py" -P -c "import sys; sys.path.append('.'); from benchmarks.paired import main; sys.exit(main(['--out', '$out/paired.md']))"
  run "$py" -P -c "import sys; sys.path.append('.'); from benchmarks.paired_training import main; sys.exit(main(['--out', '$out/training.md']))"
}

phase_sanitize() {
  run "$py" scripts/sanitize.py --report "$out/sanitize.md"
}

phases=("$@")
[ ${#phases[@]} -gt 0 ] || { sed -n '2,15p' "$0"; exit 2; }
[ "${phases[0]}" = all ] && phases=(build test bench sanitize)
for p in "${phases[@]}"; do
  case "$p" in
    build | test | bench | sanitize)
      echo "== $p (logs: $out/$p.log)"
      if [ "$dry" = 1 ]; then "phase_$p"; else "phase_$p" 2>&1 | tee "$out/$p.log"; fi
      ;;
    *) echo "unknown phase '$p' (build, test, bench, sanitize, all)" >&2; exit 2 ;;
  esac
done
