"""The in-tree build backend pins the build's torch to the torch already installed.

The full path (an environment with torch 2.11.0, `pip install .` with build isolation,
the compiled extensions loading afterwards) is CI's floor leg, .ci/floor-leg.sh; these
are the cheap checks of its two decisions: which torch is installed, and what to ask for.
"""

import importlib.metadata
import os
import sys

import pytest
import torch

from support.paths import REPO

ROOT = str(REPO)
sys.path.insert(0, os.path.join(ROOT, "build_backend"))
import enat_build_backend as backend  # noqa: E402

sys.path.pop(0)


@pytest.mark.parametrize(
    "installed, expected",
    [
        ("2.11.0+cu130", "torch==2.11.0"),  # local tag dropped: the registry's wheels have none
        ("2.11.0", "torch==2.11.0"),
        ("2.14.1+cpu", "torch==2.14.1"),
        ("2.13.0", "torch==2.13.0"),
        (None, backend.TORCH_RANGE),  # no torch yet: the range, as the runtime dependency
        ("2.10.0", backend.TORCH_RANGE),  # unsupported: not pinned, the range then refuses it
        ("2.15.0.dev20270101", backend.TORCH_RANGE),
        ("garbage", backend.TORCH_RANGE),
    ],
)
def test_torch_requirement(installed, expected, monkeypatch):
    monkeypatch.delenv("ENAT_KERNELS_BUILD_TORCH", raising=False)
    assert backend.torch_requirement(installed) == expected


def test_torch_requirement_override(monkeypatch):
    monkeypatch.setenv("ENAT_KERNELS_BUILD_TORCH", "torch==2.12.0")
    assert backend.torch_requirement("2.11.0") == "torch==2.12.0"


def test_probe_sees_torch_through_pip_isolation(tmp_path, monkeypatch):
    """pip hides the target's site-packages from the build with a sitecustomize on
    PYTHONPATH and PYTHONNOUSERSITE; the probe must still read the installed torch."""
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nsys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("PYTHONNOUSERSITE", "1")
    assert backend.installed_torch_version() == importlib.metadata.version("torch")


def test_probe_without_torch_or_python(tmp_path):
    assert backend.installed_torch_version(str(tmp_path / "no-python")) is None


def test_requirement_hooks_ask_for_the_installed_torch(monkeypatch):
    monkeypatch.delenv("ENAT_KERNELS_BUILD_TORCH", raising=False)
    monkeypatch.setattr(backend, "installed_torch_version", lambda: "2.11.0+cu130")
    assert backend.get_requires_for_build_wheel() == ["torch==2.11.0"]
    assert backend.get_requires_for_build_editable() == ["torch==2.11.0"]
    assert backend.get_requires_for_build_sdist() == ["torch==2.11.0"]


def test_pyproject_uses_this_backend_and_no_static_torch():
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    build_system = text.split("[build-system]", 1)[1].split("\n[", 1)[0]
    assert 'build-backend = "enat_build_backend"' in build_system
    assert 'backend-path = ["build_backend"]' in build_system
    # A static torch requirement would first install the newest torch into the build
    # environment (gigabytes), only for the pin to replace it.
    requires = build_system.split("requires", 1)[1].split("]", 1)[0]
    assert "torch" not in requires


def _cuda_variants():
    sys.path.insert(0, os.path.join(ROOT, "build_backend"))
    import cuda_variants

    sys.path.pop(0)
    return cuda_variants


def test_cuda_variant_sources_follow_the_list(tmp_path):
    """setup.py's per-variant translation units: one per (pass, head_dim) of the list,
    rewritten only when their text changes (ninja then skips them), stale ones removed."""
    cuda_variants = _cuda_variants()
    head_dims, dtypes = cuda_variants.read_variants()
    assert head_dims == tuple(sorted(head_dims)) and all(d % 16 == 0 for d in head_dims) and dtypes
    paths = cuda_variants.write_sources(str(tmp_path), head_dims)
    assert sorted(os.path.basename(p) for p in paths) == sorted(
        f"sc_attention_{p}_hdim{d}.cu" for p in ("fwd", "bwd") for d in head_dims)
    before = {p: os.stat(p).st_mtime_ns for p in paths}
    other = tmp_path / "notes.txt"
    other.write_text("kept")
    assert cuda_variants.write_sources(str(tmp_path), head_dims) == paths
    assert {p: os.stat(p).st_mtime_ns for p in paths} == before
    fewer = cuda_variants.write_sources(str(tmp_path), head_dims[:1])
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(p) for p in fewer] + ["notes.txt"])


