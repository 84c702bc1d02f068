/* The model-specific code of the library: the fused decode blocks of the Gemma 3 / Gemma 4
 * layers, a whole attention sub-layer, a whole dense FFN sub-layer or a whole MoE sub-layer
 * per call.
 *
 * A decode step of a small model spends as long in Python between kernels as in the kernels
 * (about 200 us per layer for ~25 torch ops and wrappers); these blocks run the same sequence
 * in C with one call each. They compute what turbollm.kernels.blocks composes from single
 * ops: the same maths, only float summation orders differ.
 *
 *   attention: out = x + post_norm(Wo . attn(rope(q_norm(q)), rope(k_norm(k)), v_norm(v)))
 *              with q, k, v = Wq, Wk, Wv . norm(x); new K/V stored into the cache first
 *   ffn:       out = residual + post_norm(Wdown . (gelu_tanh(Wgate . n) * (Wup . n))), n = norm(h)
 *   moe:       out = post_norm(sum_k w_k expert_k(pre_norm(h))), the k experts and weights w_k from
 *              softmax(W_router (rms(h) * router_scale / sqrt(n_embd))): top k, renormalised,
 *              times the expert's scale
 *
 * Portable C and no SIMD of its own: the products, float ops, KV codecs and threads it calls
 * are api.c's, ops.c's, kv.c's and threads.c's (which bring the SIMD versions); what is here is
 * the order of those calls and the small loops between them (q/k norm with RoPE, residuals,
 * the router's softmax and top k).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "tl_internal.h"

static int weight_ok(const tl_weight *w) { return w->data != NULL; }

static int matmul_weights(const tl_weight *const *ws, int n, const float *x, int64_t n_tok, float *const *ys) {
    int types[8];
    const void *ptrs[8];
    int64_t row_bytes[8], rows[8];
    for (int i = 0; i < n; i++) {
        types[i] = ws[i]->type;
        ptrs[i] = ws[i]->data;
        row_bytes[i] = ws[i]->row_bytes;
        rows[i] = ws[i]->n_rows;
    }
    return tl_matmul_multi(n, types, ptrs, row_bytes, rows, ws[0]->n_cols, x, n_tok, ys);
}

/* per-head RMSNorm (optional weight) then NeoX rotation with cos/sin rows [n_tok, d] */
static void norm_rope(float *x, int64_t n_tok, int64_t n_head, int64_t d, const float *w, float eps,
                      const float *cos, const float *sin) {
    const int64_t half = d / 2;
    for (int64_t t = 0; t < n_tok; t++) {
        for (int64_t h = 0; h < n_head; h++) {
            float *v = x + (t * n_head + h) * d;
            tl_rms_norm(v, w, v, 1, d, eps);
            if (cos == NULL) continue;
            const float *c = cos + t * d, *s = sin + t * d;
            for (int64_t i = 0; i < half; i++) {
                const float a = v[i], b = v[i + half];
                v[i] = a * c[i] - b * s[i];
                v[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}

int tl_attention_block(const tl_attn_desc *b, const float *x, int64_t n_tok, const float *cos, const float *sin,
                       const tl_kv_codec *kc, const tl_kv_codec *vc, const void *k_slots, const void *v_slots,
                       const int64_t *slot_pos, int64_t n_slots, void *tail_k, void *tail_v, const int64_t *tail_pos,
                       int64_t n_tail, int store, const tl_key_cond *kcond, const tl_kv_exact *exact,
                       const int64_t *q_pos, float *out) {
    const int64_t D = b->n_embd, hd = b->head_dim, q_dim = b->n_head * hd, kv_dim = b->n_kv * hd;
    if (store && n_tail != n_tok) return -2;  /* bad shape: a storing layer's tail is its new tokens */
    float *a = malloc(sizeof(float) * (size_t)(n_tok * D));
    float *q = malloc(sizeof(float) * (size_t)(n_tok * q_dim));
    float *att = malloc(sizeof(float) * (size_t)(n_tok * q_dim));
    float *k = malloc(sizeof(float) * (size_t)(n_tok * kv_dim));
    float *v = malloc(sizeof(float) * (size_t)(n_tok * kv_dim));
    float *o = malloc(sizeof(float) * (size_t)(n_tok * D));
    int rc = (a && q && att && k && v && o) ? 0 : -3;
    if (rc == 0) {
        tl_rms_norm(x, b->norm, a, n_tok, D, b->eps);
        if (store) {
            const tl_weight *ws[3] = {&b->wq, &b->wk, &b->wv};
            float *ys[3] = {q, k, v};
            rc = matmul_weights(ws, weight_ok(&b->wv) ? 3 : 2, a, n_tok, ys);
            if (rc == 0 && !weight_ok(&b->wv)) memcpy(v, k, sizeof(float) * (size_t)(n_tok * kv_dim));  /* V = raw K */
        } else {
            const tl_weight *ws[1] = {&b->wq};
            float *ys[1] = {q};
            rc = matmul_weights(ws, 1, a, n_tok, ys);
        }
    }
    if (rc == 0) norm_rope(q, n_tok, b->n_head, hd, b->q_norm, b->eps, cos, sin);
    if (rc == 0 && store) {
        norm_rope(k, n_tok, b->n_kv, hd, b->k_norm, b->eps, cos, sin);
        if (b->v_norm) tl_rms_norm(v, NULL, v, n_tok * b->n_kv, hd, b->eps);
        static const tl_kv_codec f16 = {TL_F16, 0, 0, NULL, NULL, 0};
        if (exact && (tl_kv_encode(&f16, k, n_tok * b->n_kv, hd, (void *)exact->segs[1].k) ||
                      tl_kv_encode(&f16, v, n_tok * b->n_kv, hd, (void *)exact->segs[1].v)))
            rc = -4;  /* the f16 rows are the keys before their conditioning */
        /* quantized keys in their coded form; the conditioning was set by the sequence's first
         * step (kernels/fast.py runs that one in PyTorch, kv/conditioning.py) */
        if (kcond) tl_condition_keys(kcond, tail_pos, n_tok, b->n_kv, hd, k);
        if (rc == 0 && (tl_kv_encode(kc, k, n_tok * b->n_kv, hd, tail_k) || tl_kv_encode(vc, v, n_tok * b->n_kv, hd, tail_v)))
            rc = -4;
    }
    if (rc == 0) {
        const tl_kv_segment segs[2] = {{k_slots, v_slots, slot_pos, n_slots}, {tail_k, tail_v, tail_pos, n_tail}};
        rc = tl_attention_kv(q, q_pos, n_tok, b->n_head, b->n_kv, hd, kc, vc, kcond, exact, segs, 2, b->scale,
                             b->window, b->softcap, att);
    }
    if (rc == 0) {
        const tl_weight *ws[1] = {&b->wo};
        float *ys[1] = {o};
        rc = matmul_weights(ws, 1, att, n_tok, ys);
    }
    if (rc == 0) {
        tl_rms_norm(o, b->post_norm, o, n_tok, D, b->eps);
        for (int64_t i = 0; i < n_tok * D; i++) out[i] = x[i] + o[i];
    }
    free(a); free(q); free(att); free(k); free(v); free(o);
    return rc;
}

int tl_ffn_block(const tl_ffn_desc *b, const float *h, int64_t n_tok, const float *residual, float *out) {
    const int64_t D = b->n_embd, F = b->gate.n_rows;
    float *n = malloc(sizeof(float) * (size_t)(n_tok * D));
    float *g = malloc(sizeof(float) * (size_t)(n_tok * F));
    float *u = malloc(sizeof(float) * (size_t)(n_tok * F));
    int rc = (n && g && u) ? 0 : -3;
    if (rc == 0) {
        tl_rms_norm(h, b->norm, n, n_tok, D, b->eps);
        const tl_weight *ws[2] = {&b->gate, &b->up};
        float *ys[2] = {g, u};
        rc = matmul_weights(ws, 2, n, n_tok, ys);
    }
    if (rc == 0) {
        tl_gelu_mul(g, u, g, n_tok * F);
        const tl_weight *ws[1] = {&b->down};
        float *ys[1] = {n};  /* reuse: D floats per token */
        rc = matmul_weights(ws, 1, g, n_tok, ys);
    }
    if (rc == 0) {
        tl_rms_norm(n, b->post_norm, out, n_tok, D, b->eps);
        if (residual) for (int64_t i = 0; i < n_tok * D; i++) out[i] += residual[i];
    }
    free(n); free(g); free(u);
    return rc;
}

/* ---- Mixture of Experts ------------------------------------------------------------------------ */

typedef struct {
    const float *router, *r;
    int64_t n_embd, n_expert, n_tok;
    float *logits;
} router_job;

static void router_task(void *vctx, int ith, int nth) {
    router_job *j = vctx;
    const int64_t n = j->n_tok * j->n_expert;
    for (int64_t i = n * ith / nth; i < n * (ith + 1) / nth; i++) {
        const int64_t t = i / j->n_expert, e = i % j->n_expert;
        j->logits[i] = tl_dot_f32(j->router + e * j->n_embd, j->r + t * j->n_embd, j->n_embd);
    }
}

/* softmax over n probabilities, then the k largest (the lower id first among equals),
 * renormalised to sum 1 and times the expert's scale */
static void choose_experts(const float *logits, int64_t n, int64_t k, const float *expert_scale, float *p,
                           int32_t *ids, float *weights) {
    float top = logits[0], sum = 0.0f;
    for (int64_t e = 1; e < n; e++) top = logits[e] > top ? logits[e] : top;
    for (int64_t e = 0; e < n; e++) { p[e] = expf(logits[e] - top); sum += p[e]; }
    for (int64_t e = 0; e < n; e++) p[e] /= sum;
    float chosen = 0.0f;
    for (int64_t s = 0; s < k; s++) {
        int64_t best = -1;
        for (int64_t e = 0; e < n; e++) {
            int taken = 0;
            for (int64_t u = 0; u < s; u++) taken |= ids[u] == e;
            if (!taken && (best < 0 || p[e] > p[best])) best = e;
        }
        ids[s] = (int32_t)best;
        weights[s] = p[best];
        chosen += p[best];
    }
    for (int64_t s = 0; s < k; s++) {
        weights[s] /= chosen;
        if (expert_scale) weights[s] *= expert_scale[ids[s]];
    }
}

int tl_moe_block(const tl_moe_desc *b, const float *h, int64_t n_tok, float *out) {
    const int64_t D = b->n_embd, F = b->n_ff, E = b->n_expert, K = b->n_used, G = b->gate.n_rows;
    const int fused = b->up.data == NULL;
    float *r = malloc(sizeof(float) * (size_t)(n_tok * D));
    float *logits = malloc(sizeof(float) * (size_t)(n_tok * E)), *p = malloc(sizeof(float) * (size_t)E);
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)(n_tok * K));
    float *weights = malloc(sizeof(float) * (size_t)(n_tok * K));
    float *g = malloc(sizeof(float) * (size_t)(n_tok * K * G));
    float *u = fused ? NULL : malloc(sizeof(float) * (size_t)(n_tok * K * F));
    float *a = malloc(sizeof(float) * (size_t)(n_tok * K * F));
    float *d = malloc(sizeof(float) * (size_t)(n_tok * K * D));
    int rc = (r && logits && p && ids && weights && g && (fused || u) && a && d) ? 0 : -3;
    if (rc == 0) {
        /* route: the same float operations, in the same order, as blocks.route */
        const float inv_sqrt = 1.0f / sqrtf((float)D);
        tl_rms_norm(h, NULL, r, n_tok, D, b->eps);
        for (int64_t i = 0; i < n_tok * D; i++) r[i] = r[i] * b->router_scale[i % D] * inv_sqrt;
        router_job job = {b->router, r, D, E, n_tok, logits};
        tl_parallel(router_task, &job);
        for (int64_t t = 0; t < n_tok; t++)
            choose_experts(logits + t * E, E, K, b->expert_scale, p, ids + t * K, weights + t * K);
        /* the experts */
        tl_rms_norm(h, b->pre_norm, r, n_tok, D, b->eps);
        rc = tl_matmul_id(b->gate.type, b->gate.data, b->gate_expert_bytes, b->gate.row_bytes, G, D, ids, n_tok, K, r, 0, g);
        if (rc == 0 && !fused)
            rc = tl_matmul_id(b->up.type, b->up.data, b->up_expert_bytes, b->up.row_bytes, F, D, ids, n_tok, K, r, 0, u);
    }
    if (rc == 0) {
        for (int64_t i = 0; i < n_tok * K; i++) {
            const float *gi = g + i * G, *ui = fused ? gi + F : u + i * F;
            tl_gelu_mul(gi, ui, a + i * F, F);
        }
        rc = tl_matmul_id(b->down.type, b->down.data, b->down_expert_bytes, b->down.row_bytes, D, F, ids, n_tok, K, a, 1, d);
    }
    if (rc == 0) {
        for (int64_t t = 0; t < n_tok; t++) {
            float *o = r + t * D;  /* reuse */
            for (int64_t i = 0; i < D; i++) o[i] = 0.0f;
            for (int64_t s = 0; s < K; s++) tl_axpy_f32(weights[t * K + s], d + (t * K + s) * D, o, D);
        }
        tl_rms_norm(r, b->post_norm, out, n_tok, D, b->eps);
    }
    free(r); free(logits); free(p); free(ids); free(weights); free(g); free(u); free(a); free(d);
    return rc;
}
