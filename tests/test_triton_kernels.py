"""The Triton backend in Triton's interpreter (CPU tensors; conftest sets TRITON_INTERPRET=1
without a GPU): the quantized linear of every supported type against the reference, on odd
shapes and 1..17 rows, and whole tiny Gemma 4 models against the reference backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton", reason="the triton backend needs Triton: pip install 'turbollm[gpu]'")

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QType  # noqa: E402
from gguf import quants as gguf_quants  # noqa: E402

from turbollm import Model, SamplingParams  # noqa: E402
from turbollm.gguf.reader import GGUFFile  # noqa: E402
from turbollm.kernels import reference  # noqa: E402
from turbollm.kernels.qtensor import QTensor  # noqa: E402
from turbollm.kernels.triton import quantized_linear as triton_linear  # noqa: E402

from conftest import tiny_gguf  # noqa: E402

# Where the kernels run: a GPU when there is one (compiled, as benchmarks/gpu_check.sh runs this
# file), else the CPU in Triton's interpreter. The reference always computes on the CPU.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# float32 products in another summation order: ~1e-7 of the output's scale (measured 2e-7..5e-7)
REL_TOL = 2e-6


def _quantized(qtype: QType, n: int, k: int) -> QTensor:
    w = np.random.default_rng(int(qtype)).standard_normal((n, k)).astype(np.float32)
    return QTensor(torch.from_numpy(gguf_quants.quantize(w, qtype).copy()), qtype, (n, k))


def _from_file(path, name: str) -> QTensor:
    gf = GGUFFile(path)
    t = gf.tensors[name]
    return QTensor(gf.tensor_bytes(name), t.qtype, tuple(t.shape), name)


def _random_blocks(qtype: QType, n: int, k: int, halves: tuple[int, ...]) -> QTensor:
    """Random bytes are valid blocks of Q5_K and IQ4_XS (every bit pattern of their quants,
    scales and indices means something) except the fp16 fields at byte offsets `halves`,
    which are set to small finite scales of either sign."""
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    b = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    for at in halves:
        b[..., at:at + 2] = rng.uniform(-0.02, 0.02, (n, k // block, 1)).astype(np.float16).view(np.uint8)
    return QTensor(torch.from_numpy(b.reshape(n, -1)), qtype, (n, k))


def _weights():
    """Every supported type: the 32-value formats quantized here (odd row counts); the others
    gguf cannot quantize (nor IQ4_NL, in gguf 0.19), so the K-quants come from the tiny MoE's
    Q4_K_M file and IQ4_NL, IQ3_S from its IQ3_M file. Q5_K (only in the full fixture folder's
    files) and IQ4_XS (in no fixture) are random blocks: odd row counts, two super-blocks a row."""
    for qtype in (QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0):
        yield qtype.name, lambda qtype=qtype: _quantized(qtype, 37, 96)
    moe = tiny_gguf("moe", "Q4_K_M")
    yield "Q4_K", lambda: _from_file(moe, "blk.0.attn_q.weight")
    yield "Q6_K", lambda: _from_file(moe, "token_embd.weight")
    iq3_m = tiny_gguf("moe", "IQ3_M")
    yield "IQ4_NL", lambda: _from_file(iq3_m, "blk.0.ffn_down.weight")
    yield "IQ3_S", lambda: _from_file(iq3_m, "blk.0.ffn_gate.weight")
    yield "Q5_K", lambda: _random_blocks(QType.Q5_K, 37, 512, halves=(0, 2))  # d, dmin
    yield "IQ4_XS", lambda: _random_blocks(QType.IQ4_XS, 37, 512, halves=(0,))  # d


WEIGHTS = dict(_weights())


@pytest.mark.parametrize("n_rows", [1, 3, 17])
@pytest.mark.parametrize("name", list(WEIGHTS))
def test_quantized_linear_equals_the_reference(name, n_rows):
    w = WEIGHTS[name]()
    assert w.qtype.name == name and triton_linear.supports(w)
    x = torch.randn(n_rows, w.shape[1], generator=torch.Generator().manual_seed(n_rows))
    ours, ref = triton_linear.linear(x.to(DEVICE), w.to(DEVICE)).cpu(), reference.linear(x, w)
    assert ours.shape == ref.shape == (n_rows, w.shape[0])
    assert float((ours - ref).abs().max()) <= REL_TOL * float(ref.abs().max())


def test_an_expert_slice_and_leading_dimensions():
    """A 3-D expert tensor's select() is a view with an offset; x may have leading dims."""
    w = _from_file(tiny_gguf("moe", "Q4_K_M"), "blk.0.ffn_down.weight")
    stacked = QTensor(torch.stack([w.data, w.data.flip(0)]), w.qtype, (2, *w.shape), "stacked")
    x = torch.randn(2, 3, w.shape[1])
    for e in (0, 1):
        ours = triton_linear.linear(x.to(DEVICE), stacked.to(DEVICE).select(e)).cpu()
        ref = reference.linear(x, stacked.select(e))
        assert ours.shape == (2, 3, w.shape[0])
        assert float((ours - ref).abs().max()) <= REL_TOL * float(ref.abs().max())


