/* The KV cache in its coded form: encoders, decoders and attention that reads coded rows.
 *
 * A row is one head's head_dim values of K or V in one codec (turbollm/kv/codecs.py is the
 * reference and defines the bytes): plain f32/f16/bf16, ggml's q8_0/q4_0/q4_1/q5_0/q5_1/iq4_nl
 * blocks, or TurboQuant (per block: fp16 norm, then b-bit codebook indices, low bit first, of the
 * block rotated by random signs + a normalised Walsh-Hadamard transform).
 *
 * Attention never decodes the cache as a whole: each key row is decoded into a small buffer
 * once per step and dotted with every query head of its group, then each value row likewise.
 * TurboQuant rows are decoded in the rotated basis: the query is rotated once (a rotation
 * keeps dot products) and the weighted sum of values is rotated back once per head.
 *
 * The work is split over (token, KV head, chunk of keys) with a per-chunk softmax (max, sum,
 * weighted values) merged at the end, so one token over a long context still uses every core.
 * With an exact window (tl_kv_exact) the f16 rows are a second pass of the same kind, with the
 * plain queries, whose chunks merge with the coded pass's (its values rotated back first).
 *
 * Portable C, except for its AVX2 + F16C decoders (f16 rows, TurboQuant codebook lookups, the
 * Walsh-Hadamard transform), which stay here behind __x86_64__ and a target pragma because
 * they are static to this file's loops; arch/x86/x86_simd.h gives them its helpers. Other
 * CPUs get the portable loops beside them.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "tl_internal.h"

#define KV_CHUNK 128     /* keys per work item */
#define KV_MAX_DIM 1024  /* longest head the stack buffers hold */
#define TURN_REANCHOR 8  /* the SIMD turning offset steps in float this many keys, then from double */

int64_t tl_kv_row_bytes(const tl_kv_codec *c, int64_t d) {
    switch (c->type) {
    case TL_F32: return 4 * d;
    case TL_F16: case TL_BF16: return 2 * d;
    case TL_KV_TURBO: return d / c->block * (2 + c->block * c->bits / 8);
    default: {
        const tl_kernels *kt = tl_kernels_for(c->type);
        return kt ? d / kt->w_block * kt->w_block_bytes : -1;
    }
    }
}

/* ---- Walsh-Hadamard rotation (same butterfly order as kv/turboquant.py's hadamard) --------- */

static int simd_f16 = 0;  /* the AVX2 + F16C paths (set from tl_simd_level when attention runs) */
static int fwht_avx2(float *x, int n);

static void fwht(float *x, int n) {
    if (simd_f16 && fwht_avx2(x, n)) return;
    for (int h = 1; h < n; h *= 2)
        for (int i = 0; i < n; i += 2 * h)
            for (int j = i; j < i + h; j++) {
                const float a = x[j], b = x[j + h];
                x[j] = a + b;
                x[j + h] = a - b;
            }
    const float s = sqrtf((float)n);
    for (int i = 0; i < n; i++) x[i] /= s;
}

/* u = H (signs * x) per block */
static void rotate(const tl_kv_codec *c, float *x, int64_t d) {
    for (int64_t b = 0; b < d; b += c->block) {
        for (int i = 0; i < c->block; i++) x[b + i] *= c->signs[i];
        fwht(x + b, c->block);
    }
}

/* x = signs * H u per block */
static void unrotate(const tl_kv_codec *c, float *x, int64_t d) {
    for (int64_t b = 0; b < d; b += c->block) {
        fwht(x + b, c->block);
        for (int i = 0; i < c->block; i++) x[b + i] *= c->signs[i];
    }
}

/* ---- encoders (ggml-quants.c's reference quantizers; iq4_nl and turbo as kv/codecs.py) ---- */

static float signed_max(const float *x, int n) {
    float amax = 0.0f, max = 0.0f;
    for (int i = 0; i < n; i++)
        if (amax < fabsf(x[i])) { amax = fabsf(x[i]); max = x[i]; }
    return max;
}

static void encode_q8_0(const float *x, block_q8_0 *y) {
    float amax = 0.0f;
    for (int i = 0; i < TL_QK; i++) amax = fmaxf(amax, fabsf(x[i]));
    const float d = amax / 127.0f, id = d ? 1.0f / d : 0.0f;
    y->d = tl_f2h(d);
    for (int i = 0; i < TL_QK; i++) y->qs[i] = (int8_t)roundf(x[i] * id);
}

static void encode_q4_0(const float *x, block_q4_0 *y) {
    const float d = signed_max(x, TL_QK) / -8.0f, id = d ? 1.0f / d : 0.0f;
    y->d = tl_f2h(d);
    for (int i = 0; i < TL_QK / 2; i++) {
        const int a = (int)(int8_t)(x[i] * id + 8.5f), b = (int)(int8_t)(x[i + 16] * id + 8.5f);
        y->qs[i] = (uint8_t)((a < 15 ? a : 15) | ((b < 15 ? b : 15) << 4));
    }
}

static void encode_q5_0(const float *x, block_q5_0 *y) {
    const float d = signed_max(x, TL_QK) / -16.0f, id = d ? 1.0f / d : 0.0f;
    y->d = tl_f2h(d);
    uint32_t qh = 0;
    for (int i = 0; i < TL_QK / 2; i++) {
        int a = (int)(int8_t)(x[i] * id + 16.5f), b = (int)(int8_t)(x[i + 16] * id + 16.5f);
        a = a < 31 ? a : 31;
        b = b < 31 ? b : 31;
        y->qs[i] = (uint8_t)((a & 0x0F) | ((b & 0x0F) << 4));
        qh |= ((uint32_t)(a >> 4) << i) | ((uint32_t)(b >> 4) << (i + 16));
    }
    memcpy(y->qh, &qh, 4);
}

static void min_max(const float *x, float *lo, float *hi) {
    *lo = x[0];
    *hi = x[0];
    for (int i = 1; i < TL_QK; i++) {
        if (x[i] < *lo) *lo = x[i];
        if (x[i] > *hi) *hi = x[i];
    }
}

