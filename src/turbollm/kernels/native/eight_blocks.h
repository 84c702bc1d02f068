/* The eight-block dot products, shared by the AVX2 (avx2.c) and AVX-512 VNNI (vnni.c) paths.
 *
 * Included once by each after it defines, for its target:
 *   E8_DOT_U8S8(q, y)  32 unsigned x 32 signed bytes -> 8 int32 lanes whose sum is q . y
 *                      (vpdpbusd; or maddubs + madd with ones on AVX2)
 *   E8_PREFIX          a name for its functions: E8(dot_q4_0) becomes <prefix>_dot_q4_0
 * and h2f, hsum_ps, nibbles_32, and Q8_0_WEIGHTS(i), Q5_0_WEIGHTS(i), IQ4_NL_WEIGHTS(i) (block
 * i's 32 signed weight bytes; IQ4_NL's reads a `table` of its levels). E8(register)(table)
 * installs the kernels. Everything here is static to the including file.
 */
#ifndef E8_PREFIX
#error "define E8_DOT_U8S8 and E8_PREFIX before including eight_blocks.h"
#endif
#include <string.h>

#define E8_CAT2(a, b) a##_##b
#define E8_CAT(a, b) E8_CAT2(a, b)
#define E8(name) E8_CAT(E8_PREFIX, name)

/* ---- Q4_0: eight blocks at a time ------------------------------------------------------------
 *
 * Per block the AVX2 kernel spends more instructions on the scales (two fp16 conversions, a
 * product, a broadcast) and on the float conversion than on the integer dot itself. Here eight
 * blocks' int32 lane sums are reduced to one vector of eight block sums, so the scales,
 * the 8 * sum(y) correction, the conversion and the multiply-add happen once per eight blocks,
 * as vectors. The activations come in a layout made for it (E8(quantize_q8_0)): the 32-byte
 * quants of every block, then each block's scale as a float, then each block's sum of quants.
 * The values are those of q8_0 (the scale is the same fp16 number), so only the order of the
 * float additions differs from the other code paths. */

static inline const float *soa_scales(const void *x, int nb) { return (const float *)((const int8_t *)x + 32 * nb); }
static inline const int32_t *soa_sums(const void *x, int nb) { return (const int32_t *)(soa_scales(x, nb) + nb); }

static void E8(quantize_q8_0)(const float *x, void *vy, int64_t n) {
    const int nb = (int)(n / TL_QK);
    int8_t *qs = vy;
    float *d = (float *)(qs + 32 * nb);
    int32_t *sums = (int32_t *)(d + nb);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int i = 0; i < nb; i++, x += TL_QK) {
        __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8), v2 = _mm256_loadu_ps(x + 16), v3 = _mm256_loadu_ps(x + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                 _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
        __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        d[i] = h2f(tl_f2h(amax / 127.0f));  /* the q8_0 scale: rounded to fp16 as ggml stores it */
        const __m256 id = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
        const int round = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, id), round));
        __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, id), round));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, id), round));
        __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, id), round));
        const __m256i total = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        i0 = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        i0 = _mm256_permutevar8x32_epi32(i0, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));  /* undo lane interleave */
        _mm256_storeu_si256((__m256i *)(qs + 32 * i), i0);
        __m128i t = _mm_add_epi32(_mm256_extracti128_si256(total, 1), _mm256_castsi256_si128(total));
        t = _mm_add_epi32(t, _mm_unpackhi_epi64(t, t));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 1));
        sums[i] = _mm_cvtsi128_si32(t);
    }
}

/* eight vectors of 8 int32 -> one vector of their eight sums */
static inline __m256i sum8(const __m256i *s) {
    const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3]));
    const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(s[4], s[5]), _mm256_hadd_epi32(s[6], s[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

static inline __m256 q4_0_scales8(const block_q4_0 *w) {
    const __m128i h = _mm_setr_epi16((short)w[0].d, (short)w[1].d, (short)w[2].d, (short)w[3].d,
                                     (short)w[4].d, (short)w[5].d, (short)w[6].d, (short)w[7].d);
    return _mm256_cvtph_ps(h);
}

/* the dot of one row with one activation row, given the row's decoded nibbles for blocks i..i+7 */
static inline __m256 q4_0_step8(const __m256i *q, const int8_t *yq, const float *yd, const int32_t *ys,
                                __m256 dw, __m256 acc) {
    __m256i s[8];
    for (int b = 0; b < 8; b++) s[b] = E8_DOT_U8S8(q[b], _mm256_loadu_si256((const __m256i *)(yq + 32 * b)));
    const __m256i isum = _mm256_sub_epi32(sum8(s), _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)ys), 3));
    return _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_loadu_ps(yd)), _mm256_cvtepi32_ps(isum), acc);
}

