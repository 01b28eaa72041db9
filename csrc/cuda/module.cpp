// Module init of enat_kernels._C_cuda: imported as a Python module so that a missing
// or ABI-incompatible build surfaces as an ImportError.  Its kernels register for the
// CUDA dispatch key of the schemas in csrc/schema.cpp; its one Python function,
// kernel_image_error(device) -> str | None, says whether this build can run on a
// device (see probe_kernel_image in routing.h).
#include <Python.h>

#include "cuda/routing.h"

namespace {

PyObject* kernel_image_error(PyObject*, PyObject* arg) {
  const long device = PyLong_AsLong(arg);
  if (device == -1 && PyErr_Occurred()) return nullptr;
  cudaError_t err;
  Py_BEGIN_ALLOW_THREADS
  err = enat_kernels::cuda::probe_kernel_image(static_cast<int>(device));
  Py_END_ALLOW_THREADS
  if (err == cudaSuccess) Py_RETURN_NONE;
  return PyUnicode_FromFormat("%s (%s)", cudaGetErrorString(err), cudaGetErrorName(err));
}

PyMethodDef methods[] = {
    {"kernel_image_error", kernel_image_error, METH_O,
     "None when this build has a kernel image for CUDA device `device`, else the CUDA error."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