static void encode_q4_1(const float *x, block_q4_1 *y) {
    float lo, hi;
    min_max(x, &lo, &hi);
    const float d = (hi - lo) / 15.0f, id = d ? 1.0f / d : 0.0f;
    y->d = tl_f2h(d);
    y->m = tl_f2h(lo);
    for (int i = 0; i < TL_QK / 2; i++) {
        const int a = (int)(int8_t)((x[i] - lo) * id + 0.5f), b = (int)(int8_t)((x[i + 16] - lo) * id + 0.5f);
        y->qs[i] = (uint8_t)((a < 15 ? a : 15) | ((b < 15 ? b : 15) << 4));
    }
}

static void encode_q5_1(const float *x, block_q5_1 *y) {
    float lo, hi;
    min_max(x, &lo, &hi);
    const float d = (hi - lo) / 31.0f, id = d ? 1.0f / d : 0.0f;
    y->d = tl_f2h(d);
    y->m = tl_f2h(lo);
    uint32_t qh = 0;
    for (int i = 0; i < TL_QK / 2; i++) {
        int a = (int)(int8_t)((x[i] - lo) * id + 0.5f), b = (int)(int8_t)((x[i + 16] - lo) * id + 0.5f);
        a = a < 31 ? a : 31;
        b = b < 31 ? b : 31;
        y->qs[i] = (uint8_t)((a & 0x0F) | ((b & 0x0F) << 4));
        qh |= ((uint32_t)(a >> 4) << i) | ((uint32_t)(b >> 4) << (i + 16));
    }
    memcpy(y->qh, &qh, 4);
}

/* the n - 1 midpoints between n ascending values: the nearest value's decision boundaries */
static void decision_bounds(const float *values, int n, float *bounds) {
    for (int k = 0; k < n - 1; k++) bounds[k] = (values[k] + values[k + 1]) / 2;
}

/* index of the nearest value: the boundaries below x, counted without branches (a value
 * exactly between two goes to the lower) */
static inline int nearest(float x, const float *bounds, int n_bounds) {
    int i = 0;
    for (int k = 0; k < n_bounds; k++) i += bounds[k] < x;
    return i;
}

static void encode_iq4_nl(const float *x, block_iq4_nl *y) {
    float values[16], bounds[15];
    for (int i = 0; i < 16; i++) values[i] = (float)tl_iq4nl_values[i];
    decision_bounds(values, 16, bounds);
    const float d0 = signed_max(x, TL_QK) / values[0], id0 = d0 ? 1.0f / d0 : 0.0f;
    float num = 0.0f, den = 0.0f;
    for (int i = 0; i < TL_QK; i++) {
        const float v = values[nearest(x[i] * id0, bounds, 15)];
        num += x[i] * v;
        den += v * v;
    }
    const float d = den > 0 ? num / den : d0, id = d ? 1.0f / d : 0.0f;
    y->d = tl_f2h(d);
    for (int i = 0; i < TL_QK / 2; i++)
        y->qs[i] = (uint8_t)(nearest(x[i] * id, bounds, 15) | (nearest(x[i + 16] * id, bounds, 15) << 4));
}

static void encode_turbo(const tl_kv_codec *c, const float *x, uint8_t *y, int64_t d) {
    const int B = c->block, levels = 1 << c->bits, block_bytes = 2 + B * c->bits / 8;
    float u[KV_MAX_DIM], bounds[15];
    decision_bounds(c->codebook, levels, bounds);
    for (int64_t b = 0; b < d; b += B, y += block_bytes) {
        float ss = 0.0f;
        for (int i = 0; i < B; i++) ss += x[b + i] * x[b + i];
        const float norm = sqrtf(ss), safe = norm > 1.17549435e-38f ? norm : 1.17549435e-38f;
        for (int i = 0; i < B; i++) u[i] = x[b + i] / safe * c->signs[i];
        fwht(u, B);
        uint8_t *codes = y + 2;
        memset(codes, 0, (size_t)(B * c->bits / 8));
        float length2 = 0.0f;
        for (int i = 0; i < B; i++) {
            const uint32_t q = (uint32_t)nearest(u[i], bounds, levels - 1);
            length2 += c->codebook[q] * c->codebook[q];
            const int bit = i * c->bits;
            codes[bit / 8] |= (uint8_t)(q << (bit % 8));
            if (bit % 8 + c->bits > 8) codes[bit / 8 + 1] |= (uint8_t)(q >> (8 - bit % 8));
        }
        const float length = sqrtf(length2);
        const tl_half h = tl_f2h(c->keep_length ? norm / (length > 1.17549435e-38f ? length : 1.17549435e-38f) : norm);
        memcpy(y, &h, 2);
    }
}

#if defined(__x86_64__)
static void f16_encode_f16c(const float *x, tl_half *y, int64_t n);
#endif

int tl_kv_encode(const tl_kv_codec *c, const float *x, int64_t n_rows, int64_t d, void *out) {
    const int64_t rb = tl_kv_row_bytes(c, d);
    if (rb <= 0 || d > KV_MAX_DIM) return -1;
    simd_f16 = tl_simd_level() >= 1;
    for (int64_t r = 0; r < n_rows; r++) {
        const float *xr = x + r * d;
        uint8_t *y = (uint8_t *)out + r * rb;
        switch (c->type) {
        case TL_F32: memcpy(y, xr, sizeof(float) * (size_t)d); break;
        case TL_F16:
#if defined(__x86_64__)
            if (simd_f16) { f16_encode_f16c(xr, (tl_half *)y, d); break; }
#endif
            for (int64_t i = 0; i < d; i++) ((tl_half *)y)[i] = tl_f2h(xr[i]);
            break;
        case TL_BF16:
            for (int64_t i = 0; i < d; i++) {
                uint32_t u;
                memcpy(&u, xr + i, 4);
                ((uint16_t *)y)[i] = (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
            }
            break;
        case TL_KV_TURBO: encode_turbo(c, xr, y, d); break;
        default:
            for (int64_t b = 0; b < d / TL_QK; b++) {
                const float *xb = xr + b * TL_QK;
                switch (c->type) {
                case TL_Q8_0: encode_q8_0(xb, (block_q8_0 *)y + b); break;
                case TL_Q4_0: encode_q4_0(xb, (block_q4_0 *)y + b); break;
                case TL_Q4_1: encode_q4_1(xb, (block_q4_1 *)y + b); break;
                case TL_Q5_0: encode_q5_0(xb, (block_q5_0 *)y + b); break;
                case TL_Q5_1: encode_q5_1(xb, (block_q5_1 *)y + b); break;
                case TL_IQ4_NL: encode_iq4_nl(xb, (block_iq4_nl *)y + b); break;
                default: return -1;
                }
            }
        }
    }
    return 0;
}

/* ---- decoders: one row to float (TurboQuant: in the rotated basis) ------------------------- */

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,f16c"))) static void f16_row_f16c(const tl_half *x, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i))));
    for (; i < n; i++) y[i] = tl_h2f(x[i]);
}

