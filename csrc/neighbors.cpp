// knn_within / pairs_within: fixed-radius neighbour search on a uniform grid (contract:
// python/stemfast/_kernels/__init__.py; reference: python/stemfast/_kernels/numpy_ref/neighbors.py).
// The grid is rebuilt on every call (a counting sort, O(N)); queries run in parallel. Distances are
// compared squared, dx * dx + dy * dy against radius * radius, as in the reference.
#include "common.hpp"

#include <cmath>
#include <limits>
#include <string>

namespace stemfast {
namespace {

using CArrD = py::array_t<double, py::array::c_style | py::array::forcecast>;

// The points bucketed into square cells (CellGrid) of about 2 points each, at most the search radius.
struct Grid : CellGrid {
    Grid(const double* xy, std::int64_t n, double radius) {
        if (n <= 0) return;
        bounds(xy, n);
        const double wx = x1 - x0, wy = y1 - y0;
        // about 2 points per cell, at most the search radius, and never more than 4 N + 64 cells
        double c = std::sqrt(std::max(wx * wy, 1e-300) / static_cast<double>(n) * 2.0);
        c = std::min(c, radius);
        const double cmin = std::sqrt(std::max(wx * wy, 0.0) / (4.0 * static_cast<double>(n) + 64.0));
        cell = std::max({c, cmin, (wx + wy) / (4.0 * static_cast<double>(n) + 64.0), 1e-9});
        bucket(xy, n);
    }

