/* The eight-block dot products, shared by the AVX2 (avx2.c) and AVX-512 VNNI (vnni.c) paths.
 *
 * Included once by each after it defines, for its target:
 *   E8_DOT_U8S8(q, y)  32 unsigned x 32 signed bytes -> 8 int32 lanes whose sum is q . y
 *                      (vpdpbusd; or maddubs + madd with ones on AVX2)
 *   E8_PREFIX          a name for its functions: E8(dot_q4_0) becomes <prefix>_dot_q4_0
 * after x86_simd.h, and the fifth_bits that Q5_0_WEIGHTS reads. E8(register)(table) installs
 * the kernels. Everything here is static to the including file.
 */
#ifndef E8_PREFIX
#error "define E8_DOT_U8S8 and E8_PREFIX before including eight_blocks.h"
#endif

#define E8_CAT2(a, b) a##_##b
#define E8_CAT(a, b) E8_CAT2(a, b)
#define E8(name) E8_CAT(E8_PREFIX, name)

/* ---- eight blocks at a time ------------------------------------------------------------------
 *
 * Per block a one-block kernel spends more instructions on the scales (two fp16 conversions, a
 * product, a broadcast) and on the float conversion than on the integer dot itself. Here eight
 * blocks' int32 lane sums are reduced to one vector of eight block sums, so the scales,
 * Q4_0's 8 * sum(y) correction, the conversion and the multiply-add happen once per eight blocks,
 * as vectors. The activations come in a layout made for it (E8(quantize_q8_0)): the 32-byte
 * quants of every block, then each block's scale as a float, then each block's sum of quants.
 * The values are those of q8_0 (the scale is the same fp16 number), so only the order of the
 * float additions differs from the other code paths. */

static inline const float *soa_scales(const void *x, int nb) { return (const float *)((const int8_t *)x + 32 * nb); }
static inline const int32_t *soa_sums(const void *x, int nb) { return (const int32_t *)(soa_scales(x, nb) + nb); }

/* The activation row of n values as q8_0 blocks in the eight-block layout; `paired`: each pair
 * of blocks (2p, 2p+1) as [first halves of both, second halves of both] (Q4_0's layout, see
 * E8(rows_q4_0)); a last unpaired block stays as it is. */
static inline __attribute__((always_inline)) void E8(quantize_blocks)(const float *x, void *vy, int64_t n, int paired) {
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
        if (paired && (i % 2 || i + 1 < nb)) {
            int8_t *pair = qs + 64 * (i / 2) + 16 * (i % 2);
            _mm_storeu_si128((__m128i *)pair, _mm256_castsi256_si128(i0));
            _mm_storeu_si128((__m128i *)(pair + 32), _mm256_extracti128_si256(i0, 1));
        } else {
            _mm256_storeu_si256((__m256i *)(qs + 32 * i), i0);
        }
        __m128i t = _mm_add_epi32(_mm256_extracti128_si256(total, 1), _mm256_castsi256_si128(total));
        t = _mm_add_epi32(t, _mm_unpackhi_epi64(t, t));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 1));
        sums[i] = _mm_cvtsi128_si32(t);
    }
}

static void E8(quantize_q8_0)(const float *x, void *vy, int64_t n) { E8(quantize_blocks)(x, vy, n, 0); }
static void E8(quantize_q8_0_paired)(const float *x, void *vy, int64_t n) { E8(quantize_blocks)(x, vy, n, 1); }

/* eight vectors of 8 int32 -> one vector of their eight sums */
static inline __m256i sum8(const __m256i *s) {
    const __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3]));
    const __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(s[4], s[5]), _mm256_hadd_epi32(s[6], s[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}

#define SCALES8(w) _mm256_cvtph_ps(_mm_setr_epi16((short)(w)[0].d, (short)(w)[1].d, (short)(w)[2].d, (short)(w)[3].d, \
                                                  (short)(w)[4].d, (short)(w)[5].d, (short)(w)[6].d, (short)(w)[7].d))

