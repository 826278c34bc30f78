// rvae_forward: the inference pass of the patch model (stemfast.model.modules.RVAENet / VAENet in
// eval mode) without torch, parallel over patches, one patch at a time in thread-local buffers
// (contract: python/stemfast/_kernels/__init__.py; reference: python/stemfast/_kernels/numpy_ref/model.py).
//
// Layouts (prepared once per model by stemfast.model.engine): activations are channels-last
// (H, W, C) per patch; convolution weights [ky][kx][cin][cout]; dense weights transposed,
// [in][out], with their (H, W, C)-ordered side in that order; the STN pooling kernel [2][h w C]. float32 throughout, like the torch CPU path; the sums are in another
// order than torch's / BLAS', so the backends agree to float32 rounding, not bit for bit.
#include "common.hpp"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

// The convolutions are most of the work. The wheel is built for the baseline x86-64 ISA (SSE2), so
// the patch pass is compiled a second time for AVX2 + FMA and rvae_forward picks the variant the CPU
// runs (__builtin_cpu_supports; other compilers / CPUs: the baseline build only).
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define STEMFAST_AVX2 1
#endif
#define STEMFAST_INLINE inline __attribute__((always_inline))

namespace stemfast {
namespace {

using CArrF = py::array_t<float, py::array::c_style | py::array::forcecast>;

constexpr int kMaxChannels = 256;

struct Conv {
    const float* w;  // [k][k][cin][cout]
    const float* b;  // [cout]
    int cin, cout, k, stride, pad;
};

// out (Ho, Wo, cout) = conv(in (H, W, cin)), zero padding, optional ReLU, for cout = NV * LANES:
// NV accumulator vectors of LANES floats (GCC vector extensions) held in registers over the whole
// (ky, kx, cin) sum of an output pixel.
template <int LANES>
struct Vec {
    typedef float type __attribute__((vector_size(LANES * sizeof(float))));
};

// One output vector: t + bias (ReLU'd when relu) into dst.
template <typename V>
STEMFAST_INLINE void store_out(V t, const float* __restrict bias, bool relu, float* __restrict dst) {
    V b;
    std::memcpy(&b, bias, sizeof(V));
    t += b;
    if (relu) {
        const V zero = {};
        t = t < zero ? zero : t;  // NaN stays NaN (np.maximum's ReLU, as the generic path and numpy)
    }
    std::memcpy(dst, &t, sizeof(V));
}

// The kernel rows [ky0, ky1) of output row oy that read image rows: the others read only the zero
// padding of `in` (Hp rows: c.pad of them on each side), whose multiply-adds add exact zeros, so they
// are skipped (on the decoder's 3 x 3 and 6 x 6 maps 2 of 9 and 2 of 18 row passes).
STEMFAST_INLINE void tap_rows(int oy, int Hp, const Conv& c, int K, int& ky0, int& ky1) {
    const int top = oy * c.stride, H = Hp - 2 * c.pad;
    ky0 = std::max(0, c.pad - top);
    ky1 = std::min(K, c.pad + H - top);
}

template <int LANES, int NV, int K>
STEMFAST_INLINE void conv_vec(const float* __restrict in, int Hp, int Wp, const Conv& c, float* __restrict out, int Ho,
                              int Wo, bool relu) {
    // `in` is the input already zero-padded by c.pad on every side, (Hp, Wp, cin): no bounds tests
    typedef typename Vec<LANES>::type V;
    constexpr int COUT = LANES * NV;
    // R independent accumulator sets over the input channels (cin % R picks one), so narrow layers
    // are not bound by the latency of one chain of multiply-adds; summed at the end
    constexpr int R = NV >= 4 ? 1 : 4 / NV;
    const int cin = c.cin, stride = c.stride;
    for (int oy = 0; oy < Ho; ++oy) {
        int ky0, ky1;
        tap_rows(oy, Hp, c, K, ky0, ky1);
        for (int ox = 0; ox < Wo; ++ox) {
            V acc[R][NV];
#pragma GCC unroll 16
            for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
                for (int q = 0; q < NV; ++q) acc[r][q] = V{};
            for (int ky = ky0; ky < ky1; ++ky) {
                const float* __restrict row = in + (static_cast<std::int64_t>(oy * stride + ky) * Wp + ox * stride) * cin;
                const float* __restrict wrow = c.w + static_cast<std::int64_t>(ky * K) * cin * COUT;
                // the K taps of this kernel row are K * cin consecutive inputs against consecutive weight rows
                const int m = K * cin;
                int i = 0;
                for (; i + R <= m; i += R) {
#pragma GCC unroll 16
                    for (int r = 0; r < R; ++r) {
                        const V vv = V{} + row[i + r];
                        const float* __restrict wr = wrow + static_cast<std::int64_t>(i + r) * COUT;
#pragma GCC unroll 16
                        for (int q = 0; q < NV; ++q) {
                            V w;
                            std::memcpy(&w, wr + q * LANES, sizeof(V));
                            acc[r][q] += vv * w;
                        }
                    }
                }
                for (; i < m; ++i) {
                    const V vv = V{} + row[i];
                    const float* __restrict wr = wrow + static_cast<std::int64_t>(i) * COUT;
#pragma GCC unroll 16
                    for (int q = 0; q < NV; ++q) {
                        V w;
                        std::memcpy(&w, wr + q * LANES, sizeof(V));
                        acc[0][q] += vv * w;
                    }
                }
            }
            float* __restrict dst = out + (static_cast<std::int64_t>(oy) * Wo + ox) * COUT;
#pragma GCC unroll 16
            for (int q = 0; q < NV; ++q) {
                V t = acc[0][q];
#pragma GCC unroll 16
                for (int r = 1; r < R; ++r) t += acc[r][q];
                store_out(t, c.b + q * LANES, relu, dst + q * LANES);
            }
        }
    }
}

// Any cout up to kMaxChannels (accumulators in memory: slower).
STEMFAST_INLINE void conv_any(const float* __restrict in, int H, int W, const Conv& c, float* __restrict out, int Ho,
                              int Wo, bool relu) {
    const int cout = c.cout;
    float acc[kMaxChannels];
    for (int oy = 0; oy < Ho; ++oy) {
        for (int ox = 0; ox < Wo; ++ox) {
            for (int co = 0; co < cout; ++co) acc[co] = c.b[co];
            for (int ky = 0; ky < c.k; ++ky) {
                const int iy = oy * c.stride - c.pad + ky;
                if (iy < 0 || iy >= H) continue;
                for (int kx = 0; kx < c.k; ++kx) {
                    const int ix = ox * c.stride - c.pad + kx;
                    if (ix < 0 || ix >= W) continue;
                    const float* __restrict src = in + (static_cast<std::int64_t>(iy) * W + ix) * c.cin;
                    const float* __restrict wk = c.w + static_cast<std::int64_t>(ky * c.k + kx) * c.cin * cout;
                    for (int ci = 0; ci < c.cin; ++ci) {
                        const float v = src[ci];
                        const float* __restrict wr = wk + static_cast<std::int64_t>(ci) * cout;
                        for (int co = 0; co < cout; ++co) acc[co] += v * wr[co];
                    }
                }
            }
            float* __restrict dst = out + (static_cast<std::int64_t>(oy) * Wo + ox) * cout;
            for (int co = 0; co < cout; ++co) dst[co] = relu && acc[co] < 0.0f ? 0.0f : acc[co];
        }
    }
}

// conv_vec for P output pixels of a row at once (Wo % P == 0): each weight vector is loaded once for
// the P pixels instead of once per pixel. The deep layers' weights (the decoder's first: 9 x 32 x 64
// floats) do not fit in L1, so per-pixel loads streamed them from L2 once per output pixel.
template <int LANES, int NV, int K, int P>
STEMFAST_INLINE void conv_vec_px(const float* __restrict in, int Hp, int Wp, const Conv& c, float* __restrict out,
                                 int Ho, int Wo, bool relu) {
    typedef typename Vec<LANES>::type V;
    constexpr int COUT = LANES * NV;
    const int cin = c.cin, stride = c.stride, m = K * cin, step = stride * cin;
    for (int oy = 0; oy < Ho; ++oy) {
        int ky0, ky1;
        tap_rows(oy, Hp, c, K, ky0, ky1);
        for (int ox = 0; ox < Wo; ox += P) {
            V acc[P][NV];
#pragma GCC unroll 16
            for (int p = 0; p < P; ++p)
#pragma GCC unroll 16
                for (int q = 0; q < NV; ++q) acc[p][q] = V{};
            for (int ky = ky0; ky < ky1; ++ky) {
                const float* __restrict row = in + (static_cast<std::int64_t>(oy * stride + ky) * Wp + ox * stride) * cin;
                const float* __restrict wrow = c.w + static_cast<std::int64_t>(ky * K) * cin * COUT;
                for (int i = 0; i < m; ++i) {
                    V w[NV];
#pragma GCC unroll 16
                    for (int q = 0; q < NV; ++q) std::memcpy(&w[q], wrow + static_cast<std::int64_t>(i) * COUT + q * LANES, sizeof(V));
#pragma GCC unroll 16
                    for (int p = 0; p < P; ++p) {
                        const V vv = V{} + row[p * step + i];
#pragma GCC unroll 16
                        for (int q = 0; q < NV; ++q) acc[p][q] += vv * w[q];
                    }
                }
            }
#pragma GCC unroll 16
            for (int p = 0; p < P; ++p) {
                float* __restrict dst = out + (static_cast<std::int64_t>(oy) * Wo + ox + p) * COUT;
#pragma GCC unroll 16
                for (int q = 0; q < NV; ++q) store_out(acc[p][q], c.b + q * LANES, relu, dst + q * LANES);
            }
        }
    }
}

// The vector registers of a compiled variant: their number and width (floats). The vectors of a
// layer (LANES floats) take LANES / width registers each on a narrower ISA (8 floats: two SSE ones).
template <int VL, int REGS, int REG_FLOATS>
struct Isa {
    static constexpr int vl = VL;  // the widest vector the layers use (floats)
    // accumulators of LANES floats that fit, 3/4 of the registers (the rest: weights and inputs)
    template <int LANES>
    static constexpr int acc() {
        return REGS * 3 / 4 / (LANES > REG_FLOATS ? LANES / REG_FLOATS : 1);
    }
};
using IsaBaseline = Isa<8, 16, 4>;  // SSE2: 16 registers of 4 floats
using IsaAvx2 = Isa<8, 16, 8>;
using IsaAvx512 = Isa<16, 32, 16>;

// P pixels at a time where the row allows it and P NV accumulators fit in the registers (ACC), else
// one pixel at a time.
template <int LANES, int NV, int K, int ACC>
STEMFAST_INLINE void conv_px(const float* __restrict in, int Hp, int Wp, const Conv& c, float* __restrict out, int Ho,
                             int Wo, bool relu) {
    if constexpr (6 * NV <= ACC) {
        if (Wo % 6 == 0) return conv_vec_px<LANES, NV, K, 6>(in, Hp, Wp, c, out, Ho, Wo, relu);
    }
    if constexpr (4 * NV <= ACC) {
        if (Wo % 4 == 0) return conv_vec_px<LANES, NV, K, 4>(in, Hp, Wp, c, out, Ho, Wo, relu);
    }
    if constexpr (3 * NV <= ACC) {
        if (Wo % 3 == 0) return conv_vec_px<LANES, NV, K, 3>(in, Hp, Wp, c, out, Ho, Wo, relu);
    }
    conv_vec<LANES, NV, K>(in, Hp, Wp, c, out, Ho, Wo, relu);
}

template <class ISA, int LANES, int NV>
STEMFAST_INLINE void conv_k(const float* __restrict in, int Hp, int Wp, const Conv& c, float* __restrict out, int Ho,
                            int Wo, bool relu) {
    constexpr int ACC = ISA::template acc<LANES>();
    if (c.k == 3)
        conv_px<LANES, NV, 3, ACC>(in, Hp, Wp, c, out, Ho, Wo, relu);
    else
        conv_px<LANES, NV, 4, ACC>(in, Hp, Wp, c, out, Ho, Wo, relu);
}

// `pad` is a scratch buffer of at least (H + 2 p) (W + 2 p) cin floats. ISA: the compiled variant's
// registers (Isa).
template <class ISA>
STEMFAST_INLINE void conv_hwc(const float* __restrict in, int H, int W, const Conv& c, float* __restrict out,
                              int Ho, int Wo, bool relu, float* __restrict pad) {
    const bool fast = (c.k == 3 || c.k == 4) &&
                      (c.cout == 4 || c.cout == 8 || c.cout == 16 || c.cout == 32 || c.cout == 64);
    if (!fast) {
        conv_any(in, H, W, c, out, Ho, Wo, relu);
        return;
    }
    const int p = c.pad, Hp = H + 2 * p, Wp = W + 2 * p, ci = c.cin;
    std::fill(pad, pad + static_cast<std::int64_t>(Hp) * Wp * ci, 0.0f);
    for (int y = 0; y < H; ++y)
        std::memcpy(pad + (static_cast<std::int64_t>(y + p) * Wp + p) * ci, in + static_cast<std::int64_t>(y) * W * ci,
                    sizeof(float) * W * ci);
    switch (c.cout) {
        case 4: conv_k<ISA, 4, 1>(pad, Hp, Wp, c, out, Ho, Wo, relu); break;
        case 8: conv_k<ISA, 8, 1>(pad, Hp, Wp, c, out, Ho, Wo, relu); break;
        case 16: conv_k<ISA, ISA::vl, 16 / ISA::vl>(pad, Hp, Wp, c, out, Ho, Wo, relu); break;
        case 32: conv_k<ISA, ISA::vl, 32 / ISA::vl>(pad, Hp, Wp, c, out, Ho, Wo, relu); break;
        default: conv_k<ISA, ISA::vl, 64 / ISA::vl>(pad, Hp, Wp, c, out, Ho, Wo, relu); break;
    }
}

// Planar 3x3 stride-1 convolution for the narrow layers (few output channels: the STN's two layers
// and the decoder's last), where one broadcast input per multiply-add of the channels-last loop
// dominates. Each input channel is a zero-padded plane (Hp = Ho + 2, Wp = Wo + 2) stored flat; an
// output pixel (oy, ox) is computed at flat index f = oy Wp + ox from in[f + ky Wp + kx], so the
// sum over the 9 (ky, kx) taps and the input channels is a run of contiguous vector loads against
// one broadcast weight. Indices f with ox >= Wo are computed too and ignored. `out` holds cout
// planes of `ostride` floats (flat index f, row stride Wp).
struct Planar {
    int Ho, Wp;     // output height, padded row width (= output width + 2)
    int istride;    // floats per input plane (>= (Ho + 2) Wp + the overrun of the last vector block)
    int ostride;    // floats per output plane (the flat range rounded up to whole blocks of the widest vectors)
};
constexpr int kPlanarNB = 6;

constexpr int kPlanarLanes = 16;  // the widest vector of any variant (AVX-512); narrower ones divide it

Planar planar_geometry(int Ho) {
    const int Wp = Ho + 2, n = Ho * Wp, block = kPlanarNB * kPlanarLanes;
    const int ostride = (n + block - 1) / block * block;
    // a block's loads reach up to ostride - 1 + 2 Wp + 2 past the plane's start
    return Planar{Ho, Wp, std::max((Ho + 2) * Wp, ostride + 2 * Wp + 2), ostride};
}

template <int LANES>
STEMFAST_INLINE void conv3_planar(const float* __restrict in, const Planar& g, const Conv& c, float* __restrict out,
                                  bool relu) {
    typedef typename Vec<LANES>::type V;
    constexpr int NB = kPlanarNB;
    const int cin = c.cin, cout = c.cout, Wp = g.Wp;
    for (int co = 0; co < cout; ++co) {
        for (int f0 = 0; f0 < g.ostride; f0 += NB * LANES) {
            V acc[NB];
#pragma GCC unroll 8
            for (int b = 0; b < NB; ++b) acc[b] = V{} + c.b[co];
            for (int ci = 0; ci < cin; ++ci) {
                const float* __restrict plane = in + static_cast<std::int64_t>(ci) * g.istride + f0;
                for (int ky = 0; ky < 3; ++ky)
#pragma GCC unroll 3
                    for (int kx = 0; kx < 3; ++kx) {
                        const V w = V{} + c.w[(static_cast<std::int64_t>(ky * 3 + kx) * cin + ci) * cout + co];
                        const float* __restrict src = plane + ky * Wp + kx;
#pragma GCC unroll 8
                        for (int b = 0; b < NB; ++b) {
                            V v;
                            std::memcpy(&v, src + b * LANES, sizeof(V));
                            acc[b] += w * v;
                        }
                    }
            }
            float* __restrict dst = out + static_cast<std::int64_t>(co) * g.ostride + f0;
#pragma GCC unroll 8
            for (int b = 0; b < NB; ++b) {
                V t = acc[b];
                if (relu) {
                    const V zero = {};
                    t = t < zero ? zero : t;  // NaN stays NaN
                }
                std::memcpy(dst + b * LANES, &t, sizeof(V));
            }
        }
    }
}

// The valid pixels of conv3_planar's output planes into the interiors of the next layer's padded
// input planes (same geometry: stride-1 layers keep the size; the borders stay zero).
STEMFAST_INLINE void planar_to_padded(const float* __restrict out, const Planar& g, int channels,
                                      float* __restrict next) {
    const int Wo = g.Wp - 2;
    for (int c = 0; c < channels; ++c)
        for (int y = 0; y < g.Ho; ++y)
            std::memcpy(next + static_cast<std::int64_t>(c) * g.istride + (y + 1) * g.Wp + 1,
                        out + static_cast<std::int64_t>(c) * g.ostride + y * g.Wp, sizeof(float) * Wo);
}

// pixel_shuffle(in (H, W, 4C)) with ReLU into the interiors of C padded input planes of geometry g
// (g.Ho = 2H): channel c * 4 + i * 2 + j of pixel (h, w) goes to plane c, pixel (2h + i, 2w + j).
STEMFAST_INLINE void shuffle2_to_planar(const float* __restrict in, int H, int W, int C, const Planar& g,
                                        float* __restrict planes) {
    for (int h = 0; h < H; ++h)
        for (int w = 0; w < W; ++w) {
            const float* src = in + (static_cast<std::int64_t>(h) * W + w) * 4 * C;
            for (int c = 0; c < C; ++c)
                for (int i = 0; i < 2; ++i)
                    for (int j = 0; j < 2; ++j) {
                        const float v = src[c * 4 + i * 2 + j];
                        planes[static_cast<std::int64_t>(c) * g.istride + (2 * h + i + 1) * g.Wp + (2 * w + j + 1)] =
                            v < 0.0f ? 0.0f : v;
                    }
        }
}

// pixel_shuffle of conv3_planar's 4 output planes (one channel): out (2 Ho, 2 Ho).
STEMFAST_INLINE void planar_shuffle1(const float* __restrict planes, const Planar& g, float* __restrict out) {
    const int H = g.Ho, W2 = 2 * (g.Wp - 2);
    for (int h = 0; h < H; ++h)
        for (int w = 0; w < g.Wp - 2; ++w)
            for (int i = 0; i < 2; ++i)
                for (int j = 0; j < 2; ++j)
                    out[(2 * h + i) * W2 + 2 * w + j] = planes[static_cast<std::int64_t>(i * 2 + j) * g.ostride + h * g.Wp + w];
}

// out (2H, 2W, C) = pixel_shuffle(in (H, W, 4C)) with optional ReLU: channel c * 4 + i * 2 + j of
// pixel (h, w) goes to pixel (2h + i, 2w + j), channel c (torch.nn.PixelShuffle(2)).
STEMFAST_INLINE void shuffle2(const float* __restrict in, int H, int W, int C, float* __restrict out, bool relu) {
    const int W2 = 2 * W;
    for (int h = 0; h < H; ++h)
        for (int w = 0; w < W; ++w) {
            const float* src = in + (static_cast<std::int64_t>(h) * W + w) * 4 * C;
            for (int i = 0; i < 2; ++i)
                for (int j = 0; j < 2; ++j) {
                    float* dst = out + (static_cast<std::int64_t>(2 * h + i) * W2 + (2 * w + j)) * C;
                    for (int c = 0; c < C; ++c) {
                        const float v = src[c * 4 + i * 2 + j];
                        dst[c] = relu && v < 0.0f ? 0.0f : v;
                    }
                }
        }
}

// y (n_out) = W x + b with W given transposed, wt (n_in, n_out); optional ReLU.
STEMFAST_INLINE void dense(const float* __restrict x, int n_in, const float* __restrict wt, const float* __restrict b,
                           int n_out, float* __restrict y, bool relu) {
    for (int o = 0; o < n_out; ++o) y[o] = b[o];
    for (int i = 0; i < n_in; ++i) {
        const float v = x[i];
        const float* __restrict wr = wt + static_cast<std::int64_t>(i) * n_out;
        for (int o = 0; o < n_out; ++o) y[o] += v * wr[o];
    }
    if (relu)
        for (int o = 0; o < n_out; ++o) y[o] = y[o] < 0.0f ? 0.0f : y[o];
}

// Bilinear rotation of an S x S patch about its centre by `deg` (counter-clockwise as displayed;
// kornia's warp_affine with align_corners=True): out(p) = in(R(-deg) (p - c) + c). border: sample
// positions clamped to the patch (grid_sample's "border"); otherwise taps outside read 0 ("zeros").
struct Taps {  // the 4 bilinear taps of one output pixel: pixel indices (clamped) and weights (0 outside)
    int i[4];
    float w[4];
};

STEMFAST_INLINE Taps rot_taps(int S, int x, int y, float ca, float sa, bool border) {
    const float c = static_cast<float>(S - 1) / 2.0f;
    const float hi = static_cast<float>(S - 1);
    const float dx = static_cast<float>(x) - c, dy = static_cast<float>(y) - c;
    float sx = ca * dx - sa * dy + c;
    float sy = sa * dx + ca * dy + c;
    if (border) {
        sx = sx < 0.0f ? 0.0f : (sx > hi ? hi : sx);
        sy = sy < 0.0f ? 0.0f : (sy > hi ? hi : sy);
    }
    const float fx0 = std::floor(sx), fy0 = std::floor(sy);
    const int x0 = static_cast<int>(fx0), y0 = static_cast<int>(fy0);
    const float gx = sx - fx0, gy = sy - fy0;
    // taps outside the patch get weight 0 and read a clamped (valid) pixel
    const float wx0 = x0 >= 0 && x0 < S ? 1.0f - gx : 0.0f, wx1 = x0 + 1 >= 0 && x0 + 1 < S ? gx : 0.0f;
    const float wy0 = y0 >= 0 && y0 < S ? 1.0f - gy : 0.0f, wy1 = y0 + 1 >= 0 && y0 + 1 < S ? gy : 0.0f;
    const int xa = x0 < 0 ? 0 : (x0 > S - 1 ? S - 1 : x0), xb = x0 + 1 < 0 ? 0 : (x0 + 1 > S - 1 ? S - 1 : x0 + 1);
    const int ya = y0 < 0 ? 0 : (y0 > S - 1 ? S - 1 : y0), yb = y0 + 1 < 0 ? 0 : (y0 + 1 > S - 1 ? S - 1 : y0 + 1);
    return Taps{{ya * S + xa, ya * S + xb, yb * S + xa, yb * S + xb}, {wx0 * wy0, wx1 * wy0, wx0 * wy1, wx1 * wy1}};
}

STEMFAST_INLINE float apply_taps(const float* __restrict in, const Taps& t) {
    return (t.w[0] * in[t.i[0]] + t.w[1] * in[t.i[1]]) + (t.w[2] * in[t.i[2]] + t.w[3] * in[t.i[3]]);
}

STEMFAST_INLINE void angle_cs(double deg, float& ca, float& sa) {
    const double a = deg * (M_PI / 180.0);
    ca = static_cast<float>(std::cos(a));
    sa = static_cast<float>(std::sin(a));
}

// Bilinear rotation of an S x S patch about its centre by `deg` (counter-clockwise as displayed;
// kornia's warp_affine with align_corners=True): out(p) = in(R(-deg) (p - c) + c). border: sample
// positions clamped to the patch (grid_sample's "border"); otherwise taps outside read 0 ("zeros").
struct RowTaps {  // one output row's taps, as arrays (the tap arithmetic vectorises over the row)
    std::vector<int> i;    // [4][S]
    std::vector<float> w;  // [4][S]
    explicit RowTaps(int S) : i(4 * static_cast<size_t>(S)), w(4 * static_cast<size_t>(S)) {}
};

template <bool BORDER>
STEMFAST_INLINE void rotate_rows(const float* __restrict in, int S, float ca, float sa, float* __restrict out, RowTaps& rt) {
    // rot_taps for 8 pixels of a row at a time (S % 8 == 0) in vectors, then the bilinear sums (which
    // the compiler vectorises with gathers). floor(v) is trunc(v) - (trunc(v) > v), exact here.
    typedef float F8 __attribute__((vector_size(32)));
    typedef int I8 __attribute__((vector_size(32)));
    const float c = static_cast<float>(S - 1) / 2.0f;
    const float hi = static_cast<float>(S - 1);
    const F8 iota = {0.0f, 1.0f, 2.0f, 3.0f, 4.0f, 5.0f, 6.0f, 7.0f};
    const F8 zero = {}, one = zero + 1.0f;
    const I8 izero = {}, ione = izero + 1, ilast = izero + (S - 1), iS = izero + S;
    int* __restrict i0 = rt.i.data();
    int* __restrict i1 = i0 + S;
    int* __restrict i2 = i1 + S;
    int* __restrict i3 = i2 + S;
    float* __restrict w0 = rt.w.data();
    float* __restrict w1 = w0 + S;
    float* __restrict w2 = w1 + S;
    float* __restrict w3 = w2 + S;
    for (int y = 0; y < S; ++y) {
        const float dy = static_cast<float>(y) - c;
        for (int x = 0; x < S; x += 8) {
            const F8 dx = (iota + static_cast<float>(x)) - c;
            F8 sx = ca * dx - sa * dy + c;
            F8 sy = sa * dx + ca * dy + c;
            if (BORDER) {
                sx = sx < zero ? zero : sx;
                sx = sx > hi ? zero + hi : sx;
                sy = sy < zero ? zero : sy;
                sy = sy > hi ? zero + hi : sy;
            }
            const I8 tx = __builtin_convertvector(sx, I8), ty = __builtin_convertvector(sy, I8);
            const I8 x0 = tx + (__builtin_convertvector(tx, F8) > sx), y0 = ty + (__builtin_convertvector(ty, F8) > sy);
            const F8 gx = sx - __builtin_convertvector(x0, F8), gy = sy - __builtin_convertvector(y0, F8);
            const I8 x1 = x0 + ione, y1 = y0 + ione;
            const F8 wx0 = (x0 >= izero) & (x0 < iS) ? one - gx : zero, wx1 = (x1 >= izero) & (x1 < iS) ? gx : zero;
            const F8 wy0 = (y0 >= izero) & (y0 < iS) ? one - gy : zero, wy1 = (y1 >= izero) & (y1 < iS) ? gy : zero;
            I8 xa = x0 < izero ? izero : x0, xb = x1 < izero ? izero : x1;
            I8 ya = y0 < izero ? izero : y0, yb = y1 < izero ? izero : y1;
            xa = xa > ilast ? ilast : xa; xb = xb > ilast ? ilast : xb;
            ya = (ya > ilast ? ilast : ya) * S; yb = (yb > ilast ? ilast : yb) * S;
            const I8 t0 = ya + xa, t1 = ya + xb, t2 = yb + xa, t3 = yb + xb;
            const F8 v0 = wx0 * wy0, v1 = wx1 * wy0, v2 = wx0 * wy1, v3 = wx1 * wy1;
            std::memcpy(i0 + x, &t0, sizeof(I8)); std::memcpy(i1 + x, &t1, sizeof(I8));
            std::memcpy(i2 + x, &t2, sizeof(I8)); std::memcpy(i3 + x, &t3, sizeof(I8));
            std::memcpy(w0 + x, &v0, sizeof(F8)); std::memcpy(w1 + x, &v1, sizeof(F8));
            std::memcpy(w2 + x, &v2, sizeof(F8)); std::memcpy(w3 + x, &v3, sizeof(F8));
        }
        float* __restrict o = out + y * S;
        for (int x = 0; x < S; ++x)
            o[x] = (w0[x] * in[i0[x]] + w1[x] * in[i1[x]]) + (w2[x] * in[i2[x]] + w3[x] * in[i3[x]]);
    }
}

STEMFAST_INLINE void rotate(const float* __restrict in, int S, double deg, bool border, float* __restrict out,
                            RowTaps& rt) {
    float ca, sa;
    angle_cs(deg, ca, sa);
    if (border)
        rotate_rows<true>(in, S, ca, sa, out, rt);
    else
        rotate_rows<false>(in, S, ca, sa, out, rt);
}

// The same rotation with its taps computed beforehand (one table serves every patch of a fixed angle).
STEMFAST_INLINE void rotate_table(const float* __restrict in, const Taps* __restrict tab, int n, float* __restrict out) {
    for (int p = 0; p < n; ++p) out[p] = apply_taps(in, tab[p]);
}

struct Net {
    int S, L, k, symmetrize, ds, has_stn, c1, c2, c3, s1, s2;
    const float* mask;  // [S * S]
    Conv stn1, stn2;    // STN convolutions (on the (S / ds)^2 pooled patch)
    const float* stn_kern;  // [2][stn_c2 planes of gs.ostride]: the folded last layer and harmonic pooling,
                            // laid out like conv3_planar's output (0 at the ignored indices)
    Planar gs, gd;          // planar geometries: the STN's layers, the decoder's last layer
    float stn_kb0, stn_kb1;  // its bias terms
    Conv e1, e2, e3;
    const float* head_w;  // [(S / 8)^2 * c3, 2L] (transposed)
    const float* head_b;
    const float* fc_w;  // [L, (S / 8)^2 * c3] (transposed)
    const float* fc_b;
    Conv d1, d2, d3;
    const Taps* sym_taps;  // [(k - 1) S^2]: the rotations by 360 j / k, j = 1 .. k - 1 (zero padding)
};

struct Scratch {
    std::vector<float> sp0, sp1, sd, st;  // padded planar inputs (borders stay 0), planar outputs
    RowTaps rt;
    std::vector<float> padbuf, xm, xc, xs, rot, e1, e2, e3, hl, lvsum, musum, f, g1, g2, yc, y;
    explicit Scratch(const Net& n) : rt(n.S) {
        const size_t S = static_cast<size_t>(n.S), S2 = S * S;
        xm.resize(S2); xc.resize(S2); xs.resize(S2); rot.resize(S2); yc.resize(S2); y.resize(S2);
        e1.resize(S2 / 4 * n.c1); e2.resize(S2 / 16 * n.c2); e3.resize(S2 / 64 * n.c3);
        hl.resize(2 * n.L); musum.resize(n.L); lvsum.resize(n.L);
        f.resize(S2 / 64 * n.c3);
        g1.resize(S2 / 64 * 4 * n.c2); g2.resize(S2 / 16 * 4 * n.c1);
        // the largest zero-padded channels-last layer input (conv_hwc): (h + 2)^2 c over the encoder's and the
        // decoder's first two layers' inputs (h, h, c)
        auto padded = [](size_t h, int c) { return (h + 2) * (h + 2) * static_cast<size_t>(std::max(1, c)); };
        sp0.assign(static_cast<size_t>(n.gs.istride), 0.0f);
        sp1.assign(static_cast<size_t>(n.gs.istride) * std::max(1, n.stn1.cout), 0.0f);
        sd.assign(static_cast<size_t>(n.gd.istride) * std::max(1, n.c1), 0.0f);
        st.assign(std::max(static_cast<size_t>(n.gs.ostride) * std::max({1, n.stn1.cout, n.stn2.cout}),
                           static_cast<size_t>(n.gd.ostride) * 4), 0.0f);
        padbuf.resize(std::max({padded(S, 1), padded(S / 2, n.c1), padded(S / 4, n.c2), padded(S / 8, n.c3)}));
    }
};

// Encoder on a masked canonical patch xin (S, S): adds mu and the clamped logvar to musum / lvsum.
template <class ISA>
STEMFAST_INLINE void encode_one(const Net& n, const float* xin, Scratch& s) {
    const int S = n.S;
    conv_hwc<ISA>(xin, S, S, n.e1, s.e1.data(), S / 2, S / 2, true, s.padbuf.data());
    conv_hwc<ISA>(s.e1.data(), S / 2, S / 2, n.e2, s.e2.data(), S / 4, S / 4, true, s.padbuf.data());
    conv_hwc<ISA>(s.e2.data(), S / 4, S / 4, n.e3, s.e3.data(), S / 8, S / 8, true, s.padbuf.data());
    dense(s.e3.data(), (S / 8) * (S / 8) * n.c3, n.head_w, n.head_b, 2 * n.L, s.hl.data(), false);
    for (int l = 0; l < n.L; ++l) {
        float lv = s.hl[n.L + l];
        lv = lv < -12.0f ? -12.0f : (lv > 8.0f ? 8.0f : lv);
        s.musum[l] += s.hl[l];
        s.lvsum[l] += lv;
    }
}

// One patch: x (S, S) model input (background already subtracted) -> mu, logvar (L), angle,
// strength, err and the reconstruction y (S, S, masked) in s.y.
template <class ISA>
STEMFAST_INLINE void forward_body(const Net& n, const float* xin, Scratch& s, float* mu, float* lv, float& angle,
                                 float& strength, float& err) {
    const int S = n.S, S2 = S * S;
    for (int i = 0; i < S2; ++i) s.xm[i] = xin[i] * n.mask[i];
    for (int l = 0; l < n.L; ++l) s.musum[l] = s.lvsum[l] = 0.0f;
    double theta = 0.0;
    if (n.has_stn) {
        const int hp = S / n.ds;
        const Planar& g = n.gs;
        // the (pooled) masked patch into the interior of the first padded plane
        if (n.ds == 2) {
            for (int y = 0; y < hp; ++y)
                for (int x = 0; x < hp; ++x) {
                    const float* r0 = s.xm.data() + (2 * y) * S + 2 * x;
                    const float* r1 = r0 + S;
                    s.sp0[(y + 1) * g.Wp + x + 1] = (r0[0] + r0[1] + r1[0] + r1[1]) * 0.25f;
                }
        } else {
            for (int y = 0; y < hp; ++y) std::memcpy(&s.sp0[(y + 1) * g.Wp + 1], s.xm.data() + y * S, sizeof(float) * hp);
        }
        conv3_planar<ISA::vl>(s.sp0.data(), g, n.stn1, s.st.data(), true);
        planar_to_padded(s.st.data(), g, n.stn1.cout, s.sp1.data());
        conv3_planar<ISA::vl>(s.sp1.data(), g, n.stn2, s.st.data(), true);
        // harmonic pooling over the output planes (the kernel is 0 at the ignored indices): 8 partial
        // sums per component (vectorisable), added at the end
        float pc[8] = {0}, ps[8] = {0};
        const int m = g.ostride * n.stn2.cout;  // a multiple of 8
        const float* __restrict kc = n.stn_kern;
        const float* __restrict ks = n.stn_kern + m;
        const float* __restrict h2 = s.st.data();
        for (int i = 0; i < m; i += 8)
            for (int l = 0; l < 8; ++l) {
                pc[l] += h2[i + l] * kc[i + l];
                ps[l] += h2[i + l] * ks[i + l];
            }
        float hc = n.stn_kb0, hs = n.stn_kb1;
        for (int l = 0; l < 8; ++l) {
            hc += pc[l];
            hs += ps[l];
        }
        strength = std::sqrt(hc * hc + hs * hs);
        angle = static_cast<float>(std::atan2(hs, hc) * (180.0 / M_PI)) / static_cast<float>(n.k);
        theta = static_cast<double>(angle);
        // canonical patch: the full patch rotated by -theta (border padding), masked afterwards
        rotate(xin, S, -theta, true, s.xc.data(), s.rt);
        if (n.symmetrize == 1) {  // "image": the mean of the k branches, encoded once
            for (int i = 0; i < S2; ++i) s.xs[i] = s.xc[i];
            for (int j = 1; j < n.k; ++j) {
                rotate_table(s.xc.data(), n.sym_taps + static_cast<std::int64_t>(j - 1) * S2, S2, s.rot.data());
                for (int i = 0; i < S2; ++i) s.xs[i] += s.rot[i];
            }
            for (int i = 0; i < S2; ++i) s.xs[i] = s.xs[i] / static_cast<float>(n.k) * n.mask[i];
            encode_one<ISA>(n, s.xs.data(), s);
        } else {
            for (int i = 0; i < S2; ++i) s.xs[i] = s.xc[i] * n.mask[i];
            encode_one<ISA>(n, s.xs.data(), s);
            if (n.symmetrize == 2) {  // "features": every branch encoded, mu and logvar averaged
                for (int j = 1; j < n.k; ++j) {
                    rotate_table(s.xc.data(), n.sym_taps + static_cast<std::int64_t>(j - 1) * S2, S2, s.rot.data());
                    for (int i = 0; i < S2; ++i) s.rot[i] *= n.mask[i];
                    encode_one<ISA>(n, s.rot.data(), s);
                }
                for (int l = 0; l < n.L; ++l) {
                    s.musum[l] /= static_cast<float>(n.k);
                    s.lvsum[l] /= static_cast<float>(n.k);
                }
            }
        }
    } else {
        angle = NAN;
        strength = NAN;
        encode_one<ISA>(n, s.xm.data(), s);
    }
    for (int l = 0; l < n.L; ++l) {
        mu[l] = s.musum[l];
        lv[l] = s.lvsum[l];
    }
    // decoder: dense + ReLU to (S/8, S/8, c3), three (3x3 conv + pixel shuffle) stages
    const int s0 = S / 8;
    dense(mu, n.L, n.fc_w, n.fc_b, s0 * s0 * n.c3, s.f.data(), true);
    conv_hwc<ISA>(s.f.data(), s0, s0, n.d1, s.g1.data(), s0, s0, false, s.padbuf.data());
    shuffle2(s.g1.data(), s0, s0, n.c2, s.e2.data(), true);  // (S/4, S/4, c2)
    conv_hwc<ISA>(s.e2.data(), 2 * s0, 2 * s0, n.d2, s.g2.data(), 2 * s0, 2 * s0, false, s.padbuf.data());
    shuffle2_to_planar(s.g2.data(), 2 * s0, 2 * s0, n.c1, n.gd, s.sd.data());  // (S/2, S/2) planes of c1
    conv3_planar<ISA::vl>(s.sd.data(), n.gd, n.d3, s.st.data(), false);
    planar_shuffle1(s.st.data(), n.gd, s.yc.data());  // (S, S)
    if (n.has_stn)
        rotate(s.yc.data(), S, theta, false, s.y.data(), s.rt);
    else
        for (int i = 0; i < S2; ++i) s.y[i] = s.yc[i];
    float e = 0.0f, msum = 0.0f;
    for (int i = 0; i < S2; ++i) {
        s.y[i] *= n.mask[i];
        const float d = (s.y[i] - xin[i]) * n.mask[i];
        e += d * d;
        msum += n.mask[i];
    }
    err = e / msum;
}

void forward_base(const Net& n, const float* xin, Scratch& s, float* mu, float* lv, float& angle, float& strength,
                  float& err) {
    forward_body<IsaBaseline>(n, xin, s, mu, lv, angle, strength, err);
}
#ifdef STEMFAST_AVX2
__attribute__((target("avx2,fma"))) void forward_avx2(const Net& n, const float* xin, Scratch& s, float* mu, float* lv,
                                                      float& angle, float& strength, float& err) {
    forward_body<IsaAvx2>(n, xin, s, mu, lv, angle, strength, err);
}
// AVX-512: the 16- to 64-channel layers in 16-float vectors (half the multiply-adds of AVX2 per output)
__attribute__((target("avx512f,avx512vl,avx2,fma"))) void forward_avx512(const Net& n, const float* xin, Scratch& s,
                                                                          float* mu, float* lv, float& angle,
                                                                          float& strength, float& err) {
    forward_body<IsaAvx512>(n, xin, s, mu, lv, angle, strength, err);
}
#endif

Conv make_conv(const CArrF& w, const CArrF& b, int stride, int pad, const char* name) {
    if (w.ndim() != 4 || w.shape(0) != w.shape(1) || b.ndim() != 1 || b.shape(0) != w.shape(3))
        throw py::value_error(std::string("rvae_forward: bad shape of convolution ") + name);
    if (w.shape(3) > kMaxChannels) throw py::value_error(std::string("rvae_forward: too many channels in ") + name);
    return Conv{w.data(), b.data(), static_cast<int>(w.shape(2)), static_cast<int>(w.shape(3)),
                static_cast<int>(w.shape(0)), stride, pad};
}

}  // namespace

py::tuple rvae_forward(CArrF x, CArrF mask, py::tuple stn, py::tuple enc, py::tuple dec, int symmetry,
                       int symmetrize, int stn_downsample, int background_rank, py::array recon) {
    if (x.ndim() != 3 || x.shape(1) != x.shape(2)) throw py::value_error("rvae_forward: x must be (N, S, S)");
    const std::int64_t N = x.shape(0);
    const int S = static_cast<int>(x.shape(1));
    if (S % 8 != 0 || S < 8) throw py::value_error("rvae_forward: the patch size must be a multiple of 8");
    if (mask.size() != static_cast<py::ssize_t>(S) * S) throw py::value_error("rvae_forward: mask must be (S, S)");
    if (enc.size() != 8 || dec.size() != 8) throw py::value_error("rvae_forward: enc and dec take 8 arrays each");
    if (!(stn.size() == 0 || stn.size() == 6)) throw py::value_error("rvae_forward: stn takes 0 or 6 arrays");
    if (symmetry < 1 || symmetrize < 0 || symmetrize > 2 || !(stn_downsample == 1 || stn_downsample == 2))
        throw py::value_error("rvae_forward: bad symmetry / symmetrize / stn_downsample");
    if (background_rank < 0 || background_rank > S * S)
        throw py::value_error("rvae_forward: background_rank must be in [0, S * S]");
    // written in place: it must be exactly right (a converted copy would be filled and dropped)
    const bool want_recon = recon.size() != 0;
    if (want_recon && (!py::isinstance<py::array_t<float>>(recon) || !(recon.flags() & py::array::c_style) ||
                       !recon.writeable() || recon.ndim() != 3 || recon.shape(0) != N || recon.shape(1) != S ||
                       recon.shape(2) != S))
        throw py::value_error("rvae_forward: recon must be a writeable C-contiguous float32 array of shape (N, S, S), "
                              "or empty");
    // keep the converted arrays alive for the call
    std::vector<CArrF> keep;
    auto arr = [&keep](py::handle h) { keep.push_back(CArrF::ensure(h)); if (!keep.back()) throw py::value_error("rvae_forward: weights must be float32 arrays"); return keep.back(); };
    Net n{};
    std::vector<float> stn_planar;
    n.S = S;
    n.k = symmetry;
    n.symmetrize = symmetrize;
    n.ds = stn_downsample;
    n.has_stn = stn.size() == 6;
    n.mask = mask.data();
    if (n.has_stn) {
        CArrF w1 = arr(stn[0]), b1 = arr(stn[1]), w2 = arr(stn[2]), b2 = arr(stn[3]), kern = arr(stn[4]), kb = arr(stn[5]);
        n.stn1 = make_conv(w1, b1, 1, 1, "stn1");
        n.stn2 = make_conv(w2, b2, 1, 1, "stn2");
        const int hp = S / stn_downsample;
        if (n.stn1.cin != 1 || n.stn2.cin != n.stn1.cout || n.stn1.k != 3 || n.stn2.k != 3 ||
            kern.size() != static_cast<py::ssize_t>(hp) * hp * n.stn2.cout * 2 || kb.size() != 2)
            throw py::value_error("rvae_forward: bad STN weights");
        // the pooling kernel, [2][hp hp C] over (y, x, c), laid out like conv3_planar's output planes
        n.gs = planar_geometry(hp);
        const int C = n.stn2.cout, m = n.gs.ostride * C;
        stn_planar.assign(2 * static_cast<size_t>(m), 0.0f);
        const float* kd = kern.data();
        for (int comp = 0; comp < 2; ++comp)
            for (int y = 0; y < hp; ++y)
                for (int x = 0; x < hp; ++x)
                    for (int c = 0; c < C; ++c)
                        stn_planar[static_cast<size_t>(comp) * m + static_cast<size_t>(c) * n.gs.ostride + y * n.gs.Wp + x] =
                            kd[static_cast<size_t>(comp) * hp * hp * C + (static_cast<size_t>(y) * hp + x) * C + c];
        n.stn_kern = stn_planar.data();
        n.stn_kb0 = kb.data()[0];
        n.stn_kb1 = kb.data()[1];
    }
    CArrF ew1 = arr(enc[0]), eb1 = arr(enc[1]), ew2 = arr(enc[2]), eb2 = arr(enc[3]), ew3 = arr(enc[4]),
          eb3 = arr(enc[5]), hw = arr(enc[6]), hb = arr(enc[7]);
    n.e1 = make_conv(ew1, eb1, 2, 1, "enc1");
    n.e2 = make_conv(ew2, eb2, 2, 1, "enc2");
    n.e3 = make_conv(ew3, eb3, 2, 1, "enc3");
    n.c1 = n.e1.cout;
    n.c2 = n.e2.cout;
    n.c3 = n.e3.cout;
    const int s0 = S / 8;
    if (n.e1.cin != 1 || n.e2.cin != n.c1 || n.e3.cin != n.c2 || n.e1.k != 4 || n.e2.k != 4 || n.e3.k != 4 ||
        hw.ndim() != 2 || hw.shape(0) != s0 * s0 * n.c3 || hw.shape(1) % 2 || hb.size() != hw.shape(1))
        throw py::value_error("rvae_forward: bad encoder weights");
    n.L = static_cast<int>(hw.shape(1) / 2);
    n.head_w = hw.data();
    n.head_b = hb.data();
    CArrF fw = arr(dec[0]), fb = arr(dec[1]), dw1 = arr(dec[2]), db1 = arr(dec[3]), dw2 = arr(dec[4]), db2 = arr(dec[5]),
          dw3 = arr(dec[6]), db3 = arr(dec[7]);
    n.d1 = make_conv(dw1, db1, 1, 1, "dec1");
    n.d2 = make_conv(dw2, db2, 1, 1, "dec2");
    n.d3 = make_conv(dw3, db3, 1, 1, "dec3");
    if (fw.ndim() != 2 || fw.shape(1) != s0 * s0 * n.c3 || fw.shape(0) != n.L || fb.size() != fw.shape(1) ||
        n.d1.cin != n.c3 || n.d1.cout != 4 * n.c2 || n.d2.cin != n.c2 || n.d2.cout != 4 * n.c1 || n.d3.cin != n.c1 ||
        n.d3.cout != 4 || n.d1.k != 3 || n.d2.k != 3 || n.d3.k != 3)
        throw py::value_error("rvae_forward: bad decoder weights");
    n.fc_w = fw.data();
    n.fc_b = fb.data();
    n.gd = planar_geometry(S / 2);
    if (!n.has_stn) n.gs = planar_geometry(1);

    std::vector<Taps> sym(static_cast<size_t>(std::max(0, symmetry - 1)) * S * S);
    for (int j = 1; j < symmetry; ++j) {
        float ca, sa;
        angle_cs(360.0 * j / symmetry, ca, sa);
        for (int y = 0; y < S; ++y)
            for (int x = 0; x < S; ++x) sym[static_cast<size_t>(j - 1) * S * S + y * S + x] = rot_taps(S, x, y, ca, sa, false);
    }
    n.sym_taps = sym.data();
    using Fwd = void (*)(const Net&, const float*, Scratch&, float*, float*, float&, float&, float&);
    Fwd fwd = forward_base;
#ifdef STEMFAST_AVX2
    // the widest variant the CPU runs, capped by STEMFAST_MAX_ISA ("baseline", "avx2"; tests run each)
    const char* cap_env = std::getenv("STEMFAST_MAX_ISA");
    const std::string cap = cap_env ? cap_env : "";
    __builtin_cpu_init();
    if (cap != "baseline" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        fwd = forward_avx2;
        if (cap != "avx2" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl"))
            fwd = forward_avx512;
    }
#endif
    py::array_t<float> mu({N, static_cast<std::int64_t>(n.L)}), lv({N, static_cast<std::int64_t>(n.L)});
    py::array_t<float> angle(N), strength(N), err(N);
    const float* xp = x.data();
    float* mup = mu.mutable_data();
    float* lvp = lv.mutable_data();
    float* ap = angle.mutable_data();
    float* sp = strength.mutable_data();
    float* ep = err.mutable_data();
    float* rp = want_recon ? static_cast<float*>(recon.mutable_data()) : nullptr;
    {
        py::gil_scoped_release release;
        const size_t S2 = static_cast<size_t>(S) * S;
        const int kbg = background_rank;
        parallel_for(N, [&](std::int64_t b, std::int64_t e) {
            Scratch s(n);
            // the patch minus its background (the kbg-th smallest value, as np.partition: NaN sorts last)
            std::vector<float> xb(kbg > 0 ? S2 : 0), sel(kbg > 0 ? S2 : 0);
            auto nan_last = [](float u, float v) { return u < v || (std::isnan(v) && !std::isnan(u)); };
#if defined(__SSE__)
            const unsigned int csr = _mm_getcsr();
            _mm_setcsr(csr | 0x8040u);  // flush / treat subnormals as zero (FTZ | DAZ) in this thread
#endif
            for (std::int64_t i = b; i < e; ++i) {
                const float* xi = xp + i * static_cast<std::int64_t>(S2);
                if (kbg > 0) {  // with the caller's floating-point mode (no DAZ), as NumPy computes it
#if defined(__SSE__)
                    _mm_setcsr(csr);
#endif
                    std::copy(xi, xi + S2, sel.begin());
                    std::nth_element(sel.begin(), sel.begin() + (kbg - 1), sel.end(), nan_last);
                    const float bg = sel[static_cast<size_t>(kbg - 1)];
                    for (size_t j = 0; j < S2; ++j) xb[j] = xi[j] - bg;
                    xi = xb.data();
#if defined(__SSE__)
                    _mm_setcsr(csr | 0x8040u);
#endif
                }
                fwd(n, xi, s, mup + i * n.L, lvp + i * n.L, ap[i], sp[i], ep[i]);
                if (rp) std::copy(s.y.begin(), s.y.end(), rp + i * S * S);
            }
#if defined(__SSE__)
            _mm_setcsr(csr);
#endif
        }, 16);
    }
    return py::make_tuple(mu, lv, angle, strength, err);
}

void register_rvae(py::module_& m) {
    m.def("rvae_forward", &rvae_forward, py::arg("x"), py::arg("mask"), py::arg("stn"), py::arg("enc"), py::arg("dec"),
          py::arg("symmetry"), py::arg("symmetrize"), py::arg("stn_downsample"), py::arg("background_rank"),
          py::arg("recon"),
          "Inference pass of the patch model (contract in stemfast._kernels).");
}

}  // namespace stemfast
