/* The entry points Python calls: initialisation and CPU dispatch, matrix products over
 * threads, dequantization. See tl.h for the contract of each.
 *
 * Portable C: the per-type kernels it dispatches to are scalar.c's, overridden by
 * arch/x86/avx2.c's and vnni.c's where the CPU has them; the float ops, the KV cache and the
 * fused Gemma blocks are ops.c, kv.c and gemma_blocks.c, the struct layouts for ctypes abi.c. */
#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "tl_internal.h"

float tl_f16_table[65536];
int8_t tl_iq4nl_values[16];
uint32_t tl_iq3s_grid[512];

static tl_kernels kernels[64];
static int simd_level = 0;

static float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {  /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(mant & 0x400)) { mant <<= 1; exp--; }
            bits = sign | (exp << 23) | ((mant & 0x3FF) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000 | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* round-to-nearest-even float -> half, as F16C's _cvtss_sh(x, 0) */
tl_half tl_f2h(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000;
    const int32_t exp = (int32_t)((x >> 23) & 0xFF) - 127 + 15;
    uint32_t mant = x & 0x7FFFFF;
    if (((x >> 23) & 0xFF) == 0xFF) return (tl_half)(sign | 0x7C00 | (mant ? 0x200 : 0));  /* inf / nan */
    if (exp >= 31) return (tl_half)(sign | 0x7C00);
    if (exp <= 0) {  /* subnormal half or zero */
        if (exp < -10) return (tl_half)sign;
        mant |= 0x800000;
        const int shift = 14 - exp;
        uint32_t half = mant >> shift;
        const uint32_t rem = mant & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (tl_half)(sign | half);
    }
    uint32_t half = ((uint32_t)exp << 10) | (mant >> 13);
    const uint32_t rem = mant & 0x1FFF;
    if (rem > 0x1000 || (rem == 0x1000 && (half & 1))) half++;  /* may carry into the exponent: correct */
    return (tl_half)(sign | half);
}

int tl_cpu_features(void) {
    int f = 0;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) f |= 1;
    if (__builtin_cpu_supports("fma")) f |= 2;
    if (__builtin_cpu_supports("f16c")) f |= 4;
    if (__builtin_cpu_supports("avx512f")) f |= 8;
    if (__builtin_cpu_supports("avx512bw")) f |= 16;
    if (__builtin_cpu_supports("avx512vnni")) f |= 32;
    if (__builtin_cpu_supports("avx512vl")) f |= 64;
    if (__builtin_cpu_supports("avx512bf16")) f |= 128;
    if (__builtin_cpu_supports("amx-bf16")) f |= 256;
#endif
    return f;
}

int tl_init(const uint8_t *iq3s_grid_bytes, const int8_t *iq4nl_values, int max_level) {
    for (int i = 0; i < 65536; i++) tl_f16_table[i] = half_to_float((uint16_t)i);
    tl_init_gelu_table();
    tl_gelu_mul_impl = tl_gelu_mul_portable;
    memcpy(tl_iq4nl_values, iq4nl_values, 16);
    for (int i = 0; i < 512; i++) {
        const uint8_t *b = iq3s_grid_bytes + 4 * i;
        tl_iq3s_grid[i] = (uint32_t)b[0] | ((uint32_t)b[1] << 8) | ((uint32_t)b[2] << 16) | ((uint32_t)b[3] << 24);
    }
    memset(kernels, 0, sizeof(kernels));
    tl_register_scalar(kernels);
    simd_level = 0;
#if defined(__x86_64__)
    const int need = 1 | 2 | 4;  /* avx2, fma, f16c */
    if (max_level >= 1 && (tl_cpu_features() & need) == need) {
        tl_register_avx2(kernels);
        tl_gelu_mul_impl = tl_gelu_mul_avx2;
        simd_level = 1;
        const int vnni = 8 | 16 | 32 | 64;  /* avx512f, avx512bw, avx512vnni, avx512vl */
        if (max_level >= 2 && (tl_cpu_features() & vnni) == vnni) {
            tl_register_vnni(kernels);
            simd_level = 2;
        }
    }
#endif
    return simd_level;
}

int tl_simd_level(void) { return simd_level; }

const tl_kernels *tl_kernels_for(int type) {
    if (type < 0 || type >= 64 || kernels[type].vec_dot == NULL) return NULL;
    return &kernels[type];
}

int tl_supports(int type) { return tl_kernels_for(type) != NULL; }

static int check(const tl_kernels *kt, int64_t k, int64_t w_row_bytes) {
    if (kt == NULL) return -1;
    if (k % kt->w_block || k % kt->act_block) return -2;
    if (w_row_bytes != k / kt->w_block * kt->w_block_bytes) return -2;
    return 0;
}

/* ---- activation quantization, spread over tokens ------------------------------------------- */

