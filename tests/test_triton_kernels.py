"""The Triton backend in Triton's interpreter (CPU tensors; conftest sets TRITON_INTERPRET=1
without a GPU): the quantized linear of every supported type against the reference, on odd
shapes and 1..17 rows, and whole tiny Gemma 4 models against the reference backend."""

from __future__ import annotations

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton", reason="the triton backend needs Triton: pip install 'turbollm[gpu]'")

from gguf import GGMLQuantizationType as QType  # noqa: E402
from gguf import quants as gguf_quants  # noqa: E402

from turbollm import Model, SamplingParams  # noqa: E402
from turbollm.gguf.reader import GGUFFile  # noqa: E402
from turbollm.kernels import reference  # noqa: E402
from turbollm.kernels.qtensor import QTensor  # noqa: E402
from turbollm.kernels.triton import quantized_linear as triton_linear  # noqa: E402

from conftest import tiny_gguf  # noqa: E402

# float32 products in another summation order: ~1e-7 of the output's scale (measured 2e-7..5e-7)
REL_TOL = 2e-6


def _quantized(qtype: QType, n: int, k: int) -> QTensor:
    w = np.random.default_rng(int(qtype)).standard_normal((n, k)).astype(np.float32)
    return QTensor(torch.from_numpy(gguf_quants.quantize(w, qtype).copy()), qtype, (n, k))


def _from_file(path, name: str) -> QTensor:
    gf = GGUFFile(path)
    t = gf.tensors[name]
    return QTensor(gf.tensor_bytes(name), t.qtype, tuple(t.shape), name)


def _weights():
    """Every supported type: the 32-value formats quantized here (odd row counts), the
    K-quants (which gguf cannot quantize) from the tiny MoE's Q4_K_M file."""
    for qtype in (QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0):
        yield qtype.name, lambda qtype=qtype: _quantized(qtype, 37, 96)
    moe = tiny_gguf("moe", "Q4_K_M")
    yield "Q4_K", lambda: _from_file(moe, "blk.0.attn_q.weight")
    yield "Q6_K", lambda: _from_file(moe, "token_embd.weight")


WEIGHTS = dict(_weights())


@pytest.mark.parametrize("n_rows", [1, 3, 17])
@pytest.mark.parametrize("name", list(WEIGHTS))
def test_quantized_linear_equals_the_reference(name, n_rows):
    w = WEIGHTS[name]()
    assert w.qtype.name == name and triton_linear.supports(w)
    x = torch.randn(n_rows, w.shape[1], generator=torch.Generator().manual_seed(n_rows))
    ours, ref = triton_linear.linear(x, w), reference.linear(x, w)
    assert ours.shape == ref.shape == (n_rows, w.shape[0])
    assert float((ours - ref).abs().max()) <= REL_TOL * float(ref.abs().max())


def test_an_expert_slice_and_leading_dimensions():
    """A 3-D expert tensor's select() is a view with an offset; x may have leading dims."""
    w = _from_file(tiny_gguf("moe", "Q4_K_M"), "blk.0.ffn_down.weight")
    stacked = QTensor(torch.stack([w.data, w.data.flip(0)]), w.qtype, (2, *w.shape), "stacked")
    x = torch.randn(2, 3, w.shape[1])
    for e in (0, 1):
        ours, ref = triton_linear.linear(x, stacked.select(e)), reference.linear(x, stacked.select(e))
        assert ours.shape == (2, 3, w.shape[0])
        assert float((ours - ref).abs().max()) <= REL_TOL * float(ref.abs().max())


@pytest.mark.parametrize("name, variant", [("dense", "Q4_0"), ("moe", "Q4_K_M")])
def test_a_tiny_gemma4_on_the_triton_backend_gives_the_references_logits_and_tokens(name, variant):
    """The Q4_0 dense model and the Q4_K_M MoE (Q4_K, Q5_0, Q6_K and Q8_0 tensors, experts)."""
    path = tiny_gguf(name, variant)
    prompt = [2, 818, 1279, 529, 3001]
    ref_model = Model.load(path, backend="reference", ctx_size=64)
    tri_model = Model.load(path, backend="triton", ctx_size=64)
    assert tri_model.network.ops.name == "triton"
    ids = torch.tensor(prompt)
    ref_logits = ref_model.network.logits(ref_model.network.forward(ids, ref_model.network.new_cache(8)))
    tri_logits = tri_model.network.logits(tri_model.network.forward(ids, tri_model.network.new_cache(8)))
    assert float((tri_logits - ref_logits).abs().max()) < 1e-4 * float(ref_logits.abs().max()) + 1e-4
    params = SamplingParams(temperature=0, max_tokens=2)  # decode: one-row products
    assert tri_model.generate(prompt, params).token_ids == ref_model.generate(prompt, params).token_ids


def test_the_triton_backend_on_the_cpu_outside_the_interpreter_is_refused(monkeypatch):
    from turbollm.kernels import backend
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="runs on a CUDA/ROCm device"):
        backend("triton", "cpu")
    assert backend("auto", "cpu").name in ("fast", "reference")  # auto never picks triton on the CPU
