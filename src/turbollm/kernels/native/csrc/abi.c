/* The layout of the public structs (tl.h), as this compiler laid them out, for the Python
 * binding to check its ctypes Structures against at load: a Structure that differs from its
 * C struct (a field missing, moved or of another size) would pass wrong pointers and sizes to
 * every call, so the binding refuses to load instead (kernels/native/__init__.py, _check_structs).
 *
 * What is here: sizeof of every struct ctypes passes, and its fields in declaration order
 * with offsetof and sizeof. What is not: any computation; the block layouts and kernel tables
 * (tl_internal.h), which Python never sees.
 */
#include <stddef.h>
#include <string.h>

#include "tl.h"

typedef struct {
    const char *name;
    int64_t size;
} struct_size;

typedef struct {
    const char *type, *field;
    int64_t offset, size;
} struct_field;

#define SIZE(s) {#s, (int64_t)sizeof(s)}
#define FIELD(s, f) {#s, #f, (int64_t)offsetof(s, f), (int64_t)sizeof(((s *)0)->f)}

static const struct_size sizes[] = {
    SIZE(tl_weight), SIZE(tl_attn_desc), SIZE(tl_ffn_desc), SIZE(tl_moe_desc),
    SIZE(tl_kv_codec), SIZE(tl_kv_segment), SIZE(tl_key_cond), SIZE(tl_kv_exact),
};

/* every field of every struct above, each struct's in declaration order */
static const struct_field fields[] = {
    FIELD(tl_weight, type), FIELD(tl_weight, data), FIELD(tl_weight, row_bytes), FIELD(tl_weight, n_rows),
    FIELD(tl_weight, n_cols),

    FIELD(tl_attn_desc, wq), FIELD(tl_attn_desc, wk), FIELD(tl_attn_desc, wv), FIELD(tl_attn_desc, wo),
    FIELD(tl_attn_desc, norm), FIELD(tl_attn_desc, q_norm), FIELD(tl_attn_desc, k_norm),
    FIELD(tl_attn_desc, post_norm), FIELD(tl_attn_desc, n_embd), FIELD(tl_attn_desc, n_head),
    FIELD(tl_attn_desc, n_kv), FIELD(tl_attn_desc, head_dim), FIELD(tl_attn_desc, v_norm),
    FIELD(tl_attn_desc, scale), FIELD(tl_attn_desc, eps), FIELD(tl_attn_desc, softcap), FIELD(tl_attn_desc, window),

    FIELD(tl_ffn_desc, gate), FIELD(tl_ffn_desc, up), FIELD(tl_ffn_desc, down), FIELD(tl_ffn_desc, norm),
    FIELD(tl_ffn_desc, post_norm), FIELD(tl_ffn_desc, n_embd), FIELD(tl_ffn_desc, eps),

    FIELD(tl_moe_desc, router), FIELD(tl_moe_desc, router_scale), FIELD(tl_moe_desc, expert_scale),
    FIELD(tl_moe_desc, pre_norm), FIELD(tl_moe_desc, post_norm), FIELD(tl_moe_desc, gate), FIELD(tl_moe_desc, up),
    FIELD(tl_moe_desc, down), FIELD(tl_moe_desc, gate_expert_bytes), FIELD(tl_moe_desc, up_expert_bytes),
    FIELD(tl_moe_desc, down_expert_bytes), FIELD(tl_moe_desc, n_embd), FIELD(tl_moe_desc, n_ff),
    FIELD(tl_moe_desc, n_expert), FIELD(tl_moe_desc, n_used), FIELD(tl_moe_desc, eps),

    FIELD(tl_kv_codec, type), FIELD(tl_kv_codec, bits), FIELD(tl_kv_codec, block), FIELD(tl_kv_codec, codebook),
    FIELD(tl_kv_codec, signs), FIELD(tl_kv_codec, keep_length),

    FIELD(tl_kv_segment, k), FIELD(tl_kv_segment, v), FIELD(tl_kv_segment, pos), FIELD(tl_kv_segment, n),

    FIELD(tl_key_cond, offset), FIELD(tl_key_cond, scale), FIELD(tl_key_cond, rot_offset),
    FIELD(tl_key_cond, rope_freq),

    FIELD(tl_kv_exact, segs), FIELD(tl_kv_exact, n_segs), FIELD(tl_kv_exact, sink), FIELD(tl_kv_exact, recent),
    FIELD(tl_kv_exact, exact_from),
};

/* The table lists every field: in each struct the first listed field is at offset 0, each next
 * one starts where the one before it ends (rounded up to its alignment), and the struct ends
 * after the last (rounded up to its own alignment). A field added to a struct in tl.h and not
 * here fails to compile, unless it fits in padding that the fields around it leave. */
