// fit_local_lattices: per-site least-squares fit of a small triangular lattice to the site and its
// neighbours (contract: python/stemfast/_kernels/__init__.py; reference:
// python/stemfast/_kernels/numpy_ref/geometry.py). The arithmetic (operation order, floor(v + 0.5)
// rounding, closed-form 2x2 inverse, r^2 <= t^2 outlier test) matches the reference exactly so that
// the integer index assignment is identical; everything per site lives on the stack.
//
// Speed: one pass over a site's points is the hot loop. On x86-64 it runs on SSE2 register pairs
// (x and y lanes, and (m, n) lanes, with the same per-lane operations as the scalar code, so the results
// are bit-identical to the scalar path, which is kept for other CPUs and as the readable version).
// A site stops as soon as a pass reproduces the previous pass's assignment (see fit_site).
#include "common.hpp"

#include <atomic>
#include <cmath>
#include <limits>

#if !defined(STEMFAST_NO_SIMD) && (defined(__SSE2__) || defined(_M_X64))
#define STEMFAST_LATTICE_SSE2 1
#include <emmintrin.h>
#endif

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

// Sums of one pass over the used points: the normal equations of d ~ o + m a1 + n a2, and the sum of
// squared residuals under the pass's starting model.
struct Sums {
    double s0, sm, sn, smm, smn, snn, rx0, ry0, rxm, rym, rxn, ryn, ss;
};

// Up to this many points per site (the site and K neighbours) a pass stores its assignment on the
// stack; the next pass compares with it (see fit_site).
constexpr std::int64_t kMaxTracked = 64;

struct Track {
    bool on;                      // k + 1 <= kMaxTracked
    bool compare;                 // compare with the stored assignment (set by the caller)
    bool same;                    // out: this pass's assignment equals the stored one
    double mn[2 * kMaxTracked];   // (m, n) of the points, in point order
    bool used[kMaxTracked];
};

// One pass, scalar version.
inline Sums pass_scalar(const double* __restrict xy, const std::int64_t* __restrict row, std::int64_t k,
                        std::int64_t i, const Model& c, const Assign& a, Track& tr) {
    const double xi = xy[2 * i], yi = xy[2 * i + 1];
    Sums s{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0};
    bool same = tr.compare;
    std::int64_t q = 0;
    for_points(xy, row, k, i, xi, yi, [&](double dx, double dy) {
        const double ex = dx - c.ox, ey = dy - c.oy;
        const double m = std::floor(ex * a.i00 + ey * a.i10 + 0.5);
        const double n = std::floor(ex * a.i01 + ey * a.i11 + 0.5);
        const double rx = ex - (m * c.b00 + n * c.b10);
        const double ry = ey - (m * c.b01 + n * c.b11);
        const double r2 = rx * rx + ry * ry;
        const bool use = r2 <= a.t2;
        if (tr.on) {
            same = same && use == tr.used[q] && (!use || (m == tr.mn[2 * q] && n == tr.mn[2 * q + 1]));
            tr.mn[2 * q] = m;
            tr.mn[2 * q + 1] = n;
            tr.used[q] = use;
            ++q;
        }
        if (!use) return;
        s.s0 += 1.0;
        s.sm += m;
        s.sn += n;
        s.smm += m * m;
        s.smn += m * n;
        s.snn += n * n;
        s.rx0 += dx;
        s.ry0 += dy;
        s.rxm += m * dx;
        s.rym += m * dy;
        s.rxn += n * dx;
        s.ryn += n * dy;
        s.ss += r2;
    });
    tr.same = same;
    return s;
}

