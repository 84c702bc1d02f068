"""The native CPU kernels against the PyTorch reference, on every code path the CPU has
(portable C, AVX2, AVX-512 VNNI).

Decode products quantize activations to 8-bit blocks, so they differ from the float reference
by at most half a quantization step per activation: for every output,
    |native - reference| <= sum over blocks of (sum |w| in the block) * amax(x in block) / 254
plus float rounding. The two code paths compute the same integer sums and must agree to float
rounding. Dequantization, grouped expert products and the fused blocks have exact or tight
twins to compare with.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from turbollm.kernels import blocks, fast, native, reference
from turbollm.kernels.attention import attention as reference_attention
from turbollm.kernels.qtensor import QTensor

pytestmark = pytest.mark.skipif(not native.available(), reason="native kernels not built")

NATIVE_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS, Q.IQ3_S]
F16_AT = {Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2],
          Q.Q6_K: [208], Q.IQ4_NL: [0], Q.IQ4_XS: [0], Q.IQ3_S: [0]}
BEST_LEVEL = native.set_simd(len(native.SIMD_NAMES) - 1) if native.available() else 0
SIMD_LEVELS = list(range(BEST_LEVEL + 1))


@pytest.fixture(params=SIMD_LEVELS, ids=lambda level: ["portable", "avx2", "vnni"][level])
def simd(request):
    assert native.set_simd(request.param) == request.param
    yield request.param
    native.set_simd(BEST_LEVEL)


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"{n}threads")
def threads(request):
    before = native.num_threads()
    native.set_num_threads(request.param)
    yield request.param
    native.set_num_threads(before)


def random_weight(qtype: Q, n_rows: int, n_cols: int, seed: int = 0, n_expert: int | None = None) -> QTensor:
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[qtype]
    n = (n_expert or 1) * n_rows * n_cols // block
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    for at in F16_AT[qtype]:
        raw[:, at:at + 2] = (rng.standard_normal(n) * 0.01).astype(np.float16).view(np.uint8).reshape(n, 2)
    shape = (n_rows, n_cols) if n_expert is None else (n_expert, n_rows, n_cols)
    return QTensor(torch.from_numpy(raw).reshape(*shape[:-1], -1), qtype, shape, f"random {qtype.name}")


def activation_block(qtype: Q) -> int:
    return 256 if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_XS, Q.IQ3_S) else 32


def quantization_bound(w: torch.Tensor, x: torch.Tensor, block: int) -> torch.Tensor:
    """[T, N] bound on |W x - W x_q| from rounding x to 8-bit blocks (half a step each)."""
    n_rows, k = w.shape
    amax = x.abs().view(x.shape[0], k // block, block).amax(-1)  # [T, blocks]
    wsum = w.abs().view(n_rows, k // block, block).sum(-1)  # [N, blocks]
    return (amax / 254.0) @ wsum.T


# (rows, cols): one row, rows not a multiple of the chunk (16) or of the thread count, smallest K
SHAPES = [(1, 256), (7, 256), (33, 512), (100, 768)]


BLOCK_32_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.IQ4_NL]
# K of 3 and 22 blocks: kernels that step eight blocks at a time end on a partial step
SHAPES_32 = [(5, 96), (9, 704)]


@pytest.mark.parametrize("qtype, n_rows, n_cols",
                         [(q, r, c) for q in NATIVE_TYPES for r, c in SHAPES]
                         + [(q, r, c) for q in BLOCK_32_TYPES for r, c in SHAPES_32],
                         ids=lambda v: v.name if isinstance(v, Q) else str(v))
def test_matmul_within_activation_quantization_bound(qtype, n_rows, n_cols, simd, threads):
    w = random_weight(qtype, n_rows, n_cols, seed=n_rows)
    x = torch.randn(3, n_cols, generator=torch.Generator().manual_seed(n_cols))
    y = native.matmul(x, w)
    wd = w.dequantize()
    ref = x @ wd.T
    bound = quantization_bound(wd, x, activation_block(qtype))
    slack = 1e-4 * (x.abs() @ wd.abs().T) + 1e-6
    if qtype in (Q.Q4_1, Q.Q5_1):  # the q8_1 block sum is stored as fp16: 2^-11 of |m| * |s| per block
        slack = slack + 2.0 ** -10 * (x.abs() @ wd.abs().T)
    assert ((y - ref).abs() <= bound + slack).all()


@pytest.mark.parametrize("qtype", NATIVE_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("level", SIMD_LEVELS[1:], ids=lambda level: ["portable", "avx2", "vnni"][level])
def test_simd_and_portable_paths_agree(qtype, level):
    w = random_weight(qtype, 40, 1024, seed=3)
    x = torch.randn(2, 1024, generator=torch.Generator().manual_seed(4))
    native.set_simd(0)
    portable = native.matmul(x, w)
    native.set_simd(level)
    fast_path = native.matmul(x, w)
    native.set_simd(BEST_LEVEL)
    scale = (x.abs() @ w.dequantize().abs().T)
    assert ((portable - fast_path).abs() <= 1e-5 * scale + 1e-6).all()


@pytest.mark.parametrize("qtype", BLOCK_32_TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("last", range(1, 8))
def test_a_rows_last_partial_step_of_each_length(qtype, last, simd):
    """Rows of 8 + `last` blocks: the eight-block kernels end on a step of `last` blocks
    (compiled for each length); every code path within the activation rounding bound."""
    n_cols = 32 * (8 + last)
    w = random_weight(qtype, 19, n_cols, seed=last)
    x = torch.randn(5, n_cols, generator=torch.Generator().manual_seed(last))
    wd = w.dequantize()
    slack = 1e-4 * (x.abs() @ wd.abs().T) + 1e-6
    if qtype in (Q.Q4_1, Q.Q5_1):
        slack = slack + 2.0 ** -10 * (x.abs() @ wd.abs().T)
    assert ((native.matmul(x, w) - x @ wd.T).abs() <= quantization_bound(wd, x, 32) + slack).all()


def test_products_do_not_depend_on_the_thread_count_or_who_computed_a_row():
    """Threads steal row chunks from each other's ranges: which thread computes a chunk
    varies from call to call, its result must not."""
    w = random_weight(Q.Q4_0, 16 * 97 + 5, 512, seed=13)
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(14))
    before = native.num_threads()
    try:
        native.set_num_threads(1)
        alone = native.matmul(x, w)
        for n in (2, 3, 5):
            native.set_num_threads(n)
            for _ in range(5):
                assert torch.equal(native.matmul(x, w), alone)
    finally:
        native.set_num_threads(before)


@pytest.mark.parametrize("qtype", NATIVE_TYPES, ids=lambda q: q.name)
def test_dequantize_is_bit_exact(qtype, simd):
    w = random_weight(qtype, 37, 512, seed=5)
    assert torch.equal(native.dequantize(w), w.dequantize())
    assert torch.equal(native.dequantize(w, slice(5, 21)), w.dequantize()[5:21])
    assert torch.equal(native.dequantize(w, dtype=torch.bfloat16), w.dequantize().to(torch.bfloat16))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q6_K], ids=lambda q: q.name)
def test_bfloat16_dequantize_of_rows_longer_than_its_buffer(qtype):
    w = random_weight(qtype, 3, 4096 + 512, seed=9)  # the C side converts 4096 elements at a time
    assert torch.equal(native.dequantize(w, dtype=torch.bfloat16), w.dequantize().to(torch.bfloat16))


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q8_0, Q.Q4_K, Q.Q6_K, Q.IQ3_S], ids=lambda q: q.name)
def test_matmul_many_equals_separate_products(qtype, threads):
    ws = [random_weight(qtype, rows, 512, seed=rows) for rows in (48, 17, 1)] + [random_weight(Q.Q8_0, 9, 512)]
    x = torch.randn(2, 512)
    for y, w in zip(native.matmul_many(x, ws), ws):
        assert torch.equal(y, native.matmul(x, w))


@pytest.mark.parametrize("qtype", NATIVE_TYPES, ids=lambda q: q.name)
def test_a_tokens_product_does_not_depend_on_the_others(qtype, simd):
    """Several tokens in one call (kernels that decode each weight block once for four
    tokens) give each token exactly what it gets alone."""
    n_cols = 704 if qtype in BLOCK_32_TYPES else 512  # 22 blocks: a partial last step
    w = random_weight(qtype, 21, n_cols, seed=11)
    x = torch.randn(9, n_cols, generator=torch.Generator().manual_seed(12))  # two groups of four and one more
    together = native.matmul(x, w)
    assert ((together - x @ w.dequantize().T).abs() <= 1e-2 * (x.abs() @ w.dequantize().abs().T) + 1e-5).all()
    for t in range(9):
        assert torch.equal(together[t], native.matmul(x[t:t + 1].contiguous(), w)[0])


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_K, Q.Q8_0], ids=lambda q: q.name)
@pytest.mark.parametrize("per_slot", [False, True])
def test_expert_matmul_equals_one_product_per_expert(qtype, per_slot, threads):
    n_expert, n_rows, n_cols, n_tok, k = 6, 24, 256, 7, 3
    w = random_weight(qtype, n_rows, n_cols, seed=7, n_expert=n_expert)
    # expert 3 gets 6 pairs, expert 0 five: groups of four and a remainder
    ids = torch.tensor([[0, 5, 2], [2, 2, 1], [5, 0, 3], [4, 1, 0], [3, 3, 3], [0, 3, 1], [3, 0, 2]], dtype=torch.int32)
    x = torch.randn(n_tok * k if per_slot else n_tok, n_cols)
    y = native.matmul_id(x, w, ids, x_per_slot=per_slot)
    for t in range(n_tok):
        for s in range(k):
            row = x[t * k + s] if per_slot else x[t]
            assert torch.equal(y[t, s], native.matmul(row[None].contiguous(), w.select(int(ids[t, s])))[0])


# sha256 of ggml's ggml_table_gelu_f16 (65536 little-endian fp16 values), read out of
# llama.cpp's libggml-cpu.so (build 11434, x86-64, -march=native with FMA) after ggml_cpu_init
GGML_GELU_TABLE_SHA256 = "5eceda6f287dec9dc0bcfa24516d6744a031a5c52d1984688b4558aeb1daf909"


def test_gelu_table_is_ggmls_bit_for_bit():
    """The fast backend's GELU is llama.cpp's: every entry of the table equals ggml's."""
    import hashlib
    assert hashlib.sha256(native.gelu_table().astype("<u2").tobytes()).hexdigest() == GGML_GELU_TABLE_SHA256


