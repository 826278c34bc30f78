// Band-pass mask applied in place to an rfft2 spectrum (contract: stemfast/_kernels/__init__.py,
// reference: stemfast/_kernels/numpy_ref/image.py::bandpass_apply).
//
// mask(fy, fx) = exp(-a f^2) * (1 - exp(-b f^2)),  a = 2 pi^2 ns^2,  b = 2 pi^2 bs^2,  f^2 = fy^2 + fx^2.
// Both exponentials factor into a row and a column table (exp(-a fy^2) * exp(-a fx^2)), so the
// kernel does no transcendental work per element; the mask is formed in double and rounded to float
// once, like the reference.
#include "common.hpp"

#include <cmath>
#include <complex>
#include <stdexcept>

namespace stemfast {
namespace {

constexpr double kPi = 3.14159265358979323846;

// `spec` is taken as a plain array (no conversion) so that the in-place update can never land in a
// silent temporary copy: it must already be a writeable C-contiguous complex64 array.
void bandpass_apply(py::array spec, std::int64_t height, std::int64_t width, double noise_sigma,
                    double background_sigma) {
    if (!py::isinstance<py::array_t<std::complex<float>>>(spec))
        throw py::type_error("bandpass_apply: spec must be a complex64 array");
    if (spec.ndim() != 2) throw std::invalid_argument("bandpass_apply: spec must be 2-D complex64");
    if (!(spec.flags() & py::array::c_style))
        throw std::invalid_argument("bandpass_apply: spec must be C-contiguous");
    if (!spec.writeable()) throw std::invalid_argument("bandpass_apply: spec must be writeable");
    const std::int64_t nrow = spec.shape(0), ncol = spec.shape(1);
    if (height <= 0 || width <= 0 || nrow != height || ncol != width / 2 + 1)
        throw std::invalid_argument("bandpass_apply: spec shape must be (height, width // 2 + 1)");
    auto* data = static_cast<std::complex<float>*>(spec.mutable_data());

    const bool use_low = noise_sigma > 0, use_high = background_sigma > 0;
    const double a = 2.0 * kPi * kPi * noise_sigma * noise_sigma;
    const double b = 2.0 * kPi * kPi * background_sigma * background_sigma;
    std::vector<double> ly(static_cast<size_t>(nrow), 1.0), hy(static_cast<size_t>(nrow), 1.0);
    std::vector<double> lx(static_cast<size_t>(ncol), 1.0), hx(static_cast<size_t>(ncol), 1.0);
    for (std::int64_t k = 0; k < nrow; ++k) {
        const double fy = static_cast<double>(k <= height / 2 ? k : k - height) / static_cast<double>(height);
        if (use_low) ly[k] = std::exp(-a * fy * fy);
        if (use_high) hy[k] = std::exp(-b * fy * fy);
    }
    for (std::int64_t j = 0; j < ncol; ++j) {
        const double fx = static_cast<double>(j) / static_cast<double>(width);
        if (use_low) lx[j] = std::exp(-a * fx * fx);
        if (use_high) hx[j] = std::exp(-b * fx * fx);
    }

    py::gil_scoped_release release;
    parallel_for(
        nrow,
        [&](std::int64_t r0, std::int64_t r1) {
            for (std::int64_t k = r0; k < r1; ++k) {
                float* row = reinterpret_cast<float*>(data + k * ncol);  // interleaved re, im
                const double lk = ly[k], hk = hy[k];
                if (use_high) {
                    for (std::int64_t j = 0; j < ncol; ++j) {
                        const float m = static_cast<float>((lk * lx[j]) * (1.0 - hk * hx[j]));
                        row[2 * j] *= m;
                        row[2 * j + 1] *= m;
                    }
                } else {
                    for (std::int64_t j = 0; j < ncol; ++j) {
                        const float m = static_cast<float>(lk * lx[j]);
                        row[2 * j] *= m;
                        row[2 * j + 1] *= m;
                    }
                }
            }
        },
        16);
}

}  // namespace

void register_bandpass(py::module_& m) {
    m.def("bandpass_apply", &bandpass_apply, py::arg("spec"), py::arg("height"), py::arg("width"),
          py::arg("noise_sigma"), py::arg("background_sigma"),
          "Multiply an rfft2 spectrum (complex64[height, width//2+1]) in place by the Gaussian "
          "band-pass mask exp(-2pi^2 ns^2 f^2) * (1 - exp(-2pi^2 bs^2 f^2)).");
}

}  // namespace stemfast
