// The Python module arcface_kernels._C: importing it loads this library, whose static
// initializers register the ops (ops.cpp, cpu/, cuda/). Its attributes are facts about the
// build, read by arcface_kernels/_cpp.py and the tests, and the dry run of the CUDA host
// code for the static kernel report (cuda/dry_run.cpp).
#include <Python.h>

#include "arcface_math.h"
#include "ops.h"

namespace arcface::cuda {
bool add_dry_run_functions(PyObject* module);  // cuda/dry_run.cpp
}

// A CUDA compile check against a CPU-only torch is built under another name (setup.py).
#ifdef ARCFACE_CUDA_CHECK_MODULE
#define AK_MODULE_INIT PyInit__C_cuda_check
#define AK_MODULE_NAME "_C_cuda_check"
#else
#define AK_MODULE_INIT PyInit__C
#define AK_MODULE_NAME "_C"
#endif

extern "C" PyMODINIT_FUNC AK_MODULE_INIT(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, AK_MODULE_NAME,
                                   "arcface-kernels C++/CUDA extension (ops registered under "
                                   "torch.ops.arcface_kernels.cpp_fwd / cpp_bwd)",
                                   -1, nullptr};
  PyObject* m = PyModule_Create(&def);
  if (m == nullptr) return nullptr;
  bool ok = PyModule_AddIntConstant(m, "WITH_CUDA", arcface::compiled_with_cuda() ? 1 : 0) == 0 &&
            PyModule_AddIntConstant(m, "WRAP_FALLBACK", arcface::WRAP_FALLBACK) == 0 &&
            PyModule_AddIntConstant(m, "WRAP_EASY", arcface::WRAP_EASY) == 0 &&
            PyModule_AddIntConstant(m, "WRAP_NONE", arcface::WRAP_NONE) == 0 &&
            PyModule_AddIntConstant(m, "GRAD_EXACT", arcface::GRAD_EXACT) == 0 &&
            PyModule_AddIntConstant(m, "GRAD_STRAIGHT_THROUGH",
                                    arcface::GRAD_STRAIGHT_THROUGH) == 0 &&
            PyModule_AddObject(m, "NORM_EPS", PyFloat_FromDouble(arcface::NORM_EPS)) == 0 &&
            PyModule_AddObject(m, "SIN2_MIN", PyFloat_FromDouble(arcface::SIN2_MIN)) == 0 &&
            PyModule_AddObject(m, "WORKSPACE_BYTES",
                               PyLong_FromLongLong(arcface::kWorkspaceBytes)) == 0;
  if (!ok || !arcface::cuda::add_dry_run_functions(m)) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