def test_gelu_mul_is_the_fp16_table_lookup(simd):
    """gelu(g) * u looks up fp16(g) (nearest even) in the table, zero at or below -10 and the
    identity at or above 10, times u, on every code path and any length (the vector loop's tail);
    the table is within fp16 rounding of the exact tanh-form GELU."""
    g = torch.cat([torch.linspace(-12, 12, 20001), torch.tensor([0.0, -0.0, 1e-30, -10.0, 10.0, 200.0, -200.0])])
    u = torch.randn(g.shape, generator=torch.Generator().manual_seed(2))
    table = torch.from_numpy(native.gelu_table().view(np.float16).astype(np.float32))
    idx = torch.from_numpy(g.to(torch.float16).numpy().view(np.uint16).astype(np.int64))
    want = torch.where(g <= -10, 0.0, torch.where(g >= 10, g, table[idx]))
    for n in (len(g), len(g) - 3, 7):
        assert torch.equal(native.gelu_mul(g[:n].contiguous(), u[:n].contiguous()), want[:n] * u[:n])
    # each entry is the tanh-form GELU of its fp16 input, rounded to fp16 (half an ulp: 2^-11
    # relative, 2^-25 absolute among fp16 subnormals), plus what ggml's float32 formula loses
    # where 1 + tanh(z) cancels in the negative tail (half an ulp of 1, times |x| / 2)
    inside = g.abs() < 10
    x16 = g.to(torch.float16).double()[inside]
    exact_at_input = F.gelu(x16, approximate="tanh")
    bound = 2.0 ** -11 * exact_at_input.abs() + 2.0 ** -25 + torch.where(x16 < -2, x16.abs() * 2.0 ** -24, 0.0)
    assert ((want[inside].double() - exact_at_input).abs() <= bound).all()