/* float -> f16 rounded to nearest even, as tl_f2h rounds (the f16 rows a step writes: 2 x 512
 * tl_f2h calls were ~3.5 us of each Gemma 3 270M layer's decode step) */
__attribute__((target("avx2,f16c"))) static void f16_encode_f16c(const float *x, tl_half *y, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; i < n; i++) y[i] = tl_f2h(x[i]);
}
#endif

/* the `bits` bytes holding 8 codes (a fixed-size load per width: a memcpy of a variable size
 * is a library call, which made 3-bit rows 6x slower to decode than 4-bit ones) */
static inline uint32_t load_codes(const uint8_t *p, int bits) {
    switch (bits) {
    case 2: return (uint32_t)p[0] | (uint32_t)p[1] << 8;
    case 3: return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16;
    case 1: return p[0];
    default: { uint32_t w; memcpy(&w, p, 4); return w; }  /* 4 bits: TurboQuant codes have 1 to 4 */
    }
}

static void decode_turbo_rotated(const tl_kv_codec *c, const uint8_t *x, float *y, int64_t d) {
    const int B = c->block, bits = c->bits, block_bytes = 2 + B * bits / 8;
    const uint32_t mask = (1u << bits) - 1;
    for (int64_t b = 0; b < d; b += B, x += block_bytes) {
        tl_half h;
        memcpy(&h, x, 2);
        const float norm = tl_h2f(h);
        const uint8_t *codes = x + 2;
        for (int i = 0; i < B; i += 8) {  /* 8 codes fill `bits` whole bytes */
            const uint32_t word = load_codes(codes + i / 8 * bits, bits);
            for (int j = 0; j < 8; j++) y[b + i + j] = c->codebook[(word >> (j * bits)) & mask] * norm;
        }
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include "arch/x86/x86_simd.h"

/* A TurboQuant codebook of up to 16 entries as a register table: 8 codes at a time from one
 * broadcast word, per-lane shifts and vpermps (two tables chosen by the code's high bit) */
typedef struct {
    __m256 lo, hi;
    __m256i shifts, mask;
    int bits;
} turbo_table;

static inline turbo_table turbo_table_of(const tl_kv_codec *c) {
    float table[16] = {0};
    memcpy(table, c->codebook, sizeof(float) * (size_t)(1 << c->bits));
    return (turbo_table){_mm256_loadu_ps(table), _mm256_loadu_ps(table + 8),
                         _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(c->bits)),
                         _mm256_set1_epi32((1 << c->bits) - 1), c->bits};
}

/* the codebook values of 8 codes, one per lane of idx */
static inline __m256 turbo_values(const turbo_table *t, __m256i idx) {
    const __m256 v = _mm256_permutevar8x32_ps(t->lo, idx);
    if (t->bits < 4) return v;
    return _mm256_blendv_ps(v, _mm256_permutevar8x32_ps(t->hi, idx), _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

/* the codebook values of the 8 codes packed in `word` */
static inline __m256 turbo_lookup8(const turbo_table *t, uint32_t word) {
    return turbo_values(t, _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)word), t->shifts), t->mask));
}

/* ---- the tiled order: 64 codes per step -------------------------------------------------------
 * Attention decodes TurboQuant rows (rotation blocks of a multiple of 64 values, 2-4 bits) in a
 * fixed permutation of each 64 values, the 8x8 transpose: lane k of step j holds value 8k + j,
 * stored at 8j + k. One load per 64 codes puts the 8 codes of each group in its lane, and a
 * step is then a shift, a mask and a table lookup (the natural order needs a broadcast of each
 * 8-code word from a scalar load: turbo3 rows decoded 3x slower). Attention brings the queries
 * to that order once and the sums of values back from it once (tile_order), as it does with
 * the rotation. */

/* 64 codes at p (8 * bits bytes, no byte beyond them read): lane k holds codes 8k .. 8k+7 */
static inline __m256i load_codes64(const uint8_t *p, int bits) {
    switch (bits) {
    case 2: return _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    case 3: {  /* bytes 0..15 and 8..23; lane k gets bytes 3k .. 3k+2 */
        const __m256i b = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)(p + 8)), _mm_loadu_si128((const __m128i *)p));
        return _mm256_shuffle_epi8(b, _mm256_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1,
                                                       4, 5, 6, -1, 7, 8, 9, -1, 10, 11, 12, -1, 13, 14, 15, -1));
    }
    default: return _mm256_loadu_si256((const __m256i *)p);
    }
}

/* The values of n_vec * 8 codes at `codes` (n_vec = 8, or 4 for blocks of 32) as n_vec vectors
 * in the order attention reads them: natural (vector j = values 8j .. 8j+7) or tiled (vector j
 * = values j, 8 + j, .. 56 + j) */
__attribute__((always_inline)) static inline void turbo_vectors(const turbo_table *t, const uint8_t *codes, int n_vec,
                                                                 const int tiled, __m256 *v) {
    if (tiled) {
        const __m256i w = load_codes64(codes, t->bits);
        for (int j = 0; j < 8; j++)
            v[j] = turbo_values(t, _mm256_and_si256(_mm256_srl_epi32(w, _mm_cvtsi32_si128(j * t->bits)), t->mask));
    } else {
        for (int j = 0; j < n_vec; j++) v[j] = turbo_lookup8(t, load_codes(codes + j * t->bits, t->bits));
    }
}

