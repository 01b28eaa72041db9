"""Triton kernels seen as a GPU would see them, without a GPU.

Used by the Triton attention and routing tests to compare the specialization key of
real launches across lengths (one compiled variant whatever the lengths), and to
compile kernels ahead of time for sm_80 / sm_90.
"""


def jit_for_gpu(kernel, arch: int = 90):
    """(JITFunction, backend, binder) of `kernel` for sm_<arch>, no GPU needed.

    The JITFunction is rebuilt from the kernel's Python function with the kernel's own
    do_not_specialize (under the interpreter `kernel` is an InterpretedFunction); the
    binder is what Triton's launcher calls to get the specialization key that selects
    the compiled variant."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    dns = getattr(kernel, "do_not_specialize", None) or kernel.kwargs.get("do_not_specialize")
    jit = JITFunction(kernel.fn, do_not_specialize=dns)
    backend = make_backend(GPUTarget("cuda", arch, 32))
    return jit, backend, create_function_from_signature(jit.signature, jit.params, backend)
