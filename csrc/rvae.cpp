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
    (void)Hp;
    for (int oy = 0; oy < Ho; ++oy) {
        for (int ox = 0; ox < Wo; ++ox) {
            V acc[R][NV];
#pragma GCC unroll 16
            for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
                for (int q = 0; q < NV; ++q) acc[r][q] = V{};
            for (int ky = 0; ky < K; ++ky) {
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
                V b;
                std::memcpy(&b, c.b + q * LANES, sizeof(V));
                V t = acc[0][q];
#pragma GCC unroll 16
                for (int r = 1; r < R; ++r) t += acc[r][q];
                t += b;
                if (relu) {
                    const V zero = {};
                    t = t > zero ? t : zero;
                }
                std::memcpy(dst + q * LANES, &t, sizeof(V));
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

template <int LANES, int NV>
STEMFAST_INLINE void conv_k(const float* __restrict in, int Hp, int Wp, const Conv& c, float* __restrict out, int Ho,
                            int Wo, bool relu) {
    if (c.k == 3)
        conv_vec<LANES, NV, 3>(in, Hp, Wp, c, out, Ho, Wo, relu);
    else
        conv_vec<LANES, NV, 4>(in, Hp, Wp, c, out, Ho, Wo, relu);
}

// `pad` is a scratch buffer of at least (H + 2 p) (W + 2 p) cin floats.
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
        case 4: conv_k<4, 1>(pad, Hp, Wp, c, out, Ho, Wo, relu); break;
        case 8: conv_k<8, 1>(pad, Hp, Wp, c, out, Ho, Wo, relu); break;
        case 16: conv_k<8, 2>(pad, Hp, Wp, c, out, Ho, Wo, relu); break;
        case 32: conv_k<8, 4>(pad, Hp, Wp, c, out, Ho, Wo, relu); break;
        default: conv_k<8, 8>(pad, Hp, Wp, c, out, Ho, Wo, relu); break;
    }
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
STEMFAST_INLINE void rotate(const float* __restrict in, int S, double deg, bool border, float* __restrict out) {
    float ca, sa;
    angle_cs(deg, ca, sa);
    for (int y = 0; y < S; ++y)
        for (int x = 0; x < S; ++x) out[y * S + x] = apply_taps(in, rot_taps(S, x, y, ca, sa, border));
}

// The same rotation with its taps computed beforehand (one table serves every patch of a fixed angle).
STEMFAST_INLINE void rotate_table(const float* __restrict in, const Taps* __restrict tab, int n, float* __restrict out) {
    for (int p = 0; p < n; ++p) out[p] = apply_taps(in, tab[p]);
}

struct Net {
    int S, L, k, symmetrize, ds, has_stn, c1, c2, c3, s1, s2;
    const float* mask;  // [S * S]
    Conv stn1, stn2;    // STN convolutions (on the (S / ds)^2 pooled patch)
    const float* stn_kern;  // [2, (S / ds)^2 * stn_c2]: the folded last layer and harmonic pooling
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
    std::vector<float> padbuf, xm, pooled, h1, h2, xc, xs, rot, e1, e2, e3, hl, lvsum, musum, f, g1, g2, g3, yc, y;
    explicit Scratch(const Net& n) {
        const size_t S = static_cast<size_t>(n.S), S2 = S * S, hp = S / n.ds;
        xm.resize(S2); xc.resize(S2); xs.resize(S2); rot.resize(S2); yc.resize(S2); y.resize(S2);
        pooled.resize(hp * hp);
        h1.resize(hp * hp * std::max(1, n.stn1.cout));
        h2.resize(hp * hp * std::max(1, n.stn2.cout));
        e1.resize(S2 / 4 * n.c1); e2.resize(S2 / 16 * n.c2); e3.resize(S2 / 64 * n.c3);
        hl.resize(2 * n.L); musum.resize(n.L); lvsum.resize(n.L);
        f.resize(S2 / 64 * n.c3);
        g1.resize(S2 / 64 * 4 * n.c2); g2.resize(S2 / 16 * 4 * n.c1); g3.resize(S2 / 4 * 4);
        // the largest zero-padded layer input (conv_hwc): (h + 2)^2 c over the layers' inputs (h, h, c)
        auto padded = [](size_t h, int c) { return (h + 2) * (h + 2) * static_cast<size_t>(std::max(1, c)); };
        padbuf.resize(std::max({padded(S, 1), padded(S / 2, n.c1), padded(S / 4, n.c2), padded(S / 8, n.c3),
                                padded(hp, n.stn1.cout)}));
    }
};

// Encoder on a masked canonical patch xin (S, S): adds mu and the clamped logvar to musum / lvsum.
STEMFAST_INLINE void encode_one(const Net& n, const float* xin, Scratch& s) {
    const int S = n.S;
    conv_hwc(xin, S, S, n.e1, s.e1.data(), S / 2, S / 2, true, s.padbuf.data());
    conv_hwc(s.e1.data(), S / 2, S / 2, n.e2, s.e2.data(), S / 4, S / 4, true, s.padbuf.data());
    conv_hwc(s.e2.data(), S / 4, S / 4, n.e3, s.e3.data(), S / 8, S / 8, true, s.padbuf.data());
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
STEMFAST_INLINE void forward_body(const Net& n, const float* xin, Scratch& s, float* mu, float* lv, float& angle,
                                 float& strength, float& err) {
    const int S = n.S, S2 = S * S;
    for (int i = 0; i < S2; ++i) s.xm[i] = xin[i] * n.mask[i];
    for (int l = 0; l < n.L; ++l) s.musum[l] = s.lvsum[l] = 0.0f;
    double theta = 0.0;
    if (n.has_stn) {
        const int hp = S / n.ds;
        const float* p = s.xm.data();
        if (n.ds == 2) {
            for (int y = 0; y < hp; ++y)
                for (int x = 0; x < hp; ++x) {
                    const float* r0 = s.xm.data() + (2 * y) * S + 2 * x;
                    const float* r1 = r0 + S;
                    s.pooled[y * hp + x] = (r0[0] + r0[1] + r1[0] + r1[1]) * 0.25f;
                }
            p = s.pooled.data();
        }
        conv_hwc(p, hp, hp, n.stn1, s.h1.data(), hp, hp, true, s.padbuf.data());
        conv_hwc(s.h1.data(), hp, hp, n.stn2, s.h2.data(), hp, hp, true, s.padbuf.data());
        // harmonic pooling: 8 partial sums per component (vectorisable), added at the end
        float pc[8] = {0}, ps[8] = {0};
        const int m = hp * hp * n.stn2.cout;
        const float* __restrict kc = n.stn_kern;
        const float* __restrict ks = n.stn_kern + m;
        int i = 0;
        for (; i + 8 <= m; i += 8)
            for (int l = 0; l < 8; ++l) {
                pc[l] += s.h2[i + l] * kc[i + l];
                ps[l] += s.h2[i + l] * ks[i + l];
            }
        for (; i < m; ++i) {
            pc[0] += s.h2[i] * kc[i];
            ps[0] += s.h2[i] * ks[i];
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
        rotate(xin, S, -theta, true, s.xc.data());
        if (n.symmetrize == 1) {  // "image": the mean of the k branches, encoded once
            for (int i = 0; i < S2; ++i) s.xs[i] = s.xc[i];
            for (int j = 1; j < n.k; ++j) {
                rotate_table(s.xc.data(), n.sym_taps + static_cast<std::int64_t>(j - 1) * S2, S2, s.rot.data());
                for (int i = 0; i < S2; ++i) s.xs[i] += s.rot[i];
            }
            for (int i = 0; i < S2; ++i) s.xs[i] = s.xs[i] / static_cast<float>(n.k) * n.mask[i];
            encode_one(n, s.xs.data(), s);
        } else {
            for (int i = 0; i < S2; ++i) s.xs[i] = s.xc[i] * n.mask[i];
            encode_one(n, s.xs.data(), s);
            if (n.symmetrize == 2) {  // "features": every branch encoded, mu and logvar averaged
                for (int j = 1; j < n.k; ++j) {
                    rotate_table(s.xc.data(), n.sym_taps + static_cast<std::int64_t>(j - 1) * S2, S2, s.rot.data());
                    for (int i = 0; i < S2; ++i) s.rot[i] *= n.mask[i];
                    encode_one(n, s.rot.data(), s);
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
        encode_one(n, s.xm.data(), s);
    }
    for (int l = 0; l < n.L; ++l) {
        mu[l] = s.musum[l];
        lv[l] = s.lvsum[l];
    }
    // decoder: dense + ReLU to (S/8, S/8, c3), three (3x3 conv + pixel shuffle) stages
    const int s0 = S / 8;
    dense(mu, n.L, n.fc_w, n.fc_b, s0 * s0 * n.c3, s.f.data(), true);
    conv_hwc(s.f.data(), s0, s0, n.d1, s.g1.data(), s0, s0, false, s.padbuf.data());
    shuffle2(s.g1.data(), s0, s0, n.c2, s.e2.data(), true);  // (S/4, S/4, c2)
    conv_hwc(s.e2.data(), 2 * s0, 2 * s0, n.d2, s.g2.data(), 2 * s0, 2 * s0, false, s.padbuf.data());
    shuffle2(s.g2.data(), 2 * s0, 2 * s0, n.c1, s.e1.data(), true);  // (S/2, S/2, c1)
    conv_hwc(s.e1.data(), 4 * s0, 4 * s0, n.d3, s.g3.data(), 4 * s0, 4 * s0, false, s.padbuf.data());
    shuffle2(s.g3.data(), 4 * s0, 4 * s0, 1, s.yc.data(), false);  // (S, S)
    if (n.has_stn)
        rotate(s.yc.data(), S, theta, false, s.y.data());
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
    forward_body(n, xin, s, mu, lv, angle, strength, err);
}
#ifdef STEMFAST_AVX2
__attribute__((target("avx2,fma"))) void forward_avx2(const Net& n, const float* xin, Scratch& s, float* mu, float* lv,
                                                      float& angle, float& strength, float& err) {
    forward_body(n, xin, s, mu, lv, angle, strength, err);
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
                       int symmetrize, int stn_downsample, CArrF recon) {
    if (x.ndim() != 3 || x.shape(1) != x.shape(2)) throw py::value_error("rvae_forward: x must be (N, S, S)");
    const std::int64_t N = x.shape(0);
    const int S = static_cast<int>(x.shape(1));
    if (S % 8 != 0 || S < 8) throw py::value_error("rvae_forward: the patch size must be a multiple of 8");
    if (mask.size() != static_cast<py::ssize_t>(S) * S) throw py::value_error("rvae_forward: mask must be (S, S)");
    if (enc.size() != 8 || dec.size() != 8) throw py::value_error("rvae_forward: enc and dec take 8 arrays each");
    if (!(stn.size() == 0 || stn.size() == 6)) throw py::value_error("rvae_forward: stn takes 0 or 6 arrays");
    if (symmetry < 1 || symmetrize < 0 || symmetrize > 2 || !(stn_downsample == 1 || stn_downsample == 2))
        throw py::value_error("rvae_forward: bad symmetry / symmetrize / stn_downsample");
    const bool want_recon = recon.ndim() == 3 && recon.shape(0) == N;
    if (!want_recon && recon.size() != 0) throw py::value_error("rvae_forward: recon must be (N, S, S) or empty");
    // keep the converted arrays alive for the call
    std::vector<CArrF> keep;
    auto arr = [&keep](py::handle h) { keep.push_back(CArrF::ensure(h)); if (!keep.back()) throw py::value_error("rvae_forward: weights must be float32 arrays"); return keep.back(); };
    Net n{};
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
        n.stn_kern = kern.data();
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
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) fwd = forward_avx2;
#endif
    py::array_t<float> mu({N, static_cast<std::int64_t>(n.L)}), lv({N, static_cast<std::int64_t>(n.L)});
    py::array_t<float> angle(N), strength(N), err(N);
    const float* xp = x.data();
    float* mup = mu.mutable_data();
    float* lvp = lv.mutable_data();
    float* ap = angle.mutable_data();
    float* sp = strength.mutable_data();
    float* ep = err.mutable_data();
    float* rp = want_recon ? recon.mutable_data() : nullptr;
    {
        py::gil_scoped_release release;
        parallel_for(N, [&](std::int64_t b, std::int64_t e) {
            Scratch s(n);
#if defined(__SSE__)
            const unsigned int csr = _mm_getcsr();
            _mm_setcsr(csr | 0x8040u);  // flush / treat subnormals as zero (FTZ | DAZ) in this thread
#endif
            for (std::int64_t i = b; i < e; ++i) {
                fwd(n, xp + i * S * S, s, mup + i * n.L, lvp + i * n.L, ap[i], sp[i], ep[i]);
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
          py::arg("symmetry"), py::arg("symmetrize"), py::arg("stn_downsample"), py::arg("recon"),
          "Inference pass of the patch model (contract in stemfast._kernels).");
}

}  // namespace stemfast