/* a row in the rotated basis, norm * codebook[code] per block, natural or tiled */
__attribute__((always_inline)) static inline void turbo_decode_g(const tl_kv_codec *c, const uint8_t *x, float *y,
                                                                  int64_t d, const int tiled) {
    const int B = c->block, bits = c->bits, block_bytes = 2 + B * bits / 8, step = B < 64 ? B : 64;
    const turbo_table t = turbo_table_of(c);
    __m256 v[8];
    for (int64_t b = 0; b < d; b += B, x += block_bytes) {
        tl_half h;
        memcpy(&h, x, 2);
        const __m256 norm = _mm256_set1_ps(tl_h2f(h));
        for (int i = 0; i < B; i += step) {
            turbo_vectors(&t, x + 2 + i / 8 * bits, step / 8, tiled, v);
            for (int j = 0; j < step / 8; j++) _mm256_storeu_ps(y + b + i + 8 * j, _mm256_mul_ps(v[j], norm));
        }
    }
}

static void turbo_rotated_avx2(const tl_kv_codec *c, const uint8_t *x, float *y, int64_t d) {
    turbo_decode_g(c, x, y, d, 0);
}

static void turbo_tiled_avx2(const tl_kv_codec *c, const uint8_t *x, float *y, int64_t d) {
    turbo_decode_g(c, x, y, d, 1);
}

/* The scores of a TurboQuant key row against `G` query rows (q, G rows of d; rotated basis, in
 * the row's order, natural or tiled): out[g] = sum_blocks norm * (q_g . codebook[codes]),
 * without writing the row out (decoding into a buffer and then dotting each query with it cost
 * twice the work per key) */
__attribute__((always_inline)) static inline void turbo_dots_g(
        const tl_kv_codec *c, const uint8_t *x, const float *q, int64_t d, float *out, const int G, const int tiled) {
    const int B = c->block, bits = c->bits, block_bytes = 2 + B * bits / 8, step = B < 64 ? B : 64;
    const turbo_table t = turbo_table_of(c);
    __m256 tot[16], acc[16], v[8];
    for (int g = 0; g < G; g++) tot[g] = _mm256_setzero_ps();
    for (int64_t b = 0; b < d; b += B, x += block_bytes) {
        tl_half h;
        memcpy(&h, x, 2);
        for (int g = 0; g < G; g++) acc[g] = _mm256_setzero_ps();
        for (int i = 0; i < B; i += step) {
            turbo_vectors(&t, x + 2 + i / 8 * bits, step / 8, tiled, v);
            for (int j = 0; j < step / 8; j++)
                for (int g = 0; g < G; g++) acc[g] = _mm256_fmadd_ps(v[j], _mm256_loadu_ps(q + g * d + b + i + 8 * j), acc[g]);
        }
        const __m256 norm = _mm256_set1_ps(tl_h2f(h));
        for (int g = 0; g < G; g++) tot[g] = _mm256_fmadd_ps(acc[g], norm, tot[g]);
    }
    for (int g = 0; g < G; g++) out[g] = hsum_ps(tot[g]);
}

/* The turning offset's scores: z (cos of m angles, then their sines) first turned by the angles
 * w when `step` (float: at most TURN_REANCHOR - 1 steps from a double-precision anchor), then
 * out[g] = ab_g . z over the 2m values, ab_g = ab + g * d (A then B of query row g) */
__attribute__((always_inline)) static inline void turn_dots_g(
        float *z, const float *w, int64_t m, int step, const float *ab, int64_t d, float *out, const int G) {
    __m256 acc[16];
    for (int g = 0; g < G; g++) acc[g] = _mm256_setzero_ps();
    for (int64_t f = 0; f < m; f += 8) {
        __m256 c = _mm256_loadu_ps(z + f), s = _mm256_loadu_ps(z + m + f);
        if (step) {
            const __m256 wc = _mm256_loadu_ps(w + f), ws = _mm256_loadu_ps(w + m + f);
            const __m256 c2 = _mm256_fmsub_ps(c, wc, _mm256_mul_ps(s, ws));
            s = _mm256_fmadd_ps(s, wc, _mm256_mul_ps(c, ws));
            c = c2;
            _mm256_storeu_ps(z + f, c);
            _mm256_storeu_ps(z + m + f, s);
        }
        for (int g = 0; g < G; g++)
            acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(ab + g * d + f), c,
                                     _mm256_fmadd_ps(_mm256_loadu_ps(ab + g * d + m + f), s, acc[g]));
    }
    for (int g = 0; g < G; g++) out[g] = hsum_ps(acc[g]);
}

/* m a multiple of 8 and 1, 2, 4 or 8 query rows; 0: not here */
static int turn_dots_avx2(float *z, const float *w, int64_t m, int step,
                                                             const float *ab, int64_t d, int64_t G, float *out) {
    if (m % 8) return 0;
    switch (G) {
    case 1: turn_dots_g(z, w, m, step, ab, d, out, 1); return 1;
    case 2: turn_dots_g(z, w, m, step, ab, d, out, 2); return 1;
    case 4: turn_dots_g(z, w, m, step, ab, d, out, 4); return 1;
    case 8: turn_dots_g(z, w, m, step, ab, d, out, 8); return 1;
    default: return 0;
    }
}

/* 1, 2, 4 or 8 query rows per KV head (the GQA groups of the Gemma models), unrolled; 0: not here */
static int turbo_dots_avx2(const tl_kv_codec *c, const uint8_t *x, const float *q,
                                                              int64_t d, int64_t G, int tiled, float *out) {
#define TURBO_DOTS(n) (tiled ? turbo_dots_g(c, x, q, d, out, n, 1) : turbo_dots_g(c, x, q, d, out, n, 0))
    switch (G) {
    case 1: TURBO_DOTS(1); return 1;
    case 2: TURBO_DOTS(2); return 1;
    case 4: TURBO_DOTS(4); return 1;
    case 8: TURBO_DOTS(8); return 1;
    default: return 0;
    }
#undef TURBO_DOTS
}

