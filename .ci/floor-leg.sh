#!/usr/bin/env bash
# CI floor leg: the oldest supported torch and Triton, in their own virtual environment,
# installed the way a user with torch already in place installs this package.
#
#   torch 2.11.0 + triton 3.6.0 from the registry, numpy < 2.4 (Triton 3.6's interpreter
#   fails with numpy 2.4: it converts one-element arrays with int(), and the library
#   then reports the interpreter unavailable), then the README's `pip install .` WITH
#   build isolation:
#   the in-tree build backend must compile against the torch 2.11.0 already there,
#   so the compiled CPU and CUDA extensions must load afterwards.
#
# The CUDA extension is compiled for one architecture (TORCH_CUDA_ARCH_LIST=9.0):
# that proves the CUDA sources build against the floor torch's headers at a third of
# the default list's compile time (the newest leg compiles the full default list).
#
# Tests, a documented subset (the newest leg runs the whole suite): the loader, the
# backend report and selection, the build backend, the SCAttention module, the Triton suite under
# TRITON_INTERPRET=1 with the Triton code-generation tests for sm_80/sm_90, the CPU
# attention suite and the routing tests (every backend).  The slow-marked cases are
# left to the newest leg.
#
# Time, measured on the 2-core CI machine while four other builds shared it: the
# install 619 s (torch 2.11.0 is unpacked twice, into this environment and into pip's
# isolated build environment, then the CPU extension and the sm_90 CUDA extension
# compile), the tests about 2-4 minutes; the whole .ci/run about 45 minutes there.
#
# Called by .ci/run; runs on its own too:  .ci/floor-leg.sh
set -euo pipefail
cd "$(dirname "$0")/.."

FLOOR_PINS=(torch==2.11.0 triton==3.6.0 "numpy<2.4")
start=$SECONDS

venv="$(mktemp -d)/venv-floor"
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1

echo "== floor: ${FLOOR_PINS[*]} + test tools"
pip install -q "${FLOOR_PINS[@]}" pytest pytest-benchmark hypothesis expecttest matplotlib

echo "== floor: install (README: pip install .), CUDA for 9.0 only"
TORCH_CUDA_ARCH_LIST="9.0" pip install .
echo "   floor install done at $((SECONDS - start)) s"

echo "== floor: import, build and backends() under the floor torch"
(cd /tmp && python - <<'PY'
import os
import torch, triton, numpy
import enat_kernels as ek
from enat_kernels import _extension
print("torch", torch.__version__, "triton", triton.__version__, "numpy", numpy.__version__)
print(ek.backends())
info = ek.build_info()
print(info)
assert info["TORCH_VERSION"] == torch.__version__, (info, torch.__version__)
assert _extension.cpu_extension_error() is None, _extension.cpu_extension_error()
assert ek.backends()["cpu"].available
if info["CUDA_BUILT"]:
    assert _extension.cuda_extension_error() is None, _extension.cuda_extension_error()
    assert _extension.has_kernel("sc_attn_fwd", "CUDA")
else:
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    assert not os.path.exists(nvcc), ("CUDA toolkit present but the CUDA extension was not built", info)
    print("CUDA extension not built here:", info["CUDA_SKIP_REASON"])
PY
)
# The interpreter suite below must run, not skip itself: Triton under TRITON_INTERPRET=1
# must be available with these pins.
(cd /tmp && TRITON_INTERPRET=1 python -c "import enat_kernels as ek; s = ek.backends()['triton']; print('triton:', s); assert s.available, s")

echo "== floor: tests (Triton under TRITON_INTERPRET=1, code generation, CPU, routing)"
TRITON_INTERPRET=1 pytest -q -rs -p no:cacheprovider -m "not slow" \
  tests/package/test_extension_loading.py tests/package/test_kernel_image_probe.py tests/package/test_build_backend.py \
  tests/kernels/test_sc_attention_module.py tests/kernels/test_triton_sc_attention.py \
  tests/kernels/test_cpu_sc_attention.py tests/kernels/test_routing.py

echo "== floor leg passed in $((SECONDS - start)) s"