def test_moe_ffn_fast_within_quantization_noise_of_reference():
    x = torch.randn(4, 256)
    gate_up = random_weight(Q.Q8_0, 64, 256, seed=1, n_expert=8)
    down = random_weight(Q.Q8_0, 256, 32, seed=2, n_expert=8)
    ids = torch.tensor([[0, 3], [7, 3], [1, 2], [5, 6]])
    weights = torch.rand(4, 2)
    ref = reference.moe_ffn(x, ids, weights, gate_up, None, down)
    out = fast.moe_ffn(x, ids, weights, gate_up, None, down)
    assert torch.allclose(out, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


@pytest.mark.parametrize("n_tok, window, softcap", [(1, 0, 0.0), (3, 5, 0.0), (1, 4, 30.0), (2, 0, 50.0)])
def test_attention_matches_reference(n_tok, window, softcap, threads):
    g = torch.Generator().manual_seed(n_tok)
    n_keys, n_head, n_kv, d = 11, 8, 2, 64
    q = torch.randn(n_tok, n_head, d, generator=g)
    k = torch.randn(n_keys, n_kv, d, generator=g)
    v = torch.randn(n_keys, n_kv, d, generator=g)
    k_pos = torch.arange(n_keys)
    k_pos[3] = -1  # an empty slot is never visible
    q_pos = torch.arange(n_keys - n_tok, n_keys)
    ref = reference_attention(q, k, v, q_pos, k_pos, 0.125, window, softcap)
    out = native.attention(q, k, v, q_pos, k_pos, 0.125, window, softcap)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_rms_norm_matches_reference():
    x, w = torch.randn(5, 640), torch.randn(640)
    assert torch.allclose(native.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6), atol=1e-5, rtol=1e-5)
    assert torch.allclose(native.rms_norm(x, None, 1e-6), reference.rms_norm(x, None, 1e-6), atol=1e-5, rtol=1e-5)


