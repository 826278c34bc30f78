// Shared helpers for the stemfast._core kernels.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/numpy.h>
#include <stdexcept>

#include <algorithm>
#include <cmath>
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
void register_rvae(py::module_& m);
void register_text(py::module_& m);

// Points bucketed into square cells of side `cell` (a counting sort by cell, row-major):
// order[start[c] .. start[c + 1]) are the points of cell c in increasing index order, cxy their
// coordinates in that order. bounds() then, with `cell` set, bucket(); range() finds the cells a
// query needs. Shared by the neighbour searches (neighbors.cpp, references.cpp).
struct CellGrid {
    double x0 = 0.0, y0 = 0.0, x1 = 0.0, y1 = 0.0, cell = 1.0;
    std::int64_t nx = 0, ny = 0;
    std::vector<std::int64_t> start, order;
    std::vector<double> cxy;

    // The bounding box of xy [n, 2] (n >= 1); every coordinate must be finite (a NaN or inf has no
    // cell: std::invalid_argument, which pybind11 raises as ValueError).
    void bounds(const double* xy, std::int64_t n) {
        for (std::int64_t i = 0; i < 2 * n; ++i)
            if (!std::isfinite(xy[i])) throw std::invalid_argument("points must be finite (a NaN or inf coordinate)");
        x0 = x1 = xy[0];
        y0 = y1 = xy[1];
        for (std::int64_t i = 1; i < n; ++i) {
            x0 = std::min(x0, xy[2 * i]);
            x1 = std::max(x1, xy[2 * i]);
            y0 = std::min(y0, xy[2 * i + 1]);
            y1 = std::max(y1, xy[2 * i + 1]);
        }
    }

    void bucket(const double* xy, std::int64_t n) {
        nx = static_cast<std::int64_t>(std::floor((x1 - x0) / cell)) + 1;
        ny = static_cast<std::int64_t>(std::floor((y1 - y0) / cell)) + 1;
        std::vector<std::int64_t> cid(static_cast<size_t>(n));
        start.assign(static_cast<size_t>(nx * ny + 1), 0);
        for (std::int64_t i = 0; i < n; ++i) {
            const std::int64_t cx = std::min(nx - 1, static_cast<std::int64_t>((xy[2 * i] - x0) / cell));
            const std::int64_t cy = std::min(ny - 1, static_cast<std::int64_t>((xy[2 * i + 1] - y0) / cell));
            cid[i] = cy * nx + cx;
            ++start[cid[i] + 1];
        }
        for (std::int64_t c = 0; c < nx * ny; ++c) start[c + 1] += start[c];
        order.resize(static_cast<size_t>(n));
        cxy.resize(static_cast<size_t>(2 * n));
        std::vector<std::int64_t> fillp(start.begin(), start.end() - 1);
        for (std::int64_t i = 0; i < n; ++i) {
            const std::int64_t slot = fillp[cid[i]]++;
            order[slot] = i;
            cxy[2 * slot] = xy[2 * i];
            cxy[2 * slot + 1] = xy[2 * i + 1];
        }
    }

    // Cell index range [lo, hi] covering [v - r, v + r] along an axis of origin o and n cells
    // (slightly widened: the exact distance test decides); false when it misses the grid.
    bool range(double v, double r, double o, std::int64_t n, std::int64_t& lo, std::int64_t& hi) const {
        const double rr = r * (1.0 + 1e-9) + 1e-12;
        const double a = std::floor((v - rr - o) / cell), b = std::floor((v + rr - o) / cell);
        if (!(b >= 0.0) || !(a <= static_cast<double>(n - 1))) return false;
        lo = a < 0.0 ? 0 : static_cast<std::int64_t>(a);
        hi = b > static_cast<double>(n - 1) ? n - 1 : static_cast<std::int64_t>(b);
        return true;
    }
};

}  // namespace stemfast