/* fwht's butterflies on vectors of 8, the same additions in the same stages (so the same
 * bits): strides 1, 2 and 4 within a vector (the partner lane by a permute; the lower lane of a
 * pair keeps self + partner, the upper partner - self), 8 and up between vectors. The scalar
 * loops cost ~2 us per query head and value sum of a turbo3 step at head dim 256. */
static int fwht_avx2(float *x, int n) {
    if (n % 8) return 0;
    for (int i = 0; i < n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i), p;
        p = _mm256_permute_ps(v, 0xB1);
        v = _mm256_blend_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), 0xAA);
        p = _mm256_permute_ps(v, 0x4E);
        v = _mm256_blend_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), 0xCC);
        p = _mm256_permute2f128_ps(v, v, 1);
        v = _mm256_blend_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), 0xF0);
        _mm256_storeu_ps(x + i, v);
    }
    for (int h = 8; h < n; h *= 2)
        for (int i = 0; i < n; i += 2 * h)
            for (int j = i; j < i + h; j += 8) {
                const __m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + h);
                _mm256_storeu_ps(x + j, _mm256_add_ps(a, b));
                _mm256_storeu_ps(x + j + h, _mm256_sub_ps(a, b));
            }
    const __m256 s = _mm256_set1_ps(sqrtf((float)n));
    for (int i = 0; i < n; i += 8) _mm256_storeu_ps(x + i, _mm256_div_ps(_mm256_loadu_ps(x + i), s));
    return 1;
}
#pragma GCC pop_options
#else
static int fwht_avx2(float *x, int n) { (void)x; (void)n; return 0; }
static int turbo_dots_avx2(const tl_kv_codec *c, const uint8_t *x, const float *q, int64_t d, int64_t G, int tiled,
                           float *out) {
    (void)c; (void)x; (void)q; (void)d; (void)G; (void)tiled; (void)out;
    return 0;
}
static void turbo_tiled_avx2(const tl_kv_codec *c, const uint8_t *x, float *y, int64_t d) {
    (void)c; (void)x; (void)y; (void)d;
}
static int turn_dots_avx2(float *z, const float *w, int64_t m, int step, const float *ab, int64_t d, int64_t G,
                          float *out) {
    (void)z; (void)w; (void)m; (void)step; (void)ab; (void)d; (void)G; (void)out;
    return 0;
}
#endif

/* Whether attention reads rows of this codec in the tiled order (only with the AVX2 decoders) */
static int is_tiled(const tl_kv_codec *c) {
    return simd_f16 && c->type == TL_KV_TURBO && c->block % 64 == 0 && c->bits >= 2 && c->bits <= 4;
}

/* x [d] -> its 64-value tiles transposed (an 8x8 transpose is its own inverse) */
static void tile_order(float *x, int64_t d) {
    float t[64];
    for (int64_t c = 0; c < d; c += 64) {
        for (int k = 0; k < 8; k++)
            for (int j = 0; j < 8; j++) t[8 * j + k] = x[c + 8 * k + j];
        memcpy(x + c, t, sizeof t);
    }
}

/* returns the row as floats: `buf` filled, or the row itself for f32; TurboQuant rows in the
 * rotated basis, and in the tiled order when `tiled` */
static const float *decode_row(const tl_kv_codec *c, const tl_kernels *kt, const void *x, float *buf, int64_t d,
                               int tiled) {
    switch (c->type) {
    case TL_F32: return x;
    case TL_F16:
#if defined(__x86_64__) && defined(__GNUC__)
        if (simd_f16) { f16_row_f16c(x, buf, d); return buf; }
#endif
        for (int64_t i = 0; i < d; i++) buf[i] = tl_h2f(((const tl_half *)x)[i]);
        return buf;
    case TL_BF16:
        for (int64_t i = 0; i < d; i++) {
            const uint32_t u = (uint32_t)((const uint16_t *)x)[i] << 16;
            memcpy(buf + i, &u, 4);
        }
        return buf;
    case TL_KV_TURBO:
        if (tiled) { turbo_tiled_avx2(c, x, buf, d); return buf; }
#if defined(__x86_64__) && defined(__GNUC__)
        if (simd_f16 && c->bits <= 4) { turbo_rotated_avx2(c, x, buf, d); return buf; }
#endif
        decode_turbo_rotated(c, x, buf, d);
        return buf;
    default: kt->dequant(x, buf, d); return buf;
    }
}

int tl_kv_decode(const tl_kv_codec *c, const void *x, int64_t n_rows, int64_t d, int rotated, float *y) {
    const int64_t rb = tl_kv_row_bytes(c, d);
    if (rb <= 0 || d > KV_MAX_DIM) return -1;
    simd_f16 = tl_simd_level() >= 1;
    const tl_kernels *kt = tl_kernels_for(c->type);
    for (int64_t r = 0; r < n_rows; r++) {
        float *yr = y + r * d;
        const float *row = decode_row(c, kt, (const uint8_t *)x + r * rb, yr, d, 0);
        if (row != yr) memcpy(yr, row, sizeof(float) * (size_t)d);
        if (c->type == TL_KV_TURBO && !rotated) unrotate(c, yr, d);
    }
    return 0;
}

/* ---- attention over coded segments ----------------------------------------------------------- */

/* The position offset of a key (kv/conditioning.py): R_p mu for pair i is
 *   (mu_i cos - mu_{i+h} sin, mu_{i+h} cos + mu_i sin),  angle p * freq_i, h = d / 2,
 * and its score against a query q is sum_i A_i cos + B_i sin with
 *   A_i = q_i mu_i + q_{i+h} mu_{i+h},  B_i = q_{i+h} mu_i - q_i mu_{i+h}.
 * Attention steps cos/sin from key to key (position p + 1: one complex product by the angle
 * of one position) and computes them afresh where the positions do not follow. */