def ROPE_FREQ(d: int) -> torch.Tensor:
    return 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)


def _cache_step(cache_type: str, n_before: int, n_new: int, n_kv: int, d: int, store: bool, window: int = 0):
    """A one-layer cache holding `n_before` committed tokens, in a step of `n_new` more: the
    layer's KVSlots. A reading (KV-shared) layer finds its tail filled, as its source leaves it.
    Quantized caches keep the first and the latest 3 positions at f16 (kv/plan.py), so a query
    reads some keys from f16 rows and the rest from coded rows."""
    from turbollm.kv.cache import KVCache
    from turbollm.kv.plan import CacheConfig, LayerKVShape, plan_kv
    cache = KVCache(plan_kv([LayerKVShape(n_kv, d, window)], 32, CacheConfig(cache_type, cache_type, recent=3, sink=1)),
                    rope_freqs=[ROPE_FREQ(d)])
    g = torch.Generator().manual_seed(9)
    if n_before:
        cache.begin(n_before)
        cache.slots(0).write(torch.randn(n_before, n_kv, d, generator=g), torch.randn(n_before, n_kv, d, generator=g))
        cache.advance()
    cache.begin(n_new)
    slots = cache.slots(0, store=store)
    if not store:
        slots.write(torch.randn(n_new, n_kv, d, generator=g), torch.randn(n_new, n_kv, d, generator=g))
    return slots


@pytest.mark.parametrize("cache_type", ["f32", "f16", "q8_0", "q4_1", "iq4_nl", "turbo3"])
@pytest.mark.parametrize("store, with_v, window, n_before", [(True, True, 6, 7), (True, False, 0, 7), (False, True, 6, 7),
                                                             (True, True, 0, 0)])  # 0: the first step sets key offsets