/* One step: r <= 8 blocks (from block i) of one weight row against activation row x, added to
 * acc. q holds the blocks' weight bytes: unsigned for Q4_0 (its nibbles 0..15; the - 8 is taken
 * off as 8 * the activation's block sums), else signed (|w| . sign(y, w)). dw: the blocks'
 * scales, zero past r. Called with constant r and is_unsigned (a row's last step, r < 8, via
 * E8(last_NAME)), it compiles to straight code; that step reads only r blocks of x, and their
 * scales and sums with a masked load. Copying them to zeroed buffers with a variable r there
 * held Q4_0 rows of 704 (22 blocks, Gemma 4's expert down projection) to 7.4 GB/s, 1 thread
 * in cache; this way 13.6 (benchmarks/kernels.py -t 1 --cols 704 --rows 4096). */
static inline __attribute__((always_inline)) __m256
step8(const __m256i *q, int r, int is_unsigned, __m256 dw, const void *x, int nb, int i, __m256 acc) {
    const int8_t *yq = (const int8_t *)x + 32 * i;
    __m256i s[8];
    for (int b = 0; b < 8; b++) {
        if (b >= r) { s[b] = _mm256_setzero_si256(); continue; }
        const __m256i y = _mm256_loadu_si256((const __m256i *)(yq + 32 * b));
        s[b] = is_unsigned ? E8_DOT_U8S8(q[b], y) : E8_DOT_U8S8(_mm256_sign_epi8(q[b], q[b]), _mm256_sign_epi8(y, q[b]));
    }
    __m256i isum = sum8(s);
    const __m256i lanes = r == 8 ? _mm256_set1_epi32(-1)
                                 : _mm256_cmpgt_epi32(_mm256_set1_epi32(r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 yd = _mm256_maskload_ps(soa_scales(x, nb) + i, lanes);
    if (is_unsigned) isum = _mm256_sub_epi32(isum, _mm256_slli_epi32(_mm256_maskload_epi32(soa_sums(x, nb) + i, lanes), 3));
    return _mm256_fmadd_ps(_mm256_mul_ps(dw, yd), _mm256_cvtepi32_ps(isum), acc);
}

/* E8(dot_NAME): one weight row with one activation row; E8(dot_x4_NAME): with four, each weight
 * block decoded once for the four. Both are one body (E8(rows_NAME)), so a token's result is
 * bit-identical whichever way it is computed. WEIGHTS(i): block i's 32 weight bytes (unsigned
 * when IS_UNSIGNED); SETUP declares what WEIGHTS reads. */
#define E8_KERNELS(name, wtype, WEIGHTS, SETUP, IS_UNSIGNED)                                                 \
static inline __attribute__((always_inline)) void                                                           \
E8(last_##name)(const wtype *w, int r, const void *const *vx, int n_x, int nb, int i, __m256 *acc) {       \
    SETUP                                                                                                     \
    __m256i q[8];                                                                                             \
    __v8hu h = {0};  /* GCC's vector subscripts: a constant b each, once unrolled */                         \
    for (int b = 0; b < r; b++) { q[b] = WEIGHTS(i + b); h[b] = w[i + b].d; }                                \
    const __m256 dw = _mm256_cvtph_ps((__m128i)h);                                                            \
    for (int t = 0; t < n_x; t++) acc[t] = step8(q, r, IS_UNSIGNED, dw, vx[t], nb, i, acc[t]);               \
}                                                                                                             \
static inline __attribute__((always_inline)) void                                                           \
E8(rows_##name)(int n, const void *vw, const void *const *vx, int n_x, float *out) {                         \
    SETUP                                                                                                     \
    const wtype *w = vw;                                                                                      \
    const int nb = n / TL_QK;                                                                                 \
    __m256 acc[4];                                                                                            \
    for (int t = 0; t < n_x; t++) acc[t] = _mm256_setzero_ps();                                               \
    int i = 0;                                                                                                \
    for (; i + 8 <= nb; i += 8) {                                                                             \
        __m256i q[8];                                                                                         \
        TL_PREFETCH(w + i, 8 * (int)sizeof(wtype));                                                           \
        for (int b = 0; b < 8; b++) q[b] = WEIGHTS(i + b);                                                    \
        const __m256 dw = SCALES8(w + i);                                                                     \
        for (int t = 0; t < n_x; t++) acc[t] = step8(q, 8, IS_UNSIGNED, dw, vx[t], nb, i, acc[t]);           \
    }                                                                                                         \
    switch (nb - i) {  /* the last blocks, a constant count for straight code */                             \
    case 1: E8(last_##name)(w, 1, vx, n_x, nb, i, acc); break;                                                \
    case 2: E8(last_##name)(w, 2, vx, n_x, nb, i, acc); break;                                                \
    case 3: E8(last_##name)(w, 3, vx, n_x, nb, i, acc); break;                                                \
    case 4: E8(last_##name)(w, 4, vx, n_x, nb, i, acc); break;                                                \
    case 5: E8(last_##name)(w, 5, vx, n_x, nb, i, acc); break;                                                \
    case 6: E8(last_##name)(w, 6, vx, n_x, nb, i, acc); break;                                                \
    case 7: E8(last_##name)(w, 7, vx, n_x, nb, i, acc); break;                                                \
    default: break;                                                                                           \
    }                                                                                                         \
    for (int t = 0; t < n_x; t++) out[t] = hsum_ps(acc[t]);                                                   \
}                                                                                                             \
static float E8(dot_##name)(int n, const void *vw, const void *vx) {                                         \
    float out;                                                                                                \
    E8(rows_##name)(n, vw, &vx, 1, &out);                                                                     \
    return out;                                                                                               \
}                                                                                                             \
static void E8(dot_x4_##name)(int n, const void *vw, const void *const *vx, float *out) {                   \
    E8(rows_##name)(n, vw, vx, 4, out);                                                                       \
}

#define NO_SETUP
#define IQ4_NL_SETUP const __m256i table = iq4nl_table();

E8_KERNELS(q8_0, block_q8_0, Q8_0_WEIGHTS, NO_SETUP, 0)
E8_KERNELS(q5_0, block_q5_0, Q5_0_WEIGHTS, NO_SETUP, 0)
E8_KERNELS(iq4_nl, block_iq4_nl, IQ4_NL_WEIGHTS, IQ4_NL_SETUP, 0)

/* ---- Q4_0: two blocks per vector ------------------------------------------------------------
 * A Q4_0 block's 16 bytes hold its 32 weights as low nibbles (weights 0..15) and high nibbles
 * (16..31). Two blocks' bytes in one vector give, with one shift and two masks, the low
 * nibbles of both and the high nibbles of both; the activations come paired to match
 * (E8(quantize_q8_0_paired)), so two dot instructions leave block 2p's sum in lanes 0..3 and
 * 2p+1's in lanes 4..7. Eight blocks then reduce with three horizontal adds instead of six,
 * and need half the nibble work (one block at a time: 0.86 ns a block, one thread, rows of
 * 2,816 in cache; two: 0.65 ns, 27.5 GB/s; rows of 704: 1.14 -> 0.99 ns; `benchmarks/vec_dot.c`).
 * Synthetic 26B-A4B Q4_0 decode: 77 -> 66-71 ms a token. */
#ifndef E8_DOT2_U8S8
#error "define E8_DOT2_U8S8(a, x, b, y): a . x + b . y per group of four bytes, before including eight_blocks.h"
#endif

/* blocks 2p and 2p+1 of w (one when `single`: its pair's second half is zero) against the
 * activation pair at y: 8 int32 lanes, 0..3 summing to block 2p's dot, 4..7 to 2p+1's */
static inline __attribute__((always_inline)) __m256i
E8(pair_q4_0)(const block_q4_0 *w, const int8_t *y, int single) {
    const __m256i qs = single ? _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)w[0].qs))
                              : _mm256_set_m128i(_mm_loadu_si128((const __m128i *)w[1].qs),
                                                 _mm_loadu_si128((const __m128i *)w[0].qs));
    const __m256i m = _mm256_set1_epi8(0x0F);
    const __m256i lo = _mm256_and_si256(qs, m), hi = _mm256_and_si256(_mm256_srli_epi16(qs, 4), m);
    if (single)  /* the block as it is: its first then its second half */
        return E8_DOT2_U8S8(lo, _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)y)),
                            hi, _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)(y + 16))));
    return E8_DOT2_U8S8(lo, _mm256_loadu_si256((const __m256i *)y), hi, _mm256_loadu_si256((const __m256i *)(y + 32)));
}

/* r <= 8 blocks from block i (r constant per call site) of one row against each of the n_x
 * activation rows, added to acc */
static inline __attribute__((always_inline)) void
E8(step_q4_0)(const block_q4_0 *w, int r, const void *const *vx, int n_x, int nb, int i, __m256 *acc) {
    __v8hu h = {0};
    for (int b = 0; b < r; b++) h[b] = w[i + b].d;
    const __m256 dw = _mm256_cvtph_ps((__m128i)h);
    const __m256i lanes = r == 8 ? _mm256_set1_epi32(-1)
                                 : _mm256_cmpgt_epi32(_mm256_set1_epi32(r), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    for (int t = 0; t < n_x; t++) {
        const int8_t *y = (const int8_t *)vx[t] + 32 * i;
        __m256i s[4];
        for (int p = 0; p < 4; p++)
            s[p] = 2 * p < r ? E8(pair_q4_0)(w + i + 2 * p, y + 64 * p, 2 * p + 1 == r) : _mm256_setzero_si256();
        /* lanes [b0 b2 b4 b6 | b1 b3 b5 b7] -> b0 .. b7 */
        const __m256i h2 = _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3]));
        __m256i isum = _mm256_permutevar8x32_epi32(h2, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        const __m256 yd = _mm256_maskload_ps(soa_scales(vx[t], nb) + i, lanes);
        isum = _mm256_sub_epi32(isum, _mm256_slli_epi32(_mm256_maskload_epi32(soa_sums(vx[t], nb) + i, lanes), 3));
        acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(dw, yd), _mm256_cvtepi32_ps(isum), acc[t]);
    }
}

