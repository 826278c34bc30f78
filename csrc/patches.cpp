// gather_patches / gather_resampled: bilinear patch sampling around sub-pixel positions, optionally
// resampled to another size and normalised in the same pass (contract:
// python/stemfast/_kernels/__init__.py; reference: python/stemfast/_kernels/numpy_ref/geometry.py).
// Same arithmetic as the reference (double precision, same operation order), parallel over patches.
#include "common.hpp"

#include <cmath>
#include <string>

namespace stemfast {
namespace {

using CArrF = py::array_t<float, py::array::c_style | py::array::forcecast>;
using CArrD = py::array_t<double, py::array::c_style | py::array::forcecast>;

// Bilinear samples of one patch around (x, y) (see the gather_patches contract) written to
// dst[size * size] as T; returns 1 when a sample lies outside the image. Scratch vectors are the
// caller's (size entries each), so a thread reuses them over its patches.
struct PatchSampler {
    const float* img;
    std::int64_t h, w, size;
    double half, xmax, ymax;
    std::vector<std::int64_t> cx0, cx1;
    std::vector<double> cgx, cwx;
    std::vector<unsigned char> cin;

    PatchSampler(const float* img_, std::int64_t h_, std::int64_t w_, std::int64_t size_)
        : img(img_), h(h_), w(w_), size(size_), half(static_cast<double>(size_ - 1) / 2.0),
          xmax(static_cast<double>(w_ - 1)), ymax(static_cast<double>(h_ - 1)),
          cx0(static_cast<size_t>(size_)), cx1(static_cast<size_t>(size_)), cgx(static_cast<size_t>(size_)),
          cwx(static_cast<size_t>(size_)), cin(static_cast<size_t>(size_)) {}