#ifdef STEMFAST_LATTICE_SSE2
// One pass on SSE2 pairs: lanes (x, y) for points and residuals, (m, n) for the indices. Each lane
// performs exactly the scalar operations of pass_scalar, in the same order.
inline Sums pass_sse2(const double* __restrict xy, const std::int64_t* __restrict row, std::int64_t k,
                      std::int64_t i, const Model& c, const Assign& a, Track& tr) {
    const __m128d pi = _mm_loadu_pd(xy + 2 * i);
    const __m128d O = _mm_set_pd(c.oy, c.ox);
    const __m128d I0 = _mm_set_pd(a.i01, a.i00), I1 = _mm_set_pd(a.i11, a.i10);
    const __m128d A1 = _mm_set_pd(c.b01, c.b00), A2 = _mm_set_pd(c.b11, c.b10);
    const __m128d half = _mm_set1_pd(0.5), one = _mm_set1_pd(1.0);
    const __m128d int_lim = _mm_set1_pd(2147483647.0);
    const __m128d abs_mask = _mm_castsi128_pd(_mm_set1_epi64x(0x7fffffffffffffffLL));
    const double t2 = a.t2;
    __m128d S1 = _mm_setzero_pd(), S2 = _mm_setzero_pd(), R0 = _mm_setzero_pd(), Rm = _mm_setzero_pd(),
            Rn = _mm_setzero_pd();
    double s0 = 0.0, smn = 0.0, ss = 0.0;
    bool same = tr.compare;
    std::int64_t q = 0;
    auto point = [&](__m128d d) {
        const __m128d e = _mm_sub_pd(d, O);
        const __m128d ex = _mm_unpacklo_pd(e, e), ey = _mm_unpackhi_pd(e, e);
        const __m128d v = _mm_add_pd(_mm_add_pd(_mm_mul_pd(ex, I0), _mm_mul_pd(ey, I1)), half);
        __m128d mn;
        if (_mm_movemask_pd(_mm_cmplt_pd(_mm_and_pd(v, abs_mask), int_lim)) == 3) {
            // floor via truncation to int32 (exact below 2^31), minus 1 where that rounded up
            const __m128d t = _mm_cvtepi32_pd(_mm_cvttpd_epi32(v));
            mn = _mm_sub_pd(t, _mm_and_pd(_mm_cmpgt_pd(t, v), one));
        } else {  // huge (or non-finite) index: std::floor per lane
            alignas(16) double vv[2];
            _mm_store_pd(vv, v);
            mn = _mm_set_pd(std::floor(vv[1]), std::floor(vv[0]));
        }
        const __m128d mm = _mm_unpacklo_pd(mn, mn), nn = _mm_unpackhi_pd(mn, mn);
        const __m128d r = _mm_sub_pd(e, _mm_add_pd(_mm_mul_pd(mm, A1), _mm_mul_pd(nn, A2)));
        const __m128d rr = _mm_mul_pd(r, r);
        const double r2 = _mm_cvtsd_f64(_mm_add_sd(rr, _mm_unpackhi_pd(rr, rr)));
        const bool use = r2 <= t2;
        if (tr.on) {
            const __m128d prev = _mm_loadu_pd(tr.mn + 2 * q);
            same = same && use == tr.used[q] && (!use || _mm_movemask_pd(_mm_cmpeq_pd(mn, prev)) == 3);
            _mm_storeu_pd(tr.mn + 2 * q, mn);
            tr.used[q] = use;
            ++q;
        }
        if (!use) return;
        s0 += 1.0;
        S1 = _mm_add_pd(S1, mn);                   // (sm, sn)
        S2 = _mm_add_pd(S2, _mm_mul_pd(mn, mn));   // (smm, snn)
        smn += _mm_cvtsd_f64(_mm_mul_sd(mn, nn));  // m * n
        R0 = _mm_add_pd(R0, d);                    // (rx0, ry0)
        Rm = _mm_add_pd(Rm, _mm_mul_pd(mm, d));    // (rxm, rym)
        Rn = _mm_add_pd(Rn, _mm_mul_pd(nn, d));    // (rxn, ryn)
        ss += r2;
    };
    point(_mm_setzero_pd());
    for (std::int64_t p = 0; p < k; ++p) {
        const std::int64_t j = row[p];
        if (j < 0 || j == i) continue;
        point(_mm_sub_pd(_mm_loadu_pd(xy + 2 * j), pi));
    }
    tr.same = same;
    alignas(16) double v1[2], v2[2], r0[2], rm[2], rn[2];
    _mm_store_pd(v1, S1);
    _mm_store_pd(v2, S2);
    _mm_store_pd(r0, R0);
    _mm_store_pd(rm, Rm);
    _mm_store_pd(rn, Rn);
    return Sums{s0, v1[0], v1[1], v2[0], smn, v2[1], r0[0], r0[1], rm[0], rm[1], rn[0], rn[1], ss};
}
#endif

// Least-squares model from the sums (adjugate of the symmetric 3x3 normal matrix, whose entries are
// exact integers); false when singular (|det| <= 1e-9 trace^3).
inline bool solve(const Sums& s, Model& out) {
    const double c00 = s.smm * s.snn - s.smn * s.smn;
    const double c01 = s.sn * s.smn - s.sm * s.snn;
    const double c02 = s.sm * s.smn - s.sn * s.smm;
    const double c11 = s.s0 * s.snn - s.sn * s.sn;
    const double c12 = s.sm * s.sn - s.s0 * s.smn;
    const double c22 = s.s0 * s.smm - s.sm * s.sm;
    const double det = s.s0 * c00 + s.sm * c01 + s.sn * c02;
    const double tr = s.s0 + s.smm + s.snn;
    if (!(std::fabs(det) > kSingularRtol * tr * tr * tr)) return false;
    out.ox = (c00 * s.rx0 + c01 * s.rxm + c02 * s.rxn) / det;
    out.oy = (c00 * s.ry0 + c01 * s.rym + c02 * s.ryn) / det;
    out.b00 = (c01 * s.rx0 + c11 * s.rxm + c12 * s.rxn) / det;
    out.b01 = (c01 * s.ry0 + c11 * s.rym + c12 * s.ryn) / det;
    out.b10 = (c02 * s.rx0 + c12 * s.rxm + c22 * s.rxn) / det;
    out.b11 = (c02 * s.ry0 + c12 * s.rym + c22 * s.ryn) / det;
    return true;
}

