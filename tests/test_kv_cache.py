"""The KV cache subsystem: codecs against ggml's reference quantizers and their error bounds,
the native codecs against the PyTorch ones, exact memory figures, rings against full caches,
and attention over coded caches against attention over the decoded cache."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants as gguf_quants

from turbollm.kernels import native
from turbollm.kernels.attention import attention as reference_attention
from turbollm.kv.cache import KVCache
from turbollm.kv.plan import CacheConfig, LayerKVShape, plan_kv
from turbollm.kv.conditioning import condition_keys, rotate_by_position
from turbollm.kv.codecs import CACHE_TYPES, Codec, pack_bits, parse_cache_type, unpack_bits
from turbollm.kv.turboquant import expected_distortion
from turbollm.cli.quality import parse_cache_entry

needs_native = pytest.mark.skipif(not native.available(), reason="native kernels not built")

# Relative RMS error of a round trip on Gaussian rows, measured (256 rows of 256): the bound
# each codec is held to, with ~20% headroom. TurboQuant's follow from its distortion,
# sqrt(expected_distortion(bits, block) * block) per unit vector: 0.34 / 0.18 / 0.096.
ERROR_BOUNDS = {"f32": 0.0, "f16": 3e-4, "bf16": 2.5e-3, "q8_0": 7e-3, "q4_0": 0.105, "q4_1": 0.095,
                "q5_0": 0.052, "q5_1": 0.046, "iq4_nl": 0.094, "turbo2": 0.36, "turbo3": 0.20, "turbo4": 0.11}


def _rows(n: int = 256, d: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * 2.5


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_block_codecs_write_the_bytes_of_ggmls_reference_quantizers(name):
    x = _rows()
    x[0, :32] = 0.0  # an all-zero block (d = 0)
    x[1, 5] = 0.5 / (x[1].abs().max() / 127)  # ties and edges still agree
    expected = gguf_quants.quantize(x.numpy(), getattr(Q, name.upper()))
    np.testing.assert_array_equal(Codec(name).encode(x).numpy(), expected)


@pytest.mark.parametrize("name", CACHE_TYPES)
def test_round_trip_error_within_the_codec_bound(name):
    x = _rows()
    for block in ((128, 32) if name.startswith("turbo") else (128,)):
        codec = Codec(name, block)
        raw = codec.encode(x)
        assert raw.dtype == torch.uint8 and raw.shape == (256, codec.row_bytes(256))
        err = ((codec.decode(raw, 256) - x).norm(dim=1) / x.norm(dim=1)).mean().item()
        assert err <= ERROR_BOUNDS[name], (codec.label, err)
        if name != "f32":
            assert err > 0.2 * ERROR_BOUNDS[name], (codec.label, err)  # a codec that stores floats is not this one


def test_bits_per_value_are_the_published_figures():
    assert [Codec(n).bits_per_value for n in ("q8_0", "q4_0", "q4_1", "q5_0", "iq4_nl")] == [8.5, 4.5, 5.0, 5.5, 4.5]
    assert [Codec(n, 32).bits_per_value for n in ("turbo2", "turbo3", "turbo4")] == [2.5, 3.5, 4.5]
    assert [Codec(n, 128).bits_per_value for n in ("turbo2", "turbo3", "turbo4")] == [2.125, 3.125, 4.125]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_bit_packing_round_trips_and_is_dense(bits):
    codes = torch.randint(0, 1 << bits, (5, 128), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.shape == (5, 128 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, 128), codes)


def test_turbo_rotation_is_orthogonal_and_scores_in_the_rotated_basis():
    codec = Codec("turbo3")
    x = _rows(8)
    rotated = codec.rotate(x)
    assert torch.allclose(rotated.norm(dim=1), x.norm(dim=1), rtol=1e-5)
    assert torch.allclose(codec.unrotate(rotated), x, atol=1e-5)
    basis = codec.rotate(torch.eye(256))
    assert torch.allclose(basis @ basis.T, torch.eye(256), atol=1e-5)
    raw, q = codec.encode(x), torch.randn(256)
    # <q, decode(k)> = <rotate(q), decode_rotated(k)>: attention never unrotates a key
    assert torch.allclose(codec.decode(raw, 256) @ q, codec.decode_rotated(raw, 256) @ codec.rotate(q), atol=1e-4)


def test_unknown_cache_types_and_bad_shapes_are_refused_clearly():
    with pytest.raises(ValueError, match="unknown KV cache type 'q3_k'"):
        parse_cache_type("q3_k")
    with pytest.raises(ValueError, match="a head of 48 does not split"):
        Codec("q8_0").row_bytes(48)
    with pytest.raises(ValueError, match="block must be one of"):
        Codec("turbo3", 64)
    with pytest.raises(ValueError, match="after '@'"):
        parse_cache_entry("turbo2@two")
    assert parse_cache_entry("q8_0/turbo4@2") == CacheConfig("q8_0", "turbo4", 2)


@pytest.mark.parametrize("block", [32, 128])
def test_turbo_keys_keep_their_length_and_values_the_codewords(block):
    x = _rows(64, 256, seed=5) * 7.0
    keep, mse = Codec("turbo3", block, keep_length=True), Codec("turbo3", block)
    blocks = x.view(64, -1, block)
    kept = keep.decode(keep.encode(x), 256).view(64, -1, block)
    shrunk = mse.decode(mse.encode(x), 256).view(64, -1, block)
    assert torch.allclose(kept.norm(dim=-1), blocks.norm(dim=-1), rtol=2e-3)  # fp16 norms
    # cell means lie inside their cells: the MSE reconstruction is 1 - distortion as long, on average
    shrink = (shrunk.norm(dim=-1) / blocks.norm(dim=-1)).pow(2).mean()
    assert abs(shrink - (1 - block * expected_distortion(3, block))) < 0.01
    assert torch.equal(keep.encode(x)[:, 2:block * 3 // 8 + 2], mse.encode(x)[:, 2:block * 3 // 8 + 2])  # same codes
    plan = plan_kv([LayerKVShape(1, 256)], 8, CacheConfig("turbo3", "turbo3"))
    assert plan.stored[0].k.keep_length and not plan.stored[0].v.keep_length


@needs_native
@pytest.mark.parametrize("name", CACHE_TYPES)
def test_native_codecs_write_and_read_the_reference_bytes(name):
    x = _rows(64, 512, seed=3)
    for block, keep_length in (((128, False), (32, False), (128, True), (32, True)) if name.startswith("turbo")
                               else ((128, False),)):
        codec = Codec(name, block, keep_length)
        ref = codec.encode(x)
        assert (native.kv_encode(codec, x) != ref).float().mean() < 1e-3  # float sums may flip a rare code
        assert torch.equal(native.kv_decode(codec, ref, 512), codec.decode(ref, 512))
        if codec.is_turbo:
            assert torch.equal(native.kv_decode(codec, ref, 512, rotated=True), codec.decode_rotated(ref, 512))


@needs_native
@pytest.mark.parametrize("name", ["f16", "turbo2", "turbo3", "turbo4"])
def test_native_encoding_writes_the_same_bytes_on_every_simd_path(name):
    """The AVX2 rows (F16C conversion; the Walsh-Hadamard butterflies on vectors of 8) do the
    portable code's arithmetic: the same bytes, not merely close ones."""
    x = _rows(64, 512, seed=5) * 3.0
    best = native.simd_level()
    for block in ((32, 128) if name.startswith("turbo") else (128,)):
        codec = Codec(name, block, keep_length=name.startswith("turbo"))
        try:
            native.set_simd(0)
            portable = native.kv_encode(codec, x)
        finally:
            native.set_simd(best)
        assert torch.equal(native.kv_encode(codec, x), portable)
        if name.startswith("turbo"):  # and the decoders' inverse rotation
            assert torch.equal(native.kv_decode(codec, portable, 512), codec.decode(portable, 512))