void tl_condition_keys(const tl_key_cond *c, const int64_t *pos, int64_t n, int64_t n_kv, int64_t d, float *x) {
    const int64_t h = d / 2;
    for (int64_t t = 0; t < n; t++)
        for (int64_t hk = 0; hk < n_kv; hk++) {
            float *xr = x + (t * n_kv + hk) * d;
            const float *mu = c->rot_offset + hk * d, *off = c->offset + hk * d, *sc = c->scale + hk * d;
            for (int64_t i = 0; i < h; i++) {
                double cs = 1.0, sn = 0.0;
                if (c->rope_freq && (mu[i] != 0.0f || mu[i + h] != 0.0f)) {  /* a pair that does not turn: no trig */
                    const double angle = (double)pos[t] * c->rope_freq[i];
                    cs = cos(angle);
                    sn = sin(angle);
                }
                const float lo = (float)(mu[i] * cs - mu[i + h] * sn), hi = (float)(mu[i + h] * cs + mu[i] * sn);
                xr[i] = (xr[i] - lo - off[i]) / sc[i];
                xr[i + h] = (xr[i + h] - hi - off[i + h]) / sc[i + h];
            }
        }
}

typedef struct {
    const float *q;  /* [T, H, D]: times the key scale, and rotated for a TurboQuant K */
    const float *qb; /* [T, H]: q . key offset, added to every score (NULL: none) */
    /* the turning offset (NULL ab: none). Per KV head hk, the n_turn[hk] pairs whose offset
     * turns, turn[hk * D / 2 + f]; per query row the A then B of those pairs; per KV head
     * their angle per position, then its cos and sin */
    const float *ab;
    const int32_t *turn;
    const int64_t *n_turn;
    const double *angle, *step, *step8;  /* per KV head: [D / 2]; cos, sin [D] of 1 and of TURN_REANCHOR positions */
    const float *stepf;  /* step in float */
    const int64_t *q_pos;
    int64_t n_tok, n_head, n_kv, d;
    const tl_kv_codec *kc, *vc;
    const tl_kernels *kkt, *vkt;
    int k_tiled, v_tiled;  /* TurboQuant rows read in the tiled order (is_tiled) */
    int64_t k_rb, v_rb;
    const tl_kv_segment *segs;
    int n_segs;
    int64_t n_keys, n_chunks;
    float scale, softcap;
    int64_t window;
    /* which rows this pass reads when positions come twice (tl_kv_exact): BAND_ALL, or the
     * coded rows of the keys not read at f16, or the f16 rows of those that are */
    int band;
    int64_t sink, recent, exact_from;
    float *partial;  /* per (t, hk, chunk): group x (max, sum, out[d]) */
} kv_attention_job;

enum { BAND_ALL = 0, BAND_CODED = 1, BAND_EXACT = 2 };

/* whether the query at p reads key position kp from its f16 row (kernels/attention.py ExactSplit) */
static inline int reads_exact(const kv_attention_job *j, int64_t p, int64_t kp) {
    return kp < j->sink || (kp >= j->exact_from && p - kp < j->recent);
}

static int locate(const kv_attention_job *j, int64_t s, const tl_kv_segment **seg) {
    for (int i = 0; i < j->n_segs; i++) {
        if (s < j->segs[i].n) { *seg = &j->segs[i]; return (int)s; }
        s -= j->segs[i].n;
    }
    return -1;
}

static inline int64_t n_units(const kv_attention_job *j) { return j->n_keys > 0 ? j->n_tok * j->n_kv * j->n_chunks : 0; }

/* One work unit of a pass: token t, KV head hk, chunk of keys; its softmax parts in j->partial */
static void attention_unit(const kv_attention_job *j, int64_t unit) {
    const int64_t group = j->n_head / j->n_kv, d = j->d;
    float kbuf[KV_MAX_DIM], vbuf[KV_MAX_DIM];
    float scores[KV_CHUNK * 16];  /* group <= 16 */
    double z[KV_MAX_DIM];  /* cos then sin of the key position's angles, of the turning pairs */
    float zf[KV_MAX_DIM];
    const int64_t half = d / 2;
    const int fused_k = simd_f16 && j->kc->type == TL_KV_TURBO && j->kc->bits <= 4;
    const int fused_turn = simd_f16 && (group == 1 || group == 2 || group == 4 || group == 8);
    const int64_t chunk = unit % j->n_chunks, hk = unit / j->n_chunks % j->n_kv, t = unit / j->n_chunks / j->n_kv;
    const int64_t s0 = chunk * KV_CHUNK, s1 = s0 + KV_CHUNK < j->n_keys ? s0 + KV_CHUNK : j->n_keys;
    const int64_t p = j->q_pos[t];
    float *part = j->partial + unit * group * (d + 2);
    float max[16];
    for (int g = 0; g < group; g++) max[g] = -INFINITY;
    int64_t z_pos = -2;  /* the position z holds the angles of */
    const int64_t m = j->ab ? j->n_turn[hk] : 0;
    const int simd_turn = fused_turn && m % 8 == 0;
    int since = 0;  /* float steps since the double anchor */
    float turns[16];
    for (int64_t s = s0; s < s1; s++) {
        const tl_kv_segment *seg = NULL;
        const int64_t i = locate(j, s, &seg);
        const int64_t kp = seg->pos[i];
        float *sc = scores + (s - s0) * group;
        if (kp < 0 || kp > p || (j->window > 0 && p - kp >= j->window) ||
            (j->band != BAND_ALL && reads_exact(j, p, kp) != (j->band == BAND_EXACT))) {
            for (int g = 0; g < group; g++) sc[g] = -INFINITY;
            continue;
        }
        int float_step = 0;
        if (m) {  /* stepped from key to key, computed afresh at a chunk's start and at breaks */
            if (kp == z_pos + 1 && simd_turn && since + 1 < TURN_REANCHOR) {
                float_step = 1;  /* in turn_dots_avx2 below */
                since++;
            } else if (kp == z_pos + 1 && simd_turn) {
                tl_turn(z, j->step8 + hk * d, m, zf);  /* the anchor, TURN_REANCHOR positions on */
                since = 0;
            } else if (kp == z_pos + 1) {
                tl_turn(z, j->step + hk * d, m, zf);
            } else {
                since = 0;
                for (int64_t f = 0; f < m; f++) {
                    const double angle = (double)kp * j->angle[hk * half + f];
                    z[f] = cos(angle);
                    z[m + f] = sin(angle);
                    zf[f] = (float)z[f];
                    zf[m + f] = (float)z[m + f];
                }
            }
            z_pos = kp;
        }
        const uint8_t *krow = (const uint8_t *)seg->k + (i * j->n_kv + hk) * j->k_rb;
        const int64_t row0 = t * j->n_head + hk * group;
        float dots[16];
        if (!(fused_k && turbo_dots_avx2(j->kc, krow, j->q + row0 * d, d, group, j->k_tiled, dots))) {
            const float *k = decode_row(j->kc, j->kkt, krow, kbuf, d, j->k_tiled);
            for (int g = 0; g < group; g++) dots[g] = tl_dot_f32(j->q + (row0 + g) * d, k, d);
        }
        if (m && !(simd_turn && turn_dots_avx2(zf, j->stepf + hk * d, m, float_step, j->ab + row0 * d, d, group, turns)))
            for (int g = 0; g < group; g++) turns[g] = tl_dot_f32(j->ab + (row0 + g) * d, zf, 2 * m);
        for (int g = 0; g < group; g++) {
            const int64_t row = row0 + g;
            float v = (dots[g] + (j->qb ? j->qb[row] : 0.0f) + (m ? turns[g] : 0.0f)) * j->scale;
            if (j->softcap > 0) v = tanhf(v / j->softcap) * j->softcap;
            sc[g] = v;
            if (v > max[g]) max[g] = v;
        }
    }
    for (int g = 0; g < group; g++) {
        part[g * (d + 2)] = max[g];
        part[g * (d + 2) + 1] = 0.0f;
        memset(part + g * (d + 2) + 2, 0, sizeof(float) * (size_t)d);
    }
    for (int64_t s = s0; s < s1; s++) {
        const float *sc = scores + (s - s0) * group;
        int any = 0;
        for (int g = 0; g < group; g++) any |= sc[g] != -INFINITY;
        if (!any) continue;
        const tl_kv_segment *seg = NULL;
        const int64_t i = locate(j, s, &seg);
        const float *v = decode_row(j->vc, j->vkt, (const uint8_t *)seg->v + (i * j->n_kv + hk) * j->v_rb, vbuf, d,
                                    j->v_tiled);
        for (int g = 0; g < group; g++) {
            if (sc[g] == -INFINITY) continue;
            const float e = expf(sc[g] - max[g]);
            part[g * (d + 2) + 1] += e;
            tl_axpy_f32(e, v, part + g * (d + 2) + 2, d);
        }
    }
}

