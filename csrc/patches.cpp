// gather_patches: bilinear patch sampling around sub-pixel positions (contract:
// python/stemfast/_kernels/__init__.py; reference: python/stemfast/_kernels/numpy_ref/geometry.py).
// Same arithmetic as the reference (double precision, same operation order), parallel over patches.
#include "common.hpp"

#include <cmath>
#include <string>

namespace stemfast {
namespace {

using CArrF = py::array_t<float, py::array::c_style | py::array::forcecast>;
using CArrD = py::array_t<double, py::array::c_style | py::array::forcecast>;

py::array_t<std::uint8_t> gather_patches(CArrF image, CArrD xy, std::int64_t size, double fill, py::array out) {
    if (image.ndim() != 2 || image.shape(0) < 1 || image.shape(1) < 1)
        throw py::value_error("gather_patches: image must be a non-empty 2-D array");
    if (xy.ndim() != 2 || xy.shape(1) != 2) throw py::value_error("gather_patches: xy must be [N, 2]");
    if (size < 1) throw py::value_error("gather_patches: size must be >= 1");
    const std::int64_t n = xy.shape(0);
    // `out` is written in place: it must already be exactly right (no silent conversion to a copy).
    if (!py::isinstance<py::array_t<float>>(out) || !(out.flags() & py::array::c_style) || !out.writeable() ||
        out.ndim() != 3 || out.shape(0) != n || out.shape(1) != size || out.shape(2) != size)
        throw py::value_error("gather_patches: out must be a writeable C-contiguous float32 array of shape [" +
                              std::to_string(n) + ", " + std::to_string(size) + ", " + std::to_string(size) + "]");

    const std::int64_t h = image.shape(0), w = image.shape(1);
    py::array_t<std::uint8_t> edge(n);
    const float* img = image.data();
    const double* pxy = xy.data();
    float* pout = static_cast<float*>(out.mutable_data());
    std::uint8_t* pe = edge.mutable_data();
    {
        py::gil_scoped_release release;
        const double half = static_cast<double>(size - 1) / 2.0;
        const double xmax = static_cast<double>(w - 1), ymax = static_cast<double>(h - 1);
        const float fillf = static_cast<float>(fill);
        parallel_for(
            n,
            [&](std::int64_t begin, std::int64_t end) {
                // per-column sample positions of one patch (shared by all its rows)
                std::vector<std::int64_t> cx0(static_cast<size_t>(size)), cx1(static_cast<size_t>(size));
                std::vector<double> cgx(static_cast<size_t>(size)), cwx(static_cast<size_t>(size));
                std::vector<unsigned char> cin(static_cast<size_t>(size));
                double* __restrict gxv = cgx.data();
                double* __restrict wxv = cwx.data();
                for (std::int64_t p = begin; p < end; ++p) {
                    const double x = pxy[2 * p], y = pxy[2 * p + 1];
                    float* dst = pout + p * size * size;
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
                        float* __restrict drow = dst + r * size;
                        const double sy = y + (static_cast<double>(r) - half);
                        if (!(sy >= 0.0 && sy <= ymax)) {
                            e = 1;
                            for (std::int64_t c = 0; c < size; ++c) drow[c] = fillf;
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
                                drow[c] = static_cast<float>(wy * top + gy * bot);
                            }
                            continue;
                        }
                        for (std::int64_t c = 0; c < size; ++c) {
                            if (!cin[c]) {
                                drow[c] = fillf;
                                continue;
                            }
                            const std::int64_t x0 = cx0[c], x1 = cx1[c];
                            const double top = wxv[c] * row0[x0] + gxv[c] * row0[x1];
                            const double bot = wxv[c] * row1[x0] + gxv[c] * row1[x1];
                            drow[c] = static_cast<float>(wy * top + gy * bot);
                        }
                    }
                    pe[p] = e;
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
}

}  // namespace stemfast