# ---- layout and memory ---------------------------------------------------------------------

GEMMA4_26B_LIKE = [LayerKVShape(2, 512) if il % 6 == 5 else LayerKVShape(8, 256, 1024) for il in range(30)]


@pytest.mark.parametrize("config", [CacheConfig(), CacheConfig("q8_0", "turbo3"), CacheConfig("turbo2", "turbo2", 2),
                                    CacheConfig("q4_1", "iq4_nl", swa_full=True), CacheConfig("q8_0", "q8_0", recent=32, sink=4)])
def test_predicted_bytes_are_the_allocated_bytes(config):
    layout = [LayerKVShape(1, 256, 512), None, LayerKVShape(2, 128), LayerKVShape(1, 256, 512)]
    plan = plan_kv(layout, 2000, config)
    assert KVCache(plan).nbytes == plan.nbytes == plan.global_bytes + plan.sliding_bytes


def test_sliding_layers_keep_a_ring_of_the_window_and_global_layers_the_context():
    plan = plan_kv(GEMMA4_26B_LIKE, 65536, CacheConfig("q8_0", "q8_0"))
    # llama.cpp's figure for these layers at 64K: 680 MiB global (one stream); we add each layer's
    # key conditioning (rotated offset, offset and scale: float32 per KV head and channel) and its flag
    offsets = 3 * 2 * 512 * 4 + 4, 3 * 8 * 256 * 4 + 4
    assert plan.global_bytes == 5 * (65536 * 2 * 2 * 512 * 34 // 32 + offsets[0]) == 680 * 2**20 + 5 * offsets[0]
    assert plan.sliding_bytes == 25 * (1024 * 8 * 2 * 256 * 34 // 32 + offsets[1])
    assert plan_kv(GEMMA4_26B_LIKE, 262144, CacheConfig("q8_0", "q8_0")).sliding_bytes == plan.sliding_bytes
    assert plan_kv(GEMMA4_26B_LIKE, 600, CacheConfig()).stored[0].capacity == 600  # a short context needs no more


def test_boundary_layers_stay_f16():
    plan = plan_kv([LayerKVShape(1, 64)] * 6, 10, CacheConfig("turbo2", "turbo3", boundary_layers=2))
    assert [p.k.name for p in plan.stored] == ["f16", "f16", "turbo2", "turbo2", "f16", "f16"]
    assert [p.v.name for p in plan.stored] == ["f16", "f16", "turbo3", "turbo3", "f16", "f16"]


# ---- rings and coded caches in attention ----------------------------------------------------

def _run_layer(cache: KVCache, ks: torch.Tensor, vs: torch.Tensor, qs: torch.Tensor, steps: list[int], window: int,
               use_native: bool, softcap: float = 0.0, at: int = 0) -> torch.Tensor:
    """Feed K/V/Q [N, ...] in steps of the given sizes through a one-layer cache holding
    positions 0..at-1; attention outputs of every query, as a model layer computes them."""
    outs = []
    for n in steps:
        cache.begin(n)
        slots = cache.slots(0)
        q = qs[at:at + n]
        positions = torch.arange(at, at + n)
        slots.write(ks[at:at + n], vs[at:at + n])
        if use_native:  # the same bytes, read by the native kernel
            outs.append(_native_attention(q, slots, positions, window, softcap))
        else:
            k, v, k_pos, split = slots.read()
            outs.append(reference_attention(q, k, v, positions, k_pos, 0.2, window, softcap, split))
        cache.advance()
        at += n
    return torch.cat(outs)


def _native_attention(q, slots, positions, window, softcap):
    n = slots.n_keys
    exact = None if slots.exact_k is None else (
        [(slots.exact_k, slots.exact_v, slots.exact_positions), (slots.tail_exact_k, slots.tail_exact_v, positions)],
        slots.split)
    return native.attention_coded(q, positions, slots.plan.k, slots.plan.v, slots.plan.n_head_kv,
                                  [(slots.k[:n], slots.v[:n], slots.positions[:n]),
                                   (slots.tail_k, slots.tail_v, positions)], 0.2, window, softcap, slots, exact)


@pytest.mark.parametrize("n_prompt", [5, 16, 40])  # shorter than, equal to, much longer than the window
@pytest.mark.parametrize("cache_type", ["f32", "q8_0", "turbo3"])
def test_ring_attention_equals_full_attention_with_a_window_mask(n_prompt, cache_type):
    window, n_kv, d, n_decode = 16, 2, 128, 30
    g = torch.Generator().manual_seed(n_prompt)
    n = n_prompt + n_decode
    ks, vs, qs = torch.randn(n, n_kv, d, generator=g), torch.randn(n, n_kv, d, generator=g), torch.randn(n, 4, d, generator=g)
    steps = [n_prompt] + [1] * 20 + [3] * 3 + [1]  # a prompt, decode steps, small batches (speculative verify)
    config = CacheConfig(cache_type, cache_type, recent=0, sink=0)  # every key coded (the exact window: below)
    ring = KVCache(plan_kv([LayerKVShape(n_kv, d, window)], n, config))
    full = KVCache(plan_kv([LayerKVShape(n_kv, d, window)], n, replace(config, swa_full=True)))
    assert ring.plan.stored[0].capacity == min(window, n) and full.plan.stored[0].capacity == n
    out_ring = _run_layer(ring, ks, vs, qs, steps, window, use_native=False)
    out_full = _run_layer(full, ks, vs, qs, steps, window, use_native=False)
    assert torch.allclose(out_ring, out_full, atol=1e-5)
    # and both are plain windowed attention over the decoded K/V of every position (quantized
    # keys coded relative to the offset and scale of the first step's keys)
    k_codec, v_codec = ring.plan.stored[0].k, ring.plan.stored[0].v  # TurboQuant keys keep their length
    k_dec = k_codec.decode(k_codec.encode(ks), d)
    if cache_type != "f32":
        c = condition_keys(ks[:n_prompt], torch.arange(n_prompt), None)
        offset = c.offset + c.rot_offset
        k_dec = k_codec.decode(k_codec.encode((ks - offset) / c.scale), d) * c.scale + offset
    v_dec = v_codec.decode(v_codec.encode(vs), d)
    expected = reference_attention(qs, k_dec, v_dec, torch.arange(n), torch.arange(n), 0.2, window)
    assert torch.allclose(out_ring, expected, atol=1e-5)


@needs_native
@pytest.mark.parametrize("cache_type", ["f16", "bf16", "q8_0", "q4_0", "q5_1", "iq4_nl", "turbo2", "turbo4"])
@pytest.mark.parametrize("window, softcap, rope", [(0, 0.0, True), (16, 0.0, True), (0, 3.0, True), (0, 0.0, False)])
def test_native_attention_on_a_coded_cache_equals_attention_on_the_decoded_cache(cache_type, window, softcap, rope):
    """A soft cap sees the key offsets; a ring (window 16) breaks the run of key positions the
    native kernel steps RoPE's angles along."""
    n_kv, d, n = 2, 128, 300  # several chunks of keys per query: the per-chunk softmax merge
    g = torch.Generator().manual_seed(7)
    ks, vs, qs = torch.randn(n, n_kv, d, generator=g), torch.randn(n, n_kv, d, generator=g), torch.randn(n, 8, d, generator=g)
    steps = [260, 1, 1, 5, 33]
    config = CacheConfig(cache_type, "q8_0" if cache_type == "turbo2" else cache_type)  # asymmetric K/V too
    freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d) if rope else None
    # a constant part before RoPE, as Gemma's keys have
    ks = ks + rotate_by_position(3.0 * torch.randn(n_kv, d, generator=g), torch.arange(n), freq)

    def cache():
        return KVCache(plan_kv([LayerKVShape(n_kv, d, window)], n, config), rope_freqs=[freq])
    ours = _run_layer(cache(), ks, vs, qs, steps, window, True, softcap)
    ref = _run_layer(cache(), ks, vs, qs, steps, window, False, softcap)
    assert torch.allclose(ours, ref, atol=2e-5, rtol=1e-4)


@needs_native
@pytest.mark.parametrize("cache_type, n_head", [("turbo3", 8), ("turbo4", 3), ("q8_0", 8)])
def test_native_coded_attention_is_the_same_on_every_simd_path(cache_type, n_head):
    """The SIMD paths (TurboQuant scores without the row written out, the turning offset stepped
    in float between double anchors) against the portable one and the reference; 3 query heads
    per KV head take the generic loops on every path."""
    n_kv, d, n, window = 1, 256, 300, 0
    g = torch.Generator().manual_seed(11)
    ks, vs = torch.randn(n, n_kv, d, generator=g), torch.randn(n, n_kv, d, generator=g)
    qs = torch.randn(n, n_head * n_kv, d, generator=g)
    freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ks = ks + rotate_by_position(3.0 * torch.randn(n_kv, d, generator=g), torch.arange(n), freq)
    config, steps = CacheConfig(cache_type, cache_type), [260, 1, 1, 5, 33]

    def run(use_native):
        cache = KVCache(plan_kv([LayerKVShape(n_kv, d, window)], n, config), rope_freqs=[freq])
        return _run_layer(cache, ks, vs, qs, steps, window, use_native)
    ref = run(False)
    best = native.simd_level()
    try:
        native.set_simd(0)
        portable = run(True)
    finally:
        native.set_simd(best)
    fast = run(True)
    assert torch.allclose(portable, ref, atol=2e-5, rtol=1e-4)
    assert torch.allclose(fast, ref, atol=2e-5, rtol=1e-4)


def test_a_speculative_step_keeps_only_the_accepted_tokens_even_in_a_ring():
    window, d = 4, 32
    ring = KVCache(plan_kv([LayerKVShape(1, d, window)], 64, CacheConfig("f32", "f32")))
    x = torch.arange(20, dtype=torch.float32)[:, None, None].expand(20, 1, d)
    ring.begin(6)
    ring.slots(0).write(x[:6], x[:6])
    ring.advance()
    ring.begin(5)  # 5 drafted tokens, 2 accepted
    ring.slots(0).write(x[6:11], x[6:11])
    ring.advance(2)
    assert ring.n_tokens == 8
    ring.begin(1)
    ring.slots(0).write(x[8:9], x[8:9])
    k, _, pos, _ = ring.slots(0).read()
    held = sorted(int(p) for p in pos if p >= 0)
    assert held == [4, 5, 6, 7, 8]  # the window before position 8, then the new token
    assert sorted(int(v) for v in k[:, 0, 0][pos >= 0]) == [4, 5, 6, 7, 8]


def test_rolling_a_ring_back_past_what_it_still_holds_is_refused():
    ring = KVCache(plan_kv([LayerKVShape(1, 32, 4)], 64, CacheConfig()))
    ring.begin(10)
    ring.slots(0).write(torch.zeros(10, 1, 32), torch.zeros(10, 1, 32))
    ring.advance()
    ring.truncate(9)  # the ring still holds positions 6..8: enough for position 9
    with pytest.raises(ValueError, match="ring of 4 slots has overwritten"):
        ring.truncate(7)


def test_describe_says_what_the_cache_is_and_costs():
    cache = KVCache(plan_kv(GEMMA4_26B_LIKE, 4096, CacheConfig("q8_0", "turbo3", boundary_layers=1)))
    line = cache.describe()
    assert "K f16 / V f16" in line and "K q8_0 / V turbo3/b128" in line
    assert "5 full-context layers, 25 sliding rings of 1024" in line
    assert line.endswith(f"{cache.nbytes / 2**20:.2f} MiB for 4096 positions")


# ---- key conditioning ----------------------------------------------------------------------

def _keys_and_queries(n: int = 400, n_kv: int = 2, group: int = 2, d: int = 128, seed: int = 3):
    """Keys whose channels differ in spread and queries that weigh channels differently,
    independently of the keys (as Gemma's do)."""
    g = torch.Generator().manual_seed(seed)
    k_sd = torch.exp(torch.randn(n_kv, d, generator=g))
    q_rms = torch.exp(torch.randn(n_kv, 1, d, generator=g)).expand(n_kv, group, d).reshape(n_kv * group, d)
    ks = torch.randn(n, n_kv, d, generator=g) * k_sd + 4.0 * torch.randn(n_kv, d, generator=g)
    qs = torch.randn(n, n_kv * group, d, generator=g) * q_rms
    return ks, qs


def _conditioning(ks, qs=None, rope_freq=None):
    return condition_keys(ks, torch.arange(len(ks)), rope_freq, qs)


def test_key_conditioning_weighs_channels_by_the_queries():
    ks, qs = _keys_and_queries()
    c = _conditioning(ks)  # no RoPE: the offset is the mean key
    sd = (ks - ks.mean(0)).pow(2).mean(0).sqrt()
    assert torch.allclose(c.rot_offset + c.offset, ks.mean(0), atol=1e-5) and c.offset.abs().max() < 1e-5
    plain = c.scale
    assert torch.allclose(plain, sd.clamp(min=0.1 * sd.mean(-1, keepdim=True)).sqrt(), rtol=1e-5)
    weighed = _conditioning(ks, qs).scale
    q_rms = qs.reshape(len(qs), 2, 2, -1).pow(2).mean(dim=(0, 2)).sqrt()
    q_rms = q_rms.clamp(min=0.1 * q_rms.mean(-1, keepdim=True))
    assert torch.allclose(weighed, plain / q_rms.sqrt(), rtol=1e-5)
    one = _conditioning(ks[:1], qs[:1]).scale  # one token says nothing about spreads
    assert torch.equal(one, torch.ones_like(one))


def test_key_conditioning_follows_rope_a_channel_constant_before_it():
    """Keys constant before RoPE turn with the position after it: no fixed offset removes them,
    the offset turned by each key's position does."""
    n, n_kv, d = 64, 2, 128
    g = torch.Generator().manual_seed(4)
    freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    strong = torch.zeros(d // 2, dtype=torch.bool)
    strong[torch.randperm(d // 2, generator=g)[:d // 8]] = True  # a quarter of the pairs
    mu = 5.0 * torch.randn(n_kv, d, generator=g) * torch.cat((strong, strong))
    mu[:, :d // 2][:, ~strong] += 0.3  # weak pairs: left to the fixed offset
    noise = 0.1 * torch.randn(n, n_kv, d, generator=g)
    positions = torch.arange(100, 100 + n)
    ks = rotate_by_position(mu, positions, freq) + noise
    turned = condition_keys(ks, positions, freq)
    kept = (turned.rot_offset != 0)[:, :d // 2] | (turned.rot_offset != 0)[:, d // 2:]
    assert (kept.sum(-1) == d // 4).all() and kept[:, strong].all()  # the strongest half of the pairs turn
    assert torch.allclose(turned.rot_offset * torch.cat((strong, strong)), mu * torch.cat((strong, strong)), atol=0.05)
    fixed = condition_keys(ks, positions, None)
    both = torch.cat((strong, strong))
    assert turned.scale[:, both].mean() < 0.3 * fixed.scale[:, both].mean()  # what is left there is the noise
    back = rotate_by_position(rotate_by_position(ks, positions, freq, inverse=True), positions, freq)
    assert torch.allclose(back, ks, atol=1e-5)
    # pairs RoPE does not turn (Gemma 4's proportional RoPE) keep a fixed offset
    still = torch.where(torch.arange(d // 2) % 4 != 0, freq, freq / 1e30)  # as rope_freqs.weight leaves them
    mu_still = condition_keys(ks, positions, still).rot_offset
    fixed_pairs = torch.arange(d // 2) % 4 == 0
    assert (mu_still[:, :d // 2][:, fixed_pairs] == 0).all() and (mu_still[:, d // 2:][:, fixed_pairs] == 0).all()


@pytest.mark.parametrize("name", ["turbo2", "turbo3", "turbo4"])
def test_query_weighed_conditioning_lowers_turboquants_score_error(name):
    """What the queries' term is for: smaller errors in q . k than scaling by the keys alone."""
    ks, qs = _keys_and_queries()
    codec = Codec(name)
    d = ks.shape[-1]
    heads = qs.view(len(qs), 2, 2, d)[:, :, 0]  # one query head of each KV head's group
    exact = torch.einsum("tkd,skd->tsk", ks, heads)

    def score_error(c):
        offset = c.offset + c.rot_offset
        k_dec = codec.decode(codec.encode((ks - offset) / c.scale), d) * c.scale + offset
        got = torch.einsum("tkd,skd->tsk", k_dec, heads)
        return (got - exact).pow(2).mean().item()

    plain, weighed = score_error(_conditioning(ks)), score_error(_conditioning(ks, qs))
    assert weighed < 0.7 * plain


@pytest.mark.parametrize("name, uses_queries", [("turbo3", True), ("q4_0", False), ("q8_0", False)])
def test_the_cache_weighs_turboquant_keys_by_the_queries_and_ggml_blocks_not(name, uses_queries):
    ks, qs = _keys_and_queries(n=8)
    cache = KVCache(plan_kv([LayerKVShape(2, 128)], 16, CacheConfig(name, "f16")))
    cache.begin(8)
    slots = cache.slots(0)
    slots.write(ks, ks, q=qs)
    expected = _conditioning(ks, qs if uses_queries else None)
    assert torch.allclose(slots.k_offset, expected.offset) and torch.allclose(slots.k_scale, expected.scale)
    assert torch.allclose(slots.k_rot_offset, expected.rot_offset)


# ---- the exact window: f16 rows of the first and the latest positions ------------------------

def test_the_exact_window_defaults_to_codecs_under_8_bits():
    assert CacheConfig().exact_window == (0, 0)
    assert CacheConfig("q8_0", "q8_0").exact_window == (0, 0)  # at the noise floor: not worth its bytes
    assert CacheConfig("q4_0", "q4_0").exact_window == (1, 64)
    assert CacheConfig("q8_0", "turbo3").exact_window == (1, 64)
    assert CacheConfig("turbo3", "turbo3", recent=0).exact_window == (0, 0)  # ~0: neither
    assert CacheConfig("turbo3", "turbo3", recent=8).exact_window == (1, 8)
    assert CacheConfig("q8_0", "q8_0", recent=8, sink=2).exact_window == (2, 8)
    with pytest.raises(ValueError, match="recent must be >= 0"):
        CacheConfig("turbo3", "turbo3", recent=-1)
    plan = plan_kv([LayerKVShape(2, 64, 16), LayerKVShape(2, 64), LayerKVShape(2, 64)], 100,
                   CacheConfig("turbo3", "turbo3", boundary_layers=1))
    # boundary layers are f16 and keep no window; a ring's window is capped at the ring
    assert [(p.sink, p.recent) for p in plan.stored] == [(0, 0), (1, 64), (0, 0)]
    assert plan_kv([LayerKVShape(2, 64, 16)], 100, CacheConfig("turbo3", "turbo3")).stored[0].recent == 16
    assert plan.stored[1].exact_bytes == 65 * 2 * 2 * 64 * 2  # rows x KV heads x (K, V) x f16 values


def _expected_with_exact_window(ks, vs, qs, config, exact_from=lambda p: 0, window=0):
    """Attention of each query at position p over keys 0..p, where a key reads its f16 value
    when kp < sink or (p - kp < recent and kp >= exact_from(p)), else its coded value."""
    n, n_kv, d = ks.shape
    plan = plan_kv([LayerKVShape(n_kv, d, window)], n, config).stored[0]
    sink, recent = config.exact_window
    c = condition_keys(ks[:6], torch.arange(6), None)  # the first step's 6 keys set the conditioning
    k_coded = plan.k.decode(plan.k.encode((ks - c.offset - c.rot_offset) / c.scale), d) * c.scale + c.offset + c.rot_offset
    v_coded = plan.v.decode(plan.v.encode(vs), d)
    k_f16, v_f16 = ks.half().float(), vs.half().float()
    outs = []
    for p in range(n):
        kp = torch.arange(p + 1)
        exact = ((kp < sink) | ((p - kp < recent) & (kp >= exact_from(p))))[:, None, None]
        k = torch.where(exact, k_f16[:p + 1], k_coded[:p + 1])
        v = torch.where(exact, v_f16[:p + 1], v_coded[:p + 1])
        outs.append(reference_attention(qs[p:p + 1], k, v, torch.tensor([p]), kp, 0.2, window))
    return torch.cat(outs)


@pytest.mark.parametrize("use_native", [False, pytest.param(True, marks=needs_native)])
@pytest.mark.parametrize("cache_type, window", [("turbo3", 0), ("turbo2", 12), ("q4_0", 0), ("q8_0/turbo4", 12)])
def test_the_exact_window_reads_its_positions_at_f16_and_the_rest_coded(cache_type, window, use_native):
    n_kv, d, n = 2, 128, 40
    g = torch.Generator().manual_seed(3)
    ks, vs, qs = torch.randn(n, n_kv, d, generator=g), torch.randn(n, n_kv, d, generator=g), torch.randn(n, 4, d, generator=g)
    k_name, _, v_name = cache_type.partition("/")
    config = CacheConfig(k_name, v_name or k_name, recent=5, sink=2)
    cache = KVCache(plan_kv([LayerKVShape(n_kv, d, window)], n, config))
    steps = [6] + [1] * 10 + [9, 3] + [1] * 12  # a prompt, decode steps, a step longer than the window of 5
    got = _run_layer(cache, ks, vs, qs, steps, window, use_native)
    expected = _expected_with_exact_window(ks, vs, qs, config, window=window)
    assert torch.allclose(got, expected, atol=2e-5, rtol=1e-4)
    # the window changes what attention reads: without it the same steps give other outputs
    plain = _run_layer(KVCache(plan_kv([LayerKVShape(n_kv, d, window)], n, replace(config, recent=0, sink=0))),
                       ks, vs, qs, steps, window, use_native)
    assert (plain - got).abs().max() > 1e-3


@pytest.mark.parametrize("use_native", [False, pytest.param(True, marks=needs_native)])
def test_after_a_rollback_past_the_exact_ring_its_lost_positions_are_read_coded(use_native):
    n_kv, d = 1, 128
    g = torch.Generator().manual_seed(5)
    ks, vs, qs = torch.randn(40, n_kv, d, generator=g), torch.randn(40, n_kv, d, generator=g), torch.randn(40, 2, d, generator=g)
    config = CacheConfig("turbo3", "turbo3", recent=4, sink=1)
    cache = KVCache(plan_kv([LayerKVShape(n_kv, d)], 40, config))
    _run_layer(cache, ks, vs, qs, [6, 6], 0, use_native)  # positions 0..11; the ring holds 8..11
    cache.truncate(10)  # it still holds 8, 9
    part = _run_layer(cache, ks, vs, qs, [1, 1], 0, use_native, at=10)
    expected = _expected_with_exact_window(ks, vs, qs, config, exact_from=lambda p: 8 if p < 12 else 0)[10:12]
    assert torch.allclose(part, expected, atol=2e-5, rtol=1e-4)
    cache.truncate(7)  # the ring holds nothing below 7: positions 4..6 are read coded from here on
    part = _run_layer(cache, ks, vs, qs, [1, 2], 0, use_native, at=7)
    expected = _expected_with_exact_window(ks, vs, qs, config, exact_from=lambda p: 7)[7:10]
    assert torch.allclose(part, expected, atol=2e-5, rtol=1e-4)