/* the last r < 8 blocks as one step: missing blocks have zero weights and zero scales */
static inline __m256 q4_0_partial(const block_q4_0 *w, int r, const int8_t *yq, const float *yd, const int32_t *ys,
                                  __m256 acc) {
    __m256i s[8];
    uint16_t h[8] = {0};
    for (int b = 0; b < 8; b++) {
        if (b < r) {
            s[b] = E8_DOT_U8S8(nibbles_32(w[b].qs), _mm256_loadu_si256((const __m256i *)(yq + 32 * b)));
            h[b] = w[b].d;
        } else {
            s[b] = _mm256_setzero_si256();
        }
    }
    int32_t sums[8] = {0};
    float scales[8] = {0};
    memcpy(sums, ys, sizeof(int32_t) * (size_t)r);
    memcpy(scales, yd, sizeof(float) * (size_t)r);
    const __m256i isum = _mm256_sub_epi32(sum8(s), _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)sums), 3));
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
    return _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_loadu_ps(scales)), _mm256_cvtepi32_ps(isum), acc);
}

static float E8(dot_q4_0)(int n, const void *vw, const void *vx) {
    const block_q4_0 *w = vw;
    const int nb = n / TL_QK;
    const int8_t *yq = vx; const float *yd = soa_scales(vx, nb); const int32_t *ys = soa_sums(vx, nb);
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= nb; i += 8) {
        __m256i q[8];
        for (int b = 0; b < 8; b++) q[b] = nibbles_32(w[i + b].qs);
        acc = q4_0_step8(q, yq + 32 * i, yd + i, ys + i, q4_0_scales8(w + i), acc);
    }
    if (i < nb) acc = q4_0_partial(w + i, nb - i, yq + 32 * i, yd + i, ys + i, acc);
    return hsum_ps(acc);
}

/* The same for four activation rows, each weight block decoded once for the four; each
 * token's result is bit-identical to E8(dot_q4_0)'s. */
static void E8(dot_x4_q4_0)(int n, const void *vw, const void *const *vx, float *out) {
    const block_q4_0 *w = vw;
    const int nb = n / TL_QK;
    __m256 acc[4];
    for (int t = 0; t < 4; t++) acc[t] = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= nb; i += 8) {
        __m256i q[8];
        for (int b = 0; b < 8; b++) q[b] = nibbles_32(w[i + b].qs);
        const __m256 dw = q4_0_scales8(w + i);
        for (int t = 0; t < 4; t++)
            acc[t] = q4_0_step8(q, (const int8_t *)vx[t] + 32 * i, soa_scales(vx[t], nb) + i, soa_sums(vx[t], nb) + i, dw, acc[t]);
    }
    for (int t = 0; t < 4; t++) {
        if (i < nb)
            acc[t] = q4_0_partial(w + i, nb - i, (const int8_t *)vx[t] + 32 * i, soa_scales(vx[t], nb) + i,
                                  soa_sums(vx[t], nb) + i, acc[t]);
        out[t] = hsum_ps(acc[t]);
    }
}

/* ---- signed weights (Q8_0, Q5_0, IQ4_NL): the same eight-block scheme on |w| . sign(y, w) --- */

static inline __m256i signed_block(__m256i q, __m256i y) {
    return E8_DOT_U8S8(_mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q));
}

#define SCALES8(w) _mm256_cvtph_ps(_mm_setr_epi16((short)(w)[0].d, (short)(w)[1].d, (short)(w)[2].d, (short)(w)[3].d, \
                                                  (short)(w)[4].d, (short)(w)[5].d, (short)(w)[6].d, (short)(w)[7].d))

static inline __m256 signed_step8(const __m256i *q, const int8_t *yq, const float *yd, __m256 dw, __m256 acc) {
    __m256i s[8];
    for (int b = 0; b < 8; b++) s[b] = signed_block(q[b], _mm256_loadu_si256((const __m256i *)(yq + 32 * b)));
    return _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_loadu_ps(yd)), _mm256_cvtepi32_ps(sum8(s)), acc);
}

/* the last r < 8 blocks as one step (q[b] for b < r; the rest are ignored) */
static inline __m256 signed_partial(const __m256i *q, const uint16_t *h, int r, const int8_t *yq, const float *yd, __m256 acc) {
    __m256i s[8];
    for (int b = 0; b < 8; b++)
        s[b] = b < r ? signed_block(q[b], _mm256_loadu_si256((const __m256i *)(yq + 32 * b))) : _mm256_setzero_si256();
    float scales[8] = {0};
    memcpy(scales, yd, sizeof(float) * (size_t)r);
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h));
    return _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_loadu_ps(scales)), _mm256_cvtepi32_ps(sum8(s)), acc);
}

