// stemfast._core: the private compiled kernels. The public API lives in Python (stemfast.*);
// every function here has a NumPy reference in stemfast/_kernels/numpy_ref.py with the same signature.
#include "common.hpp"

#include <atomic>

namespace stemfast {
// The kernel contract this extension implements: stemfast._kernels.CONTRACT_VERSION (bump both together).
constexpr int kContractVersion = 2;
// Process-wide (all calling threads), read once per parallel_for; atomic because a kernel may run in
// one thread while another changes the setting (the running kernel keeps the count it started with).
static std::atomic<int> g_threads{0};
int hardware_threads() {
    unsigned hc = std::thread::hardware_concurrency();
    return hc == 0 ? 1 : static_cast<int>(hc);
}
int num_threads() {
    const int n = g_threads.load(std::memory_order_relaxed);
    return n > 0 ? n : hardware_threads();
}
void set_num_threads(int n) {
    if (n < 0) throw py::value_error("set_num_threads: n must be >= 0 (0 = hardware concurrency)");
    g_threads.store(n, std::memory_order_relaxed);
}
}  // namespace stemfast

PYBIND11_MODULE(_core, m) {
    m.doc() = "stemfast compiled kernels (private; use the stemfast package API)";
    m.attr("CONTRACT_VERSION") = stemfast::kContractVersion;
    m.def("get_num_threads", &stemfast::num_threads,
          "Worker threads the kernels use (process-wide; the hardware concurrency unless set).");
    m.def("set_num_threads", &stemfast::set_num_threads, pybind11::arg("n"),
          "Set the kernels' worker threads, process-wide (0 = hardware concurrency; n < 0 raises ValueError). "
          "Results do not depend on it.");
    m.def("hardware_threads", &stemfast::hardware_threads,
          "std::thread::hardware_concurrency() (1 when unknown): the default of get_num_threads.");
    stemfast::register_bandpass(m);
    stemfast::register_peaks(m);
    stemfast::register_lattice(m);
    stemfast::register_patches(m);
    stemfast::register_neighbors(m);
    stemfast::register_references(m);
    stemfast::register_rvae(m);
    stemfast::register_text(m);
}
