"""Build the compiled part of enat_kernels.

Two extension modules, so that a CPU-only build never touches nvcc and a broken CUDA
toolchain never costs the CPU kernels:

- ``enat_kernels._C``: the op schemas (``TORCH_LIBRARY(enat_kernels, ...)``) and the
  C++ CPU kernels.  Always built.
- ``enat_kernels._C_cuda``: the CUDA C++ kernels, registered for the CUDA dispatch key
  of the same schemas.  Built when a CUDA toolkit and a CUDA build of torch are present
  (no GPU is needed to compile).

Build flags (environment variables):

- ``ENAT_KERNELS_SKIP_CUDA=1``  build only ``_C``.
- ``TORCH_CUDA_ARCH_LIST``      architectures for ``_C_cuda``; default ``8.0;9.0+PTX`` (machine
                                code for sm_80 and sm_90, and sm_90 PTX that the driver
                                compiles for newer GPUs on first use).
- ``ENAT_KERNELS_DEBUG=1``      ``-O0 -g`` host code and ``-lineinfo`` device code.
- ``ENAT_KERNELS_SANITIZE=1``   ``_C`` with AddressSanitizer and UndefinedBehaviorSanitizer
  (``-O1 -g``, any UB aborts); implies ``ENAT_KERNELS_SKIP_CUDA``.  Run Python with the
  sanitizer runtime preloaded: see ``.ci/sanitize-leg.sh``.
- ``MAX_JOBS``                  parallel compile jobs (ninja), as in torch.
- ``CUDA_HOME``                 toolkit location; defaults to /usr/local/cuda when present.
"""

import glob
import os
import shutil
import sys

# torch.utils.cpp_extension reads CUDA_HOME when it is imported and otherwise guesses
# from the nvcc on PATH, which gives /usr/local on some machines and fails to link.
if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"

sys.path.insert(0, os.path.join(HERE, "build_backend"))
import cuda_variants  # noqa: E402  (the variant list of csrc/cuda/sc_attention_variants.h)

sys.path.pop(0)
CUDA_HEAD_DIMS, CUDA_DTYPES = cuda_variants.read_variants(is_dtype_name=lambda n: isinstance(getattr(torch, n, None), torch.dtype))
# One translation unit per (pass, head_dim), written from the list (see cuda_variants.py).
GENERATED_CUDA_DIR = os.path.join(HERE, "build", "generated", "cuda")


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def _cuda_build_reason() -> str | None:
    """None when the CUDA extension can be built, else why not."""
    if _flag("ENAT_KERNELS_SKIP_CUDA"):
        return "ENAT_KERNELS_SKIP_CUDA is set"
    if SANITIZE:
        return "ENAT_KERNELS_SANITIZE is set (the sanitizer build is CPU-only)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if cpp_extension.CUDA_HOME is None or not os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    ):
        return "no CUDA toolkit (nvcc) found; set CUDA_HOME"
    return None


DEBUG = _flag("ENAT_KERNELS_DEBUG")
SANITIZE = _flag("ENAT_KERNELS_SANITIZE")
opt = ["-O0", "-g"] if DEBUG else ["-O3"]
# -fopenmp: at::parallel_for is a header template; without it the CPU kernels run serially.
cxx_flags = opt + ["-fopenmp", "-Wno-unused-parameter"]
link_flags = ["-fopenmp"]
if SANITIZE:
    # vptr is off: torch's own libraries are not instrumented, so its type info checks
    # would report false positives on every virtual call into them.
    sanitize = ["-fsanitize=address,undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=all"]
    opt = ["-O0", "-g"] if DEBUG else ["-O1", "-g"]
    cxx_flags = opt + ["-fno-omit-frame-pointer", "-fopenmp", "-Wno-unused-parameter"] + sanitize
    link_flags = link_flags + sanitize

ext_modules = [
    cpp_extension.CppExtension(
        "enat_kernels._C",
        _rel(glob.glob(os.path.join(HERE, "csrc", "*.cpp")) + glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp"))),
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )
]

cuda_reason = _cuda_build_reason()
cuda_archs = None
if cuda_reason is None:
    cuda_archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS
    # cpp_extension turns this variable into -gencode flags.
    os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_archs
    nvcc_flags = opt + [
        "-std=c++20",
        "--expt-relaxed-constexpr",
        "--use_fast_math",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-Xptxas=-warn-spills",
    ]
    if DEBUG:
        nvcc_flags.append("-lineinfo")
    ext_modules.append(
        cpp_extension.CUDAExtension(
            "enat_kernels._C_cuda",
            _rel(
                glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cpp"))
                + glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu"))
                + cuda_variants.write_sources(GENERATED_CUDA_DIR, CUDA_HEAD_DIMS)
            ),
            include_dirs=[os.path.join(HERE, "csrc")],
            extra_compile_args={"cxx": opt + ["-Wno-unused-parameter"], "nvcc": nvcc_flags},
        )
    )
else:
    print(f"enat_kernels: not building the CUDA extension: {cuda_reason}")


def _write_build_info():
    """Record what the extension was built against; the loader refuses a mismatch."""
    path = os.path.join(HERE, "enat_kernels", "_build_info.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time. Do not edit.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n")
        f.write(f"CUDA_BUILT = {cuda_reason is None!r}\n")
        f.write(f"CUDA_SKIP_REASON = {cuda_reason!r}\n")
        f.write(f"CUDA_ARCHS = {cuda_archs!r}\n")
        # The variants of csrc/cuda/sc_attention_variants.h (compiled when CUDA_BUILT).
        f.write(f"CUDA_SC_ATTENTION_HEAD_DIMS = {CUDA_HEAD_DIMS!r}\n")
        f.write(f"CUDA_SC_ATTENTION_DTYPES = {CUDA_DTYPES!r}\n")
        f.write(f"DEBUG = {DEBUG!r}\n")
        f.write(f"SANITIZE = {SANITIZE!r}\n")


_write_build_info()

if shutil.which("ninja") is None:
    print("enat_kernels: ninja not found; the build will be slow and serial")

setup(
    ext_modules=ext_modules,
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    package_data={"enat_kernels": ["_build_info.py"]},
)