    // fn(slot, d2) for every point in the cells around (qx, qy) that a disc of radius r touches
    template <class Fn>
    void visit(double qx, double qy, double r, Fn&& fn) const {
        if (nx == 0) return;
        std::int64_t cx0, cx1, cy0, cy1;
        if (!range(qx, r, x0, nx, cx0, cx1) || !range(qy, r, y0, ny, cy0, cy1)) return;
        for (std::int64_t cy = cy0; cy <= cy1; ++cy) {
            const std::int64_t a = start[cy * nx + cx0], b = start[cy * nx + cx1 + 1];
            for (std::int64_t s = a; s < b; ++s) {
                const double dx = cxy[2 * s] - qx, dy = cxy[2 * s + 1] - qy;
                fn(s, dx * dx + dy * dy);
            }
        }
    }
};

py::tuple knn_within(CArrD points, CArrD queries, std::int64_t k, double radius) {
    if (points.ndim() != 2 || points.shape(1) != 2) throw py::value_error("knn_within: points must be [N, 2]");
    if (queries.ndim() != 2 || queries.shape(1) != 2) throw py::value_error("knn_within: queries must be [M, 2]");
    if (k < 1) throw py::value_error("knn_within: k must be >= 1");
    if (!(std::isfinite(radius) && radius > 0.0)) throw py::value_error("knn_within: radius must be finite and > 0");
    const std::int64_t n = points.shape(0), m = queries.shape(0);
    py::array_t<double> dist({m, k});
    py::array_t<std::int64_t> idx({m, k});
    const double* p = points.data();
    const double* q = queries.data();
    double* pd = dist.mutable_data();
    std::int64_t* pi = idx.mutable_data();
    {
        py::gil_scoped_release release;
        const Grid g(p, n, radius);
        const double r2 = radius * radius;
        const double inf = std::numeric_limits<double>::infinity();
        parallel_for(
            m,
            [&](std::int64_t begin, std::int64_t end) {
                std::vector<double> bd(static_cast<size_t>(k));
                std::vector<std::int64_t> bi(static_cast<size_t>(k));
                for (std::int64_t t = begin; t < end; ++t) {
                    std::int64_t cnt = 0;
                    g.visit(q[2 * t], q[2 * t + 1], radius, [&](std::int64_t s, double d2) {
                        if (!(d2 < r2)) return;
                        const std::int64_t j = g.order[s];
                        if (cnt == k && !(d2 < bd[k - 1] || (d2 == bd[k - 1] && j < bi[k - 1]))) return;
                        std::int64_t pos = cnt < k ? cnt++ : k - 1;  // insertion into the sorted list
                        while (pos > 0 && (d2 < bd[pos - 1] || (d2 == bd[pos - 1] && j < bi[pos - 1]))) {
                            bd[pos] = bd[pos - 1];
                            bi[pos] = bi[pos - 1];
                            --pos;
                        }
                        bd[pos] = d2;
                        bi[pos] = j;
                    });
                    double* drow = pd + t * k;
                    std::int64_t* irow = pi + t * k;
                    for (std::int64_t c = 0; c < k; ++c) {
                        drow[c] = c < cnt ? std::sqrt(bd[c]) : inf;
                        irow[c] = c < cnt ? bi[c] : -1;
                    }
                }
            },
            2048);
    }
    return py::make_tuple(dist, idx);
}

py::array_t<std::int64_t> pairs_within(CArrD points, double radius) {
    if (points.ndim() != 2 || points.shape(1) != 2) throw py::value_error("pairs_within: points must be [N, 2]");
    if (!(std::isfinite(radius) && radius > 0.0)) throw py::value_error("pairs_within: radius must be finite and > 0");
    const std::int64_t n = points.shape(0);
    const double* p = points.data();
    std::vector<std::int64_t> offs(static_cast<size_t>(n + 1), 0);
    std::vector<std::int64_t> flat;
    {
        py::gil_scoped_release release;
        const Grid g(p, n, radius);
        const double r2 = radius * radius;
        // pass 1: partners j > i of every i; pass 2: write them, sorted, at the prefix offsets
        parallel_for(
            n,
            [&](std::int64_t begin, std::int64_t end) {
                for (std::int64_t i = begin; i < end; ++i) {
                    std::int64_t c = 0;
                    g.visit(p[2 * i], p[2 * i + 1], radius, [&](std::int64_t s, double d2) {
                        if (d2 <= r2 && g.order[s] > i) ++c;
                    });
                    offs[i + 1] = c;
                }
            },
            2048);
        for (std::int64_t i = 0; i < n; ++i) offs[i + 1] += offs[i];
        flat.resize(static_cast<size_t>(offs[n]));
        parallel_for(
            n,
            [&](std::int64_t begin, std::int64_t end) {
                for (std::int64_t i = begin; i < end; ++i) {
                    std::int64_t* seg = flat.data() + offs[i];
                    std::int64_t c = 0;
                    g.visit(p[2 * i], p[2 * i + 1], radius, [&](std::int64_t s, double d2) {
                        const std::int64_t j = g.order[s];
                        if (d2 <= r2 && j > i) seg[c++] = j;
                    });
                    std::sort(seg, seg + c);
                }
            },
            2048);
    }
    const std::int64_t np_ = offs[n];
    py::array_t<std::int64_t> out({np_, std::int64_t(2)});
    std::int64_t* po = out.mutable_data();
    for (std::int64_t i = 0; i < n; ++i)
        for (std::int64_t t = offs[i]; t < offs[i + 1]; ++t) {
            po[2 * t] = i;
            po[2 * t + 1] = flat[t];
        }
    return out;
}

}  // namespace

void register_neighbors(py::module_& m) {
    m.def("knn_within", &knn_within, py::arg("points"), py::arg("queries"), py::arg("k"), py::arg("radius"),
          "Up to k nearest points strictly within radius of every query -> (dist float64[M, k] (inf padded),\n"
          "idx int64[M, k] (-1 padded)), nearest first, ties by index (see stemfast._kernels for the contract).");
    m.def("pairs_within", &pairs_within, py::arg("points"), py::arg("radius"),
          "Pairs (i, j), i < j, of points at most radius apart -> int64[P, 2], sorted by i then j.");
}

}  // namespace stemfast