@pytest.mark.parametrize("name, variant, cache", [("dense", "Q4_0", ("q4_0", "turbo3")), ("moe", "Q4_K_M", ("f16", "f16"))])
def test_a_tiny_gemma4_on_the_triton_backend_gives_the_references_logits_and_tokens(name, variant, cache):
    """The Q4_0 dense model over a coded cache (q4_0 keys with their conditioning, turbo3
    values, the exact window) and the Q4_K_M MoE (Q4_K, Q5_0, Q6_K and Q8_0 tensors, grouped
    experts) over f16, both against the reference backend on the same cache."""
    from turbollm.kv.plan import CacheConfig
    path = tiny_gguf(name, variant)
    prompt = [2, 818, 1279, 529, 3001]
    config = CacheConfig(*cache, turbo_block=32, recent=2)
    ref_model = Model.load(path, backend="reference", ctx_size=64, cache=config)
    tri_model = Model.load(path, backend="triton", ctx_size=64, cache=config, device=str(DEVICE))
    assert tri_model.network.ops.name == "triton"
    ids = torch.tensor(prompt)
    ref_logits = ref_model.network.logits(ref_model.network.forward(ids, ref_model.network.new_cache(8, config)))
    tri_logits = tri_model.network.logits(tri_model.network.forward(ids, tri_model.network.new_cache(8, config))).cpu()
    # a coded cache: the two backends' keys differ by float noise (1e-7), which can move a value
    # across a q4_0 rounding boundary, and one code's step shows in the logits (measured up to
    # 1.5e-3 of their scale, depending on torch's thread count); the kernels alone are held to
    # 2e-5 above
    tol = 1e-4 if cache == ("f16", "f16") else 1e-2
    assert float((tri_logits - ref_logits).abs().max()) < tol * float(ref_logits.abs().max()) + 1e-4
    params = SamplingParams(temperature=0, max_tokens=3)  # decode: one-row products, the exact window's ring
    assert tri_model.generate(prompt, params).token_ids == ref_model.generate(prompt, params).token_ids


def test_the_triton_backend_on_the_cpu_outside_the_interpreter_is_refused(monkeypatch):
    from turbollm.kernels import backend
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="runs on a CUDA/ROCm device"):
        backend("triton", "cpu")
    assert backend("auto", "cpu").name in ("fast", "reference")  # auto never picks triton on the CPU


# ---- attention over the KV cache, read where the rows are stored -----------------------------

def _attend_steps(cache, ks, vs, qs, steps, window, softcap, ops):
    """Feed K/V/Q in steps of the given sizes through a one-layer cache, as a model layer does:
    write the step's rows, attend over the slots with the backend `ops`, commit. Outputs of
    every query."""
    outs, at = [], 0
    for n in steps:
        cache.begin(n)
        slots, q, positions = cache.slots(0), qs[at:at + n], torch.arange(at, at + n, device=qs.device)
        slots.write(ks[at:at + n], vs[at:at + n], q=q)
        outs.append(ops.attend(q, slots, positions, 0.2, window, softcap))
        cache.advance()
        at += n
    return torch.cat(outs)


ATTENTION_CASES = [(t, 0, 0.0, True) for t in ("f32", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl",
                                                "turbo2", "turbo3", "turbo4")]
ATTENTION_CASES += [(t, 16, 3.0, True) for t in ("f16", "q8_0", "turbo3")]  # a ring past its window, a soft cap
ATTENTION_CASES += [(t, 0, 0.0, False) for t in ("f16", "q4_0", "turbo4")]  # keys without RoPE's turning offset


@pytest.mark.parametrize("cache_type, window, softcap, rope", ATTENTION_CASES)
def test_attention_over_the_stored_rows_equals_attention_over_the_decoded_cache(cache_type, window, softcap, rope):
    """Every cache type read in place, against kv/cache.py's decoded rows and the reference
    attention: a prompt (tensor-core tiles, 16+ query rows), decode steps (a broadcast row sum),
    a speculative-sized step; 2 query heads per KV head; quantized keys with the key
    conditioning (the offset turning with RoPE, or not) and an exact window of the first 1
    and latest 8 positions at f16 (both segments and both halves of the split)."""
    from dataclasses import replace

    from turbollm.kv.cache import KVCache
    from turbollm.kv.conditioning import rotate_by_position
    from turbollm.kv.plan import CacheConfig, LayerKVShape, plan_kv
    n_kv, d, n = 2, 64, 100
    g = torch.Generator().manual_seed(7)
    ks, vs, qs = torch.randn(n, n_kv, d, generator=g), torch.randn(n, n_kv, d, generator=g), torch.randn(n, 4, d, generator=g)
    freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d) if rope else None
    ks = ks + rotate_by_position(3.0 * torch.randn(n_kv, d, generator=g), torch.arange(n), freq)  # Gemma's constant part
    config = CacheConfig(cache_type, "q8_0" if cache_type == "turbo2" else cache_type, turbo_block=32)
    if config.quantized:
        config = replace(config, recent=8, sink=1)
    steps = [70, 1, 1, 5, 23]

    from turbollm.kernels.triton import attention as triton_attention
    from turbollm.kv.codecs import Codec
    assert all(triton_attention.supports(Codec(t), d) for t in (config.type_k, config.type_v))  # no fallback here

    def run(use_triton):
        dev = DEVICE if use_triton else torch.device("cpu")
        cache = KVCache(plan_kv([LayerKVShape(n_kv, d, window)], n, config), dev, rope_freqs=[freq])
        from turbollm.kernels import triton as triton_backend
        ops = triton_backend.TritonBackend(device=dev) if use_triton else reference.ReferenceBackend()
        return _attend_steps(cache, ks.to(dev), vs.to(dev), qs.to(dev), steps, window, softcap, ops).cpu()
    ours, ref = run(True), run(False)
    assert torch.allclose(ours, ref, atol=2e-5, rtol=1e-4), float((ours - ref).abs().max())


