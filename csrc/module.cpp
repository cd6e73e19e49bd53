// The Python module mtbert._C. It holds no Python functions: importing it loads this library,
// whose TORCH_LIBRARY blocks register the ops under torch.ops.mtbert.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "mtbert's compiled ops (see torch.ops.mtbert)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
