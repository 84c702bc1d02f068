/* turbollm native CPU kernels: what the C files share and Python never sees.
 *
 * What is here: the block layouts of the quantized weights and activations (ggml's,
 * ggml-common.h; type ids are GGML type numbers), the tables tl_init fills, the per-type
 * kernel table that the portable code (scalar.c) fills and the x86 code (arch/x86/) overrides,
 * the thread pool, and the float helpers the files call across each other.
 *
 * What is not: the public API (tl.h, included here), nor anything about models (the fused
 * Gemma blocks are gemma_blocks.c, which only uses what is declared here).
 */
#ifndef TL_INTERNAL_H
#define TL_INTERNAL_H

#include "tl.h"

#define TL_QK 32     /* elements per block of the 32-block formats */
#define TL_QK_K 256  /* elements per super-block of the K- and i-quants */

typedef uint16_t tl_half;

typedef struct { tl_half d; uint8_t qs[16]; } block_q4_0;
typedef struct { tl_half d, m; uint8_t qs[16]; } block_q4_1;
typedef struct { tl_half d; uint8_t qh[4]; uint8_t qs[16]; } block_q5_0;
typedef struct { tl_half d, m; uint8_t qh[4]; uint8_t qs[16]; } block_q5_1;
typedef struct { tl_half d; int8_t qs[32]; } block_q8_0;
typedef struct { tl_half d, s; int8_t qs[32]; } block_q8_1;  /* s = d * sum(qs) */
typedef struct { tl_half d; uint8_t qs[16]; } block_iq4_nl;
typedef struct { tl_half d, dmin; uint8_t scales[12]; uint8_t qs[128]; } block_q4_K;
typedef struct { tl_half d, dmin; uint8_t scales[12]; uint8_t qh[32]; uint8_t qs[128]; } block_q5_K;
typedef struct { uint8_t ql[128]; uint8_t qh[64]; int8_t scales[16]; tl_half d; } block_q6_K;
typedef struct { tl_half d; uint16_t scales_h; uint8_t scales_l[4]; uint8_t qs[128]; } block_iq4_xs;
typedef struct { tl_half d; uint8_t qs[64]; uint8_t qh[8]; uint8_t signs[32]; uint8_t scales[4]; } block_iq3_s;
typedef struct { float d; int8_t qs[256]; int16_t bsums[16]; } block_q8_K;  /* bsums: sums of 16 qs */

_Static_assert(sizeof(block_q4_0) == 18, "q4_0"); _Static_assert(sizeof(block_q4_1) == 20, "q4_1");
_Static_assert(sizeof(block_q5_0) == 22, "q5_0"); _Static_assert(sizeof(block_q5_1) == 24, "q5_1");
_Static_assert(sizeof(block_q8_0) == 34, "q8_0"); _Static_assert(sizeof(block_q8_1) == 36, "q8_1");
_Static_assert(sizeof(block_q4_K) == 144, "q4_K"); _Static_assert(sizeof(block_q5_K) == 176, "q5_K");
_Static_assert(sizeof(block_q6_K) == 210, "q6_K"); _Static_assert(sizeof(block_iq4_xs) == 136, "iq4_xs");
_Static_assert(sizeof(block_iq3_s) == 110, "iq3_s"); _Static_assert(sizeof(block_q8_K) == 292, "q8_K");

/* ---- shared state, set once by tl_init ---------------------------------------------------- */
extern float tl_f16_table[65536];   /* fp16 bits -> float */
extern int8_t tl_iq4nl_values[16];  /* IQ4_NL / IQ4_XS non-linear levels */
extern uint32_t tl_iq3s_grid[512];  /* IQ3_S grid: 4 unsigned bytes per entry */

static inline float tl_h2f(tl_half h) { return tl_f16_table[h]; }
tl_half tl_f2h(float f);

/* ---- vec_dot: n elements of one weight row with one quantized activation row ------------- */
typedef float (*tl_vec_dot_fn)(int n, const void *w, const void *x);
/* one weight row with four activation rows: out[t] = w . x[t]; each weight block is decoded
 * once for the four (prefill of the experts, whose few tokens each make GEMMs too small) */
typedef void (*tl_vec_dot_x4_fn)(int n, const void *w, const void *const *x, float *out);
/* quantize one activation row of n floats into the activation format of a weight type */
typedef void (*tl_quantize_fn)(const float *x, void *y, int64_t n);
/* dequantize one weight row of n elements to float */
typedef void (*tl_dequant_fn)(const void *w, float *y, int64_t n);

typedef struct {
    tl_vec_dot_fn vec_dot;
    tl_quantize_fn quantize_act;
    tl_dequant_fn dequant;
    int act_block;       /* activation block size in elements (32 or 256) */
    int act_block_bytes; /* bytes of one activation block */
    int w_block;         /* weight block size in elements */
    int w_block_bytes;
    tl_vec_dot_x4_fn vec_dot_x4;  /* optional */
} tl_kernels;

const tl_kernels *tl_kernels_for(int type);  /* NULL if the type has no native kernel */
void tl_register_scalar(tl_kernels *table);  /* fills every supported type (scalar.c) */
void tl_register_avx2(tl_kernels *table);    /* overrides where an AVX2 version exists (arch/x86/avx2.c) */
void tl_register_vnni(tl_kernels *table);    /* overrides where an AVX-512 VNNI version exists (arch/x86/vnni.c) */

/* ---- threads (threads.c; tl_set_num_threads, tl_get_num_threads and tl_rest are in tl.h) --- */
typedef void (*tl_task_fn)(void *ctx, int ith, int nth);
void tl_parallel(tl_task_fn fn, void *ctx);  /* fn(ctx, i, n) for i in 0..n-1; the caller runs i = 0 */
typedef void (*tl_item_fn)(void *ctx, int64_t item);
/* fn(ctx, item) for every item in 0..n_items-1, contiguous ranges per thread, idle threads stealing */
void tl_parallel_for(tl_item_fn fn, void *ctx, int64_t n_items);

/* ---- KV rows and key conditioning (kv.c) -------------------------------------------------- */
int64_t tl_kv_row_bytes(const tl_kv_codec *c, int64_t d);
/* keys x [n, n_kv, d] at positions pos [n] -> their coded form (x - R_p rot_offset - offset) / scale, in place */
void tl_condition_keys(const tl_key_cond *c, const int64_t *pos, int64_t n, int64_t n_kv, int64_t d, float *x);

/* ---- float helpers (ops.c; tl_gelu_mul_avx2: arch/x86/avx2.c) ------------------------------ */
float tl_dot_f32(const float *a, const float *b, int64_t n);
void tl_axpy_f32(float a, const float *x, float *y, int64_t n);  /* y += a x */
typedef void (*tl_gelu_mul_fn)(const float *g, const float *u, float *out, int64_t n);
extern tl_gelu_mul_fn tl_gelu_mul_impl;  /* the portable loop, or avx2.c's when the CPU has it */
void tl_init_gelu_table(void);
void tl_gelu_mul_portable(const float *g, const float *u, float *out, int64_t n);
void tl_gelu_mul_avx2(const float *g, const float *u, float *out, int64_t n);
/* z = (cos[n], sin[n]) of n angles, turned by the angles of w (z <- z * w as complex numbers);
 * zf = z in float */
void tl_turn(double *z, const double *w, int64_t n, float *zf);

#endif