# ---- the MoE experts in one launch per projection ------------------------------------------

@pytest.mark.parametrize("n_tok", [1, 3, 40])  # decode (broadcast rows), a few tokens, prefill (tl.dot tiles)
@pytest.mark.parametrize("fused", [True, False])
def test_grouped_experts_equal_the_references_expert_loop(n_tok, fused):
    """Every (token, slot) pair through its expert in one grouped launch per projection, against
    reference.moe_ffn's loop over experts; some experts chosen by many tokens (several tiles),
    some by one, some by none."""
    from turbollm.kernels import triton as triton_backend
    n_exp, n_embd, n_ff, k = 6, 64, 32, 3
    g = torch.Generator().manual_seed(n_tok)

    def stacked(rows, cols, qtype):
        w = torch.randn(n_exp * rows, cols, generator=g).numpy()
        return QTensor(torch.from_numpy(gguf_quants.quantize(w, qtype).copy()).view(n_exp, rows, -1), qtype, (n_exp, rows, cols))
    gate = stacked(2 * n_ff if fused else n_ff, n_embd, QType.Q4_0)
    up = None if fused else stacked(n_ff, n_embd, QType.Q8_0)
    down = stacked(n_embd, n_ff, QType.Q5_1)
    x = torch.randn(n_tok, n_embd, generator=g)
    scores = torch.randn(n_tok, n_exp, generator=g) + torch.tensor([3.0, 2.0, 0, 0, 0, -9.0])  # expert 5: never
    weights, ids = torch.softmax(scores, -1).topk(k, dim=-1)
    on = [t.to(DEVICE) for t in (x, ids, weights)]
    ours = triton_backend.moe_ffn(*on, gate.to(DEVICE), None if up is None else up.to(DEVICE), down.to(DEVICE)).cpu()
    ref = reference.moe_ffn(x, ids, weights, gate, up, down)
    assert float((ours - ref).abs().max()) <= REL_TOL * float(ref.abs().max())


def test_experts_kept_in_cpu_memory_run_on_the_host_backend_on_an_accelerator_run():
    """--n-cpu-moe on a GPU: a MoE block whose experts are in CPU memory is the native CPU
    backend's job (llama.cpp's split), while the device's own blocks stay with Triton. The
    backend is made for cuda:0 here but only CPU tensors are touched, so no GPU is needed."""
    from turbollm.kernels import fast, native
    from turbollm.kernels import triton as triton_backend
    if not native.available():
        pytest.skip("the native CPU kernels are not built")
    model = Model.load(tiny_gguf("moe", "Q4_K_M"), backend="fast", ctx_size=64)
    block = next(layer.moe for layer in model.network.layers if layer.moe is not None)
    h = torch.randn(2, model.config.n_embd)
    host = fast.FastBackend("fp32")
    on_gpu_run = triton_backend.TritonBackend(device="cuda:0", host=host)
    assert on_gpu_run._on_host(block.down.data)
    assert torch.equal(on_gpu_run.moe_block(h, block), host.moe_block(h, block))
    interpreted = triton_backend.TritonBackend(device="cpu", host=host)  # the CPU is the device itself
    assert not interpreted._on_host(block.down.data)
    assert torch.allclose(interpreted.moe_block(h, block), reference.ReferenceBackend().moe_block(h, block), atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 640), (5, 4, 64), (3, 2816), (7, 100)])  # decode, head norms, wide, odd
def test_rms_norm_and_the_gelu_gate_in_one_launch_equal_the_reference(shape):
    from turbollm.kernels.triton import elementwise
    g = torch.Generator().manual_seed(shape[-1])
    x, w = torch.randn(shape, generator=g), torch.randn(shape[-1], generator=g)
    for weight in (w, None):
        ours = elementwise.rms_norm(x.to(DEVICE), None if weight is None else weight.to(DEVICE), 1e-2).cpu()
        assert torch.allclose(ours, reference.rms_norm(x, weight, 1e-2), atol=2e-6, rtol=1e-6)
    gate, up = 4 * torch.randn(shape, generator=g), torch.randn(shape, generator=g)  # far into tanh's tails too
    ours = elementwise.gelu_mul(gate.to(DEVICE), up.to(DEVICE)).cpu()
    assert torch.allclose(ours, reference.gelu_mul(gate, up), atol=2e-6, rtol=1e-6)