/* Sizes a pass of attention (job's q, codecs, segments and band filled in) and allocates its
 * j->partial: per (t, hk, chunk) and head of the group (max, sum, out[d]). */
static int prepare_pass(kv_attention_job *j) {
    int64_t n_keys = 0;
    for (int i = 0; i < j->n_segs; i++) n_keys += j->segs[i].n;
    const int64_t group = j->n_head / j->n_kv;
    j->n_keys = n_keys;
    j->n_chunks = n_keys > 0 ? (n_keys + KV_CHUNK - 1) / KV_CHUNK : 1;
    j->k_rb = tl_kv_row_bytes(j->kc, j->d);
    j->v_rb = tl_kv_row_bytes(j->vc, j->d);
    j->kkt = tl_kernels_for(j->kc->type);
    j->vkt = tl_kernels_for(j->vc->type);
    j->k_tiled = is_tiled(j->kc);
    j->v_tiled = is_tiled(j->vc);
    j->partial = malloc(sizeof(float) * (size_t)(j->n_tok * j->n_kv * j->n_chunks * group * (j->d + 2)));
    if (j->partial == NULL) return -3;
    if (n_keys == 0)
        for (int64_t r = 0; r < j->n_tok * j->n_kv * group; r++) j->partial[r * (j->d + 2)] = -INFINITY;
    return 0;
}

/* Both passes' units as the items of one parallel section (a section costs a wake-up and a
 * wait per layer and token), the f16 pass's first. Its few rows are one unit, and the coded
 * pass's unit holding the newest keys skips most of them: a fixed split of these uneven units
 * left the other thread waiting ~10% of a turbo3 decode step (Gemma 3 270M at 8K, perf); with
 * tl_parallel_for an idle thread takes what is left of the other's. */
typedef struct { const kv_attention_job *first, *second; } kv_passes;

static void kv_passes_item(void *vctx, int64_t item) {
    const kv_passes *ps = vctx;
    const int64_t n_first = n_units(ps->first);
    if (item < n_first) attention_unit(ps->first, item);
    else attention_unit(ps->second, item - n_first);
}

/* Folds a pass's chunks for query row (t, h) into the running softmax (m, sum, o[d]). */
static void merge_pass(const kv_attention_job *j, int64_t t, int64_t h, float *m, float *sum, float *o) {
    const int64_t group = j->n_head / j->n_kv, hk = h / group, g = h % group, d = j->d;
    for (int64_t c = 0; c < j->n_chunks; c++) {
        const float *part = j->partial + ((t * j->n_kv + hk) * j->n_chunks + c) * group * (d + 2) + g * (d + 2);
        if (part[0] == -INFINITY) continue;
        if (part[0] > *m) {  /* a new maximum: what is summed so far shrinks by e^(old - new) */
            const float shrink = *m == -INFINITY ? 0.0f : expf(*m - part[0]);
            *sum *= shrink;
            for (int64_t i = 0; i < d; i++) o[i] *= shrink;
            *m = part[0];
        }
        const float w = expf(part[0] - *m);
        *sum += part[1] * w;
        tl_axpy_f32(w, part + 2, o, d);
    }
}

