/* Float kernels around the matrix products: RMSNorm, the table GELU, the dot, axpy and
 * rotation helpers the KV cache and the fused blocks share, and attention over float32 K/V
 * (kv.c's coded-cache kernel on f32 rows). The GELU's AVX2 loop is arch/x86/avx2.c's.
 *
 * Plain C loops, compiled twice by GCC's target_clones (AVX2+FMA and the baseline) and chosen
 * at load time by the CPU: the compiler vectorizes them. They exist because each torch op
 * costs microseconds of dispatch, and a decode step runs hundreds of them.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tl_internal.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define TL_CLONES __attribute__((target_clones("avx2,fma", "default")))
#else
#define TL_CLONES
#endif

TL_CLONES static float dot_f32(const float *a, const float *b, int64_t n) {
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

float tl_dot_f32(const float *a, const float *b, int64_t n) { return dot_f32(a, b, n); }

TL_CLONES static void axpy_f32(float a, const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

void tl_axpy_f32(float a, const float *x, float *y, int64_t n) { axpy_f32(a, x, y, n); }

/* GELU as llama.cpp's CPU backend computes it (ggml-cpu.c ggml_table_gelu_f16, vec.h
 * ggml_vec_geglu_f32 / ggml_vec_gelu_f32 under GGML_GELU_FP16): the input rounded to fp16
 * and looked up in a table holding gelu_tanh of every fp16 value, rounded to fp16; zero at or
 * below -10 and the identity at or above 10. The exact function differs from it by the two
 * roundings (about 1e-3 relative), and that difference alone moved the tiny random Gemma 4
 * MoE's logits up to 4 units away from llama.cpp's, which the decode path otherwise matches to
 * 1e-7 (it quantizes activations exactly as ggml does). The table is built as ggml builds it
 * on an FMA machine (the fused 1 + a x^2 of its -march=native build): tests check every entry
 * against a checksum of ggml's own table. */
float tl_gelu_table[65536];

void tl_init_gelu_table(void) {
    for (int i = 0; i < 65536; i++) {
        const float x = tl_h2f((tl_half)i);
        const float inner = fmaf(0.044715f * x, x, 1.0f);
        const float g = 0.5f * x * (1.0f + tanhf(0.79788456080286535587989211986876f * x * inner));
        tl_gelu_table[i] = tl_h2f(tl_f2h(g));
    }
}

static inline float gelu_one(float x) { return x <= -10.0f ? 0.0f : x >= 10.0f ? x : tl_gelu_table[tl_f2h(x)]; }

/* portable: out = gelu(g) * u (out may be g) */
void tl_gelu_mul_portable(const float *g, const float *u, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i++) out[i] = gelu_one(g[i]) * u[i];
}

tl_gelu_mul_fn tl_gelu_mul_impl = tl_gelu_mul_portable;

void tl_gelu_mul(const float *g, const float *u, float *out, int64_t n) { tl_gelu_mul_impl(g, u, out, n); }

TL_CLONES static void turn(double *z, const double *w, int64_t n, float *zf) {
    for (int64_t i = 0; i < n; i++) {
        const double c = z[i] * w[i] - z[n + i] * w[n + i], s = z[n + i] * w[i] + z[i] * w[n + i];
        z[i] = c;
        z[n + i] = s;
        zf[i] = (float)c;
        zf[n + i] = (float)s;
    }
}

void tl_turn(double *z, const double *w, int64_t n, float *zf) { turn(z, w, n, zf); }

TL_CLONES void tl_rms_norm(const float *x, const float *w, float *y, int64_t n_rows, int64_t dim, float eps) {
    for (int64_t r = 0; r < n_rows; r++, x += dim, y += dim) {
        const float scale = 1.0f / sqrtf(dot_f32(x, x, dim) / (float)dim + eps);
        if (w) for (int64_t i = 0; i < dim; i++) y[i] = x[i] * scale * w[i];
        else for (int64_t i = 0; i < dim; i++) y[i] = x[i] * scale;
    }
}

/* attention over float32 K/V (one segment of f32 rows): the coded-cache kernel of kv.c */
int tl_attention(const float *q, const float *k, const float *v, const int64_t *q_pos, const int64_t *k_pos,
                 int64_t n_tok, int64_t n_head, int64_t n_kv, int64_t d, int64_t dv, int64_t n_keys,
                 float scale, int64_t window, float softcap, float *out) {
    if (dv != d) return -2;
    const tl_kv_codec f32 = {TL_F32, 0, 0, NULL, NULL};
    const tl_kv_segment seg = {k, v, k_pos, n_keys};
    return tl_attention_kv(q, q_pos, n_tok, n_head, n_kv, d, &f32, &f32, NULL, NULL, &seg, 1, scale, window, softcap,
                           out);
}