#define ALIGN_UP(n, a) (((n) + (a) - 1) / (a) * (a))
#define END(s, f) (offsetof(s, f) + sizeof(((s *)0)->f))
#define FIRST(s, f) _Static_assert(offsetof(s, f) == 0, #s "." #f " is not its first field")
#define NEXT(s, a, b) \
    _Static_assert(offsetof(s, b) == ALIGN_UP(END(s, a), _Alignof(__typeof__(((s *)0)->b))), \
                   #s "." #b " does not follow " #a ": a field between them is missing from the table")
#define LAST(s, f) _Static_assert(sizeof(s) == ALIGN_UP(END(s, f), _Alignof(s)), #s "." #f " is not its last field")

FIRST(tl_weight, type); NEXT(tl_weight, type, data); NEXT(tl_weight, data, row_bytes);
NEXT(tl_weight, row_bytes, n_rows); NEXT(tl_weight, n_rows, n_cols); LAST(tl_weight, n_cols);
FIRST(tl_attn_desc, wq); NEXT(tl_attn_desc, wq, wk); NEXT(tl_attn_desc, wk, wv); NEXT(tl_attn_desc, wv, wo);
NEXT(tl_attn_desc, wo, norm); NEXT(tl_attn_desc, norm, q_norm); NEXT(tl_attn_desc, q_norm, k_norm);
NEXT(tl_attn_desc, k_norm, post_norm); NEXT(tl_attn_desc, post_norm, n_embd);
NEXT(tl_attn_desc, n_embd, n_head); NEXT(tl_attn_desc, n_head, n_kv); NEXT(tl_attn_desc, n_kv, head_dim);
NEXT(tl_attn_desc, head_dim, v_norm); NEXT(tl_attn_desc, v_norm, scale); NEXT(tl_attn_desc, scale, eps);
NEXT(tl_attn_desc, eps, softcap); NEXT(tl_attn_desc, softcap, window); LAST(tl_attn_desc, window);
FIRST(tl_ffn_desc, gate); NEXT(tl_ffn_desc, gate, up); NEXT(tl_ffn_desc, up, down);
NEXT(tl_ffn_desc, down, norm); NEXT(tl_ffn_desc, norm, post_norm); NEXT(tl_ffn_desc, post_norm, n_embd);
NEXT(tl_ffn_desc, n_embd, eps); LAST(tl_ffn_desc, eps);
FIRST(tl_moe_desc, router); NEXT(tl_moe_desc, router, router_scale);
NEXT(tl_moe_desc, router_scale, expert_scale); NEXT(tl_moe_desc, expert_scale, pre_norm);
NEXT(tl_moe_desc, pre_norm, post_norm); NEXT(tl_moe_desc, post_norm, gate); NEXT(tl_moe_desc, gate, up);
NEXT(tl_moe_desc, up, down); NEXT(tl_moe_desc, down, gate_expert_bytes);
NEXT(tl_moe_desc, gate_expert_bytes, up_expert_bytes); NEXT(tl_moe_desc, up_expert_bytes, down_expert_bytes);
NEXT(tl_moe_desc, down_expert_bytes, n_embd); NEXT(tl_moe_desc, n_embd, n_ff);
NEXT(tl_moe_desc, n_ff, n_expert); NEXT(tl_moe_desc, n_expert, n_used); NEXT(tl_moe_desc, n_used, eps);
LAST(tl_moe_desc, eps);
FIRST(tl_kv_codec, type); NEXT(tl_kv_codec, type, bits); NEXT(tl_kv_codec, bits, block);
NEXT(tl_kv_codec, block, codebook); NEXT(tl_kv_codec, codebook, signs); NEXT(tl_kv_codec, signs, keep_length);
LAST(tl_kv_codec, keep_length);
FIRST(tl_kv_segment, k); NEXT(tl_kv_segment, k, v); NEXT(tl_kv_segment, v, pos); NEXT(tl_kv_segment, pos, n);
LAST(tl_kv_segment, n);
FIRST(tl_key_cond, offset); NEXT(tl_key_cond, offset, scale); NEXT(tl_key_cond, scale, rot_offset);
NEXT(tl_key_cond, rot_offset, rope_freq); LAST(tl_key_cond, rope_freq);
FIRST(tl_kv_exact, segs); NEXT(tl_kv_exact, segs, n_segs); NEXT(tl_kv_exact, n_segs, sink);
NEXT(tl_kv_exact, sink, recent); NEXT(tl_kv_exact, recent, exact_from); LAST(tl_kv_exact, exact_from);

int64_t tl_struct_size(const char *name) {
    if (name == NULL) return -1;
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
        if (strcmp(sizes[i].name, name) == 0) return sizes[i].size;
    return -1;
}

const char *tl_struct_field(const char *name, int i, int64_t *offset, int64_t *size) {
    if (name == NULL || i < 0) return NULL;
    int k = 0;
    for (size_t j = 0; j < sizeof fields / sizeof fields[0]; j++) {
        if (strcmp(fields[j].type, name) != 0) continue;
        if (k++ < i) continue;
        if (offset != NULL) *offset = fields[j].offset;
        if (size != NULL) *size = fields[j].size;
        return fields[j].field;
    }
    return NULL;
}
