/* turbollm native CPU kernels: the public API, which is what ctypes sees.
 *
 * What is here: every function the Python binding (turbollm/kernels/native/__init__.py) calls,
 * every struct it passes (its ctypes Structures mirror these; tl_struct_size / tl_struct_field
 * describe them so the binding checks the layouts at load: a field changed here is changed in
 * abi.c's table and the binding's Structure too), and the type ids the int arguments take:
 * GGML type numbers, and TL_KV_TURBO for TurboQuant cache rows.
 *
 * What is not: the block layouts, kernel tables, thread pool and helpers the C files share
 * (tl_internal.h), nor anything compiled for one instruction set (arch/). The Python side calls
 * these on the data pointers of torch CPU tensors.
 */
#ifndef TL_H
#define TL_H

#include <stddef.h>
#include <stdint.h>

enum tl_type {
    TL_F32 = 0, TL_F16 = 1, TL_Q4_0 = 2, TL_Q4_1 = 3, TL_Q5_0 = 6, TL_Q5_1 = 7, TL_Q8_0 = 8,
    TL_Q8_1 = 9, TL_Q2_K = 10, TL_Q3_K = 11, TL_Q4_K = 12, TL_Q5_K = 13, TL_Q6_K = 14, TL_Q8_K = 15,
    TL_IQ4_NL = 20, TL_IQ3_S = 21, TL_IQ4_XS = 23, TL_BF16 = 30,
};

/* ---- set-up (api.c, threads.c) ------------------------------------------------------------ */
int tl_init(const uint8_t *iq3s_grid_bytes, const int8_t *iq4nl_values, int max_level);
int tl_cpu_features(void);  /* bit 0 avx2, 1 fma, 2 f16c, 3 avx512f, 4 avx512bw, 5 avx512vnni, 6 avx512vl,
                               7 avx512bf16, 8 amx-bf16 */
int tl_simd_level(void);    /* 0 scalar, 1 avx2, 2 avx2 + avx512-vnni */
int tl_supports(int type);
void tl_set_num_threads(int n);
int tl_get_num_threads(void);
void tl_rest(void);  /* let the workers sleep now instead of spinning for the next section */

/* ---- the layout of the structs below, for the binding's check at load (abi.c) -------------- */
int64_t tl_struct_size(const char *name);  /* sizeof(name), e.g. "tl_weight"; -1 for an unknown name */
/* field i (0, 1, ...) of struct `name` in declaration order: its name, *offset and *size its
 * offsetof and sizeof; NULL past the last field or for an unknown struct */
const char *tl_struct_field(const char *name, int i, int64_t *offset, int64_t *size);

/* ---- matrix products and dequantization (api.c) ------------------------------------------- */
int tl_matmul(int type, const void *w, int64_t w_row_bytes, int64_t n_rows, int64_t k,
              const float *x, int64_t n_tok, float *y);
int tl_matmul_multi(int n_mats, const int *types, const void *const *ws, const int64_t *w_row_bytes,
                    const int64_t *n_rows, int64_t k, const float *x, int64_t n_tok, float *const *ys);
int tl_matmul_id(int type, const void *w, int64_t expert_bytes, int64_t w_row_bytes, int64_t n_rows, int64_t k,
                 const int32_t *ids, int64_t n_tok, int64_t n_slot, const float *x, int x_per_slot, float *y);
/* y: float32, or bfloat16 when bf16 != 0 */
int tl_dequantize(int type, const void *w, int64_t w_row_bytes, int64_t n_rows, int64_t k, void *y, int bf16);
int tl_quantize_activations(int type, const float *x, int64_t n_tok, int64_t k, void *out);

/* ---- float ops (ops.c) -------------------------------------------------------------------- */
void tl_rms_norm(const float *x, const float *w, float *y, int64_t n_rows, int64_t dim, float eps);
/* out = gelu(g) * u (out may be g): ggml's fp16-table GELU (ops.c) */
void tl_gelu_mul(const float *g, const float *u, float *out, int64_t n);
extern float tl_gelu_table[65536];  /* fp16 bits -> gelu, set by tl_init */
int tl_attention(const float *q, const float *k, const float *v, const int64_t *q_pos, const int64_t *k_pos,
                 int64_t n_tok, int64_t n_head, int64_t n_kv, int64_t d, int64_t dv, int64_t n_keys,
                 float scale, int64_t window, float softcap, float *out);

/* ---- KV cache codecs and attention over coded rows (kv.c; turbollm/kv/codecs.py defines the bytes) */
#define TL_KV_TURBO 100
typedef struct {
    int type;              /* TL_F32, TL_F16, TL_BF16, TL_Q8_0, TL_Q4_0, TL_Q4_1, TL_Q5_0, TL_Q5_1, TL_IQ4_NL, TL_KV_TURBO */
    int bits, block;       /* TurboQuant: bits per code, rotation block */
    const float *codebook; /* TurboQuant: 2^bits ascending values */
    const float *signs;    /* TurboQuant: the rotation's random signs, one per block position */
    int keep_length;       /* TurboQuant: store norm / |codeword| (kv/turboquant.py) */
} tl_kv_codec;
typedef struct { const void *k, *v; const int64_t *pos; int64_t n; } tl_kv_segment;  /* rows [n, n_kv, row_bytes] */
int tl_kv_encode(const tl_kv_codec *c, const float *x, int64_t n_rows, int64_t d, void *out);
int tl_kv_decode(const tl_kv_codec *c, const void *x, int64_t n_rows, int64_t d, int rotated, float *y);
/* How quantized keys were coded (kv/conditioning.py): a key k at position p as
 * (k - R_p rot_offset - offset) / scale, all [n_kv, d]; R_p turns pair (i, i + d/2) by
 * p * rope_freq[i] (rope_freq NULL: no turn) */
typedef struct {
    const float *offset, *scale, *rot_offset;
    const double *rope_freq;  /* [d / 2] */
} tl_key_cond;
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

/* ---- fused decode blocks of the Gemma layers (gemma_blocks.c) ----------------------------- */
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
int tl_moe_block(const tl_moe_desc *b, const float *h, int64_t n_tok, float *out);

#endif