def test_cuda_variant_sources_leave_other_files_alone(tmp_path):
    """`python build_backend/cuda_variants.py DIR` may be given any directory: it removes
    or replaces only the files it wrote, and refuses to overwrite one it did not."""
    cuda_variants = _cuda_variants()
    head_dims, _ = cuda_variants.read_variants()
    mine = tmp_path / "routing.cu"
    mine.write_text("// a source of the user's\n")
    unlisted = tmp_path / f"sc_attention_fwd_hdim{head_dims[-1] + 16}.cu"  # a generated name, not generated
    unlisted.write_text("// the user's own variant\n")
    paths = cuda_variants.write_sources(str(tmp_path), head_dims)
    assert mine.read_text() == "// a source of the user's\n"
    assert unlisted.read_text() == "// the user's own variant\n"
    assert len(paths) == 2 * len(head_dims)
    clash = tmp_path / f"sc_attention_bwd_hdim{head_dims[0]}.cu"
    clash.write_text("// hand-edited\n")
    with pytest.raises(FileExistsError, match="not replacing it"):
        cuda_variants.write_sources(str(tmp_path), head_dims)
    assert clash.read_text() == "// hand-edited\n"
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "head_dims, dtypes, expected",
    [
        ("X(32) X(64) /* X(96) not yet */", '  X(kFloat16, Fp16, "float16", Half)', ((32, 64), ("float16",))),
        ("X(32) \\\n  X(64)  // X(128)", '  X(kFloat16, Fp16, "float16", Half) // X(kX, X, "float8", X)', ((32, 64), ("float16",))),
        ("X(32) X(32)", '  X(kFloat16, Fp16, "float16", Half)', "ascending, without repeats"),
        ("X(64) X(32)", '  X(kFloat16, Fp16, "float16", Half)', "ascending, without repeats"),
        ("X(32) X(40)", '  X(kFloat16, Fp16, "float16", Half)', "multiple of 16"),
        ("X(32)", '  X(kFloat16, Fp16, "float16", Half) X(kHalf, Fp16, "float16", Half)', "a dtype twice"),
        ("", '  X(kFloat16, Fp16, "float16", Half)', "empty variant list"),
        ("X(32) X(HD64)", '  X(kFloat16, Fp16, "float16", Half)', "entries not of the form"),
        ("X(32)", '  X(kFloat16, Fp16, "float16", Half) X(kBFloat16, Bf16, bfloat16, BFloat16)', "entries not of the form"),
    ],
    ids=["block-comment", "line-comments", "repeat", "descending", "not-multiple-of-16", "dtype-twice", "empty",
         "head-dim-not-a-number", "dtype-name-unquoted"],
)
def test_cuda_variant_list_is_read_as_the_preprocessor_reads_it(tmp_path, head_dims, dtypes, expected):
    """Commented-out entries are not compiled, so they are not listed (nor recorded in the
    build info); a list the C++ dispatch cannot compile is refused naming the header."""
    cuda_variants = _cuda_variants()
    header = tmp_path / "variants.h"
    header.write_text(f"#define ENAT_SC_ATTN_HEAD_DIMS(X) {head_dims}\n#define ENAT_SC_ATTN_DTYPES(X) \\\n{dtypes}\n")
    if isinstance(expected, tuple):
        assert cuda_variants.read_variants(str(header)) == expected
    else:
        with pytest.raises(ValueError, match=expected) as info:
            cuda_variants.read_variants(str(header))
        assert str(header) in str(info.value)


def test_cuda_variant_dtype_names_must_be_torch_dtypes(tmp_path):
    """A misspelt torch name would build, then break `import enat_kernels`; setup.py
    passes this predicate so the build stops first, naming the header."""
    cuda_variants = _cuda_variants()
    header = tmp_path / "variants.h"
    dtypes = 'X(kFloat16, Fp16, "float16", Half) X(kBFloat16, Bf16, "bfloat61", BFloat16)'
    header.write_text(f"#define ENAT_SC_ATTN_HEAD_DIMS(X) X(32)\n#define ENAT_SC_ATTN_DTYPES(X) {dtypes}\n")
    is_dtype = lambda n: isinstance(getattr(torch, n, None), torch.dtype)  # noqa: E731
    with pytest.raises(ValueError, match="names bfloat61, not a torch dtype") as info:
        cuda_variants.read_variants(str(header), is_dtype_name=is_dtype)
    assert str(header) in str(info.value)
    assert cuda_variants.read_variants(str(header))[1] == ("float16", "bfloat61")  # no predicate: names only


def test_cuda_variant_reader_names_the_header_it_read(tmp_path):
    header = tmp_path / "variants.h"
    header.write_text("// no list here\n")
    with pytest.raises(ValueError, match="no '#define ENAT_SC_ATTN_HEAD_DIMS") as info:
        _cuda_variants().read_variants(str(header))
    assert str(header) in str(info.value)
