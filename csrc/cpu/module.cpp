// The Python module of one ISA build of the CPU kernels (fastres._cpu_avx2, fastres._cpu_avx512,
// fastres._cpu_default): importing it registers their CPU implementations of the fastres_native
// ops, whose schemas fastres._C defines.
#include <Python.h>

#define FASTRES_CAT_(a, b) a##b
#define FASTRES_CAT(a, b) FASTRES_CAT_(a, b)
#define FASTRES_STR_(a) #a
#define FASTRES_STR(a) FASTRES_STR_(a)

PyMODINIT_FUNC FASTRES_CAT(PyInit_, TORCH_EXTENSION_NAME)() {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "fastres." FASTRES_STR(TORCH_EXTENSION_NAME),
                            "fastres CPU kernels", -1, nullptr};
  return PyModule_Create(&def);
}
