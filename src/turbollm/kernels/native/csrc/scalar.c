/* Portable kernels: activation quantizers, dot products and dequantizers for every type with
 * a native path. They run on any CPU, define what the SIMD versions must compute, and are
 * the fallback where no SIMD version exists.
 *
 * Dot products follow ggml's reference formulas (ggml-quants.c): integer sums within a block,
 * float scales outside. Dequantizers perform their float operations in the same order as the
 * gguf package's numpy reference, so they are bit-exact with turbollm.gguf.quants.
 * The SIMD versions are in arch/x86/ (avx2.c, vnni.c); nothing here needs a target pragma.
 */
#include <math.h>
#include <string.h>

#include "tl_internal.h"

/* ---- activation quantizers ----------------------------------------------------------------- */

static inline int round_even(float v) { return (int)nearbyintf(v); }

void tl_quantize_q8_0_scalar(const float *x, void *vy, int64_t n) {
    block_q8_0 *y = vy;
    for (int64_t i = 0; i < n / TL_QK; i++, x += TL_QK) {
        float amax = 0.0f;
        for (int j = 0; j < TL_QK; j++) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
        y[i].d = tl_f2h(d);
        for (int j = 0; j < TL_QK; j++) y[i].qs[j] = (int8_t)round_even(x[j] * id);
    }
}

void tl_quantize_q8_1_scalar(const float *x, void *vy, int64_t n) {
    block_q8_1 *y = vy;
    for (int64_t i = 0; i < n / TL_QK; i++, x += TL_QK) {
        float amax = 0.0f;
        for (int j = 0; j < TL_QK; j++) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int j = 0; j < TL_QK; j++) {
            y[i].qs[j] = (int8_t)round_even(x[j] * id);
            sum += y[i].qs[j];
        }
        y[i].d = tl_f2h(d);
        y[i].s = tl_f2h((float)sum * d);
    }
}

/* ggml's q8_K: scale by the signed value of largest magnitude (-127/max), so d may be negative */
void tl_quantize_q8_K_scalar(const float *x, void *vy, int64_t n) {
    block_q8_K *y = vy;
    for (int64_t i = 0; i < n / TL_QK_K; i++, x += TL_QK_K) {
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < TL_QK_K; j++) {
            if (fabsf(x[j]) > amax) { amax = fabsf(x[j]); max = x[j]; }
        }
        if (amax == 0.0f) {
            memset(&y[i], 0, sizeof(block_q8_K));
            continue;
        }
        const float iscale = -127.0f / max;
        for (int j = 0; j < TL_QK_K; j++) {
            const int v = round_even(iscale * x[j]);
            y[i].qs[j] = (int8_t)(v < 127 ? v : 127);
        }
        for (int j = 0; j < TL_QK_K / 16; j++) {
            int sum = 0;
            for (int l = 0; l < 16; l++) sum += y[i].qs[16 * j + l];
            y[i].bsums[j] = (int16_t)sum;
        }
        y[i].d = 1.0f / iscale;
    }
}

/* ---- 32-element block formats ---------------------------------------------------------------- */

static float dot_q4_0(int n, const void *vw, const void *vx) {
    const block_q4_0 *w = vw; const block_q8_0 *x = vx;
    float sum = 0.0f;
    for (int i = 0; i < n / TL_QK; i++) {
        int sumi = 0;
        for (int j = 0; j < 16; j++)
            sumi += ((w[i].qs[j] & 0xF) - 8) * x[i].qs[j] + ((w[i].qs[j] >> 4) - 8) * x[i].qs[j + 16];
        sum += (float)sumi * (tl_h2f(w[i].d) * tl_h2f(x[i].d));
    }
    return sum;
}

