// stemfast._core: the private compiled kernels. The public API lives in Python (stemfast.*);
// every function here has a NumPy reference in stemfast/_kernels/numpy_ref.py with the same signature.
#include "common.hpp"

namespace stemfast {
static int g_threads = 0;
int num_threads() {
    if (g_threads > 0) return g_threads;
    unsigned hc = std::thread::hardware_concurrency();
    return hc == 0 ? 1 : static_cast<int>(hc);
}
void set_num_threads(int n) { g_threads = n < 0 ? 0 : n; }
}  // namespace stemfast

PYBIND11_MODULE(_core, m) {
    m.doc() = "stemfast compiled kernels (private; use the stemfast package API)";
    m.def("get_num_threads", &stemfast::num_threads, "Worker threads used by the kernels.");
    m.def("set_num_threads", &stemfast::set_num_threads, pybind11::arg("n"),
          "Set worker threads (0 = hardware concurrency).");
    stemfast::register_bandpass(m);
    stemfast::register_peaks(m);
    stemfast::register_lattice(m);
    stemfast::register_patches(m);
    stemfast::register_neighbors(m);
}