def test_fused_attention_block_equals_composed(store, with_v, window, n_before, cache_type):
    d_model, n_head, n_kv, hd = 256, 4, 2, 128
    wq = random_weight(Q.Q8_0, n_head * hd, d_model, seed=1)
    wk = random_weight(Q.Q4_0, n_kv * hd, d_model, seed=2) if store else None
    wv = random_weight(Q.Q5_0, n_kv * hd, d_model, seed=3) if store and with_v else None
    wo = random_weight(Q.Q4_K, d_model, n_head * hd, seed=4)
    ones = lambda n: 1.0 + 0.1 * torch.randn(n)
    b = blocks.AttentionBlock(ones(d_model), wq, wk, wv, wo, ones(hd), ones(hd) if store else None, ones(d_model),
                              n_head, n_kv, hd, v_norm=True, scale=0.1, window=window, eps=1e-6)
    x = torch.randn(2, d_model)
    positions = torch.tensor([n_before, n_before + 1])
    angles = positions.float()[:, None] * ROPE_FREQ(hd)
    angles = torch.cat((angles, angles), -1)[:, None, :]
    rope = (angles.cos(), angles.sin())
    composed_slots = _cache_step(cache_type, n_before, 2, n_kv, hd, store, window)
    fused_slots = _cache_step(cache_type, n_before, 2, n_kv, hd, store, window)
    composed = blocks.attention_block(fast.FastBackend("fp32"), x, b, rope, composed_slots, positions)
    fused = fast.FastBackend("fp32").attention_block(x, b, rope, fused_slots, positions)
    assert torch.allclose(fused, composed, atol=2e-4, rtol=2e-4)
    # the C encoder wrote the bytes the reference encoder writes (the K/V inputs agree to ~1e-6)
    assert (fused_slots.tail_k != composed_slots.tail_k).float().mean() < 0.01
    assert (fused_slots.tail_v != composed_slots.tail_v).float().mean() < 0.01
    if store and composed_slots.exact_k is not None:  # and the f16 rows of the exact window
        assert (fused_slots.tail_exact_k != composed_slots.tail_exact_k).float().mean() < 0.01
        assert (fused_slots.tail_exact_v != composed_slots.tail_exact_v).float().mean() < 0.01
    if composed_slots.k_offset is not None:  # quantized keys: a first step set the same conditioning
        assert torch.allclose(fused_slots.k_offset, composed_slots.k_offset, atol=1e-5)
        assert torch.allclose(fused_slots.k_scale, composed_slots.k_scale, atol=1e-5)
        assert torch.allclose(fused_slots.k_rot_offset, composed_slots.k_rot_offset, atol=1e-5)
        assert int(fused_slots.k_offset_set[0]) == 1


def test_fused_ffn_block_equals_composed():
    d_model, ff = 256, 512
    b = blocks.FfnBlock(1 + 0.1 * torch.randn(d_model), random_weight(Q.Q5_0, ff, d_model, 1),
                        random_weight(Q.Q4_K, ff, d_model, 2), random_weight(Q.Q6_K, d_model, ff, 3),
                        1 + 0.1 * torch.randn(d_model), 1e-6)
    h = torch.randn(3, d_model)
    for residual in (None, h):
        ops = fast.FastBackend("fp32")
        assert torch.allclose(ops.ffn_block(h, b, residual), blocks.ffn_block(ops, h, b, residual), atol=1e-4, rtol=1e-4)


def test_real_model_weights_within_bound(gemma3_model):
    layer = gemma3_model.network.layers[0]
    weights = [layer.attn.wq, layer.attn.wv, layer.attn.wo, layer.ffn.down, gemma3_model.network.token_embd]
    assert {w.qtype for w in weights} >= {Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K}
    for w in weights:
        x = torch.randn(2, w.shape[1])
        wd = w.dequantize()
        bound = quantization_bound(wd, x, activation_block(w.qtype)) + 1e-4 * (x.abs() @ wd.abs().T)
        assert ((native.matmul(x, w) - x @ wd.T).abs() <= bound).all(), w.name


@pytest.mark.parametrize("fused", [True, False], ids=["gate_up", "gate+up"])
@pytest.mark.parametrize("n_tok", [1, 5])
def test_moe_block_native_within_quantization_noise_of_reference(fused, n_tok):
    n_expert, n_embd, n_ff = 16, 256, 64
    gen = torch.Generator().manual_seed(21)
    router = torch.randn(n_expert, n_embd, generator=gen)
    b = blocks.MoEBlock(
        router=QTensor(router.view(torch.uint8), Q.F32, (n_expert, n_embd), "router"),
        router_scale=torch.rand(n_embd, generator=gen) + 0.5,
        expert_scale=None if fused else torch.rand(n_expert, generator=gen) + 0.5,
        pre_norm=torch.rand(n_embd, generator=gen) + 0.5, post_norm=torch.rand(n_embd, generator=gen) + 0.5,
        gate=random_weight(Q.Q4_0, (2 if fused else 1) * n_ff, n_embd, seed=22, n_expert=n_expert),
        up=None if fused else random_weight(Q.Q8_0, n_ff, n_embd, seed=23, n_expert=n_expert),
        down=random_weight(Q.Q5_0, n_embd, n_ff, seed=24, n_expert=n_expert),
        n_used=4, eps=1e-6)
    h = torch.randn(n_tok, n_embd, generator=gen)
    ref = blocks.moe_block(reference.ReferenceBackend(), h, b)
    out = fast.FastBackend("fp32").moe_block(h, b)
    assert native.available() and fast._descs.get(b) is not None  # the native block ran
    assert torch.allclose(out, ref, rtol=0.05, atol=0.05 * ref.abs().max().item())
    # the output is normed per token: a wrong expert or weight moves it by far more than the noise
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.IQ4_NL, Q.Q4_K, Q.Q6_K])
@pytest.mark.parametrize("n_tok", [2, 3, 5, 6])
def test_each_row_of_a_batch_equals_that_row_alone(qtype, n_tok):
    """Batched decode and speculative verification rely on it: a row's result must not depend
    on how many rows share the call (four-row kernels, and the padded call for 2-3 rows)."""
    w = random_weight(qtype, 37, 512, seed=3)
    x = torch.randn(n_tok, 512)
    batch = native.matmul(x, w)
    for t in range(n_tok):
        assert torch.equal(batch[t], native.matmul(x[t:t + 1].contiguous(), w)[0])


