/* turbollm native CPU kernels: the C side.
 *
 * What is here: dot products of GGML-quantized weight rows with activation rows quantized to
 * 8 bits (as ggml does for decode), fast dequantization to float32 (for prefill tiles), the
 * drivers that spread a matrix product over threads, and the block layouts they read.
 * Block layouts are ggml's (ggml-common.h); type ids are GGML type numbers.
 *
 * What is not: anything about models. Python (turbollm/kernels/native.py) calls these through
 * ctypes on the data pointers of torch CPU tensors.
 */
#ifndef TL_H
#define TL_H

#include <stddef.h>
#include <stdint.h>

#define TL_QK 32     /* elements per block of the 32-block formats */
#define TL_QK_K 256  /* elements per super-block of the K- and i-quants */

enum tl_type {
    TL_F32 = 0, TL_F16 = 1, TL_Q4_0 = 2, TL_Q4_1 = 3, TL_Q5_0 = 6, TL_Q5_1 = 7, TL_Q8_0 = 8,
    TL_Q8_1 = 9, TL_Q2_K = 10, TL_Q3_K = 11, TL_Q4_K = 12, TL_Q5_K = 13, TL_Q6_K = 14, TL_Q8_K = 15,
    TL_IQ4_NL = 20, TL_IQ3_S = 21, TL_IQ4_XS = 23, TL_BF16 = 30,
};

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
void tl_register_scalar(tl_kernels *table);  /* fills every supported type */
void tl_register_avx2(tl_kernels *table);    /* overrides where an AVX2 version exists */
void tl_register_vnni(tl_kernels *table);    /* overrides where an AVX-512 VNNI version exists */

/* ---- threads ------------------------------------------------------------------------------ */
typedef void (*tl_task_fn)(void *ctx, int ith, int nth);
void tl_parallel(tl_task_fn fn, void *ctx);  /* fn(ctx, i, n) for i in 0..n-1; the caller runs i = 0 */
typedef void (*tl_item_fn)(void *ctx, int64_t item);
/* fn(ctx, item) for every item in 0..n_items-1, contiguous ranges per thread, idle threads stealing */
void tl_parallel_for(tl_item_fn fn, void *ctx, int64_t n_items);
void tl_set_num_threads(int n);
int tl_get_num_threads(void);
void tl_rest(void);  /* let the workers sleep now instead of spinning for the next section */

/* ---- public API (ctypes) ------------------------------------------------------------------ */
int tl_init(const uint8_t *iq3s_grid_bytes, const int8_t *iq4nl_values, int max_level);
int tl_cpu_features(void);  /* bit 0 avx2, 1 fma, 2 f16c, 3 avx512f, 4 avx512bw, 5 avx512vnni, 6 avx512vl,
                               7 avx512bf16, 8 amx-bf16 */
int tl_simd_level(void);    /* 0 scalar, 1 avx2, 2 avx2 + avx512-vnni */
int tl_supports(int type);
int tl_matmul(int type, const void *w, int64_t w_row_bytes, int64_t n_rows, int64_t k,
              const float *x, int64_t n_tok, float *y);
int tl_matmul_multi(int n_mats, const int *types, const void *const *ws, const int64_t *w_row_bytes,
                    const int64_t *n_rows, int64_t k, const float *x, int64_t n_tok, float *const *ys);
void tl_rms_norm(const float *x, const float *w, float *y, int64_t n_rows, int64_t dim, float eps);
int tl_attention(const float *q, const float *k, const float *v, const int64_t *q_pos, const int64_t *k_pos,
                 int64_t n_tok, int64_t n_head, int64_t n_kv, int64_t d, int64_t dv, int64_t n_keys,
                 float scale, int64_t window, float softcap, float *out);
int tl_matmul_id(int type, const void *w, int64_t expert_bytes, int64_t w_row_bytes, int64_t n_rows, int64_t k,
                 const int32_t *ids, int64_t n_tok, int64_t n_slot, const float *x, int x_per_slot, float *y);
/* fused decode blocks (blocks.c) */
typedef struct { int type; const void *data; int64_t row_bytes, n_rows, n_cols; } tl_weight;  /* data NULL: absent */
typedef struct {
    tl_weight wq, wk, wv, wo;  /* wv absent: V is the raw K projection */
    const float *norm, *q_norm, *k_norm, *post_norm;
    int64_t n_embd, n_head, n_kv, head_dim;
    int v_norm;
    float scale, eps, softcap;
    int64_t window;
} tl_attn_desc;
typedef struct {
    tl_weight gate, up, down;
    const float *norm, *post_norm;
    int64_t n_embd;
    float eps;
} tl_ffn_desc;
/* KV cache codecs and attention over coded rows (kv.c; turbollm/kv/codecs.py defines the bytes) */
#define TL_KV_TURBO 100
typedef struct {
    int type;              /* TL_F32, TL_F16, TL_BF16, TL_Q8_0, TL_Q4_0, TL_Q4_1, TL_Q5_0, TL_Q5_1, TL_IQ4_NL, TL_KV_TURBO */
    int bits, block;       /* TurboQuant: bits per code, rotation block */
    const float *codebook; /* TurboQuant: 2^bits ascending values */
    const float *signs;    /* TurboQuant: the rotation's random signs, one per block position */
    int keep_length;       /* TurboQuant: store norm / |codeword| (kv/turboquant.py) */
} tl_kv_codec;
typedef struct { const void *k, *v; const int64_t *pos; int64_t n; } tl_kv_segment;  /* rows [n, n_kv, row_bytes] */
int64_t tl_kv_row_bytes(const tl_kv_codec *c, int64_t d);
int tl_kv_encode(const tl_kv_codec *c, const float *x, int64_t n_rows, int64_t d, void *out);
int tl_kv_decode(const tl_kv_codec *c, const void *x, int64_t n_rows, int64_t d, int rotated, float *y);
/* How quantized keys were coded (kv/conditioning.py): a key k at position p as
 * (k - R_p rot_offset - offset) / scale, all [n_kv, d]; R_p turns pair (i, i + d/2) by
 * p * rope_freq[i] (rope_freq NULL: no turn) */