typedef struct {
    const tl_kernels *kt;
    const float *x;
    int64_t n_tok, k, q_row_bytes;
    uint8_t *q;
} quantize_job;

static void quantize_task(void *vctx, int ith, int nth) {
    quantize_job *j = vctx;
    for (int64_t t = ith; t < j->n_tok; t += nth) j->kt->quantize_act(j->x + t * j->k, j->q + t * j->q_row_bytes, j->k);
}

static uint8_t *quantize_rows(const tl_kernels *kt, const float *x, int64_t n_tok, int64_t k, int64_t *q_row_bytes) {
    *q_row_bytes = k / kt->act_block * kt->act_block_bytes;
    uint8_t *q = malloc((size_t)(*q_row_bytes * n_tok));
    if (q == NULL) return NULL;
    quantize_job job = {kt, x, n_tok, k, *q_row_bytes, q};
    if (n_tok > 1) tl_parallel(quantize_task, &job);
    else quantize_task(&job, 0, 1);
    return q;
}

int tl_quantize_activations(int type, const float *x, int64_t n_tok, int64_t k, void *out) {
    const tl_kernels *kt = tl_kernels_for(type);
    if (kt == NULL) return -1;
    if (k % kt->act_block) return -2;
    const int64_t row = k / kt->act_block * kt->act_block_bytes;
    for (int64_t t = 0; t < n_tok; t++) kt->quantize_act(x + t * k, (uint8_t *)out + t * row, k);
    return 0;
}

/* ---- y_m[t, n] = W_m[n, :] . x[t, :] for several weights sharing one input ---------------- */

#define ROWS_PER_CHUNK 16
#define TL_MAX_MATS 8

typedef struct {
    int n_mats;
    const tl_kernels *kt[TL_MAX_MATS];
    const uint8_t *w[TL_MAX_MATS];
    int64_t w_row_bytes[TL_MAX_MATS], n_rows[TL_MAX_MATS], first_chunk[TL_MAX_MATS + 1];
    const uint8_t *q[TL_MAX_MATS];  /* the quantized activations each weight reads */
    int64_t q_row_bytes[TL_MAX_MATS];
    float *y[TL_MAX_MATS];
    int64_t k, n_tok;
} matmul_job;

/* Rows r0..r1-1 of W against n activation rows: row u of q is q_rows[u] (u when q_rows is NULL),
 * its outputs go to row y_rows[u] (or u) of y, y_row_len floats per row. Four activation rows
 * per call where the type has a four-token kernel (each weight block decoded once for them).
 * (Four weight rows per call sharing the activation loads was faster in cache but 40% slower
 * streaming from memory: measured, dropped.) */
static void dot_rows(const tl_kernels *kt, int64_t k, const uint8_t *w, int64_t rb, int64_t r0, int64_t r1,
                     const uint8_t *q, int64_t q_row_bytes, const int64_t *q_rows,
                     float *y, int64_t y_row_len, const int64_t *y_rows, int64_t n) {
#define Q_ROW(u) (q + (q_rows ? q_rows[u] : (u)) * q_row_bytes)
#define Y_ROW(u) (y + (y_rows ? y_rows[u] : (u)) * y_row_len)
    int64_t u = 0;
    if (kt->vec_dot_x4) {
        for (; u + 4 <= n; u += 4) {
            const void *qs[4] = {Q_ROW(u), Q_ROW(u + 1), Q_ROW(u + 2), Q_ROW(u + 3)};
            float *ys[4] = {Y_ROW(u), Y_ROW(u + 1), Y_ROW(u + 2), Y_ROW(u + 3)};
            for (int64_t r = r0; r < r1; r++) {
                float out[4];
                kt->vec_dot_x4((int)k, w + r * rb, qs, out);
                ys[0][r] = out[0]; ys[1][r] = out[1]; ys[2][r] = out[2]; ys[3][r] = out[3];
            }
        }
    }
    if (kt->vec_dot_x4 && n - u >= 2) {
        /* two or three rows left: one four-row call with the last row repeated decodes each
         * weight block once for all of them (a speculative verify of 1 + 2 tokens measured
         * 36 ms as three single-row passes against ~25 ms this way, default model) */
        const int64_t rem = n - u;
        const void *qs[4];
        float *ys[4];
        for (int i = 0; i < 4; i++) {
            const int64_t v = u + (i < rem ? i : rem - 1);
            qs[i] = Q_ROW(v);
            ys[i] = Y_ROW(v);
        }
        for (int64_t r = r0; r < r1; r++) {
            float out[4];
            kt->vec_dot_x4((int)k, w + r * rb, qs, out);
            for (int i = 0; i < rem; i++) ys[i][r] = out[i];
        }
        u = n;
    }
    for (; u < n; u++) {
        const uint8_t *qu = Q_ROW(u);
        float *yu = Y_ROW(u);
        for (int64_t r = r0; r < r1; r++) yu[r] = kt->vec_dot((int)k, w + r * rb, qu);
    }
#undef Q_ROW
#undef Y_ROW
}

