/* Float kernels around the matrix products: RMSNorm and attention over a KV cache.
 *
 * Plain C loops, compiled twice by GCC's target_clones (AVX2+FMA and the baseline) and chosen
 * at load time by the CPU: the compiler vectorizes them. They exist because each torch op
 * costs microseconds of dispatch, and a decode step runs hundreds of them.
 */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "tl.h"

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

TL_CLONES void tl_rms_norm(const float *x, const float *w, float *y, int64_t n_rows, int64_t dim, float eps) {
    for (int64_t r = 0; r < n_rows; r++, x += dim, y += dim) {
        const float scale = 1.0f / sqrtf(dot_f32(x, x, dim) / (float)dim + eps);
        if (w) for (int64_t i = 0; i < dim; i++) y[i] = x[i] * scale * w[i];
        else for (int64_t i = 0; i < dim; i++) y[i] = x[i] * scale;
    }
}

typedef struct {
    const float *q, *k, *v;  /* q [T, H, D]; k [S, Hkv, D]; v [S, Hkv, Dv] */
    const int64_t *q_pos, *k_pos;
    int64_t n_tok, n_head, n_kv, d, dv, n_keys;
    float scale, softcap;
    int64_t window;
    float *out;     /* [T, H, Dv] */
    float *scores;  /* n_keys per thread */
} attention_job;

/* one (token, head) per task item, split evenly over threads */
static void attention_task(void *vctx, int ith, int nth) {
    const attention_job *j = vctx;
    const int64_t n_items = j->n_tok * j->n_head, group = j->n_head / j->n_kv;
    float *scores = j->scores + ith * j->n_keys;
    for (int64_t item = ith; item < n_items; item += nth) {
        const int64_t t = item / j->n_head, h = item % j->n_head, hk = h / group;
        const float *q = j->q + (t * j->n_head + h) * j->d;
        const int64_t p = j->q_pos[t];
        float *o = j->out + (t * j->n_head + h) * j->dv;
        memset(o, 0, sizeof(float) * (size_t)j->dv);
        float max = -INFINITY;
        for (int64_t s = 0; s < j->n_keys; s++) {
            const int64_t kp = j->k_pos[s];
            if (kp < 0 || kp > p || (j->window > 0 && p - kp >= j->window)) { scores[s] = -INFINITY; continue; }
            float sc = dot_f32(q, j->k + (s * j->n_kv + hk) * j->d, j->d) * j->scale;
            if (j->softcap > 0) sc = tanhf(sc / j->softcap) * j->softcap;
            scores[s] = sc;
            if (sc > max) max = sc;
        }
        if (max == -INFINITY) continue;  /* no visible key: output zeros */
        float sum = 0.0f;
        for (int64_t s = 0; s < j->n_keys; s++) {
            if (scores[s] == -INFINITY) continue;
            const float e = expf(scores[s] - max);
            scores[s] = e;
            sum += e;
        }
        const float inv = 1.0f / sum;
        for (int64_t s = 0; s < j->n_keys; s++) {
            if (scores[s] == -INFINITY) continue;
            axpy_f32(scores[s] * inv, j->v + (s * j->n_kv + hk) * j->dv, o, j->dv);
        }
    }
}

int tl_attention(const float *q, const float *k, const float *v, const int64_t *q_pos, const int64_t *k_pos,
                 int64_t n_tok, int64_t n_head, int64_t n_kv, int64_t d, int64_t dv, int64_t n_keys,
                 float scale, int64_t window, float softcap, float *out) {
    if (n_kv <= 0 || n_head % n_kv) return -2;
    const int n_threads = tl_get_num_threads();
    float *scores = malloc(sizeof(float) * (size_t)(n_keys > 0 ? n_keys : 1) * (size_t)n_threads);
    if (scores == NULL) return -3;
    attention_job job = {q, k, v, q_pos, k_pos, n_tok, n_head, n_kv, d, dv, n_keys, scale, softcap, window, out, scores};
    tl_parallel(attention_task, &job);
    free(scores);
    return 0;
}
