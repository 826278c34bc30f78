// fit_local_lattices: per-site least-squares fit of a small triangular lattice to the site and its
// neighbours (contract: python/stemfast/_kernels/__init__.py; reference:
// python/stemfast/_kernels/numpy_ref/geometry.py). The arithmetic (operation order, floor(v + 0.5)
// rounding, closed-form 2x2 inverse, r^2 <= t^2 outlier test) matches the reference exactly so that
// the integer index assignment is identical; everything per site lives on the stack.
#include "common.hpp"

#include <atomic>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <tuple>

namespace stemfast {
namespace {

constexpr double kSingularRtol = 1e-9;
constexpr double kMinPoints = 4.0;

// A local lattice model: offset o and basis rows a1 = (b00, b01), a2 = (b10, b11).
struct Model {
    double ox, oy, b00, b01, b10, b11;
};

// What a pass needs from its starting model: the inverse basis and the squared outlier radius.
struct Assign {
    double i00, i01, i10, i11, t2;
};

inline bool make_assign(const Model& c, double outlier_tol, Assign& a) {
    const double det = c.b00 * c.b11 - c.b01 * c.b10;
    if (!(std::isfinite(det) && det != 0.0)) return false;
    a.i00 = c.b11 / det;
    a.i01 = -c.b01 / det;
    a.i10 = -c.b10 / det;
    a.i11 = c.b00 / det;
    const double t = outlier_tol *
                     (std::sqrt(c.b00 * c.b00 + c.b01 * c.b01) + std::sqrt(c.b10 * c.b10 + c.b11 * c.b11)) /
                     2.0;
    a.t2 = t * t;
    return true;
}

// Index assignment of one point d under model c; true when it is an inlier.
inline bool assign_point(double dx, double dy, const Model& c, const Assign& a, double& m, double& n) {
    const double ex = dx - c.ox, ey = dy - c.oy;
    m = std::floor(ex * a.i00 + ey * a.i10 + 0.5);
    n = std::floor(ex * a.i01 + ey * a.i11 + 0.5);
    const double rx = ex - (m * c.b00 + n * c.b10);
    const double ry = ey - (m * c.b01 + n * c.b11);
    return rx * rx + ry * ry <= a.t2;
}

// Calls f(dx, dy) for the site itself (d = 0) and then for each neighbour j >= 0, j != i, in row order.
template <class F>
inline void for_points(const double* __restrict xy, const std::int64_t* __restrict row, std::int64_t k,
                       std::int64_t i, double xi, double yi, F&& f) {
    f(0.0, 0.0);
    for (std::int64_t q = 0; q < k; ++q) {
        const std::int64_t j = row[q];
        if (j < 0 || j == i) continue;
        f(xy[2 * j] - xi, xy[2 * j + 1] - yi);
    }
}

struct SiteResult {
    Model model;
    double rms;
    std::int64_t n_used;
};

// Up to this many points per site (the site and K neighbours) the assignment of the last pass is kept
// on the stack, which lets a site stop as soon as a pass reproduces the previous assignment.
constexpr std::int64_t kMaxTracked = 64;

// One site. Passes as in the contract; two shortcuts give bit-identical results:
//  * when a pass assigns exactly the same (m, n) to exactly the same used points as the previous
//    successful pass, its normal equations (and so its fit) are identical: every later pass repeats
//    it, so the site is done, and the residuals this pass just computed under the current model are
//    the final rms residuals;
//  * otherwise the rms needs one more loop over the points of the final pass (with the model fitted by
//    it), using the stored assignment.
inline SiteResult fit_site(const double* __restrict xy, const std::int64_t* __restrict row, std::int64_t k,
                           std::int64_t i, const double* __restrict b0, int n_iter, double outlier_tol) {
    const double xi = xy[2 * i], yi = xy[2 * i + 1];
    const bool track = k + 1 <= kMaxTracked;
    double pm[kMaxTracked], pn[kMaxTracked];  // assignment of the last pass (valid points in row order)
    bool pu[kMaxTracked];
    Model cur{0.0, 0.0, b0[0], b0[1], b0[2], b0[3]};
    Model prev = cur;
    Assign prev_a{};
    bool ok = false;
    double cnt_final = 0.0;
    for (int it = 0; it < n_iter; ++it) {
        Assign a;
        if (!make_assign(cur, outlier_tol, a)) break;
        double s0 = 0, sm = 0, sn = 0, smm = 0, smn = 0, snn = 0;
        double rx0 = 0, ry0 = 0, rxm = 0, rym = 0, rxn = 0, ryn = 0, ss = 0;
        bool same = ok && track;  // compare with the previous successful pass's assignment
        std::int64_t q = 0;
        for_points(xy, row, k, i, xi, yi, [&](double dx, double dy) {
            const double ex = dx - cur.ox, ey = dy - cur.oy;
            const double m = std::floor(ex * a.i00 + ey * a.i10 + 0.5);
            const double n = std::floor(ex * a.i01 + ey * a.i11 + 0.5);
            const double rx = ex - (m * cur.b00 + n * cur.b10);
            const double ry = ey - (m * cur.b01 + n * cur.b11);
            const double r2 = rx * rx + ry * ry;
            const bool use = r2 <= a.t2;
            if (track) {
                same = same && (use == pu[q]) && (!use || (m == pm[q] && n == pn[q]));
                pm[q] = m;
                pn[q] = n;
                pu[q] = use;
                ++q;
            }
            if (!use) return;
            s0 += 1.0;
            sm += m;
            sn += n;
            smm += m * m;
            smn += m * n;
            snn += n * n;
            rx0 += dx;
            ry0 += dy;
            rxm += m * dx;
            rym += m * dy;
            rxn += n * dx;
            ryn += n * dy;
            ss += r2;
        });
        if (same) {  // converged: this pass would refit the current model exactly
            return {cur, std::sqrt(ss / s0), static_cast<std::int64_t>(s0)};
        }
        if (s0 < kMinPoints) break;
        // A = [[s0, sm, sn], [sm, smm, smn], [sn, smn, snn]] (exact integers): adjugate and determinant
        const double c00 = smm * snn - smn * smn;
        const double c01 = sn * smn - sm * snn;
        const double c02 = sm * smn - sn * smm;
        const double c11 = s0 * snn - sn * sn;
        const double c12 = sm * sn - s0 * smn;
        const double c22 = s0 * smm - sm * sm;
        const double det = s0 * c00 + sm * c01 + sn * c02;
        const double tr = s0 + smm + snn;
        if (!(std::fabs(det) > kSingularRtol * tr * tr * tr)) break;
        prev = cur;
        prev_a = a;
        cur.ox = (c00 * rx0 + c01 * rxm + c02 * rxn) / det;
        cur.oy = (c00 * ry0 + c01 * rym + c02 * ryn) / det;
        cur.b00 = (c01 * rx0 + c11 * rxm + c12 * rxn) / det;
        cur.b01 = (c01 * ry0 + c11 * rym + c12 * ryn) / det;
        cur.b10 = (c02 * rx0 + c12 * rxm + c22 * rxn) / det;
        cur.b11 = (c02 * ry0 + c12 * rym + c22 * ryn) / det;
        ok = true;
        cnt_final = s0;
    }
    if (!ok) return {cur, std::numeric_limits<double>::quiet_NaN(), 0};
    // rms of the final model over the final successful pass's points. If a later pass failed, the
    // stored assignment is that failed pass's, so redo the final pass's assignment from its start model.
    double ss = 0.0;
    for_points(xy, row, k, i, xi, yi, [&](double dx, double dy) {
        double m, n;
        if (!assign_point(dx, dy, prev, prev_a, m, n)) return;
        const double fx = dx - cur.ox - (m * cur.b00 + n * cur.b10);
        const double fy = dy - cur.oy - (m * cur.b01 + n * cur.b11);
        ss += fx * fx + fy * fy;
    });
    return {cur, std::sqrt(ss / cnt_final), static_cast<std::int64_t>(cnt_final)};
}

using CArrD = py::array_t<double, py::array::c_style | py::array::forcecast>;
using CArrI = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;

py::tuple fit_local_lattices(CArrD xy, CArrI neighbors, CArrD basis0, int n_iter, double outlier_tol) {
    if (xy.ndim() != 2 || xy.shape(1) != 2) throw py::value_error("fit_local_lattices: xy must be [N, 2]");
    const std::int64_t n_sites = xy.shape(0);
    if (neighbors.ndim() != 2 || neighbors.shape(0) != n_sites)
        throw py::value_error("fit_local_lattices: neighbors must be [N, K]");
    if (basis0.ndim() != 3 || basis0.shape(0) != n_sites || basis0.shape(1) != 2 || basis0.shape(2) != 2)
        throw py::value_error("fit_local_lattices: basis0 must be [N, 2, 2]");
    const std::int64_t k = neighbors.shape(1);

    py::array_t<double> origin({n_sites, std::int64_t(2)});
    py::array_t<double> basis({n_sites, std::int64_t(2), std::int64_t(2)});
    py::array_t<double> rms(n_sites);
    py::array_t<std::int64_t> n_used(n_sites);

    const double* pxy = xy.data();
    const std::int64_t* pnb = neighbors.data();
    const double* pb0 = basis0.data();
    double* po = origin.mutable_data();
    double* pb = basis.mutable_data();
    double* pr = rms.mutable_data();
    std::int64_t* pn = n_used.mutable_data();
    std::atomic<bool> bad_index{false};
    {
        py::gil_scoped_release release;
        parallel_for(
            n_sites,
            [&](std::int64_t begin, std::int64_t end) {
                for (std::int64_t i = begin; i < end; ++i) {
                    const std::int64_t* row = pnb + i * k;
                    bool bad = false;
                    for (std::int64_t q = 0; q < k; ++q) bad |= row[q] >= n_sites;
                    if (bad) {
                        bad_index.store(true, std::memory_order_relaxed);
                        continue;
                    }
                    const SiteResult s = fit_site(pxy, row, k, i, pb0 + 4 * i, n_iter, outlier_tol);
                    po[2 * i] = pxy[2 * i] + s.model.ox;
                    po[2 * i + 1] = pxy[2 * i + 1] + s.model.oy;
                    pb[4 * i] = s.model.b00;
                    pb[4 * i + 1] = s.model.b01;
                    pb[4 * i + 2] = s.model.b10;
                    pb[4 * i + 3] = s.model.b11;
                    pr[i] = s.rms;
                    pn[i] = s.n_used;
                }
            },
            256);
    }
    if (bad_index.load()) throw py::value_error("fit_local_lattices: neighbour index out of range");
    return py::make_tuple(origin, basis, rms, n_used);
}

}  // namespace

void register_lattice(py::module_& m) {
    m.def("fit_local_lattices", &fit_local_lattices, py::arg("xy"), py::arg("neighbors"), py::arg("basis0"),
          py::arg("n_iter"), py::arg("outlier_tol"),
          "Per-site local triangular lattice fit (see stemfast._kernels for the contract).\n"
          "Returns (origin float64[N, 2], basis float64[N, 2, 2], rms float64[N], n_used int64[N]).");
}

}  // namespace stemfast