/* E8(dot_NAME) (one activation row) and E8(dot_x4_NAME) (four, each bit-identical to the first);
 * WEIGHTS(i) yields block i's 32 signed weight bytes, SETUP declares what it needs */
#define SIGNED_KERNELS(name, wtype, WEIGHTS, SETUP)                                                          \
static float E8(dot_##name)(int n, const void *vw, const void *vx) {                                             \
    SETUP                                                                                                     \
    const wtype *w = vw;                                                                                      \
    const int nb = n / TL_QK;                                                                                 \
    const int8_t *yq = vx; const float *yd = soa_scales(vx, nb);                                              \
    __m256 acc = _mm256_setzero_ps();                                                                         \
    int i = 0;                                                                                                \
    for (; i + 8 <= nb; i += 8) {                                                                             \
        __m256i q[8];                                                                                         \
        for (int b = 0; b < 8; b++) q[b] = WEIGHTS(i + b);                                                    \
        acc = signed_step8(q, yq + 32 * i, yd + i, SCALES8(w + i), acc);                                      \
    }                                                                                                         \
    if (i < nb) {                                                                                             \
        __m256i q[8]; uint16_t h[8] = {0};                                                                    \
        for (int b = 0; b < nb - i; b++) { q[b] = WEIGHTS(i + b); h[b] = w[i + b].d; }                        \
        acc = signed_partial(q, h, nb - i, yq + 32 * i, yd + i, acc);                                         \
    }                                                                                                         \
    return hsum_ps(acc);                                                                                      \
}                                                                                                             \
static void E8(dot_x4_##name)(int n, const void *vw, const void *const *vx, float *out) {                       \
    SETUP                                                                                                     \
    const wtype *w = vw;                                                                                      \
    const int nb = n / TL_QK;                                                                                 \
    __m256 acc[4];                                                                                            \
    for (int t = 0; t < 4; t++) acc[t] = _mm256_setzero_ps();                                                 \
    int i = 0;                                                                                                \
    for (; i + 8 <= nb; i += 8) {                                                                             \
        __m256i q[8];                                                                                         \
        for (int b = 0; b < 8; b++) q[b] = WEIGHTS(i + b);                                                    \
        const __m256 dw = SCALES8(w + i);                                                                     \
        for (int t = 0; t < 4; t++)                                                                           \
            acc[t] = signed_step8(q, (const int8_t *)vx[t] + 32 * i, soa_scales(vx[t], nb) + i, dw, acc[t]);  \
    }                                                                                                         \
    if (i < nb) {                                                                                             \
        __m256i q[8]; uint16_t h[8] = {0};                                                                    \
        for (int b = 0; b < nb - i; b++) { q[b] = WEIGHTS(i + b); h[b] = w[i + b].d; }                        \
        for (int t = 0; t < 4; t++)                                                                           \
            acc[t] = signed_partial(q, h, nb - i, (const int8_t *)vx[t] + 32 * i, soa_scales(vx[t], nb) + i, acc[t]); \
    }                                                                                                         \
    for (int t = 0; t < 4; t++) out[t] = hsum_ps(acc[t]);                                                     \
}

#define NO_SETUP
#define IQ4_NL_SETUP const __m256i table = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)tl_iq4nl_values));

SIGNED_KERNELS(q8_0, block_q8_0, Q8_0_WEIGHTS, NO_SETUP)
SIGNED_KERNELS(q5_0, block_q5_0, Q5_0_WEIGHTS, NO_SETUP)
SIGNED_KERNELS(iq4_nl, block_iq4_nl, IQ4_NL_WEIGHTS, IQ4_NL_SETUP)

/* Q4_0, Q5_0, Q8_0 and IQ4_NL: these dots, their four-token twins and the activation layout */
static void E8(register)(tl_kernels *t) {
    t[TL_Q4_0].vec_dot = E8(dot_q4_0); t[TL_Q4_0].vec_dot_x4 = E8(dot_x4_q4_0);
    const int types[3] = {TL_Q5_0, TL_Q8_0, TL_IQ4_NL};
    const tl_vec_dot_fn dots[3] = {E8(dot_q5_0), E8(dot_q8_0), E8(dot_iq4_nl)};
    const tl_vec_dot_x4_fn dots_x4[3] = {E8(dot_x4_q5_0), E8(dot_x4_q8_0), E8(dot_x4_iq4_nl)};
    for (int k = 0; k < 3; k++) { t[types[k]].vec_dot = dots[k]; t[types[k]].vec_dot_x4 = dots_x4[k]; }
    const int all[4] = {TL_Q4_0, TL_Q5_0, TL_Q8_0, TL_IQ4_NL};
    for (int k = 0; k < 4; k++) { t[all[k]].quantize_act = E8(quantize_q8_0); t[all[k]].act_block_bytes = 32 + 4 + 4; }
}
