// local_references / neighbour_mean: statistics over each site's k nearest sites (contract:
// python/stemfast/_kernels/__init__.py; reference: python/stemfast/_kernels/numpy_ref/references.py).
// The k nearest are found on a uniform grid (about 2 points per cell): every point within a radius
// that should hold k points is collected (the radius grows until it does), and the k smallest
// (squared distance, index) pairs are selected with nth_element -- the exact set, ties by index.
// The medians select with a branch-free quickselect (select_kth): the same order statistics.
// The per-neighbour arithmetic (offsets, lattice coordinates, rint, the node test) and the medians
// (0.5 * (lower + upper middle)) are those of the reference, so the results are bit-identical.
#include "common.hpp"

#include <cmath>
#include <limits>
#include <utility>

namespace stemfast {
namespace {

using CArrD = py::array_t<double, py::array::c_style | py::array::forcecast>;
using CArrI = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;
using CArrB = py::array_t<std::uint8_t, py::array::c_style | py::array::forcecast>;
using Cand = std::pair<double, std::int64_t>;  // (squared distance, index): ordered lexicographically

// The sites bucketed into square cells of about 2 points each (CellGrid); `density` the points per px^2.
struct KnnGrid : CellGrid {
    double density = 1.0;

    KnnGrid(const double* xy, std::int64_t n) {
        bounds(xy, n);
        const double wx = x1 - x0, wy = y1 - y0;
        const double area = std::max(wx * wy, std::max(wx, wy) * std::max(wx, wy) * 1e-6);
        density = static_cast<double>(n) / std::max(area, 1e-300);
        cell = std::max({std::sqrt(2.0 / density), (wx + wy) / (4.0 * static_cast<double>(n) + 64.0), 1e-9});
        bucket(xy, n);
    }

    // Every point with dx * dx + dy * dy <= r * r into cand; true when the square searched held the whole grid.
    bool collect(double qx, double qy, double r, std::vector<Cand>& cand) const {
        cand.clear();
        const double r2 = r * r;
        std::int64_t cx0, cx1, cy0, cy1;
        if (range(qx, r, x0, nx, cx0, cx1) && range(qy, r, y0, ny, cy0, cy1)) {
            for (std::int64_t cy = cy0; cy <= cy1; ++cy) {
                const std::int64_t a = start[cy * nx + cx0], b = start[cy * nx + cx1 + 1];
                for (std::int64_t s = a; s < b; ++s) {
                    const double dx = cxy[2 * s] - qx, dy = cxy[2 * s + 1] - qy;
                    const double d2 = dx * dx + dy * dy;
                    if (d2 <= r2) cand.emplace_back(d2, order[s]);
                }
            }
        }
        // the disc holds the whole bounding box: every (finite) point was seen
        const double fx = std::max(qx - x0, x1 - qx), fy = std::max(qy - y0, y1 - qy);
        return fx * fx + fy * fy <= r2;
    }

