#!/usr/bin/env bash
# Memory-safety leg: the CPU extension built with AddressSanitizer and
# UndefinedBehaviorSanitizer (ENAT_KERNELS_SANITIZE=1, no CUDA), then the CPU suites,
# the randomized suite and the adversarial suite run with the sanitizer runtime
# preloaded into Python.  Any invalid access or undefined behaviour in the compiled
# kernels aborts its process, which fails the test (the adversarial suite runs its
# cases in child processes, so one abort fails one case).
#
# Usage: .ci/sanitize-leg.sh [extra pytest arguments]
# Run it with the python of an environment that has torch and the test dependencies
# (CI's venv, or the one you develop in): a separate venv is made on top of it (its
# packages are visible through a .pth file), so the sanitized build never replaces
# the normal one.  Needs gcc's libasan and libubsan (Debian/Ubuntu: libgcc-*-dev).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS

# Every package directory of the calling environment (its own .pth files included).
base_paths="$(python -c 'import sys; print("\n".join(p for p in sys.path if p.endswith(("site-packages", "dist-packages"))))')"
# SANITIZE_DIR=<folder>: keep the sanitized build there and reuse it on the next run
# (for running tests under the sanitizer by hand); by default a temporary folder.
if [ -n "${SANITIZE_DIR:-}" ]; then
    tmp="$SANITIZE_DIR"
    mkdir -p "$tmp"
else
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
fi
venv="$tmp/venv-sanitize"
[ -x "$venv/bin/python" ] || python -m venv "$venv"
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$base_paths" > "$site/base-env.pth"

echo "== sanitize: build _C with ASan + UBSan (CPU only)"
# The build needs setuptools and ninja; CI's environment (made with build isolation) may lack them.
"$venv/bin/python" -c "import setuptools, ninja" 2>/dev/null || "$venv/bin/python" -m pip install -q setuptools wheel ninja
# A copy of the sources, so the sanitized objects and _build_info.py never mix with the
# normal build's.
src="$tmp/src"
mkdir -p "$src"
tar --exclude='./.venv*' --exclude='./build' --exclude='./.git' --exclude='*.so' -cf - . | tar -xf - -C "$src"
[ -n "${SANITIZE_DIR:-}" ] && [ -e "$src/.built" ] && [ -z "$(find csrc setup.py -newer "$src/.built" | head -1)" ] && echo "   reusing $src" ||
(cd "$src" && ENAT_KERNELS_SANITIZE=1 ENAT_KERNELS_SKIP_CUDA=1 MAX_JOBS="${MAX_JOBS:-2}" \
    "$venv/bin/python" -m pip install -q --no-build-isolation --no-deps . && touch .built)
echo "   build took $((SECONDS - start)) s"

asan="$(gcc -print-file-name=libasan.so)"
ubsan="$(gcc -print-file-name=libubsan.so)"
for lib in "$asan" "$ubsan"; do
    [ -e "$lib" ] || { echo "sanitize: $lib not found (install gcc's sanitizer runtimes)"; exit 1; }
done
# detect_leaks=0: CPython and torch keep allocations alive until exit by design.
# PYTHONMALLOC=malloc: Python's objects go through the sanitized malloc too.
export LD_PRELOAD="$asan $ubsan"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1:alloc_dealloc_mismatch=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:abort_on_error=1"
export PYTHONMALLOC=malloc
# The sanitized module must be the one loaded (from outside the source tree).
(cd /tmp && "$venv/bin/python" -c "import enat_kernels as ek; from enat_kernels import _build_info as b; assert b.SANITIZE, 'not the sanitized build'; assert ek.backends()['cpu'].available, ek.backends()")

echo "== sanitize: CPU, randomized and adversarial suites"
# The tests of the CPU backend only: the Triton interpreter and the torch reference
# run no compiled code of this project.
# From tests/: python -m puts the working directory first on sys.path, and the
# uncompiled ./enat_kernels of the repository root must not shadow the installed one.
# --capture=sys: a sanitizer writes its report to file descriptor 2 and then aborts;
# pytest's default (fd) capture would swallow it with the dying test's output.
# pytest's faulthandler then names the test that aborted.
(cd tests && "$venv/bin/python" -m pytest -q -p no:cacheprovider --capture=sys \
    kernels/test_cpu_sc_attention.py kernels/test_adversarial.py kernels/test_randomized.py kernels/test_routing.py \
    kernels/test_sc_attention.py kernels/test_errors.py \
    -k "cpu" "$@")
unset LD_PRELOAD
echo "== sanitize leg passed in $((SECONDS - start)) s"
