// Local maxima and sub-pixel refinement (contract: stemfast/_kernels/__init__.py; reference with the
// exact definitions: stemfast/_kernels/numpy_ref/image.py).
//
// local_maxima: rows run in parallel. Away from the image edge a branch-free pass over a whole row
// tests the threshold and the 8-neighbourhood (when the disc contains it), which rejects nearly all
// pixels; the survivors are checked against the full disc, nearest offsets first. Each thread keeps
// its own hit list; the lists of consecutive row blocks are concatenated, so the result is in raster
// order.
// refine_gauss: one Levenberg-Marquardt fit per site, 5x5 systems on the stack, sites in parallel.
#include "common.hpp"

#include <array>
#include <cmath>
#include <limits>
#include <stdexcept>

namespace stemfast {
namespace {

using ImageF = py::array_t<float, py::array::c_style | py::array::forcecast>;
using ArrayD = py::array_t<double, py::array::c_style | py::array::forcecast>;

struct Offset {
    std::int64_t dy, dx;
};

// (dy, dx) with dy^2 + dx^2 <= radius^2 (float64 comparison), raster order.
std::vector<Offset> disc_offsets(double radius) {
    const std::int64_t r = radius > 0 ? static_cast<std::int64_t>(std::floor(radius)) : 0;
    std::vector<Offset> offs;
    for (std::int64_t dy = -r; dy <= r; ++dy)
        for (std::int64_t dx = -r; dx <= r; ++dx)
            if (static_cast<double>(dy * dy + dx * dx) <= radius * radius) offs.push_back({dy, dx});
    return offs;
}

inline std::int64_t round_half_up(double v) { return static_cast<std::int64_t>(std::floor(v + 0.5)); }

// Largest float f with f <= t, so that for every float v: (double)v > t  <=>  v > f.
float float_floor(double t) {
    float f = static_cast<float>(t);
    if (static_cast<double>(f) > t) f = std::nextafter(f, -std::numeric_limits<float>::infinity());
    return f;
}

void check_image(const ImageF& image, const char* fn) {
    if (image.ndim() != 2) throw std::invalid_argument(std::string(fn) + ": image must be 2-D");
}

void check_xy(const ArrayD& xy, const char* fn) {
    if (xy.ndim() != 2 || xy.shape(1) != 2) throw std::invalid_argument(std::string(fn) + ": xy must be [N, 2]");
}

// ------------------------------------------------------------------------------------------------
// local maxima
// ------------------------------------------------------------------------------------------------
py::array_t<std::int64_t> local_maxima(ImageF image, double radius, double threshold, std::int64_t border) {
    check_image(image, "local_maxima");
    const std::int64_t h = image.shape(0), w = image.shape(1);
    const float* img = image.data();
    border = std::max<std::int64_t>(border, 0);
    const std::int64_t y0 = border, y1 = std::max(h - border, border);
    const std::int64_t x0 = border, x1 = std::max(w - border, border);

    // all disc offsets except (0, 0), nearest first (stable: raster order among equal distances)
    std::vector<Offset> offs;
    for (const Offset& o : disc_offsets(radius))
        if (o.dy != 0 || o.dx != 0) offs.push_back(o);
    std::stable_sort(offs.begin(), offs.end(), [](const Offset& a, const Offset& b) {
        return a.dy * a.dy + a.dx * a.dx < b.dy * b.dy + b.dx * b.dx;
    });
    std::int64_t r = 0;
    for (const Offset& o : offs) r = std::max({r, std::abs(o.dy), std::abs(o.dx)});
    const std::size_t K = offs.size();
    std::vector<std::int64_t> lin(K);
    std::vector<unsigned char> later(K);
    for (std::size_t t = 0; t < K; ++t) {
        lin[t] = offs[t].dy * w + offs[t].dx;
        later[t] = offs[t].dy > 0 || (offs[t].dy == 0 && offs[t].dx > 0);
    }
    const bool prepass = radius > 0.0 && radius * radius >= 2.0;  // the disc holds the whole 8-neighbourhood
    const float thr_f = float_floor(threshold);

    const std::int64_t nrow = y1 > y0 ? y1 - y0 : 0;
    const int nt = std::max(1, num_threads());
    std::vector<std::vector<std::int64_t>> hits(static_cast<size_t>(nt) + 1);
    {
        py::gil_scoped_release release;
        // generic test: full disc with bounds checks where needed
        auto is_max = [&](std::int64_t y, std::int64_t x) -> bool {
            const float* p = img + y * w + x;
            const float v = *p;
            if (y >= r && y < h - r && x >= r && x < w - r) {
                for (std::size_t t = 0; t < K; ++t) {
                    const float q = p[lin[t]];
                    if (later[t] ? !(q < v) : !(q <= v)) return false;
                }
            } else {
                for (std::size_t t = 0; t < K; ++t) {
                    const std::int64_t qy = y + offs[t].dy, qx = x + offs[t].dx;
                    if (qy < 0 || qy >= h || qx < 0 || qx >= w) continue;
                    const float q = p[lin[t]];
                    if (later[t] ? !(q < v) : !(q <= v)) return false;
                }
            }
            return true;
        };
        // split rows into nt contiguous blocks; block b appends to hits[b] (keeps raster order)
        const std::int64_t step = (nrow + nt - 1) / std::max<std::int64_t>(1, nt);
        std::int64_t nblocks = step > 0 ? (nrow + step - 1) / step : 0;
        parallel_for(
            nblocks,
            [&](std::int64_t b0, std::int64_t b1) {
                std::vector<unsigned char> flag(static_cast<size_t>(std::max<std::int64_t>(w, 1)));
                for (std::int64_t b = b0; b < b1; ++b) {
                    std::vector<std::int64_t>& out = hits[static_cast<size_t>(b)];
                    const std::int64_t ya = y0 + b * step, yb = std::min(y1, ya + step);
                    for (std::int64_t y = ya; y < yb; ++y) {
                        const float* row = img + y * w;
                        if (prepass && y >= 1 && y < h - 1 && w >= 3) {
                            const std::int64_t xa = std::max<std::int64_t>(x0, 1), xb = std::min(x1, w - 1);
                            const float* up = row - w;
                            const float* dn = row + w;
                            unsigned char* f = flag.data();
                            for (std::int64_t x = xa; x < xb; ++x) {
                                const float v = row[x];
                                f[x] = static_cast<unsigned char>(
                                    (v > thr_f) & (v >= up[x - 1]) & (v >= up[x]) & (v >= up[x + 1]) &
                                    (v >= row[x - 1]) & (v > row[x + 1]) & (v > dn[x - 1]) & (v > dn[x]) &
                                    (v > dn[x + 1]));
                            }
                            // edge columns (x = 0, x = w - 1) inside [x0, x1): generic path
                            for (std::int64_t x = x0; x < xa; ++x)
                                if (row[x] > thr_f && is_max(y, x)) out.insert(out.end(), {x, y});
                            for (std::int64_t x = xa; x < xb; ++x)
                                if (f[x] && is_max(y, x)) out.insert(out.end(), {x, y});
                            for (std::int64_t x = std::max(xb, xa); x < x1; ++x)
                                if (row[x] > thr_f && is_max(y, x)) out.insert(out.end(), {x, y});
                        } else {
                            for (std::int64_t x = x0; x < x1; ++x)
                                if (row[x] > thr_f && is_max(y, x)) out.insert(out.end(), {x, y});
                        }
                    }
                }
            },
            1);
    }
    std::size_t total = 0;
    for (const auto& v : hits) total += v.size() / 2;
    py::array_t<std::int64_t> result({static_cast<py::ssize_t>(total), static_cast<py::ssize_t>(2)});
    std::int64_t* dst = result.mutable_data();
    for (const auto& v : hits) dst = std::copy(v.begin(), v.end(), dst);
    return result;
}

// ------------------------------------------------------------------------------------------------
// centre of mass
// ------------------------------------------------------------------------------------------------
py::array_t<double> refine_com(ImageF image, ArrayD xy, double radius) {
    check_image(image, "refine_com");
    check_xy(xy, "refine_com");
    const std::int64_t h = image.shape(0), w = image.shape(1), n = xy.shape(0);
    const float* img = image.data();
    const double* pts = xy.data();
    const std::vector<Offset> offs = disc_offsets(radius);
    py::array_t<double> result({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(2)});
    double* out = result.mutable_data();
    {
        py::gil_scoped_release release;
        parallel_for(
            n,
            [&](std::int64_t i0, std::int64_t i1) {
                for (std::int64_t i = i0; i < i1; ++i) {
                    const std::int64_t cx = round_half_up(pts[2 * i]), cy = round_half_up(pts[2 * i + 1]);
                    double vmin = std::numeric_limits<double>::infinity();
                    for (const Offset& o : offs) {
                        const std::int64_t qy = cy + o.dy, qx = cx + o.dx;
                        if (qy < 0 || qy >= h || qx < 0 || qx >= w) continue;
                        vmin = std::min(vmin, static_cast<double>(img[qy * w + qx]));
                    }
                    double sw = 0.0, sx = 0.0, sy = 0.0;
                    for (const Offset& o : offs) {
                        const std::int64_t qy = cy + o.dy, qx = cx + o.dx;
                        if (qy < 0 || qy >= h || qx < 0 || qx >= w) continue;
                        const double wt = static_cast<double>(img[qy * w + qx]) - vmin;
                        sw += wt;
                        sx += wt * static_cast<double>(o.dx);
                        sy += wt * static_cast<double>(o.dy);
                    }
                    out[2 * i] = static_cast<double>(cx) + (sw > 0 ? sx / sw : 0.0);
                    out[2 * i + 1] = static_cast<double>(cy) + (sw > 0 ? sy / sw : 0.0);
                }
            },
            256);
    }
    return result;
}

// ------------------------------------------------------------------------------------------------
// Gaussian fit (Levenberg-Marquardt, Marquardt damping; details in the NumPy reference docstring)
// ------------------------------------------------------------------------------------------------
constexpr double kStepTol = 1e-6;  // x0, y0, s steps (px); A, B steps: times the disc's value range
constexpr double kFtol = 1e-10;  // or the step's predicted cost reduction below this * cost
constexpr double kLambda0 = 1e-3;

using Vec5 = std::array<double, 5>;
using Mat5 = std::array<std::array<double, 5>, 5>;

// Disc pixels of one site (inside the image), stored row by row. Coordinates are relative to the
// disc centre c; column / row table index t = offset + r.
struct Disc {
    std::int64_t r = 0;
    std::int64_t nrows = 0;
    std::vector<std::int32_t> row_t, lo, hi;  // per stored row: row index t, column span [lo, hi]
    std::vector<std::int64_t> start;           // per stored row: first pixel in val
    std::vector<double> val;                   // pixel values, row-major over the stored rows
    std::int64_t m = 0;                        // number of pixels
};

// Per-evaluation scratch tables over the 2r+1 columns / rows.
struct Tables {
    std::vector<double> buf;
    double *ex, *exx, *gx, *ey, *gy, *P;  // P: 8 prefix sums over the columns, interleaved [t * 8 + f]
    explicit Tables(std::int64_t r) {
        const std::size_t T = static_cast<std::size_t>(2 * r + 1);
        buf.assign(5 * T + 8 * (T + 1), 0.0);
        ex = buf.data();
        exx = ex + T;
        gx = exx + T;
        ey = gx + T;
        gy = ey + T;
        P = gy + T;  // P[0..7] = 0 (empty prefix), P[(t + 1) * 8 + f] = sum over columns <= t
    }
};

// Cost (sum of squared residuals) at p and the normal equations J^T J, J^T r of the model
// B + A exp(-((u - x0)^2 + (v - y0)^2) / (2 s^2)), J = d model / d (x0, y0, A, s, B).
//
// The Gaussian factorises into a column and a row term, G = gx(u) gy(v), so the residual-free
// sums of J^T J factorise per disc row into a row factor times a span sum of column terms (taken
// from prefix sums over the 2r+1 columns). Only the residual terms are summed per pixel:
// r, r^2, G r, G r ex, G r ex^2 (13 flops per pixel; 5 exponentials per evaluation, see gauss_samples).
// Mathematically identical to the per-pixel sums of the NumPy reference; the rounding differs
// at the 1e-16 relative level.
// g[t] = exp(-c e[t]^2) with e[t] = t - r - x0, t in [0, 2r]. From the sample t0 nearest to x0
// outwards by g[t +- 1] = g[t] rho, where rho = exp(-c (1 +- 2 e[t])) itself steps by the constant
// factor q = exp(-2c) (and rho_left(t0) = q / rho_right(t0)): 2 exponentials per axis instead of
// 2r + 1 (relative error ~ (2r)^2 ulp). Going outwards the factors are <= 1, so nothing overflows;
// far tails may underflow to 0, as the exact values do.
void gauss_samples(double x0, double c, double q, std::int64_t r, double* e, double* g) {
    const std::int64_t T = 2 * r + 1;
    for (std::int64_t t = 0; t < T; ++t) e[t] = static_cast<double>(t - r) - x0;
    if (!std::isfinite(x0) || !std::isfinite(c) || !(c > 0)) {
        for (std::int64_t t = 0; t < T; ++t) g[t] = std::exp(-(e[t] * e[t]) * c);
        return;
    }
    const std::int64_t t0 = std::clamp<std::int64_t>(static_cast<std::int64_t>(std::floor(x0 + 0.5)) + r, 0, T - 1);
    g[t0] = std::exp(-(e[t0] * e[t0]) * c);
    const double rho_r = std::exp(-c * (2.0 * e[t0] + 1.0));
    double rho = rho_r;
    for (std::int64_t t = t0; t + 1 < T; ++t) {
        g[t + 1] = g[t] * rho;
        rho *= q;
    }
    rho = rho_r > 1e-250 && rho_r < 1e250 ? q / rho_r : std::exp(-c * (1.0 - 2.0 * e[t0]));
    for (std::int64_t t = t0; t > 0; --t) {
        g[t - 1] = g[t] * rho;
        rho *= q;
    }
}

double evaluate(const Vec5& p, const Disc& d, Tables& tb, Mat5& jtj, Vec5& jtr) {
    const double x0 = p[0], y0 = p[1], a = p[2], s = p[3], b = p[4];
    const double inv2s2 = 1.0 / (2.0 * s * s);
    const double is2 = 1.0 / (s * s);
    const double is3 = is2 / s;
    const std::int64_t T = 2 * d.r + 1;
    const double step_factor = std::exp(-2.0 * inv2s2);
    gauss_samples(x0, inv2s2, step_factor, d.r, tb.ex, tb.gx);
    gauss_samples(y0, inv2s2, step_factor, d.r, tb.ey, tb.gy);
    double* P = tb.P;
    for (int f = 0; f < 8; ++f) P[f] = 0.0;
    for (std::int64_t t = 0; t < T; ++t) {
        const double ex = tb.ex[t];
        const double exx = ex * ex;
        const double g = tb.gx[t];
        tb.exx[t] = exx;
        const double g2 = g * g;
        const double* q = P + t * 8;
        double* n = P + (t + 1) * 8;
        n[0] = q[0] + g2;              // gx^2
        n[1] = q[1] + g2 * ex;         // gx^2 ex
        n[2] = q[2] + g2 * exx;        // gx^2 ex^2
        n[3] = q[3] + g2 * exx * ex;   // gx^2 ex^3
        n[4] = q[4] + g2 * exx * exx;  // gx^2 ex^4
        n[5] = q[5] + g;               // gx
        n[6] = q[6] + g * ex;          // gx ex
        n[7] = q[7] + g * exx;         // gx ex^2
    }
    // residual-free sums (G = gx gy; d2 = ex^2 + ey^2)
    double s_g2 = 0, s_g2x = 0, s_g2y = 0, s_g2xx = 0, s_g2yy = 0, s_g2xy = 0;
    double s_g2xd = 0, s_g2yd = 0, s_g2dd = 0;  // G^2 ex d2, G^2 ey d2, G^2 d2^2
    double s_g = 0, s_gx = 0, s_gy = 0, s_gd = 0;
    // residual sums
    double cost = 0, s_r = 0, s_gr = 0, s_grx = 0, s_gry = 0, s_grd = 0;
    const double* ex = tb.ex;
    const double* exx = tb.exx;
    const double* gx = tb.gx;
    for (std::int64_t k = 0; k < d.nrows; ++k) {
        const std::int64_t t = d.row_t[k], lo = d.lo[k], hi = d.hi[k];
        const double e = tb.ey[t], e2 = e * e, gy = tb.gy[t], gy2 = gy * gy;
        const double* ph = P + (hi + 1) * 8;
        const double* pl = P + lo * 8;
        const double A0 = ph[0] - pl[0], A1 = ph[1] - pl[1], A2 = ph[2] - pl[2], A3 = ph[3] - pl[3];
        const double A4 = ph[4] - pl[4], C0 = ph[5] - pl[5], C1 = ph[6] - pl[6], C2 = ph[7] - pl[7];
        s_g2 += gy2 * A0;
        s_g2x += gy2 * A1;
        s_g2y += gy2 * e * A0;
        s_g2xx += gy2 * A2;
        s_g2yy += gy2 * e2 * A0;
        s_g2xy += gy2 * e * A1;
        s_g2xd += gy2 * (A3 + e2 * A1);
        s_g2yd += gy2 * e * (A2 + e2 * A0);
        s_g2dd += gy2 * (A4 + 2.0 * e2 * A2 + e2 * e2 * A0);
        s_g += gy * C0;
        s_gx += gy * C1;
        s_gy += gy * e * C0;
        s_gd += gy * (C2 + e2 * C0);
        const double* v = d.val.data() + d.start[k] - lo;
        double r_c = 0, r_r = 0, r_gr = 0, r_grx = 0, r_grxx = 0;
        for (std::int64_t i = lo; i <= hi; ++i) {
            const double G = gx[i] * gy;
            const double res = v[i] - (b + a * G);
            r_c += res * res;
            r_r += res;
            const double gr = G * res;
            r_gr += gr;
            r_grx += gr * ex[i];
            r_grxx += gr * exx[i];
        }
        cost += r_c;
        s_r += r_r;
        s_gr += r_gr;
        s_grx += r_grx;
        s_gry += e * r_gr;
        s_grd += r_grxx + e2 * r_gr;
    }
    const double c1 = a * is2, c3 = a * is3;
    jtj[0][0] = c1 * c1 * s_g2xx;
    jtj[1][0] = jtj[0][1] = c1 * c1 * s_g2xy;
    jtj[1][1] = c1 * c1 * s_g2yy;
    jtj[2][0] = jtj[0][2] = c1 * s_g2x;
    jtj[2][1] = jtj[1][2] = c1 * s_g2y;
    jtj[2][2] = s_g2;
    jtj[3][0] = jtj[0][3] = c1 * c3 * s_g2xd;
    jtj[3][1] = jtj[1][3] = c1 * c3 * s_g2yd;
    jtj[3][2] = jtj[2][3] = c3 * (s_g2xx + s_g2yy);
    jtj[3][3] = c3 * c3 * s_g2dd;
    jtj[4][0] = jtj[0][4] = c1 * s_gx;
    jtj[4][1] = jtj[1][4] = c1 * s_gy;
    jtj[4][2] = jtj[2][4] = s_g;
    jtj[4][3] = jtj[3][4] = c3 * s_gd;
    jtj[4][4] = static_cast<double>(d.m);
    jtr = {c1 * s_grx, c1 * s_gry, s_gr, c3 * s_grd, s_r};
    return cost;
}

// Solve mat x = rhs by L D L^T (unit lower L; same operation order as the reference); false if a
// pivot is not > 0 (matrix not positive definite).
bool ldl_solve(const Mat5& mat, const Vec5& rhs, Vec5& x) {
    Mat5 L{};
    Vec5 dd{};
    for (int j = 0; j < 5; ++j) {
        double dj = mat[j][j];
        for (int k = 0; k < j; ++k) dj -= L[j][k] * L[j][k] * dd[k];
        if (!(dj > 0)) return false;
        dd[j] = dj;
        const double inv = 1.0 / dj;
        for (int i = j + 1; i < 5; ++i) {
            double s = mat[i][j];
            for (int k = 0; k < j; ++k) s -= L[i][k] * L[j][k] * dd[k];
            L[i][j] = s * inv;
        }
    }
    for (int i = 0; i < 5; ++i) {
        double s = rhs[i];
        for (int k = 0; k < i; ++k) s -= L[i][k] * x[k];
        x[i] = s;
    }
    for (int i = 4; i >= 0; --i) {
        double s = x[i] / dd[i];
        for (int k = i + 1; k < 5; ++k) s -= L[k][i] * x[k];
        x[i] = s;
    }
    return true;
}

py::array_t<double> refine_gauss(ImageF image, ArrayD xy, double radius, double sigma0, std::int64_t n_iter) {
    check_image(image, "refine_gauss");
    check_xy(xy, "refine_gauss");
    const std::int64_t h = image.shape(0), w = image.shape(1), n = xy.shape(0);
    const float* img = image.data();
    const double* pts = xy.data();
    // disc rows: for each dy the contiguous dx span of the disc
    const std::vector<Offset> offs = disc_offsets(radius);
    std::int64_t r = 0;
    for (const Offset& q : offs) r = std::max({r, std::abs(q.dy), std::abs(q.dx)});
    const std::int64_t T = 2 * r + 1;
    std::vector<std::int64_t> span_lo(static_cast<size_t>(T), 1), span_hi(static_cast<size_t>(T), 0);  // in dx
    for (const Offset& q : offs) {
        const size_t t = static_cast<size_t>(q.dy + r);
        if (span_lo[t] > span_hi[t]) span_lo[t] = span_hi[t] = q.dx;
        span_lo[t] = std::min(span_lo[t], q.dx);
        span_hi[t] = std::max(span_hi[t], q.dx);
    }
    const std::size_t K = offs.size();
    py::array_t<double> result({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(6)});
    double* out = result.mutable_data();
    const double nan = std::numeric_limits<double>::quiet_NaN();
    {
        py::gil_scoped_release release;
        parallel_for(
            n,
            [&](std::int64_t i0, std::int64_t i1) {
                Disc d;
                d.r = r;
                d.row_t.resize(static_cast<size_t>(T));
                d.lo.resize(static_cast<size_t>(T));
                d.hi.resize(static_cast<size_t>(T));
                d.start.resize(static_cast<size_t>(T));
                d.val.resize(K);
                Tables tb(r);
                for (std::int64_t i = i0; i < i1; ++i) {
                    const double x = pts[2 * i], y = pts[2 * i + 1];
                    const std::int64_t cx = round_half_up(x), cy = round_half_up(y);
                    double* o = out + 6 * i;
                    if (cx < 0 || cx >= w || cy < 0 || cy >= h) {
                        o[0] = x, o[1] = y, o[2] = nan, o[3] = sigma0, o[4] = nan, o[5] = 0.0;
                        continue;
                    }
                    std::int64_t m = 0, nr = 0;
                    double vmin = std::numeric_limits<double>::infinity();
                    double vmax = -std::numeric_limits<double>::infinity();
                    for (std::int64_t t = 0; t < T; ++t) {
                        const std::int64_t qy = cy + t - r;
                        if (qy < 0 || qy >= h || span_lo[t] > span_hi[t]) continue;
                        const std::int64_t dx0 = std::max(span_lo[t], -cx), dx1 = std::min(span_hi[t], w - 1 - cx);
                        if (dx0 > dx1) continue;
                        d.row_t[nr] = static_cast<std::int32_t>(t);
                        d.lo[nr] = static_cast<std::int32_t>(dx0 + r);
                        d.hi[nr] = static_cast<std::int32_t>(dx1 + r);
                        d.start[nr] = m;
                        const float* src = img + qy * w + cx;
                        for (std::int64_t dx = dx0; dx <= dx1; ++dx) {
                            const double v = static_cast<double>(src[dx]);
                            d.val[m++] = v;
                            vmin = std::min(vmin, v);
                            vmax = std::max(vmax, v);
                        }
                        ++nr;
                    }
                    d.nrows = nr;
                    d.m = m;
                    const double b0 = vmin, a0 = static_cast<double>(img[cy * w + cx]) - b0;
                    for (std::int64_t k = 0; k < m; ++k) d.val[k] -= b0;  // data relative to B0
                    const double vtol = kStepTol * (vmax - b0);         // intensity steps: relative
                    Vec5 p = {x - static_cast<double>(cx), y - static_cast<double>(cy), a0, sigma0, 0.0};
                    Mat5 jtj, jtj_t, mat;
                    Vec5 jtr, jtr_t, delta{}, pt;
                    double lam = kLambda0;
                    bool converged = false;
                    double cost = evaluate(p, d, tb, jtj, jtr);
                    for (std::int64_t it = 0; it < n_iter; ++it) {
                        mat = jtj;
                        for (int a = 0; a < 5; ++a) mat[a][a] += lam * jtj[a][a];
                        if (!ldl_solve(mat, jtr, delta)) {
                            lam *= 10.0;
                            continue;
                        }
                        double pred = 0.0;  // predicted cost reduction of the damped quadratic model
                        for (int a = 0; a < 5; ++a) pred += delta[a] * (jtr[a] + lam * jtj[a][a] * delta[a]);
                        const bool small = (std::abs(delta[0]) < kStepTol && std::abs(delta[1]) < kStepTol &&
                                            std::abs(delta[3]) < kStepTol && std::abs(delta[2]) < vtol &&
                                            std::abs(delta[4]) < vtol) ||
                                           pred < kFtol * cost;
                        if (small) {  // tiny step: applied unevaluated, the fit has converged
                            for (int a = 0; a < 5; ++a) p[a] += delta[a];
                            converged = true;
                            break;
                        }
                        for (int a = 0; a < 5; ++a) pt[a] = p[a] + delta[a];
                        const double new_cost = evaluate(pt, d, tb, jtj_t, jtr_t);
                        if (new_cost < cost) {
                            p = pt;
                            jtj = jtj_t;
                            jtr = jtr_t;
                            cost = new_cost;
                            lam /= 10.0;
                        } else {
                            lam *= 10.0;
                        }
                    }
                    const double x0 = p[0] + static_cast<double>(cx), y0 = p[1] + static_cast<double>(cy);
                    const double dist2 = (x0 - x) * (x0 - x) + (y0 - y) * (y0 - y);
                    const bool ok = converged && p[2] > 0 && p[3] > 0 && p[3] < 2.0 * radius &&
                                    dist2 <= radius * radius;
                    if (ok) {
                        o[0] = x0, o[1] = y0, o[2] = p[2], o[3] = p[3], o[4] = p[4] + b0, o[5] = 1.0;
                    } else {
                        o[0] = x, o[1] = y, o[2] = a0, o[3] = sigma0, o[4] = b0, o[5] = 0.0;
                    }
                }
            },
            64);
    }
    return result;
}

}  // namespace

void register_peaks(py::module_& m) {
    m.def("local_maxima", &local_maxima, py::arg("image"), py::arg("radius"), py::arg("threshold"),
          py::arg("border"),
          "(x, y) int64[N, 2] of the pixels above threshold that are the maximum of their disc of the "
          "given radius (later raster pixels must be strictly lower), in raster order.");
    m.def("refine_com", &refine_com, py::arg("image"), py::arg("xy"), py::arg("radius"),
          "Centre of mass of image - min over the disc around round(xy) -> float64[N, 2].");
    m.def("refine_gauss", &refine_gauss, py::arg("image"), py::arg("xy"), py::arg("radius"), py::arg("sigma0"),
          py::arg("n_iter"),
          "Levenberg-Marquardt fit of B + A exp(-r^2 / (2 s^2)) per site -> float64[N, 6] "
          "(x0, y0, A, s, B, ok).");
}

}  // namespace stemfast