struct SiteResult {
    Model model;
    double rms;
    std::int64_t n_used;
};

// One site: passes as in the contract, with a shortcut that gives bit-identical results. When a pass
// assigns exactly the same (m, n) to exactly the same used points as the previous successful pass,
// its normal equations, and so its fit, are identical: every later pass would repeat it. The site is
// then done, and the residuals this pass computed under the current model are the final rms residuals.
// Otherwise the rms takes one more loop over the final successful pass's points.
template <bool kSimd>
inline SiteResult fit_site(const double* __restrict xy, const std::int64_t* __restrict row, std::int64_t k,
                           std::int64_t i, const double* __restrict b0, int n_iter, double outlier_tol) {
    Track tr;
    tr.on = k + 1 <= kMaxTracked;
    Model cur{0.0, 0.0, b0[0], b0[1], b0[2], b0[3]};
    Model prev = cur;
    Assign prev_a{};
    bool ok = false;
    double cnt_final = 0.0;
    for (int it = 0; it < n_iter; ++it) {
        Assign a;
        if (!make_assign(cur, outlier_tol, a)) break;
        tr.compare = ok && tr.on;  // the stored assignment is the previous (successful) pass's
#ifdef STEMFAST_LATTICE_SSE2
        const Sums s = kSimd ? pass_sse2(xy, row, k, i, cur, a, tr) : pass_scalar(xy, row, k, i, cur, a, tr);
#else
        const Sums s = pass_scalar(xy, row, k, i, cur, a, tr);
#endif
        if (tr.compare && tr.same) return {cur, std::sqrt(s.ss / s.s0), static_cast<std::int64_t>(s.s0)};
        if (s.s0 < kMinPoints) break;
        Model next;
        if (!solve(s, next)) break;
        prev = cur;
        prev_a = a;
        cur = next;
        ok = true;
        cnt_final = s.s0;
    }
    if (!ok) return {cur, std::numeric_limits<double>::quiet_NaN(), 0};
    // rms of the final model over the final successful pass's points: redo that pass's assignment
    // from the model it started with, measure the residuals with the model it fitted.
    const double xi = xy[2 * i], yi = xy[2 * i + 1];
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

py::tuple fit_local_lattices(CArrD xy, CArrI neighbors, CArrD basis0, int n_iter, double outlier_tol, bool scalar) {
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
                    const SiteResult s = scalar ? fit_site<false>(pxy, row, k, i, pb0 + 4 * i, n_iter, outlier_tol)
                                                : fit_site<true>(pxy, row, k, i, pb0 + 4 * i, n_iter, outlier_tol);
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

// labels[kids[i]] = (labels[parents[i]] + step[i]) mod 3 for i = 0, 1, ... in order (a breadth-first
// walk: every parent is labelled before its children), in place. Sequential by nature, O(M).
void propagate_labels(py::array_t<std::int64_t> labels, CArrI kids, CArrI parents, CArrI step) {
    if (labels.ndim() != 1 || !(labels.flags() & py::array::c_style))
        throw py::value_error("propagate_labels: labels must be a C-contiguous int64[N] array");
    if (kids.ndim() != 1 || parents.ndim() != 1 || step.ndim() != 1 || parents.shape(0) != kids.shape(0) ||
        step.shape(0) != kids.shape(0))
        throw py::value_error("propagate_labels: kids, parents and step must be [M] arrays of the same length");
    const std::int64_t n = labels.shape(0), m = kids.shape(0);
    const std::int64_t* pk = kids.data();
    const std::int64_t* pp = parents.data();
    for (std::int64_t i = 0; i < m; ++i)
        if (pk[i] < 0 || pk[i] >= n || pp[i] < 0 || pp[i] >= n)
            throw py::value_error("propagate_labels: site index out of range");
    std::int64_t* pl = labels.mutable_data();
    const std::int64_t* ps = step.data();
    py::gil_scoped_release release;
    for (std::int64_t i = 0; i < m; ++i) {
        const std::int64_t v = (pl[pp[i]] + ps[i]) % 3;
        pl[pk[i]] = v < 0 ? v + 3 : v;
    }
}

}  // namespace

void register_lattice(py::module_& m) {
    m.def("propagate_labels", &propagate_labels, py::arg("labels"), py::arg("kids"), py::arg("parents"),
          py::arg("step"),
          "labels[kids[i]] = (labels[parents[i]] + step[i]) mod 3 in order, in place (see stemfast._kernels).");
    m.def("fit_local_lattices", &fit_local_lattices, py::arg("xy"), py::arg("neighbors"), py::arg("basis0"),
          py::arg("n_iter"), py::arg("outlier_tol"), py::kw_only(), py::arg("scalar") = false,
          "Per-site local triangular lattice fit (see stemfast._kernels for the contract).\n"
          "Returns (origin float64[N, 2], basis float64[N, 2, 2], rms float64[N], n_used int64[N]).\n"
          "scalar=True runs the portable scalar loop instead of the SSE2 one (identical results; for tests).");
}

}  // namespace stemfast