def test_every_structure_the_binding_passes_has_the_c_layout():
    """Each ctypes Structure of the binding is checked at load against its C struct (abi.c):
    size, and every field's name, offset and size in order."""
    structures = {v for v in vars(native).values() if isinstance(v, type) and issubclass(v, ctypes.Structure)}
    assert structures == set(native._STRUCTS.values())  # a new Structure must be registered to be checked
    for c_name, cls in native._STRUCTS.items():
        size, fields = native._c_layout(native._lib, c_name)
        assert size == ctypes.sizeof(cls) and [f[0] for f in fields] == [f[0] for f in cls._fields_], c_name
        assert native._struct_mismatch(c_name, cls) is None
    assert native._check_structs(native._lib) is None
    assert native._lib.tl_struct_size(b"no_such_struct") == -1
    assert native._lib.tl_struct_field(b"no_such_struct", 0, None, None) is None


def test_a_structure_unlike_its_c_struct_is_reported():
    class MissingLast(ctypes.Structure):  # tl_kv_codec without keep_length: 32 bytes, not 40
        _fields_ = native._KVCodec._fields_[:-1]

    class Swapped(ctypes.Structure):  # same size, two fields in the other order
        _fields_ = [native._KVCodec._fields_[i] for i in (0, 2, 1, 3, 4, 5)]

    class Renamed(ctypes.Structure):
        _fields_ = [("key", ctypes.c_void_p), *native._KVSegment._fields_[1:]]

    class Shorter(ctypes.Structure):  # the same size as tl_kv_segment, one field too few
        _fields_ = [("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("pos", ctypes.c_void_p * 2)]

    assert native._struct_mismatch("tl_kv_codec", MissingLast) == (
        "struct tl_kv_codec is 40 bytes in C but 32 in the binding's MissingLast")
    assert native._struct_mismatch("tl_kv_codec", Swapped) == (
        "struct tl_kv_codec field 1: C has bits at offset 4 (4 bytes), the binding's Swapped has block at offset 4 (4 bytes)")
    assert "field 0: C has k at offset 0 (8 bytes)" in native._struct_mismatch("tl_kv_segment", Renamed)
    assert native._struct_mismatch("tl_kv_segment", Shorter) == (
        "struct tl_kv_segment field 2: C has pos at offset 16 (8 bytes), the binding's Shorter has pos at offset 16 "
        "(16 bytes)")
    assert "no struct tl_nothing" in native._struct_mismatch("tl_nothing", MissingLast)
    assert "MissingLast" in native._check_structs(native._lib, {"tl_kv_exact": native._KVExact,
                                                                "tl_kv_codec": MissingLast})


def test_a_layout_mismatch_at_load_leaves_the_library_unloaded(monkeypatch):
    """Not a crash at the first call: available() is false and load_error() names the struct."""
    class MissingLast(ctypes.Structure):
        _fields_ = native._KVCodec._fields_[:-1]

    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_load_error", None)
    monkeypatch.setattr(native, "_STRUCTS", {**native._STRUCTS, "tl_kv_codec": MissingLast})
    native._load()
    assert not native.available()
    error = native.load_error()
    assert "struct tl_kv_codec is 40 bytes in C but 32" in error and "\n" not in error