static inline __attribute__((always_inline)) void
E8(rows_q4_0)(int n, const void *vw, const void *const *vx, int n_x, float *out) {
    const block_q4_0 *w = vw;
    const int nb = n / TL_QK;
    __m256 acc[4];
    for (int t = 0; t < n_x; t++) acc[t] = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= nb; i += 8) {
        TL_PREFETCH(w + i, 8 * (int)sizeof(block_q4_0));
        E8(step_q4_0)(w, 8, vx, n_x, nb, i, acc);
    }
    switch (nb - i) {  /* the last blocks, a constant count for straight code */
    case 1: E8(step_q4_0)(w, 1, vx, n_x, nb, i, acc); break;
    case 2: E8(step_q4_0)(w, 2, vx, n_x, nb, i, acc); break;
    case 3: E8(step_q4_0)(w, 3, vx, n_x, nb, i, acc); break;
    case 4: E8(step_q4_0)(w, 4, vx, n_x, nb, i, acc); break;
    case 5: E8(step_q4_0)(w, 5, vx, n_x, nb, i, acc); break;
    case 6: E8(step_q4_0)(w, 6, vx, n_x, nb, i, acc); break;
    case 7: E8(step_q4_0)(w, 7, vx, n_x, nb, i, acc); break;
    default: break;
    }
    for (int t = 0; t < n_x; t++) out[t] = hsum_ps(acc[t]);
}