    // The k nearest points of (qx, qy) (k <= number of points): cand[0 .. k) afterwards, in no order,
    // with cand[k - 1] the k-th smallest (squared distance, index). Returns how many were found: k, or
    // fewer only when points are not finite.
    std::int64_t nearest(double qx, double qy, std::int64_t k, std::vector<Cand>& cand) const {
        double r = std::sqrt(static_cast<double>(k) / (3.141592653589793 * density)) * 1.05 + 0.5 * cell;
        for (;;) {
            const bool all = collect(qx, qy, r, cand);
            const auto got = static_cast<std::int64_t>(cand.size());
            if (got >= k || all) break;
            r *= std::max(1.25, std::sqrt(static_cast<double>(k) / static_cast<double>(std::max<std::int64_t>(got, 1))));
        }
        k = std::min<std::int64_t>(k, static_cast<std::int64_t>(cand.size()));
        if (k > 0) std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end());
        return k;
    }
};

// a[k] of a[0 .. n) in ascending order, with a[0 .. k) <= a[k] <= a[k + 1 .. n) afterwards (what
// std::nth_element guarantees; the values are the same order statistics, so results do not change).
// A quickselect whose three-way partition writes every element to both ends of `tmp` and advances
// one end by a comparison (no branch to mispredict on random data: ~2x std::nth_element on the ~100
// values of a site's sublattice); short ranges by insertion sort. Finite values only.
double select_kth(double* a, std::int64_t n, std::int64_t k, std::vector<double>& tmp) {
    std::int64_t lo = 0, hi = n;
    if (static_cast<std::int64_t>(tmp.size()) < n) tmp.resize(static_cast<size_t>(n));
    double* t = tmp.data();
    while (hi - lo > 16) {
        const double x = a[lo], y = a[lo + (hi - lo) / 2], z = a[hi - 1];
        const double pivot = std::max(std::min(x, y), std::min(std::max(x, y), z));  // median of three
        const std::int64_t m = hi - lo;
        std::int64_t nl = 0, ng = 0;
        for (std::int64_t i = lo; i < hi; ++i) {
            const double v = a[i];
            t[nl] = v;
            nl += v < pivot;
            t[m - 1 - ng] = v;
            ng += v > pivot;
        }
        std::copy(t, t + nl, a + lo);
        std::fill(a + lo + nl, a + hi - ng, pivot);
        std::copy(t + m - ng, t + m, a + hi - ng);
        if (k < lo + nl)
            hi = lo + nl;
        else if (k >= hi - ng)
            lo = hi - ng;
        else
            return pivot;
    }
    for (std::int64_t i = lo + 1; i < hi; ++i) {
        const double v = a[i];
        std::int64_t j = i;
        for (; j > lo && a[j - 1] > v; --j) a[j] = a[j - 1];
        a[j] = v;
    }
    return a[k];
}

// Median of a[0 .. c) (reordered): 0.5 * (a[(c - 1) / 2] + a[c / 2]) of the sorted values; c >= 1.
double median_of(double* a, std::int64_t c, std::vector<double>& tmp) {
    const std::int64_t hi = c / 2, lo = (c - 1) / 2;
    const double h = select_kth(a, c, hi, tmp);
    const double l = lo == hi ? h : *std::max_element(a, a + hi);
    return 0.5 * (l + h);
}

struct RefInputs {
    const double* xy;
    const double* inv;
    const double* values;
    const std::uint8_t* refable;
    double tol;
};

// The statistics of one site i into med[3], mad[3], cnt[3] from its neighbours cand[0 .. k).
void site_stats(std::int64_t i, const RefInputs& in, const std::vector<Cand>& cand, std::int64_t k,
                std::vector<double> (&buf)[3], std::vector<double>& tmp, double* med, double* mad, std::int64_t* cnt) {
    const double qx = in.xy[2 * i], qy = in.xy[2 * i + 1];
    const double* ia = in.inv + 4 * i;
    for (auto& b : buf) b.clear();
    for (std::int64_t t = 0; t < k; ++t) {
        const std::int64_t j = cand[t].second;
        if (j == i || !in.refable[j]) continue;
        const double x = in.xy[2 * j] - qx, y = in.xy[2 * j + 1] - qy;
        const double m = x * ia[0] + y * ia[2];
        const double n = x * ia[1] + y * ia[3];
        const double rm = std::nearbyint(m), rn = std::nearbyint(n);
        if (!(std::fabs(m - rm) < in.tol && std::fabs(n - rn) < in.tol)) continue;  // NaN: not on a node
        const auto c = static_cast<std::int64_t>(rm - rn);
        buf[((c % 3) + 3) % 3].push_back(in.values[j]);
    }
    const double nan = std::numeric_limits<double>::quiet_NaN();
    for (int c = 0; c < 3; ++c) {
        auto& b = buf[c];
        const auto cc = static_cast<std::int64_t>(b.size());
        cnt[c] = cc;
        if (cc == 0) {
            med[c] = mad[c] = nan;
            continue;
        }
        const double md = median_of(b.data(), cc, tmp);
        for (auto& v : b) v = std::fabs(v - md);
        med[c] = md;
        mad[c] = 1.4826 * median_of(b.data(), cc, tmp);
    }
}

py::tuple local_references(CArrD xy, CArrD inv_basis, CArrD values, CArrB refable, CArrI rows, std::int64_t k,
                           double tol) {
    if (xy.ndim() != 2 || xy.shape(1) != 2) throw py::value_error("local_references: xy must be [N, 2]");
    const std::int64_t n = xy.shape(0), m = rows.ndim() == 1 ? rows.shape(0) : -1;
    if (inv_basis.ndim() != 3 || inv_basis.shape(0) != n || inv_basis.shape(1) != 2 || inv_basis.shape(2) != 2)
        throw py::value_error("local_references: inv_basis must be [N, 2, 2]");
    if (values.ndim() != 1 || values.shape(0) != n) throw py::value_error("local_references: values must be [N]");
    if (refable.ndim() != 1 || refable.shape(0) != n) throw py::value_error("local_references: refable must be [N]");
    if (m < 0) throw py::value_error("local_references: rows must be [M]");
    if (k < 1 || k > n) throw py::value_error("local_references: k must be in [1, N]");
    const std::int64_t* pr = rows.data();
    for (std::int64_t t = 0; t < m; ++t)
        if (pr[t] < 0 || pr[t] >= n) throw py::value_error("local_references: rows out of range");
    py::array_t<double> med({m, std::int64_t(3)}), mad({m, std::int64_t(3)});
    py::array_t<std::int64_t> cnt({m, std::int64_t(3)});
    py::array_t<double> reach(m);
    const RefInputs in{xy.data(), inv_basis.data(), values.data(), refable.data(), tol};
    double *pmed = med.mutable_data(), *pmad = mad.mutable_data(), *preach = reach.mutable_data();
    std::int64_t* pcnt = cnt.mutable_data();
    {
        py::gil_scoped_release release;
        if (m > 0) {
            const KnnGrid g(in.xy, n);
            parallel_for(
                m,
                [&](std::int64_t begin, std::int64_t end) {
                    std::vector<Cand> cand;
                    std::vector<double> buf[3], tmp;
                    for (std::int64_t t = begin; t < end; ++t) {
                        const std::int64_t i = pr[t];
                        const std::int64_t got = g.nearest(in.xy[2 * i], in.xy[2 * i + 1], k, cand);
                        preach[t] = got > 0 ? std::sqrt(cand[got - 1].first) : std::numeric_limits<double>::quiet_NaN();
                        site_stats(i, in, cand, got, buf, tmp, pmed + 3 * t, pmad + 3 * t, pcnt + 3 * t);
                    }
                },
                256);
        }
    }
    return py::make_tuple(med, mad, cnt, reach);
}

py::array_t<double> neighbour_mean(CArrD xy, CArrD values, std::int64_t k) {
    if (xy.ndim() != 2 || xy.shape(1) != 2) throw py::value_error("neighbour_mean: xy must be [N, 2]");
    const std::int64_t n = xy.shape(0);
    if (values.ndim() != 2 || values.shape(0) != n) throw py::value_error("neighbour_mean: values must be [N, L]");
    if (k < 1 || k > n) throw py::value_error("neighbour_mean: k must be in [1, N]");
    const std::int64_t L = values.shape(1);
    py::array_t<double> out({n, L});
    const double* p = xy.data();
    const double* v = values.data();
    double* po = out.mutable_data();
    {
        py::gil_scoped_release release;
        const KnnGrid g(p, n);
        parallel_for(
            n,
            [&](std::int64_t begin, std::int64_t end) {
                std::vector<Cand> cand;
                for (std::int64_t i = begin; i < end; ++i) {
                    const std::int64_t got = g.nearest(p[2 * i], p[2 * i + 1], k, cand);
                    std::sort(cand.begin(), cand.begin() + got);  // nearest first, ties by index
                    double* row = po + i * L;
                    for (std::int64_t l = 0; l < L; ++l) row[l] = 0.0;
                    for (std::int64_t t = 0; t < got; ++t) {
                        const double* src = v + cand[t].second * L;
                        for (std::int64_t l = 0; l < L; ++l) row[l] += src[l];
                    }
                    for (std::int64_t l = 0; l < L; ++l) row[l] /= static_cast<double>(k);
                }
            },
            256);
    }
    return out;
}

}  // namespace

void register_references(py::module_& m) {
    m.def("local_references", &local_references, py::arg("xy"), py::arg("inv_basis"), py::arg("values"),
          py::arg("refable"), py::arg("rows"), py::arg("k"), py::arg("tol"),
          "Median, 1.4826 MAD and count [M, 3] of the values of each row site's on-node neighbours by relative\n"
          "colour, and the distance to the k-th nearest site [M] (see stemfast._kernels for the contract).");
    m.def("neighbour_mean", &neighbour_mean, py::arg("xy"), py::arg("values"), py::arg("k"),
          "Mean of values [N, L] over each site's k nearest sites (itself included), summed nearest first.");
}

}  // namespace stemfast
