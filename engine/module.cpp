// idemrt._engine: native runtime parts (pybind11). Components register themselves here.
#include <pybind11/pybind11.h>

namespace idemrt {
void register_rans(pybind11::module_& m);
}

PYBIND11_MODULE(_engine, m) {
    m.doc() = "idemrt native runtime";
    idemrt::register_rans(m);
}