    template <class T>
    std::uint8_t sample(double x, double y, T fillv, T* dst) {
        double* __restrict gxv = cgx.data();
        double* __restrict wxv = cwx.data();
        std::uint8_t e = 0;
        for (std::int64_t c = 0; c < size; ++c) {
            const double sx = x + (static_cast<double>(c) - half);
            const bool in = sx >= 0.0 && sx <= xmax;
            cin[c] = in;
            if (!in) {
                e = 1;
                cx0[c] = cx1[c] = 0;
                gxv[c] = 0.0;
                wxv[c] = 1.0;
                continue;
            }
            const double f0 = std::floor(sx);
            const std::int64_t x0 = static_cast<std::int64_t>(f0);
            cx0[c] = x0;
            cx1[c] = x0 < w - 1 ? x0 + 1 : x0;  // past the last pixel: weight 0 (sx == W - 1)
            gxv[c] = sx - f0;
            wxv[c] = 1.0 - gxv[c];
        }
        // common case: every column inside, consecutive pixels x0, x0 + 1, ... with a right
        // neighbour each, so a row is a contiguous run of the image rows (vectorisable)
        bool contiguous = e == 0 && cx1[size - 1] == cx0[size - 1] + 1;
        for (std::int64_t c = 1; contiguous && c < size; ++c) contiguous = cx0[c] == cx0[0] + c;
        for (std::int64_t r = 0; r < size; ++r) {
            T* __restrict drow = dst + r * size;
            const double sy = y + (static_cast<double>(r) - half);
            if (!(sy >= 0.0 && sy <= ymax)) {
                e = 1;
                for (std::int64_t c = 0; c < size; ++c) drow[c] = fillv;
                continue;
            }
            const double f0 = std::floor(sy);
            const std::int64_t y0 = static_cast<std::int64_t>(f0);
            const std::int64_t y1 = y0 < h - 1 ? y0 + 1 : y0;
            const double gy = sy - f0;
            const double wy = 1.0 - gy;
            const float* __restrict row0 = img + y0 * w;
            const float* __restrict row1 = img + y1 * w;
            if (contiguous) {
                const float* __restrict a = row0 + cx0[0];
                const float* __restrict b = row1 + cx0[0];
                for (std::int64_t c = 0; c < size; ++c) {
                    const double top = wxv[c] * a[c] + gxv[c] * a[c + 1];
                    const double bot = wxv[c] * b[c] + gxv[c] * b[c + 1];
                    drow[c] = static_cast<T>(wy * top + gy * bot);
                }
                continue;
            }
            for (std::int64_t c = 0; c < size; ++c) {
                if (!cin[c]) {
                    drow[c] = fillv;
                    continue;
                }
                const std::int64_t x0 = cx0[c], x1 = cx1[c];
                const double top = wxv[c] * row0[x0] + gxv[c] * row0[x1];
                const double bot = wxv[c] * row1[x0] + gxv[c] * row1[x1];
                drow[c] = static_cast<T>(wy * top + gy * bot);
            }
        }
        return e;
    }
};

void check_image_xy(const char* name, const CArrF& image, const CArrD& xy, std::int64_t size) {
    if (image.ndim() != 2 || image.shape(0) < 1 || image.shape(1) < 1)
        throw py::value_error(std::string(name) + ": image must be a non-empty 2-D array");
    if (xy.ndim() != 2 || xy.shape(1) != 2) throw py::value_error(std::string(name) + ": xy must be [N, 2]");
    if (size < 1) throw py::value_error(std::string(name) + ": size must be >= 1");
}

void check_out(const char* name, const py::array& out, std::int64_t n, std::int64_t size) {
    // `out` is written in place: it must already be exactly right (no silent conversion to a copy).
    if (!py::isinstance<py::array_t<float>>(out) || !(out.flags() & py::array::c_style) || !out.writeable() ||
        out.ndim() != 3 || out.shape(0) != n || out.shape(1) != size || out.shape(2) != size)
        throw py::value_error(std::string(name) + ": out must be a writeable C-contiguous float32 array of shape [" +
                              std::to_string(n) + ", " + std::to_string(size) + ", " + std::to_string(size) + "]");
}

py::array_t<std::uint8_t> gather_patches(CArrF image, CArrD xy, std::int64_t size, double fill, py::array out) {
    check_image_xy("gather_patches", image, xy, size);
    const std::int64_t n = xy.shape(0);
    check_out("gather_patches", out, n, size);
    const std::int64_t h = image.shape(0), w = image.shape(1);
    py::array_t<std::uint8_t> edge(n);
    const float* img = image.data();
    const double* pxy = xy.data();
    float* pout = static_cast<float*>(out.mutable_data());
    std::uint8_t* pe = edge.mutable_data();
    {
        py::gil_scoped_release release;
        const float fillf = static_cast<float>(fill);
        parallel_for(
            n,
            [&](std::int64_t begin, std::int64_t end) {
                PatchSampler ps(img, h, w, size);
                for (std::int64_t p = begin; p < end; ++p)
                    pe[p] = ps.sample<float>(pxy[2 * p], pxy[2 * p + 1], fillf, pout + p * size * size);
            },
            64);
    }
    return edge;
}

// Taps of a resampling matrix W[m, size]: output i uses the k-th input from start[i] with weight
// tap[i * k + j] (zero-padded to the widest row; start clamped so start + k <= size).
struct Taps {
    std::int64_t k = 1;
    std::vector<std::int64_t> start;
    std::vector<double> tap;
    Taps(const double* wt, std::int64_t m, std::int64_t size) : start(static_cast<size_t>(m)) {
        std::vector<std::int64_t> lo(static_cast<size_t>(m)), hi(static_cast<size_t>(m));
        for (std::int64_t r = 0; r < m; ++r) {
            std::int64_t a = 0, b = size;
            while (a < size && wt[r * size + a] == 0.0) ++a;
            while (b > a && wt[r * size + b - 1] == 0.0) --b;
            if (a == b) a = b = 0;
            lo[r] = a;
            hi[r] = b;
            k = std::max(k, b - a);
        }
        tap.assign(static_cast<size_t>(m * k), 0.0);
        for (std::int64_t r = 0; r < m; ++r) {
            const std::int64_t s0 = std::min(lo[r], size - k);
            start[r] = s0;
            for (std::int64_t j = lo[r]; j < hi[r]; ++j) tap[r * k + (j - s0)] = wt[r * size + j];
        }
    }
};

// out[r * m + c] = (sum_ij W[r, i] P[i, j] W[c, j] - center) * inv, as a vertical pass on P
// (U = W P, vectorised along the rows) and then a horizontal one (U W^T).
template <int K>
void resample_patch(const double* __restrict P, std::int64_t size, const Taps& t, std::int64_t m, double center,
                    double inv, double* __restrict U, float* __restrict dst) {
    const std::int64_t kk = K > 0 ? K : t.k;
    const double* __restrict tap = t.tap.data();
    const std::int64_t* __restrict start = t.start.data();
    for (std::int64_t r = 0; r < m; ++r) {
        double* __restrict urow = U + r * size;
        const double* __restrict p0 = P + start[r] * size;
        const double w0 = tap[r * kk];
        for (std::int64_t j = 0; j < size; ++j) urow[j] = w0 * p0[j];
        for (std::int64_t q = 1; q < kk; ++q) {
            const double wq = tap[r * kk + q];
            const double* __restrict pq = p0 + q * size;
            for (std::int64_t j = 0; j < size; ++j) urow[j] += wq * pq[j];
        }
    }
    for (std::int64_t r = 0; r < m; ++r) {
        const double* __restrict urow = U + r * size;
        float* __restrict drow = dst + r * m;
        for (std::int64_t c = 0; c < m; ++c) {
            const double* __restrict u = urow + start[c];
            const double* __restrict wc = tap + c * kk;
            double s = 0.0;
            for (std::int64_t q = 0; q < kk; ++q) s += u[q] * wc[q];
            drow[c] = static_cast<float>((s - center) * inv);
        }
    }
}

// Interior patch (every sample inside, each with its right / lower neighbour): the bilinear sample
// and the resampling fold into one set of taps per output row / column (W convolved with the
// bilinear weights [1 - g, g]) applied straight to the image window -- no size x size patch.
// ex, ey: K + 1 taps per output column / row, from column / row x0 + start[c] / y0 + start[r].
void resample_interior(const float* __restrict img, std::int64_t w, std::int64_t x0, std::int64_t y0,
                       std::int64_t size, const Taps& t, std::int64_t m, const double* __restrict ex,
                       const double* __restrict ey, double center, double inv, double* __restrict U,
                       float* __restrict dst) {
    const std::int64_t ke = t.k + 1, width = size + 1;
    const std::int64_t* __restrict start = t.start.data();
    for (std::int64_t r = 0; r < m; ++r) {
        double* __restrict urow = U + r * width;
        const float* __restrict p0 = img + (y0 + start[r]) * w + x0;
        const double w0 = ey[r * ke];
        for (std::int64_t j = 0; j < width; ++j) urow[j] = w0 * p0[j];
        for (std::int64_t q = 1; q < ke; ++q) {
            const double wq = ey[r * ke + q];
            const float* __restrict pq = p0 + q * w;
            for (std::int64_t j = 0; j < width; ++j) urow[j] += wq * pq[j];
        }
    }
    for (std::int64_t r = 0; r < m; ++r) {
        const double* __restrict urow = U + r * width;
        float* __restrict drow = dst + r * m;
        for (std::int64_t c = 0; c < m; ++c) {
            const double* __restrict u = urow + start[c];
            const double* __restrict wc = ex + c * ke;
            double s = 0.0;
            for (std::int64_t q = 0; q < ke; ++q) s += u[q] * wc[q];
            drow[c] = static_cast<float>((s - center) * inv);
        }
    }
}

// Taps of W convolved with the bilinear weights (1 - g) at offset 0 and g at offset 1: ke = k + 1
// taps per output, from start[i] (the same start as W's own taps).
void fold_bilinear(const Taps& t, std::int64_t m, double g, double* __restrict e) {
    const std::int64_t k = t.k, ke = k + 1;
    const double* __restrict tap = t.tap.data();
    for (std::int64_t i = 0; i < m; ++i) {
        const double* __restrict ti = tap + i * k;
        double* __restrict ei = e + i * ke;
        ei[0] = (1.0 - g) * ti[0];
        for (std::int64_t q = 1; q < k; ++q) ei[q] = (1.0 - g) * ti[q] + g * ti[q - 1];
        ei[k] = g * ti[k - 1];
    }
}

// gather_resampled: the gather_patches patch (in double), resampled separably with weights[M, size]
// (out = W P W^T), then (v - center) / scale, stored as float32[N, M, M].
py::array_t<std::uint8_t> gather_resampled(CArrF image, CArrD xy, std::int64_t size, CArrD weights, double fill,
                                           double center, double scale, py::array out) {
    check_image_xy("gather_resampled", image, xy, size);
    if (weights.ndim() != 2 || weights.shape(1) != size || weights.shape(0) < 1)
        throw py::value_error("gather_resampled: weights must be [M, size] with M >= 1");
    if (!(std::isfinite(scale) && scale != 0.0)) throw py::value_error("gather_resampled: scale must be finite, != 0");
    const std::int64_t n = xy.shape(0), m = weights.shape(0);
    check_out("gather_resampled", out, n, m);
    const std::int64_t h = image.shape(0), w = image.shape(1);
    const Taps taps(weights.data(), m, size);
    py::array_t<std::uint8_t> edge(n);
    const float* img = image.data();
    const double* pxy = xy.data();
    float* pout = static_cast<float*>(out.mutable_data());
    std::uint8_t* pe = edge.mutable_data();
    {
        py::gil_scoped_release release;
        const double inv = 1.0 / scale;
        const double half = static_cast<double>(size - 1) / 2.0;
        auto resample = taps.k == 2 ? &resample_patch<2> : taps.k == 3 ? &resample_patch<3>
                        : taps.k == 4 ? &resample_patch<4> : taps.k == 1 ? &resample_patch<1> : &resample_patch<0>;
        parallel_for(
            n,
            [&](std::int64_t begin, std::int64_t end) {
                PatchSampler ps(img, h, w, size);
                std::vector<double> patch(static_cast<size_t>(size * size));
                std::vector<double> tmp(static_cast<size_t>(m * (size + 1)));
                std::vector<double> ex(static_cast<size_t>(m * (taps.k + 1))), ey(ex.size());
                for (std::int64_t p = begin; p < end; ++p) {
                    const double x = pxy[2 * p], y = pxy[2 * p + 1];
                    float* dst = pout + p * m * m;
                    // first and last sample column / row; interior when all of them have both neighbours
                    const double sx0 = x - half, sy0 = y - half;
                    const double fx = std::floor(sx0), fy = std::floor(sy0);
                    if (sx0 >= 0.0 && sy0 >= 0.0 && fx + static_cast<double>(size) <= static_cast<double>(w - 1) &&
                        fy + static_cast<double>(size) <= static_cast<double>(h - 1)) {
                        fold_bilinear(taps, m, sx0 - fx, ex.data());
                        fold_bilinear(taps, m, sy0 - fy, ey.data());
                        resample_interior(img, w, static_cast<std::int64_t>(fx), static_cast<std::int64_t>(fy), size,
                                          taps, m, ex.data(), ey.data(), center, inv, tmp.data(), dst);
                        pe[p] = 0;
                        continue;
                    }
                    pe[p] = ps.sample<double>(x, y, fill, patch.data());
                    resample(patch.data(), size, taps, m, center, inv, tmp.data(), dst);
                }
            },
            64);
    }
    return edge;
}

}  // namespace

void register_patches(py::module_& m) {
    m.def("gather_patches", &gather_patches, py::arg("image"), py::arg("xy"), py::arg("size"), py::arg("fill"),
          py::arg("out"),
          "Bilinear patches of `image` around `xy` written into `out` float32[N, size, size]; returns uint8[N]\n"
          "edge flags (see stemfast._kernels for the contract).");
    m.def("gather_resampled", &gather_resampled, py::arg("image"), py::arg("xy"), py::arg("size"),
          py::arg("weights"), py::arg("fill"), py::arg("center"), py::arg("scale"), py::arg("out"),
          "gather_patches patches resampled with weights[M, size] (W P W^T) and normalised ((v - center) / scale)\n"
          "into `out` float32[N, M, M]; returns uint8[N] edge flags (see stemfast._kernels for the contract).");
}

}  // namespace stemfast
