// Shared helpers for the stemfast._core kernels.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace stemfast {

namespace py = pybind11;

// Number of worker threads the kernels use: process-wide, set_num_threads(0) restores the default
// (hardware_threads()). Every kernel's result is independent of it (contiguous chunks, no
// reductions across chunks); tests/test_backend.py checks that.
int num_threads();
void set_num_threads(int n);
int hardware_threads();

// Run fn(begin, end) over [0, n) split into contiguous chunks on num_threads() threads.
// The caller must have released the GIL (py::gil_scoped_release) when fn touches no Python objects.
template <class Fn>
void parallel_for(std::int64_t n, Fn&& fn, std::int64_t min_chunk = 1024) {
    if (n <= 0) return;
    std::int64_t nt = std::max(1, num_threads());
    nt = std::min<std::int64_t>(nt, std::max<std::int64_t>(1, n / std::max<std::int64_t>(1, min_chunk)));
    if (nt <= 1) { fn(std::int64_t(0), n); return; }
    std::vector<std::thread> pool;
    pool.reserve(static_cast<size_t>(nt));
    const std::int64_t step = (n + nt - 1) / nt;
    for (std::int64_t t = 0; t < nt; ++t) {
        const std::int64_t b = t * step, e = std::min(n, b + step);
        if (b >= e) break;
        pool.emplace_back([&fn, b, e] { fn(b, e); });
    }
    for (auto& th : pool) th.join();
}

// Each kernel family registers its functions here (one .cpp each).
void register_bandpass(py::module_& m);
void register_peaks(py::module_& m);
void register_lattice(py::module_& m);
void register_patches(py::module_& m);
void register_neighbors(py::module_& m);
void register_references(py::module_& m);

}  // namespace stemfast
