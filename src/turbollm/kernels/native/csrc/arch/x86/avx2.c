/* AVX2 + FMA + F16C versions of the dot products and dequantizers.
 *
 * This file is compiled for that target with a pragma, so the rest of the library stays
 * portable; tl_init registers these only when the CPU reports all three features. Each
 * function computes what its scalar twin in scalar.c computes: integer sums per block are
 * exact, only the order of the float accumulation differs.
 *
 * The integer core is ggml's: _mm256_maddubs_epi16 multiplies unsigned by signed bytes and
 * adds pairs into int16; signed-by-signed products use |x| and sign(y, x). K-quant sub-block
 * scales multiply the int16 pair sums through _mm256_madd_epi16.
 */
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c")
#include <string.h>

#include "x86_simd.h"

/* 32 bits -> 32 bytes of 0x00 / 0xFF */
static inline __m256i bits_32(uint32_t bits) {
    const __m256i shuffle = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0);
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), shuffle);
    bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    return _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
}

/* signed x signed bytes -> 16 int16 pair sums */
static inline __m256i mul_i8_pairs(__m256i x, __m256i y) {
    return _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x));
}

/* int16 pairs -> 8 floats */
static inline __m256 pairs_to_ps(__m256i p16) {
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

static inline uint32_t load_u32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

/* ---- 32-element block formats ---------------------------------------------------------------- */

static float dot_q4_1(int n, const void *vw, const void *vx) {
    const block_q4_1 *w = vw; const block_q8_1 *x = vx;
    __m256 acc = _mm256_setzero_ps();
    float mins = 0.0f;
    for (int i = 0; i < n / TL_QK; i++) {
        TL_PREFETCH(w + i, sizeof(*w));
        mins += h2f(w[i].m) * h2f(x[i].s);
        const __m256 d = _mm256_set1_ps(h2f(w[i].d) * h2f(x[i].d));
        const __m256i p = _mm256_maddubs_epi16(nibbles_32(w[i].qs), _mm256_loadu_si256((const __m256i *)x[i].qs));
        acc = _mm256_fmadd_ps(d, pairs_to_ps(p), acc);
    }
    return hsum_ps(acc) + mins;
}

/* the 5th bits of a q5 block as 0x10 per byte */
static inline __m256i fifth_bits(const uint8_t *qh) {
    return _mm256_and_si256(bits_32(load_u32(qh)), _mm256_set1_epi8(0x10));
}


static float dot_q5_1(int n, const void *vw, const void *vx) {
    const block_q5_1 *w = vw; const block_q8_1 *x = vx;
    __m256 acc = _mm256_setzero_ps();
    float mins = 0.0f;
    for (int i = 0; i < n / TL_QK; i++) {
        TL_PREFETCH(w + i, sizeof(*w));
        mins += h2f(w[i].m) * h2f(x[i].s);
        const __m256 d = _mm256_set1_ps(h2f(w[i].d) * h2f(x[i].d));
        const __m256i q = _mm256_or_si256(nibbles_32(w[i].qs), fifth_bits(w[i].qh));
        const __m256i p = _mm256_maddubs_epi16(q, _mm256_loadu_si256((const __m256i *)x[i].qs));
        acc = _mm256_fmadd_ps(d, pairs_to_ps(p), acc);
    }
    return hsum_ps(acc) + mins;
}



/* the dots of Q4_0, Q5_0, Q8_0 and IQ4_NL: the eight-block kernels of eight_blocks.h */
#define E8_DOT_U8S8(q, y) _mm256_madd_epi16(_mm256_maddubs_epi16((q), (y)), _mm256_set1_epi16(1))
#define E8_DOT2_U8S8(a, x, b, y) _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16((a), (x)), _mm256_maddubs_epi16((b), (y))), _mm256_set1_epi16(1))
#define E8_PREFIX avx2
#include "eight_blocks.h"

/* ---- K-quants -------------------------------------------------------------------------------- */

static inline void k_scale_min(const uint8_t *q, uint8_t *sc, uint8_t *mn) {
    for (int j = 0; j < 4; j++) {
        sc[j] = q[j] & 63;
        mn[j] = q[j + 4] & 63;
        sc[j + 4] = (q[j + 8] & 0xF) | ((q[j] >> 6) << 4);
        mn[j + 4] = (q[j + 8] >> 4) | ((q[j + 4] >> 6) << 4);
    }
}

/* sum over 8 sub-blocks of min[j] * (bsums[2j] + bsums[2j+1]) */
static inline int mins_dot(const uint8_t *mn, const int16_t *bsums) {
    const __m128i b = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)bsums), _mm_loadu_si128((const __m128i *)(bsums + 8)));
    const __m128i m = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)mn));
    __m128i p = _mm_madd_epi16(m, b);
    p = _mm_add_epi32(p, _mm_unpackhi_epi64(p, p));
    p = _mm_add_epi32(p, _mm_shuffle_epi32(p, 1));
    return _mm_cvtsi128_si32(p);
}