/* An item is one chunk of rows of one weight. Threads take contiguous ranges of chunks, long
 * sequential reads that keep the hardware prefetchers streaming (handing out chunks one by one
 * interleaved the threads' reads and cost a third of the bandwidth on the layer weights), and
 * steal from the ends of each other's ranges when done (tl_parallel_for). */
static void matmul_item(void *vctx, int64_t c) {
    matmul_job *j = vctx;
    int m = 0;
    while (c >= j->first_chunk[m + 1]) m++;
    const int64_t r0 = (c - j->first_chunk[m]) * ROWS_PER_CHUNK;
    const int64_t r1 = r0 + ROWS_PER_CHUNK < j->n_rows[m] ? r0 + ROWS_PER_CHUNK : j->n_rows[m];
    dot_rows(j->kt[m], j->k, j->w[m], j->w_row_bytes[m], r0, r1, j->q[m], j->q_row_bytes[m], NULL,
             j->y[m], j->n_rows[m], NULL, j->n_tok);
}

int tl_matmul_multi(int n_mats, const int *types, const void *const *ws, const int64_t *w_row_bytes,
                    const int64_t *n_rows, int64_t k, const float *x, int64_t n_tok, float *const *ys) {
    if (n_mats < 1 || n_mats > TL_MAX_MATS) return -2;
    matmul_job job = {.n_mats = n_mats, .k = k, .n_tok = n_tok};
    uint8_t *owned[TL_MAX_MATS] = {0};
    int rc = 0;
    job.first_chunk[0] = 0;
    for (int m = 0; m < n_mats && rc == 0; m++) {
        const tl_kernels *kt = tl_kernels_for(types[m]);
        rc = check(kt, k, w_row_bytes[m]);
        if (rc) break;
        job.kt[m] = kt;
        job.w[m] = ws[m];
        job.w_row_bytes[m] = w_row_bytes[m];
        job.n_rows[m] = n_rows[m];
        job.y[m] = ys[m];
        job.first_chunk[m + 1] = job.first_chunk[m] + (n_rows[m] + ROWS_PER_CHUNK - 1) / ROWS_PER_CHUNK;
        /* weights with the same activation format share one quantized copy of x */
        for (int p = 0; p < m; p++) {
            if (job.kt[p]->quantize_act == kt->quantize_act) { job.q[m] = job.q[p]; job.q_row_bytes[m] = job.q_row_bytes[p]; break; }
        }
        if (job.q[m] == NULL) {
            owned[m] = quantize_rows(kt, x, n_tok, k, &job.q_row_bytes[m]);
            if (owned[m] == NULL) rc = -3;
            job.q[m] = owned[m];
        }
    }
    if (rc == 0) tl_parallel_for(matmul_item, &job, job.first_chunk[n_mats]);
    for (int m = 0; m < n_mats; m++) free(owned[m]);
    return rc;
}

int tl_matmul(int type, const void *w, int64_t w_row_bytes, int64_t n_rows, int64_t k,
              const float *x, int64_t n_tok, float *y) {
    return tl_matmul_multi(1, &type, &w, &w_row_bytes, &n_rows, k, x, n_tok, &y);
}

/* ---- Mixture of Experts: each (token, slot) row through the expert ids[t, slot] ------------ */

typedef struct {
    const tl_kernels *kt;
    const uint8_t *w;
    int64_t expert_bytes, w_row_bytes, n_rows, k;
    const uint8_t *q;
    int64_t q_row_bytes;
    /* pairs sorted by expert; group g covers pairs [group_start[g], group_start[g + 1]) */
    const int32_t *group_expert;
    const int64_t *group_start, *pair_q_row, *pair_y_row;
    int64_t n_groups;
    float *y;
} matmul_id_job;

/* an item is one row chunk of one expert, applied to every pair routed to that expert: the
 * chunk stays in cache while the expert's tokens pass through it; items in expert order, so a
 * thread's range streams through whole experts (see matmul_item) */
static void matmul_id_item(void *vctx, int64_t item) {
    matmul_id_job *j = vctx;
    const int64_t chunks = (j->n_rows + ROWS_PER_CHUNK - 1) / ROWS_PER_CHUNK;
    const int64_t g = item / chunks, c = item % chunks;
    const uint8_t *we = j->w + (int64_t)j->group_expert[g] * j->expert_bytes;
    const int64_t r0 = c * ROWS_PER_CHUNK, r1 = r0 + ROWS_PER_CHUNK < j->n_rows ? r0 + ROWS_PER_CHUNK : j->n_rows;
    const int64_t p0 = j->group_start[g];
    dot_rows(j->kt, j->k, we, j->w_row_bytes, r0, r1, j->q, j->q_row_bytes, j->pair_q_row + p0,
             j->y, j->n_rows, j->pair_y_row + p0, j->group_start[g + 1] - p0);
}

