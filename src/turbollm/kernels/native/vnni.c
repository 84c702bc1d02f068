/* AVX-512 VNNI versions (on 256-bit registers: AVX512VL) of the 32-block dot products.
 *
 * vpdpbusd multiplies unsigned by signed bytes and adds each group of four products into an
 * int32 lane: one instruction where AVX2 needs maddubs + madd, and no int16 saturation. Q4_0
 * uses it on the unsigned nibbles (0..15) directly and subtracts 8 * sum(y) afterwards, also
 * computed by vpdpbusd, so the sign juggling of the AVX2 kernel disappears; the integer sums
 * stay exact. Signed weights (Q5_0, Q8_0, IQ4_NL) keep the |w| . sign(y, w) form of avx2.c
 * and save the madd. Registered by tl_init only when the CPU reports avx512f/bw/vl/vnni.
 */
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")
#include <immintrin.h>

#include "tl.h"

static inline float h2f(tl_half h) { return _cvtsh_ss(h); }

static inline float hsum_ps(__m256 x) {
    __m128 r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

static inline __m256i nibbles_32(const uint8_t *p) {
    const __m128i t = _mm_loadu_si128((const __m128i *)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0x0F));
}

/* (q - 8) . y for one block of unsigned nibbles q, as 8 int32 partial sums: q . y - 8 . y */
static inline __m256i q4_0_block_q(__m256i q, __m256i y, __m256i eights) {
    const __m256i zero = _mm256_setzero_si256();
    return _mm256_sub_epi32(_mm256_dpbusd_epi32(zero, q, y), _mm256_dpbusd_epi32(zero, eights, y));
}

static inline __m256i q4_0_block(const uint8_t *qs, __m256i y, __m256i eights) {
    return q4_0_block_q(nibbles_32(qs), y, eights);
}

static float dot_q4_0(int n, const void *vw, const void *vx) {
    const block_q4_0 *w = vw; const block_q8_0 *x = vx;
    const __m256i eights = _mm256_set1_epi8(8);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    const int nb = n / TL_QK;
    int i = 0;
    for (; i + 2 <= nb; i += 2) {
        const __m256i s0 = q4_0_block(w[i].qs, _mm256_loadu_si256((const __m256i *)x[i].qs), eights);
        const __m256i s1 = q4_0_block(w[i + 1].qs, _mm256_loadu_si256((const __m256i *)x[i + 1].qs), eights);
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(h2f(w[i].d) * h2f(x[i].d)), _mm256_cvtepi32_ps(s0), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(h2f(w[i + 1].d) * h2f(x[i + 1].d)), _mm256_cvtepi32_ps(s1), acc1);
    }
    for (; i < nb; i++) {
        const __m256i s = q4_0_block(w[i].qs, _mm256_loadu_si256((const __m256i *)x[i].qs), eights);
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(h2f(w[i].d) * h2f(x[i].d)), _mm256_cvtepi32_ps(s), acc0);
    }
    return hsum_ps(_mm256_add_ps(acc0, acc1));
}

/* four weight rows against one activation row: the activation block and its 8 . y correction
 * are loaded and computed once for the four */
/* Bit-identical to dot_q4_0 for each token (same blocks into the same two accumulators), so a
 * token's result does not depend on how many others share its call. */
static void dot_x4_q4_0(int n, const void *vw, const void *const *vx, float *out) {
    const block_q4_0 *w = vw;
    const block_q8_0 *x[4] = {vx[0], vx[1], vx[2], vx[3]};
    const __m256i eights = _mm256_set1_epi8(8);
    __m256 even[4], odd[4];
    for (int t = 0; t < 4; t++) even[t] = odd[t] = _mm256_setzero_ps();
    const int nb = n / TL_QK;
    int i = 0;
    for (; i + 2 <= nb; i += 2) {
        const __m256i q0 = nibbles_32(w[i].qs), q1 = nibbles_32(w[i + 1].qs);
        const float d0 = h2f(w[i].d), d1 = h2f(w[i + 1].d);
        for (int t = 0; t < 4; t++) {
            const __m256i s0 = q4_0_block_q(q0, _mm256_loadu_si256((const __m256i *)x[t][i].qs), eights);
            const __m256i s1 = q4_0_block_q(q1, _mm256_loadu_si256((const __m256i *)x[t][i + 1].qs), eights);
            even[t] = _mm256_fmadd_ps(_mm256_set1_ps(d0 * h2f(x[t][i].d)), _mm256_cvtepi32_ps(s0), even[t]);
            odd[t] = _mm256_fmadd_ps(_mm256_set1_ps(d1 * h2f(x[t][i + 1].d)), _mm256_cvtepi32_ps(s1), odd[t]);
        }
    }
    for (; i < nb; i++) {
        const __m256i q = nibbles_32(w[i].qs);
        const float d = h2f(w[i].d);
        for (int t = 0; t < 4; t++) {
            const __m256i s = q4_0_block_q(q, _mm256_loadu_si256((const __m256i *)x[t][i].qs), eights);
            even[t] = _mm256_fmadd_ps(_mm256_set1_ps(d * h2f(x[t][i].d)), _mm256_cvtepi32_ps(s), even[t]);
        }
    }
    for (int t = 0; t < 4; t++) out[t] = hsum_ps(_mm256_add_ps(even[t], odd[t]));
}