static float dot_q4_K(int n, const void *vw, const void *vx) {
    const block_q4_K *w = vw; const block_q8_K *x = vx;
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    __m256 acc = _mm256_setzero_ps();
    float acc_min = 0.0f;
    for (int i = 0; i < n / TL_QK_K; i++) {
        TL_PREFETCH(w + i, sizeof(*w));
        uint8_t sc[8], mn[8];
        k_scale_min(w[i].scales, sc, mn);
        acc_min += x[i].d * h2f(w[i].dmin) * (float)mins_dot(mn, x[i].bsums);
        __m256i sumi = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            const __m256i bits = _mm256_loadu_si256((const __m256i *)(w[i].qs + 32 * j));
            const __m256i lo = _mm256_and_si256(bits, low4), hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), low4);
            const __m256i plo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(x[i].qs + 64 * j)));
            const __m256i phi = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(x[i].qs + 64 * j + 32)));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(plo, _mm256_set1_epi16(sc[2 * j])));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(phi, _mm256_set1_epi16(sc[2 * j + 1])));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(x[i].d * h2f(w[i].d)), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum_ps(acc) - acc_min;
}

static float dot_q5_K(int n, const void *vw, const void *vx) {
    const block_q5_K *w = vw; const block_q8_K *x = vx;
    const __m256i low4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
    __m256 acc = _mm256_setzero_ps();
    float acc_min = 0.0f;
    for (int i = 0; i < n / TL_QK_K; i++) {
        TL_PREFETCH(w + i, sizeof(*w));
        uint8_t sc[8], mn[8];
        k_scale_min(w[i].scales, sc, mn);
        acc_min += x[i].d * h2f(w[i].dmin) * (float)mins_dot(mn, x[i].bsums);
        const __m256i hbits = _mm256_loadu_si256((const __m256i *)w[i].qh);
        __m256i sumi = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {
            const __m256i bits = _mm256_loadu_si256((const __m256i *)(w[i].qs + 32 * j));
            const __m256i h0 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hbits, 2 * j), one), 4);
            const __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hbits, 2 * j + 1), one), 4);
            const __m256i lo = _mm256_or_si256(_mm256_and_si256(bits, low4), h0);
            const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bits, 4), low4), h1);
            const __m256i plo = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(x[i].qs + 64 * j)));
            const __m256i phi = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(x[i].qs + 64 * j + 32)));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(plo, _mm256_set1_epi16(sc[2 * j])));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(phi, _mm256_set1_epi16(sc[2 * j + 1])));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(x[i].d * h2f(w[i].d)), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum_ps(acc) - acc_min;
}

/* int16 scale vector: 8 lanes of s0 (first 16 elements) then 8 lanes of s1 (next 16) */
static inline __m256i scale_pair(int s0, int s1) {
    return _mm256_set_m128i(_mm_set1_epi16((short)s1), _mm_set1_epi16((short)s0));
}

static float dot_q6_K(int n, const void *vw, const void *vx) {
    const block_q6_K *w = vw; const block_q8_K *x = vx;
    const __m256i low4 = _mm256_set1_epi8(0x0F), m3 = _mm256_set1_epi8(3), m32 = _mm256_set1_epi8(32);
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < n / TL_QK_K; i++) {
        TL_PREFETCH(w + i, sizeof(*w));
        __m256i sumi = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            const __m256i ql0 = _mm256_loadu_si256((const __m256i *)(w[i].ql + 64 * h));
            const __m256i ql1 = _mm256_loadu_si256((const __m256i *)(w[i].ql + 64 * h + 32));
            const __m256i qh = _mm256_loadu_si256((const __m256i *)(w[i].qh + 32 * h));
            __m256i q[4];
            q[0] = _mm256_or_si256(_mm256_and_si256(ql0, low4), _mm256_slli_epi16(_mm256_and_si256(qh, m3), 4));
            q[1] = _mm256_or_si256(_mm256_and_si256(ql1, low4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m3), 4));
            q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), low4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m3), 4));
            q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), low4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m3), 4));
            for (int s = 0; s < 4; s++) {
                const __m256i y = _mm256_loadu_si256((const __m256i *)(x[i].qs + 128 * h + 32 * s));
                /* (q - 32) . y = q . y - 32 . y */
                const __m256i p = _mm256_sub_epi16(_mm256_maddubs_epi16(q[s], y), _mm256_maddubs_epi16(m32, y));
                const int g = 8 * h + 2 * s;
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, scale_pair(w[i].scales[g], w[i].scales[g + 1])));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(x[i].d * h2f(w[i].d)), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum_ps(acc);
}

