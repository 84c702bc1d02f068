/* Float kernels around the matrix products: RMSNorm and attention over a KV cache.
 *
 * Plain C loops, compiled twice by GCC's target_clones (AVX2+FMA and the baseline) and chosen
 * at load time by the CPU: the compiler vectorizes them. They exist because each torch op
 * costs microseconds of dispatch, and a decode step runs hundreds of them.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tl.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TL_CLONES __attribute__((target_clones("avx2,fma", "default")))
#else
#define TL_CLONES
#endif

TL_CLONES static float dot_f32(const float *a, const float *b, int64_t n) {
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

float tl_dot_f32(const float *a, const float *b, int64_t n) { return dot_f32(a, b, n); }

TL_CLONES static void axpy_f32(float a, const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

void tl_axpy_f32(float a, const float *x, float *y, int64_t n) { axpy_f32(a, x, y, n); }

/* e^x for x in [-87, 88] (clamped), within ~2 ulp: Cephes' expf, as straight float code the
 * compiler vectorizes (libm's expf is a call per element) */
static inline float exp_clamped(float x) {
    x = x < -87.0f ? -87.0f : x > 88.0f ? 88.0f : x;  /* not fminf/fmaxf: calls, for their NaN rules */
    const float n = rintf(x * 1.44269504088896341f);
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  /* x - n ln 2, ln 2 in two parts */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;  /* 2^n, n in -126..127 */
    float two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

/* out = gelu_tanh(g) * u. 0.5 x (1 + tanh(z)) = x / (1 + e^(-2z)): one exponential, and no
 * cancellation where tanh(z) is near -1. Scalar tanhf took ~8% of a 26B-A4B MoE layer's time
 * on the calling thread while the other thread waited (perf). */
TL_CLONES static void gelu_mul(const float *g, const float *u, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const float x = g[i], z = 0.7978845608028654f * (x + 0.044715f * x * x * x);
        out[i] = x / (1.0f + exp_clamped(-2.0f * z)) * u[i];
    }
}

void tl_gelu_mul(const float *g, const float *u, float *out, int64_t n) { gelu_mul(g, u, out, n); }

TL_CLONES static void turn(double *z, const double *w, int64_t n, float *zf) {
    for (int64_t i = 0; i < n; i++) {
        const double c = z[i] * w[i] - z[n + i] * w[n + i], s = z[n + i] * w[i] + z[i] * w[n + i];
        z[i] = c;
        z[n + i] = s;
        zf[i] = (float)c;
        zf[n + i] = (float)s;
    }
}

void tl_turn(double *z, const double *w, int64_t n, float *zf) { turn(z, w, n, zf); }

TL_CLONES void tl_rms_norm(const float *x, const float *w, float *y, int64_t n_rows, int64_t dim, float eps) {
    for (int64_t r = 0; r < n_rows; r++, x += dim, y += dim) {
        const float scale = 1.0f / sqrtf(dot_f32(x, x, dim) / (float)dim + eps);
        if (w) for (int64_t i = 0; i < dim; i++) y[i] = x[i] * scale * w[i];
        else for (int64_t i = 0; i < dim; i++) y[i] = x[i] * scale;
    }
}

/* attention over float32 K/V (one segment of f32 rows): the coded-cache kernel of kv.c */
int tl_attention(const float *q, const float *k, const float *v, const int64_t *q_pos, const int64_t *k_pos,
                 int64_t n_tok, int64_t n_head, int64_t n_kv, int64_t d, int64_t dv, int64_t n_keys,
                 float scale, int64_t window, float softcap, float *out) {
    if (dv != d) return -2;
    const tl_kv_codec f32 = {TL_F32, 0, 0, NULL, NULL};
    const tl_kv_segment seg = {k, v, k_pos, n_keys};
    return tl_attention_kv(q, q_pos, n_tok, n_head, n_kv, d, &f32, &f32, NULL, NULL, &seg, 1, scale, window, softcap,
                           out);
}