static float dot_q4_1(int n, const void *vw, const void *vx) {
    const block_q4_1 *w = vw; const block_q8_1 *x = vx;
    float sum = 0.0f;
    for (int i = 0; i < n / TL_QK; i++) {
        int sumi = 0;
        for (int j = 0; j < 16; j++)
            sumi += (w[i].qs[j] & 0xF) * x[i].qs[j] + (w[i].qs[j] >> 4) * x[i].qs[j + 16];
        sum += (tl_h2f(w[i].d) * tl_h2f(x[i].d)) * (float)sumi + tl_h2f(w[i].m) * tl_h2f(x[i].s);
    }
    return sum;
}

static inline uint32_t load_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

static float dot_q5_0(int n, const void *vw, const void *vx) {
    const block_q5_0 *w = vw; const block_q8_0 *x = vx;
    float sum = 0.0f;
    for (int i = 0; i < n / TL_QK; i++) {
        const uint32_t qh = load_u32(w[i].qh);
        int sumi = 0;
        for (int j = 0; j < 16; j++) {
            const int x0 = ((w[i].qs[j] & 0xF) | (((qh >> j) & 1) << 4)) - 16;
            const int x1 = ((w[i].qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16;
            sumi += x0 * x[i].qs[j] + x1 * x[i].qs[j + 16];
        }
        sum += (float)sumi * (tl_h2f(w[i].d) * tl_h2f(x[i].d));
    }
    return sum;
}

static float dot_q5_1(int n, const void *vw, const void *vx) {
    const block_q5_1 *w = vw; const block_q8_1 *x = vx;
    float sum = 0.0f;
    for (int i = 0; i < n / TL_QK; i++) {
        const uint32_t qh = load_u32(w[i].qh);
        int sumi = 0;
        for (int j = 0; j < 16; j++) {
            const int x0 = (w[i].qs[j] & 0xF) | (((qh >> j) & 1) << 4);
            const int x1 = (w[i].qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
            sumi += x0 * x[i].qs[j] + x1 * x[i].qs[j + 16];
        }
        sum += (tl_h2f(w[i].d) * tl_h2f(x[i].d)) * (float)sumi + tl_h2f(w[i].m) * tl_h2f(x[i].s);
    }
    return sum;
}

static float dot_q8_0(int n, const void *vw, const void *vx) {
    const block_q8_0 *w = vw; const block_q8_0 *x = vx;
    float sum = 0.0f;
    for (int i = 0; i < n / TL_QK; i++) {
        int sumi = 0;
        for (int j = 0; j < TL_QK; j++) sumi += w[i].qs[j] * x[i].qs[j];
        sum += (float)sumi * (tl_h2f(w[i].d) * tl_h2f(x[i].d));
    }
    return sum;
}

static float dot_iq4_nl(int n, const void *vw, const void *vx) {
    const block_iq4_nl *w = vw; const block_q8_0 *x = vx;
    float sum = 0.0f;
    for (int i = 0; i < n / TL_QK; i++) {
        int sumi = 0;
        for (int j = 0; j < 16; j++)
            sumi += tl_iq4nl_values[w[i].qs[j] & 0xF] * x[i].qs[j] + tl_iq4nl_values[w[i].qs[j] >> 4] * x[i].qs[j + 16];
        sum += (float)sumi * (tl_h2f(w[i].d) * tl_h2f(x[i].d));
    }
    return sum;
}

/* ---- K-quants -------------------------------------------------------------------------------- */

/* 12 bytes -> eight 6-bit scales and eight 6-bit mins (Q4_K, Q5_K) */
static inline void k_scale_min(const uint8_t *q, uint8_t *sc, uint8_t *mn) {
    for (int j = 0; j < 4; j++) {
        sc[j] = q[j] & 63;
        mn[j] = q[j + 4] & 63;
        sc[j + 4] = (q[j + 8] & 0xF) | ((q[j] >> 6) << 4);
        mn[j + 4] = (q[j + 8] >> 4) | ((q[j + 4] >> 6) << 4);
    }
}

static float dot_q4_K(int n, const void *vw, const void *vx) {
    const block_q4_K *w = vw; const block_q8_K *x = vx;
    float sum = 0.0f;
    for (int i = 0; i < n / TL_QK_K; i++) {
        uint8_t sc[8], mn[8];
        k_scale_min(w[i].scales, sc, mn);
        int sumi_mins = 0;
        for (int j = 0; j < 8; j++) sumi_mins += mn[j] * (x[i].bsums[2 * j] + x[i].bsums[2 * j + 1]);
        int sumi = 0;
        for (int j = 0; j < 4; j++) {
            const uint8_t *q = w[i].qs + 32 * j;
            const int8_t *y = x[i].qs + 64 * j;
            int lo = 0, hi = 0;
            for (int l = 0; l < 32; l++) { lo += (q[l] & 0xF) * y[l]; hi += (q[l] >> 4) * y[l + 32]; }
            sumi += sc[2 * j] * lo + sc[2 * j + 1] * hi;
        }
        sum += x[i].d * tl_h2f(w[i].d) * (float)sumi - x[i].d * tl_h2f(w[i].dmin) * (float)sumi_mins;
    }
    return sum;
}

static float dot_q5_K(int n, const void *vw, const void *vx) {
    const block_q5_K *w = vw; const block_q8_K *x = vx;
    float sum = 0.0f;
    for (int i = 0; i < n / TL_QK_K; i++) {
        uint8_t sc[8], mn[8];
        k_scale_min(w[i].scales, sc, mn);
        int sumi_mins = 0;
        for (int j = 0; j < 8; j++) sumi_mins += mn[j] * (x[i].bsums[2 * j] + x[i].bsums[2 * j + 1]);
        int sumi = 0;
        for (int j = 0; j < 4; j++) {
            const uint8_t *q = w[i].qs + 32 * j;
            const int8_t *y = x[i].qs + 64 * j;
            int lo = 0, hi = 0;
            for (int l = 0; l < 32; l++) {
                lo += ((q[l] & 0xF) | (((w[i].qh[l] >> (2 * j)) & 1) << 4)) * y[l];
                hi += ((q[l] >> 4) | (((w[i].qh[l] >> (2 * j + 1)) & 1) << 4)) * y[l + 32];
            }
            sumi += sc[2 * j] * lo + sc[2 * j + 1] * hi;
        }
        sum += x[i].d * tl_h2f(w[i].d) * (float)sumi - x[i].d * tl_h2f(w[i].dmin) * (float)sumi_mins;
    }
    return sum;
}

/* Q6_K element e = 128h + 32s + l: low 4 bits from ql[64h + 32(s&1) + l] (high nibble if s >= 2),
 * 2 high bits from qh[32h + l] >> 2s, scale index e / 16 */
static inline int q6_value(const block_q6_K *b, int e) {
    const int h = e / 128, s = (e % 128) / 32, l = e % 32;
    const uint8_t ql = b->ql[64 * h + 32 * (s & 1) + l];
    const int low = s >= 2 ? ql >> 4 : ql & 0xF;
    return (low | (((b->qh[32 * h + l] >> (2 * s)) & 3) << 4)) - 32;
}

static float dot_q6_K(int n, const void *vw, const void *vx) {
    const block_q6_K *w = vw; const block_q8_K *x = vx;
    float sum = 0.0f;
    for (int i = 0; i < n / TL_QK_K; i++) {
        int sumi = 0;
        for (int g = 0; g < 16; g++) {
            int s = 0;
            for (int l = 0; l < 16; l++) s += q6_value(&w[i], 16 * g + l) * x[i].qs[16 * g + l];
            sumi += w[i].scales[g] * s;
        }
        sum += tl_h2f(w[i].d) * x[i].d * (float)sumi;
    }
    return sum;
}

/* ---- i-quants -------------------------------------------------------------------------------- */

static inline int iq4_xs_scale(const block_iq4_xs *b, int ib) {
    return (((b->scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF) | (((b->scales_h >> (2 * ib)) & 3) << 4)) - 32;
}

static float dot_iq4_xs(int n, const void *vw, const void *vx) {
    const block_iq4_xs *w = vw; const block_q8_K *x = vx;
    float sum = 0.0f;
    for (int i = 0; i < n / TL_QK_K; i++) {
        int sumi = 0;
        for (int ib = 0; ib < 8; ib++) {
            const uint8_t *q = w[i].qs + 16 * ib;
            const int8_t *y = x[i].qs + 32 * ib;
            int s = 0;
            for (int j = 0; j < 16; j++) s += tl_iq4nl_values[q[j] & 0xF] * y[j] + tl_iq4nl_values[q[j] >> 4] * y[j + 16];
            sumi += iq4_xs_scale(&w[i], ib) * s;
        }
        sum += tl_h2f(w[i].d) * x[i].d * (float)sumi;
    }
    return sum;
}

/* IQ3_S sub-block ib (32 values), group g (8 values): grid entries 8ib + 2g and 8ib + 2g + 1,
 * 9-bit index qs | (bit k of qh[ib]) << 8, signs from bits of signs[4ib + g] */
static inline int iq3s_value(const block_iq3_s *b, int ib, int g, int v) {
    const int k = 2 * g + v / 4;
    const int index = b->qs[8 * ib + k] | (((b->qh[ib] >> k) & 1) << 8);
    const int mag = (tl_iq3s_grid[index] >> (8 * (v % 4))) & 0xFF;
    return (b->signs[4 * ib + g] >> v) & 1 ? -mag : mag;
}

static float dot_iq3_s(int n, const void *vw, const void *vx) {
    const block_iq3_s *w = vw; const block_q8_K *x = vx;
    float sum = 0.0f;
    for (int i = 0; i < n / TL_QK_K; i++) {
        int sumi = 0;
        for (int ib = 0; ib < 8; ib++) {
            int s = 0;
            for (int g = 0; g < 4; g++)
                for (int v = 0; v < 8; v++) s += iq3s_value(&w[i], ib, g, v) * x[i].qs[32 * ib + 8 * g + v];
            sumi += (1 + 2 * ((w[i].scales[ib / 2] >> (4 * (ib % 2))) & 0xF)) * s;
        }
        sum += tl_h2f(w[i].d) * x[i].d * (float)sumi;
    }
    return sum;
}

/* ---- dequantizers (float order as gguf-py) -------------------------------------------------- */

static void deq_q4_0(const void *vw, float *y, int64_t n) {
    const block_q4_0 *w = vw;
    for (int64_t i = 0; i < n / TL_QK; i++, y += TL_QK) {
        const float d = tl_h2f(w[i].d);
        for (int j = 0; j < 16; j++) { y[j] = d * (float)((w[i].qs[j] & 0xF) - 8); y[j + 16] = d * (float)((w[i].qs[j] >> 4) - 8); }
    }
}

static void deq_q4_1(const void *vw, float *y, int64_t n) {
    const block_q4_1 *w = vw;
    for (int64_t i = 0; i < n / TL_QK; i++, y += TL_QK) {
        const float d = tl_h2f(w[i].d), m = tl_h2f(w[i].m);
        for (int j = 0; j < 16; j++) { y[j] = d * (float)(w[i].qs[j] & 0xF) + m; y[j + 16] = d * (float)(w[i].qs[j] >> 4) + m; }
    }
}

static void deq_q5_0(const void *vw, float *y, int64_t n) {
    const block_q5_0 *w = vw;
    for (int64_t i = 0; i < n / TL_QK; i++, y += TL_QK) {
        const float d = tl_h2f(w[i].d);
        const uint32_t qh = load_u32(w[i].qh);
        for (int j = 0; j < 16; j++) {
            const int x0 = (int)((w[i].qs[j] & 0xF) | (((qh >> j) & 1) << 4)) - 16;
            const int x1 = (int)((w[i].qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16;
            y[j] = d * (float)x0;
            y[j + 16] = d * (float)x1;
        }
    }
}

static void deq_q5_1(const void *vw, float *y, int64_t n) {
    const block_q5_1 *w = vw;
    for (int64_t i = 0; i < n / TL_QK; i++, y += TL_QK) {
        const float d = tl_h2f(w[i].d), m = tl_h2f(w[i].m);
        const uint32_t qh = load_u32(w[i].qh);
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)((w[i].qs[j] & 0xF) | (((qh >> j) & 1) << 4)) + m;
            y[j + 16] = d * (float)((w[i].qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) + m;
        }
    }
}

static void deq_q8_0(const void *vw, float *y, int64_t n) {
    const block_q8_0 *w = vw;
    for (int64_t i = 0; i < n / TL_QK; i++, y += TL_QK) {
        const float d = tl_h2f(w[i].d);
        for (int j = 0; j < TL_QK; j++) y[j] = (float)w[i].qs[j] * d;
    }
}

static void deq_iq4_nl(const void *vw, float *y, int64_t n) {
    const block_iq4_nl *w = vw;
    for (int64_t i = 0; i < n / TL_QK; i++, y += TL_QK) {
        const float d = tl_h2f(w[i].d);
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)tl_iq4nl_values[w[i].qs[j] & 0xF];
            y[j + 16] = d * (float)tl_iq4nl_values[w[i].qs[j] >> 4];
        }
    }
}

static void deq_q4_K(const void *vw, float *y, int64_t n) {
    const block_q4_K *w = vw;
    for (int64_t i = 0; i < n / TL_QK_K; i++, y += TL_QK_K) {
        uint8_t sc[8], mn[8];
        k_scale_min(w[i].scales, sc, mn);
        const float d = tl_h2f(w[i].d), dmin = tl_h2f(w[i].dmin);
        for (int j = 0; j < 4; j++) {
            const float d1 = d * (float)sc[2 * j], m1 = dmin * (float)mn[2 * j];
            const float d2 = d * (float)sc[2 * j + 1], m2 = dmin * (float)mn[2 * j + 1];
            for (int l = 0; l < 32; l++) {
                y[64 * j + l] = d1 * (float)(w[i].qs[32 * j + l] & 0xF) - m1;
                y[64 * j + 32 + l] = d2 * (float)(w[i].qs[32 * j + l] >> 4) - m2;
            }
        }
    }
}

static void deq_q5_K(const void *vw, float *y, int64_t n) {
    const block_q5_K *w = vw;
    for (int64_t i = 0; i < n / TL_QK_K; i++, y += TL_QK_K) {
        uint8_t sc[8], mn[8];
        k_scale_min(w[i].scales, sc, mn);
        const float d = tl_h2f(w[i].d), dmin = tl_h2f(w[i].dmin);
        for (int j = 0; j < 4; j++) {
            const float d1 = d * (float)sc[2 * j], m1 = dmin * (float)mn[2 * j];
            const float d2 = d * (float)sc[2 * j + 1], m2 = dmin * (float)mn[2 * j + 1];
            for (int l = 0; l < 32; l++) {
                const int lo = (w[i].qs[32 * j + l] & 0xF) | (((w[i].qh[l] >> (2 * j)) & 1) << 4);
                const int hi = (w[i].qs[32 * j + l] >> 4) | (((w[i].qh[l] >> (2 * j + 1)) & 1) << 4);
                y[64 * j + l] = d1 * (float)lo - m1;
                y[64 * j + 32 + l] = d2 * (float)hi - m2;
            }
        }
    }
}

static void deq_q6_K(const void *vw, float *y, int64_t n) {
    const block_q6_K *w = vw;
    for (int64_t i = 0; i < n / TL_QK_K; i++, y += TL_QK_K) {
        const float d = tl_h2f(w[i].d);
        for (int g = 0; g < 16; g++) {
            const float dl = d * (float)w[i].scales[g];
            for (int l = 0; l < 16; l++) y[16 * g + l] = dl * (float)q6_value(&w[i], 16 * g + l);
        }
    }
}

static void deq_iq4_xs(const void *vw, float *y, int64_t n) {
    const block_iq4_xs *w = vw;
    for (int64_t i = 0; i < n / TL_QK_K; i++, y += TL_QK_K) {
        const float d = tl_h2f(w[i].d);
        for (int ib = 0; ib < 8; ib++) {
            const float dl = d * (float)iq4_xs_scale(&w[i], ib);
            const uint8_t *q = w[i].qs + 16 * ib;
            for (int j = 0; j < 16; j++) {
                y[32 * ib + j] = dl * (float)tl_iq4nl_values[q[j] & 0xF];
                y[32 * ib + 16 + j] = dl * (float)tl_iq4nl_values[q[j] >> 4];
            }
        }
    }
}

static void deq_iq3_s(const void *vw, float *y, int64_t n) {
    const block_iq3_s *w = vw;
    for (int64_t i = 0; i < n / TL_QK_K; i++, y += TL_QK_K) {
        const float d = tl_h2f(w[i].d);
        for (int ib = 0; ib < 8; ib++) {
            const float db = d * (float)(1 + 2 * ((w[i].scales[ib / 2] >> (4 * (ib % 2))) & 0xF));
            for (int g = 0; g < 4; g++)
                for (int v = 0; v < 8; v++) {
                    const int value = iq3s_value(&w[i], ib, g, v);  /* sign applied last, as gguf-py */
                    const float mag = db * (float)(value < 0 ? -value : value);
                    y[32 * ib + 8 * g + v] = value < 0 ? -mag : mag;
                }
        }
    }
}

/* ---- registry -------------------------------------------------------------------------------- */

static void set(tl_kernels *t, int type, tl_vec_dot_fn dot, tl_quantize_fn quant, tl_dequant_fn deq,
                int act_block, int act_block_bytes, int w_block, int w_block_bytes) {
    t[type] = (tl_kernels){dot, quant, deq, act_block, act_block_bytes, w_block, w_block_bytes};
}

void tl_register_scalar(tl_kernels *t) {
    const int q80 = sizeof(block_q8_0), q81 = sizeof(block_q8_1), q8k = sizeof(block_q8_K);
    set(t, TL_Q4_0, dot_q4_0, tl_quantize_q8_0_scalar, deq_q4_0, TL_QK, q80, TL_QK, sizeof(block_q4_0));
    set(t, TL_Q4_1, dot_q4_1, tl_quantize_q8_1_scalar, deq_q4_1, TL_QK, q81, TL_QK, sizeof(block_q4_1));
    set(t, TL_Q5_0, dot_q5_0, tl_quantize_q8_0_scalar, deq_q5_0, TL_QK, q80, TL_QK, sizeof(block_q5_0));
    set(t, TL_Q5_1, dot_q5_1, tl_quantize_q8_1_scalar, deq_q5_1, TL_QK, q81, TL_QK, sizeof(block_q5_1));
    set(t, TL_Q8_0, dot_q8_0, tl_quantize_q8_0_scalar, deq_q8_0, TL_QK, q80, TL_QK, sizeof(block_q8_0));
    set(t, TL_IQ4_NL, dot_iq4_nl, tl_quantize_q8_0_scalar, deq_iq4_nl, TL_QK, q80, TL_QK, sizeof(block_iq4_nl));
    set(t, TL_Q4_K, dot_q4_K, tl_quantize_q8_K_scalar, deq_q4_K, TL_QK_K, q8k, TL_QK_K, sizeof(block_q4_K));
    set(t, TL_Q5_K, dot_q5_K, tl_quantize_q8_K_scalar, deq_q5_K, TL_QK_K, q8k, TL_QK_K, sizeof(block_q5_K));
    set(t, TL_Q6_K, dot_q6_K, tl_quantize_q8_K_scalar, deq_q6_K, TL_QK_K, q8k, TL_QK_K, sizeof(block_q6_K));
    set(t, TL_IQ4_XS, dot_iq4_xs, tl_quantize_q8_K_scalar, deq_iq4_xs, TL_QK_K, q8k, TL_QK_K, sizeof(block_iq4_xs));
    set(t, TL_IQ3_S, dot_iq3_s, tl_quantize_q8_K_scalar, deq_iq3_s, TL_QK_K, q8k, TL_QK_K, sizeof(block_iq3_s));
}