/* signed weights: |w| . sign(y, w), four products per int32 lane */
static inline __m256i signed_block(__m256i q, __m256i y) {
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q));
}

/* the 32-block kernels with signed weights: WEIGHTS(i) yields block i's 32 signed bytes; two
 * blocks per iteration into two accumulators, as in avx2.c */
#define DOT_32_SIGNED(wtype, WEIGHTS)                                                                      \
    const wtype *w = vw; const block_q8_0 *x = vx;                                                          \
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();                                          \
    const int nb = n / TL_QK;                                                                                \
    int i = 0;                                                                                               \
    for (; i + 2 <= nb; i += 2) {                                                                            \
        const __m256i s0 = signed_block(WEIGHTS(i), _mm256_loadu_si256((const __m256i *)x[i].qs));         \
        const __m256i s1 = signed_block(WEIGHTS(i + 1), _mm256_loadu_si256((const __m256i *)x[i + 1].qs)); \
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(h2f(w[i].d) * h2f(x[i].d)), _mm256_cvtepi32_ps(s0), acc0);   \
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(h2f(w[i + 1].d) * h2f(x[i + 1].d)), _mm256_cvtepi32_ps(s1), acc1); \
    }                                                                                                        \
    for (; i < nb; i++) {                                                                                    \
        const __m256i s = signed_block(WEIGHTS(i), _mm256_loadu_si256((const __m256i *)x[i].qs));          \
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(h2f(w[i].d) * h2f(x[i].d)), _mm256_cvtepi32_ps(s), acc0);    \
    }                                                                                                        \
    return hsum_ps(_mm256_add_ps(acc0, acc1));

/* 32 bits -> 32 bytes of 0x00 / 0x10 (the fifth bits of a q5 block) */
static inline __m256i fifth_bits(const uint8_t *qh) {
    uint32_t bits;
    __builtin_memcpy(&bits, qh, 4);
    return _mm256_maskz_mov_epi8((__mmask32)bits, _mm256_set1_epi8(0x10));
}

#define Q8_0_WEIGHTS(i) _mm256_loadu_si256((const __m256i *)w[i].qs)
#define Q5_0_WEIGHTS(i) _mm256_sub_epi8(_mm256_or_si256(nibbles_32(w[i].qs), fifth_bits(w[i].qh)), _mm256_set1_epi8(16))
#define IQ4_NL_WEIGHTS(i) _mm256_shuffle_epi8(table, nibbles_32(w[i].qs))

static float dot_q8_0(int n, const void *vw, const void *vx) { DOT_32_SIGNED(block_q8_0, Q8_0_WEIGHTS) }
static float dot_q5_0(int n, const void *vw, const void *vx) { DOT_32_SIGNED(block_q5_0, Q5_0_WEIGHTS) }

static float dot_iq4_nl(int n, const void *vw, const void *vx) {
    const __m128i t = _mm_loadu_si128((const __m128i *)tl_iq4nl_values);
    const __m256i table = _mm256_set_m128i(t, t);
    DOT_32_SIGNED(block_iq4_nl, IQ4_NL_WEIGHTS)
}

void tl_register_vnni(tl_kernels *t) {
    t[TL_Q4_0].vec_dot = dot_q4_0; t[TL_Q4_0].vec_dot_x4 = dot_x4_q4_0;
    t[TL_Q5_0].vec_dot = dot_q5_0;
    t[TL_Q8_0].vec_dot = dot_q8_0;
    t[TL_IQ4_NL].vec_dot = dot_iq4_nl;
}
#else
#include "tl.h"
void tl_register_vnni(tl_kernels *t) { (void)t; }
#endif
