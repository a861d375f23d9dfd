// The Python module sparse_grad._C. Importing it registers the native kernels with the
// dispatcher (TORCH_LIBRARY_IMPL in csrc/cpu and csrc/cuda); it also tells which CPU
// instruction set the CPU loops run with, fingerprints a param group for the bound step, and
// tells autograd of a step's in-place writes.
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <string>

#include "cpu/loops.h"

namespace {

void put(std::string& key, int64_t value) { key.append(reinterpret_cast<const char*>(&value), sizeof(value)); }

// Appends what the bound step relies on in a tensor: address, shape, contiguity (and, for a
// grad, dtype and device); false where only the full check can say (no storage, not strided,
// a Python subclass such as DTensor).
bool put_tensor(std::string& key, const at::Tensor& t, bool grad) {
  if (!t.has_storage() || t.layout() != at::kStrided || t.key_set().has(c10::DispatchKey::Python)) return false;
  put(key, reinterpret_cast<int64_t>(t.data_ptr()));
  put(key, t.dim());
  for (int64_t size : t.sizes()) put(key, size);
  put(key, t.is_contiguous());
  if (grad) {
    put(key, static_cast<int64_t>(t.scalar_type()));
    put(key, static_cast<int64_t>(t.device().type()) << 16 | (t.device().index() & 0xFFFF));
  }
  return true;
}

// group_fingerprint(params: list) -> (bytes, grads) or None.
// In one C call what binding.reuse otherwise reads with several maps over Parameters (each
// Python-level access to a Parameter pays a __torch_function__ lookup): per param its object,
// address, shape and contiguity, and its grad's presence, address, shape, contiguity, dtype and
// device; with the list of the grads present, in param order. None where a tensor needs the
// full check. Equal bytes mean the same params, in place, with grads at the same addresses.
PyObject* group_fingerprint(PyObject*, PyObject* params) {
  if (!PyList_Check(params)) {
    PyErr_SetString(PyExc_TypeError, "group_fingerprint takes a list of tensors");
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(params);
  std::string key;
  key.reserve(static_cast<size_t>(n) * 96);
  PyObject* grads = PyList_New(0);
  if (grads == nullptr) return nullptr;
  try {
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* item = PyList_GET_ITEM(params, i);
      if (!THPVariable_Check(item)) {
        Py_DECREF(grads);
        Py_RETURN_NONE;
      }
      const at::Tensor& p = THPVariable_Unpack(item);
      put(key, reinterpret_cast<int64_t>(item));
      if (!put_tensor(key, p, false)) {
        Py_DECREF(grads);
        Py_RETURN_NONE;
      }
      const at::Tensor& g = p.grad();
      put(key, g.defined());
      if (!g.defined()) continue;
      if (!put_tensor(key, g, true)) {
        Py_DECREF(grads);
        Py_RETURN_NONE;
      }
      PyObject* wrapped = THPVariable_Wrap(g);
      if (wrapped == nullptr || PyList_Append(grads, wrapped) != 0) {
        Py_XDECREF(wrapped);
        Py_DECREF(grads);
        return nullptr;
      }
      put(key, reinterpret_cast<int64_t>(Py_TYPE(wrapped)));  // a subclass view at the same address differs
      Py_DECREF(wrapped);
    }
  } catch (const std::exception&) {  // e.g. a tensor whose data_ptr cannot be read: full check
    Py_DECREF(grads);
    Py_RETURN_NONE;
  }
  PyObject* bytes = PyBytes_FromStringAndSize(key.data(), static_cast<Py_ssize_t>(key.size()));
  if (bytes == nullptr) {
    Py_DECREF(grads);
    return nullptr;
  }
  PyObject* result = PyTuple_Pack(2, bytes, grads);
  Py_DECREF(bytes);
  Py_DECREF(grads);
  return result;
}

// bump_versions(tensors: list) -> None.
// What torch._C._increment_version does for a list, without converting the list to a
// std::vector<at::Tensor> first (about 90 ns a tensor on a 2-core VM, a third of a steady-state
// step's host time at 192 params): every version counter goes up by one; inference tensors,
// which have none, are skipped. Every element is checked before any counter moves.
PyObject* bump_versions(PyObject*, PyObject* tensors) {
  if (!PyList_Check(tensors)) {
    PyErr_SetString(PyExc_TypeError, "bump_versions takes a list of tensors");
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(tensors);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!THPVariable_Check(PyList_GET_ITEM(tensors, i))) {
      PyErr_Format(PyExc_TypeError, "bump_versions: element %zd is a %s, not a tensor", i,
                   Py_TYPE(PyList_GET_ITEM(tensors, i))->tp_name);
      return nullptr;
    }
  }
  for (Py_ssize_t i = 0; i < n; ++i) {
    c10::TensorImpl* impl = THPVariable_Unpack(PyList_GET_ITEM(tensors, i)).unsafeGetTensorImpl();
    if (!impl->is_inference()) impl->bump_version();
  }
  Py_RETURN_NONE;
}

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
    {"group_fingerprint", group_fingerprint, METH_O,
     "(bytes, grads) describing a param list for the bound step, or None (see binding.reuse)."},
    {"bump_versions", bump_versions, METH_O,
     "Bumps the autograd version counter of each tensor in a list (torch._C._increment_version)."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "sparse_grad's native kernels.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module); }