static float E8(dot_q4_0)(int n, const void *vw, const void *vx) {
    float out;
    E8(rows_q4_0)(n, vw, &vx, 1, &out);
    return out;
}

static void E8(dot_x4_q4_0)(int n, const void *vw, const void *const *vx, float *out) {
    E8(rows_q4_0)(n, vw, vx, 4, out);
}

/* Q4_0, Q5_0, Q8_0 and IQ4_NL: these dots, their four-token twins and the activation layout */
static void E8(register)(tl_kernels *t) {
    t[TL_Q4_0].vec_dot = E8(dot_q4_0); t[TL_Q4_0].vec_dot_x4 = E8(dot_x4_q4_0);
    const int types[3] = {TL_Q5_0, TL_Q8_0, TL_IQ4_NL};
    const tl_vec_dot_fn dots[3] = {E8(dot_q5_0), E8(dot_q8_0), E8(dot_iq4_nl)};
    const tl_vec_dot_x4_fn dots_x4[3] = {E8(dot_x4_q5_0), E8(dot_x4_q8_0), E8(dot_x4_iq4_nl)};
    for (int k = 0; k < 3; k++) { t[types[k]].vec_dot = dots[k]; t[types[k]].vec_dot_x4 = dots_x4[k]; }
    const int all[4] = {TL_Q4_0, TL_Q5_0, TL_Q8_0, TL_IQ4_NL};
    for (int k = 0; k < 4; k++) { t[all[k]].quantize_act = E8(quantize_q8_0); t[all[k]].act_block_bytes = 32 + 4 + 4; }
    t[TL_Q4_0].quantize_act = E8(quantize_q8_0_paired);
}