/* ---- i-quants -------------------------------------------------------------------------------- */

static float dot_iq4_xs(int n, const void *vw, const void *vx) {
    const block_iq4_xs *w = vw; const block_q8_K *x = vx;
    const __m256i table = iq4nl_table();
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < n / TL_QK_K; i++) {
        TL_PREFETCH(w + i, sizeof(*w));
        __m256i sumi = _mm256_setzero_si256();
        for (int ib = 0; ib < 8; ib++) {
            const int ls = (((w[i].scales_l[ib / 2] >> (4 * (ib % 2))) & 0xF) | (((w[i].scales_h >> (2 * ib)) & 3) << 4)) - 32;
            const __m256i q = _mm256_shuffle_epi8(table, nibbles_32(w[i].qs + 16 * ib));
            const __m256i p = mul_i8_pairs(q, _mm256_loadu_si256((const __m256i *)(x[i].qs + 32 * ib)));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, _mm256_set1_epi16((short)ls)));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(h2f(w[i].d) * x[i].d), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum_ps(acc);
}

static float dot_iq3_s(int n, const void *vw, const void *vx) {
    const block_iq3_s *w = vw; const block_q8_K *x = vx;
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < n / TL_QK_K; i++) {
        TL_PREFETCH(w + i, sizeof(*w));
        __m256i sumi = _mm256_setzero_si256();
        for (int ib = 0; ib < 8; ib++) {
            const uint8_t *qs = w[i].qs + 8 * ib, qh = w[i].qh[ib];
            const __m256i index = _mm256_setr_epi32(
                qs[0] | ((qh << 8) & 256), qs[1] | ((qh << 7) & 256), qs[2] | ((qh << 6) & 256), qs[3] | ((qh << 5) & 256),
                qs[4] | ((qh << 4) & 256), qs[5] | ((qh << 3) & 256), qs[6] | ((qh << 2) & 256), qs[7] | ((qh << 1) & 256));
            const __m256i grid = _mm256_i32gather_epi32((const int *)tl_iq3s_grid, index, 4);  /* 32 unsigned bytes */
            const __m256i neg = bits_32(load_u32(w[i].signs + 4 * ib));
            __m256i y = _mm256_loadu_si256((const __m256i *)(x[i].qs + 32 * ib));
            y = _mm256_sub_epi8(_mm256_xor_si256(y, neg), neg);  /* negate where the sign bit is set */
            const int scale = 1 + 2 * ((w[i].scales[ib / 2] >> (4 * (ib % 2))) & 0xF);
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(_mm256_maddubs_epi16(grid, y), _mm256_set1_epi16((short)scale)));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(h2f(w[i].d) * x[i].d), _mm256_cvtepi32_ps(sumi), acc);
    }
    return hsum_ps(acc);
}

/* ---- dequantizers for prefill tiles (bit-exact with scalar.c: y = scale * (float)q, one
 * rounding, as gguf-py) ------------------------------------------------------------------------- */

/* 32 signed bytes -> floats: the first 16 times d0, the next 16 times d1 */
static inline void store_scaled_32(__m256i q, float d0, float d1, float *y) {
    const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    const __m256 s0 = _mm256_set1_ps(d0), s1 = _mm256_set1_ps(d1);
    _mm256_storeu_ps(y, _mm256_mul_ps(s0, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo))));
    _mm256_storeu_ps(y + 8, _mm256_mul_ps(s0, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)))));
    _mm256_storeu_ps(y + 16, _mm256_mul_ps(s1, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi))));
    _mm256_storeu_ps(y + 24, _mm256_mul_ps(s1, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)))));
}