int tl_matmul_id(int type, const void *w, int64_t expert_bytes, int64_t w_row_bytes, int64_t n_rows, int64_t k,
                 const int32_t *ids, int64_t n_tok, int64_t n_slot, const float *x, int x_per_slot, float *y) {
    const tl_kernels *kt = tl_kernels_for(type);
    const int rc = check(kt, k, w_row_bytes);
    if (rc) return rc;
    const int64_t n_pairs = n_tok * n_slot;
    int32_t max_id = 0;
    for (int64_t i = 0; i < n_pairs; i++) {
        if (ids[i] < 0) return -2;
        if (ids[i] > max_id) max_id = ids[i];
    }
    int64_t q_row_bytes;
    uint8_t *q = quantize_rows(kt, x, x_per_slot ? n_pairs : n_tok, k, &q_row_bytes);
    int64_t *count = calloc((size_t)max_id + 2, sizeof(int64_t));
    int64_t *pair_q = malloc(sizeof(int64_t) * (size_t)n_pairs), *pair_y = malloc(sizeof(int64_t) * (size_t)n_pairs);
    int64_t *group_start = malloc(sizeof(int64_t) * ((size_t)max_id + 2));
    int32_t *group_expert = malloc(sizeof(int32_t) * ((size_t)max_id + 1));
    if (!q || !count || !pair_q || !pair_y || !group_start || !group_expert) {
        free(q); free(count); free(pair_q); free(pair_y); free(group_start); free(group_expert);
        return -3;
    }
    /* stable counting sort of the pairs by expert; one group per expert that has pairs */
    for (int64_t i = 0; i < n_pairs; i++) count[ids[i] + 1]++;
    int64_t n_groups = 0;
    for (int32_t e = 0; e <= max_id; e++) {
        if (count[e + 1]) { group_expert[n_groups] = e; group_start[n_groups] = count[e]; n_groups++; }
        count[e + 1] += count[e];
    }
    group_start[n_groups] = n_pairs;
    for (int64_t i = 0; i < n_pairs; i++) {
        const int64_t at = count[ids[i]]++;
        pair_q[at] = x_per_slot ? i : i / n_slot;
        pair_y[at] = i;
    }
    matmul_id_job job = {kt, w, expert_bytes, w_row_bytes, n_rows, k, q, q_row_bytes,
                         group_expert, group_start, pair_q, pair_y, n_groups, y};
    tl_parallel_for(matmul_id_item, &job, n_groups * ((n_rows + ROWS_PER_CHUNK - 1) / ROWS_PER_CHUNK));
    free(q); free(count); free(pair_q); free(pair_y); free(group_start); free(group_expert);
    return 0;
}

/* ---- dequantization to float32 or bfloat16, rows over threads ------------------------------ */

typedef struct {
    const tl_kernels *kt;
    const uint8_t *w;
    int64_t w_row_bytes, n_rows, k;
    void *y;
    int bf16;  /* write bfloat16 (round to nearest even, as torch's .to(torch.bfloat16)) */
} dequant_job;

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static void dequant_task(void *vctx, int ith, int nth) {
    dequant_job *j = vctx;
    const int64_t per = (j->n_rows + nth - 1) / nth, r0 = ith * per, r1 = r0 + per < j->n_rows ? r0 + per : j->n_rows;
    if (!j->bf16) {
        for (int64_t r = r0; r < r1; r++) j->kt->dequant(j->w + r * j->w_row_bytes, (float *)j->y + r * j->k, j->k);
        return;
    }
    float row[4096];  /* one row at a time through a float buffer that stays in L1/L2 */
    for (int64_t r = r0; r < r1; r++) {
        uint16_t *out = (uint16_t *)j->y + r * j->k;
        for (int64_t c = 0; c < j->k; c += 4096) {
            const int64_t n = j->k - c < 4096 ? j->k - c : 4096;  /* a multiple of the block: 4096 is */
            j->kt->dequant(j->w + r * j->w_row_bytes + c / j->kt->w_block * j->kt->w_block_bytes, row, n);
            for (int64_t e = 0; e < n; e++) out[c + e] = f32_to_bf16(row[e]);
        }
    }
}

int tl_dequantize(int type, const void *w, int64_t w_row_bytes, int64_t n_rows, int64_t k, void *y, int bf16) {
    const tl_kernels *kt = tl_kernels_for(type);
    const int rc = check(kt, k, w_row_bytes);
    if (rc) return rc;
    dequant_job job = {kt, w, w_row_bytes, n_rows, k, y, bf16};
    tl_parallel(dequant_task, &job);
    return 0;
}