typedef struct {
    const float *offset, *scale, *rot_offset;
    const double *rope_freq;  /* [d / 2] */
} tl_key_cond;
/* keys x [n, n_kv, d] at positions pos [n] -> their coded form (x - R_p rot_offset - offset) / scale, in place */
void tl_condition_keys(const tl_key_cond *c, const int64_t *pos, int64_t n, int64_t n_kv, int64_t d, float *x);
/* The exact window of a quantized cache (kv/plan.py): f16 K/V rows of some positions besides
 * their coded rows. A query at p reads position kp from its f16 row when kp < sink, or when
 * p - kp < recent and kp >= exact_from, else from its coded row (kernels/attention.py
 * ExactSplit). segs: the f16 rows [n, n_kv, 2 d bytes] (the committed ones, then a step's). */
typedef struct {
    tl_kv_segment segs[2];
    int n_segs;
    int64_t sink, recent, exact_from;
} tl_kv_exact;
/* kcond NULL: keys stored as they are; exact NULL: no f16 rows */
int tl_attention_kv(const float *q, const int64_t *q_pos, int64_t n_tok, int64_t n_head, int64_t n_kv, int64_t d,
                    const tl_kv_codec *kc, const tl_kv_codec *vc, const tl_key_cond *kcond, const tl_kv_exact *exact,
                    const tl_kv_segment *segs, int n_segs, float scale, int64_t window, float softcap, float *out);
/* the new tokens' K/V are encoded into tail_k/tail_v (store: n_tail == n_tok) or read from
 * there (a KV-shared layer; an MTP head reads an empty tail, n_tail 0); attention runs over
 * the n_slots committed slots, then the n_tail tail rows at positions tail_pos. With an exact
 * window, a storing layer also writes the new tokens' f16 rows into exact->segs[1] (the step's
 * rows, whose n is n_tail) */
int tl_attention_block(const tl_attn_desc *b, const float *x, int64_t n_tok, const float *cos, const float *sin,
                       const tl_kv_codec *kc, const tl_kv_codec *vc, const void *k_slots, const void *v_slots,
                       const int64_t *slot_pos, int64_t n_slots, void *tail_k, void *tail_v, const int64_t *tail_pos,
                       int64_t n_tail, int store, const tl_key_cond *kcond, const tl_kv_exact *exact,
                       const int64_t *q_pos, float *out);
int tl_ffn_block(const tl_ffn_desc *b, const float *h, int64_t n_tok, const float *residual, float *out);
typedef struct {
    const float *router;        /* [n_expert, n_embd] float32 */
    const float *router_scale;  /* [n_embd] */
    const float *expert_scale;  /* [n_expert], or NULL */
    const float *pre_norm, *post_norm;
    tl_weight gate, up, down;   /* one expert's shape; gate holds gate and up fused when up is absent */
    int64_t gate_expert_bytes, up_expert_bytes, down_expert_bytes;
    int64_t n_embd, n_ff, n_expert, n_used;
    float eps;
} tl_moe_desc;
int tl_moe_block(const tl_moe_desc *b, const float *h, int64_t n_tok, float *out);
float tl_dot_f32(const float *a, const float *b, int64_t n);
void tl_axpy_f32(float a, const float *x, float *y, int64_t n);  /* y += a x */
/* out = gelu(g) * u (out may be g): ggml's fp16-table GELU (ops.c) */
void tl_gelu_mul(const float *g, const float *u, float *out, int64_t n);
typedef void (*tl_gelu_mul_fn)(const float *g, const float *u, float *out, int64_t n);
extern tl_gelu_mul_fn tl_gelu_mul_impl;  /* the portable loop, or avx2.c's when the CPU has it */
extern float tl_gelu_table[65536];        /* fp16 bits -> gelu, set by tl_init */
void tl_init_gelu_table(void);
void tl_gelu_mul_portable(const float *g, const float *u, float *out, int64_t n);
void tl_gelu_mul_avx2(const float *g, const float *u, float *out, int64_t n);
/* z = (cos[n], sin[n]) of n angles, turned by the angles of w (z <- z * w as complex numbers);
 * zf = z in float */
void tl_turn(double *z, const double *w, int64_t n, float *zf);
/* y: float32, or bfloat16 when bf16 != 0 */
int tl_dequantize(int type, const void *w, int64_t w_row_bytes, int64_t n_rows, int64_t k, void *y, int bf16);
int tl_quantize_activations(int type, const float *x, int64_t n_tok, int64_t k, void *out);

#endif
