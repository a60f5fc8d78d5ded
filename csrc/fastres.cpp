// The schemas of every fastres_native op, and the Python module fastres._C whose import defines
// them along with the CUDA kernels (cuda/*.cu). The CPU kernels (cpu/*.cpp) are built once per
// ISA as the modules fastres._cpu_<isa>; fastres.backend imports the one this CPU runs.
// `fastres._C.built_with_cuda` says whether the CUDA kernels were compiled in.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fastres_native, m) {
  m.def("bn_act(Tensor x, Tensor? weight, Tensor? bias, Tensor? mean, Tensor? invstd, Tensor? residual, "
        "str act) -> Tensor");
  m.def("bn_act_backward(Tensor grad, Tensor x, Tensor? weight, Tensor? bias, Tensor? mean, Tensor? invstd, "
        "Tensor? residual, Tensor? out, str act, bool training, bool[] output_mask) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("batch_stats(Tensor x) -> (Tensor, Tensor)");
  m.def("bn_act_pool2d(Tensor x, Tensor? weight, Tensor? bias, Tensor? mean, Tensor? invstd, str act, str kind, "
        "int[] kernel_size, int[] stride, int[] padding) -> Tensor");
  m.def("se_gate_act(Tensor x, Tensor gate, Tensor? residual, str act) -> Tensor");
  m.def("se_gate_act_backward(Tensor grad, Tensor x, Tensor gate, Tensor? residual, Tensor? out, str act) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("residual_act_(Tensor(a!) out, Tensor residual, str act) -> ()");
  m.def("split_add(Tensor x, Tensor y, Tensor(a!) slot) -> Tensor");
}

#ifdef FASTRES_WITH_CUDA
constexpr bool kBuiltWithCuda = true;
#else
constexpr bool kBuiltWithCuda = false;
#endif

PyMODINIT_FUNC PyInit__C() {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "fastres._C", "fastres compiled kernels", -1, nullptr};
  PyObject* mod = PyModule_Create(&def);
  if (mod && PyModule_AddObjectRef(mod, "built_with_cuda", kBuiltWithCuda ? Py_True : Py_False) < 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
