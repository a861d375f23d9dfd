// The Python module sparse_grad._C. Importing it registers the native kernels with the
// dispatcher (TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda); it also tells which CPU
// instruction set the CPU loops run with.
#include <Python.h>

#include "cpu/loops.h"

namespace {

PyObject* cpu_isa(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(sparse_grad::cpu::loops().isa);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "The instruction set of the CPU loops (default, avx2, avx512)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "sparse_grad's native kernels.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module); }
