// Module init of enat_kernels._C_cuda: imported as a Python module so that a missing
// or ABI-incompatible build surfaces as an ImportError; it has no Python API.  Its
// kernels register for the CUDA dispatch key of the schemas in csrc/schema.cpp.
#include <Python.h>

extern "C" PyMODINIT_FUNC PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