int tl_attention_kv(const float *q, const int64_t *q_pos, int64_t n_tok, int64_t n_head, int64_t n_kv, int64_t d,
                    const tl_kv_codec *kc, const tl_kv_codec *vc, const tl_key_cond *kcond, const tl_kv_exact *exact,
                    const tl_kv_segment *segs, int n_segs, float scale, int64_t window, float softcap, float *out) {
    if (n_kv <= 0 || n_head % n_kv || n_head / n_kv > 16 || d > KV_MAX_DIM) return -2;
    const int64_t group = n_head / n_kv;
    simd_f16 = tl_simd_level() >= 1;
    const float *q_plain = q;
    float *qr = NULL, *qb = NULL;
    float *ab = NULL;
    int32_t *turn = NULL;
    int64_t *n_turn = NULL;
    double *angle = NULL, *step = NULL, *step8 = NULL;  /* per KV head: [half], [d], [d] */
    float *stepf = NULL;                                 /* [d] */
    const int64_t half = d / 2;
    if (kcond && kcond->rope_freq) {  /* the pairs whose offset turns: those the conditioning kept */
        ab = malloc(sizeof(float) * (size_t)(n_tok * n_head * d));
        turn = malloc(sizeof(int32_t) * (size_t)(n_kv * half));
        n_turn = calloc((size_t)n_kv, sizeof(int64_t));
        angle = malloc(sizeof(double) * (size_t)(n_kv * (half + 2 * d)) + sizeof(float) * (size_t)(n_kv * d));
        if (!ab || !turn || !n_turn || !angle) { free(ab); free(turn); free(n_turn); free(angle); return -3; }
        step = angle + n_kv * half;
        step8 = step + n_kv * d;
        stepf = (float *)(step8 + n_kv * d);
        for (int64_t hk = 0; hk < n_kv; hk++) {
            const float *mu = kcond->rot_offset + hk * d;
            double *a = angle + hk * half, *s1 = step + hk * d, *s8 = step8 + hk * d;
            float *sf = stepf + hk * d;
            int64_t m = 0;
            for (int64_t f = 0; f < half; f++)
                if (mu[f] != 0.0f || mu[f + half] != 0.0f) turn[hk * half + m++] = (int32_t)f;
            n_turn[hk] = m;
            for (int64_t f = 0; f < m; f++) {
                a[f] = kcond->rope_freq[turn[hk * half + f]];
                s1[f] = cos(a[f]);
                s1[m + f] = sin(a[f]);
                s8[f] = cos(TURN_REANCHOR * a[f]);
                s8[m + f] = sin(TURN_REANCHOR * a[f]);
                sf[f] = (float)s1[f];
                sf[m + f] = (float)s1[m + f];
            }
        }
    }
    if (kc->type == TL_KV_TURBO || kcond) {  /* bring the queries to the keys' coded form once */
        qr = malloc(sizeof(float) * (size_t)(n_tok * n_head * (d + 1)));
        if (qr == NULL) { free(ab); free(turn); free(n_turn); free(angle); return -3; }
        qb = kcond ? qr + n_tok * n_head * d : NULL;
        for (int64_t r = 0; r < n_tok * n_head; r++) {
            const int64_t hk = r % n_head / group;
            float *qq = qr + r * d;
            memcpy(qq, q + r * d, sizeof(float) * (size_t)d);
            if (kcond) {
                const float *mu = kcond->rot_offset + hk * d;
                qb[r] = tl_dot_f32(qq, kcond->offset + hk * d, d);
                if (ab) {
                    const int64_t m = n_turn[hk];
                    float *a = ab + r * d, *b = a + m;
                    for (int64_t e = 0; e < m; e++) {
                        const int64_t f = turn[hk * half + e];
                        a[e] = qq[f] * mu[f] + qq[f + half] * mu[f + half];
                        b[e] = qq[f + half] * mu[f] - qq[f] * mu[f + half];
                    }
                } else {
                    qb[r] += tl_dot_f32(qq, mu, d);  /* not turned: one more fixed offset */
                }
                for (int64_t i = 0; i < d; i++) qq[i] *= kcond->scale[hk * d + i];
            }
            if (kc->type == TL_KV_TURBO) rotate(kc, qq, d);
            if (is_tiled(kc)) tile_order(qq, d);
        }
        q = qr;
    }
    static const tl_kv_codec f16 = {TL_F16, 0, 0, NULL, NULL, 0};
    kv_attention_job coded = {.q = q, .qb = qb, .ab = ab, .turn = turn, .n_turn = n_turn, .angle = angle,
                              .step = step, .step8 = step8, .stepf = stepf, .q_pos = q_pos, .n_tok = n_tok,
                              .n_head = n_head, .n_kv = n_kv, .d = d, .kc = kc, .vc = vc, .segs = segs,
                              .n_segs = n_segs, .scale = scale, .softcap = softcap, .window = window,
                              .band = exact ? BAND_CODED : BAND_ALL};
    kv_attention_job plain = coded;  /* the f16 rows: plain queries, no offsets, no rotation */
    if (exact) {
        coded.sink = plain.sink = exact->sink;
        coded.recent = plain.recent = exact->recent;
        coded.exact_from = plain.exact_from = exact->exact_from;
        plain.q = q_plain;
        plain.qb = NULL;
        plain.ab = NULL;
        plain.kc = plain.vc = &f16;
        plain.segs = exact->segs;
        plain.n_segs = exact->n_segs;
        plain.band = BAND_EXACT;
    }
    int rc = prepare_pass(&coded);
    if (rc == 0 && exact) rc = prepare_pass(&plain);
    if (rc == 0) {
        kv_passes passes = {&plain, &coded};  /* without an exact window plain has no keys, so no units */
        tl_parallel_for(kv_passes_item, &passes, n_units(&plain) + n_units(&coded));
        for (int64_t t = 0; t < n_tok; t++)
            for (int64_t h = 0; h < n_head; h++) {
                float *o = out + (t * n_head + h) * d;
                float m = -INFINITY, sum = 0.0f;
                memset(o, 0, sizeof(float) * (size_t)d);
                merge_pass(&coded, t, h, &m, &sum, o);
                if (vc->type == TL_KV_TURBO && m != -INFINITY) {  /* linear maps: they take sums too */
                    if (is_tiled(vc)) tile_order(o, d);
                    unrotate(vc, o, d);
                }
                if (exact) merge_pass(&plain, t, h, &m, &sum, o);
                if (m == -INFINITY) continue;  /* no visible key: zeros */
                const float inv = 1.0f / sum;
                for (int64_t i = 0; i < d; i++) o[i] *= inv;
            }
    }
    free(coded.partial);
    free(plain.partial);  /* NULL without an exact window: copied from `coded` before it was prepared */
    free(qr);
    free(ab);
    free(turn);
    free(n_turn);
    free(angle);
    return rc;
}
