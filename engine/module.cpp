// idemrt._engine: native runtime parts (pybind11). Components register themselves here.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_engine, m) {
    m.doc() = "idemrt native runtime";
}