#define DEQ_32(wtype, WEIGHTS)                                                  \
    const wtype *w = vw;                                                        \
    for (int64_t i = 0; i < n / TL_QK; i++, y += TL_QK) {                        \
        const float d = h2f(w[i].d);                                            \
        store_scaled_32(WEIGHTS(i), d, d, y);                                   \
    }

static void deq_q4_0(const void *vw, float *y, int64_t n) { DEQ_32(block_q4_0, Q4_0_WEIGHTS) }
static void deq_q5_0(const void *vw, float *y, int64_t n) { DEQ_32(block_q5_0, Q5_0_WEIGHTS) }
static void deq_iq4_nl(const void *vw, float *y, int64_t n) {
    const __m256i table = iq4nl_table();
    DEQ_32(block_iq4_nl, IQ4_NL_WEIGHTS)
}

static void deq_q6_K(const void *vw, float *y, int64_t n) {
    const block_q6_K *w = vw;
    const __m256i low4 = _mm256_set1_epi8(0x0F), m3 = _mm256_set1_epi8(3), m32 = _mm256_set1_epi8(32);
    for (int64_t i = 0; i < n / TL_QK_K; i++, y += TL_QK_K) {
        const float d = h2f(w[i].d);
        for (int h = 0; h < 2; h++) {
            const __m256i ql0 = _mm256_loadu_si256((const __m256i *)(w[i].ql + 64 * h));
            const __m256i ql1 = _mm256_loadu_si256((const __m256i *)(w[i].ql + 64 * h + 32));
            const __m256i qh = _mm256_loadu_si256((const __m256i *)(w[i].qh + 32 * h));
            const __m256i lows[4] = {_mm256_and_si256(ql0, low4), _mm256_and_si256(ql1, low4),
                                     _mm256_and_si256(_mm256_srli_epi16(ql0, 4), low4),
                                     _mm256_and_si256(_mm256_srli_epi16(ql1, 4), low4)};
            for (int s = 0; s < 4; s++) {
                const __m256i high = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * s), m3), 4);
                const __m256i q = _mm256_sub_epi8(_mm256_or_si256(lows[s], high), m32);
                const int g = 8 * h + 2 * s;
                store_scaled_32(q, d * (float)w[i].scales[g], d * (float)w[i].scales[g + 1], y + 128 * h + 32 * s);
            }
        }
    }
}

/* ops.c's table GELU, eight at a time: F16C rounds to fp16 as ggml's GGML_CPU_FP32_TO_FP16
 * does (nearest even), a gather reads the table */
void tl_gelu_mul_avx2(const float *g, const float *u, float *out, int64_t n) {
    const __m256 lo = _mm256_set1_ps(-10.0f), hi = _mm256_set1_ps(10.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(g + i);
        const __m256i idx = _mm256_cvtepu16_epi32(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
        __m256 y = _mm256_i32gather_ps(tl_gelu_table, idx, 4);
        y = _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, hi, _CMP_GE_OQ));
        y = _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LE_OQ), y);
        _mm256_storeu_ps(out + i, _mm256_mul_ps(y, _mm256_loadu_ps(u + i)));
    }
    if (i < n) tl_gelu_mul_portable(g + i, u + i, out + i, n - i);
}

void tl_register_avx2(tl_kernels *t) {
    avx2_register(t);  /* Q4_0, Q5_0, Q8_0, IQ4_NL: eight_blocks.h */
    t[TL_Q4_0].dequant = deq_q4_0; t[TL_Q5_0].dequant = deq_q5_0; t[TL_IQ4_NL].dequant = deq_iq4_nl;
    t[TL_Q6_K].dequant = deq_q6_K;
    t[TL_Q4_1].vec_dot = dot_q4_1;
    t[TL_Q5_1].vec_dot = dot_q5_1;
    t[TL_Q4_K].vec_dot = dot_q4_K;
    t[TL_Q5_K].vec_dot = dot_q5_K;
    t[TL_Q6_K].vec_dot = dot_q6_K;
    t[TL_IQ4_XS].vec_dot = dot_iq4_xs;
    t[TL_IQ3_S].vec_dot = dot_iq3_s;
}
#else
#include "../../tl_internal.h"
void tl_register_avx2(tl_kernels *t) { (void)t; }
void tl_gelu_mul_avx2(const float *g, const float *u, float *out, int64_t n) { tl_gelu_mul_portable(g, u, out, n); }
#endif
