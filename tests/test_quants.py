"""The torch dequantizers are bit-exact with the gguf package's numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf import quants as gguf_quants

from turbollm.gguf import quants
from turbollm.gguf.reader import GGUFFile

REQUIRED = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K,
            Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS, Q.IQ3_S, Q.IQ3_XXS, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S,
            Q.IQ1_S, Q.IQ1_M]

# Byte offsets of each block's f16 scale fields, overwritten with finite values so that the
# comparison exercises real numbers (random bytes make many NaN/inf scales). IQ1_M spreads its
# scale over the top bits of four uint16s; it keeps random bytes (NaN positions must still agree).
F16_FIELDS = {
    Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0], Q.Q2_K: [80, 82],
    Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208], Q.IQ4_NL: [0], Q.IQ4_XS: [0],
    Q.IQ3_S: [0], Q.IQ3_XXS: [0], Q.IQ2_XXS: [0], Q.IQ2_XS: [0], Q.IQ2_S: [0], Q.IQ1_S: [0], Q.IQ1_M: [],
}


def _random_blocks(qtype: Q, n_blocks: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if qtype in (Q.F32, Q.F16):
        values = rng.standard_normal(n_blocks).astype(np.float32 if qtype == Q.F32 else np.float16)
        return values.view(np.uint8).reshape(n_blocks, type_size)
    raw = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    for at in F16_FIELDS.get(qtype, []):
        scales = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16)
        raw[:, at:at + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return raw


def _reference(raw: np.ndarray, qtype: Q) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        return gguf_quants.dequantize(raw.reshape(-1), qtype).astype(np.float32).reshape(-1)


@pytest.mark.parametrize("qtype", REQUIRED, ids=lambda q: q.name)
def test_random_blocks_bit_exact(qtype):
    block_size, _ = GGML_QUANT_SIZES[qtype]
    n_blocks = 96 if block_size > 1 else 1000
    raw = _random_blocks(qtype, n_blocks, seed=int(qtype))
    ours = quants.dequantize(torch.from_numpy(raw), qtype, (n_blocks * block_size,))
    assert ours.dtype == torch.float32 and ours.shape == (n_blocks * block_size,)
    ref = _reference(raw, qtype)
    if qtype not in (Q.IQ1_M, Q.BF16):
        assert np.isfinite(ref).all()
    np.testing.assert_array_equal(ours.numpy(), ref)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0, Q.IQ3_S], ids=lambda q: q.name)
def test_multi_row_layout(qtype):
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = _random_blocks(qtype, 6, seed=7)  # 3 rows of 2 blocks each
    ours = quants.dequantize(torch.from_numpy(raw.reshape(3, 2 * type_size)), qtype, (3, 2 * block_size))
    np.testing.assert_array_equal(ours.numpy(), _reference(raw, qtype).reshape(3, 2 * block_size))


def test_bf16_widens_exactly():
    values = np.array([1.0, -2.5, 3.140625, 0.0, -0.0, 65280.0], dtype=np.float32)
    raw = (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    np.testing.assert_array_equal(quants.dequantize(torch.from_numpy(raw), Q.BF16, (6,)).numpy(), values)


def test_every_required_type_is_registered():
    assert all(quants.is_supported(q) for q in REQUIRED)


def test_unsupported_type_is_a_clear_error():
    with pytest.raises(ValueError, match="TQ1_0 is not supported"):
        quants.dequantize(torch.zeros(54, dtype=torch.uint8), Q.TQ1_0, (256,))


def test_wrong_byte_count_is_a_clear_error():
    with pytest.raises(ValueError, match="Q4_0 tensor of shape \\(64,\\) needs 36 bytes, got 35"):
        quants.dequantize(torch.zeros(35, dtype=torch.uint8), Q.Q4_0, (64,))
    with pytest.raises(ValueError, match="not a whole number of Q4_K blocks"):
        quants.row_bytes(Q.Q4_K, 100)


@pytest.mark.slow
def test_every_tensor_of_the_default_model_bit_exact(default_model_path):
    gf = GGUFFile(default_model_path)
    seen = set()
    for name, info in gf.tensors.items():
        data = gf.tensor_bytes(name)
        ours = quants.dequantize(data, info.qtype, info.shape)
        ref = gguf_quants.dequantize(data.numpy().reshape(-1), info.qtype).reshape(info.shape)
        np.testing.assert_array_equal(ours.numpy(), ref.astype(np.float32), err_msg=name)
        seen.add(info.qtype)
    assert seen == {Q.F32, Q.Q5_0, Q.Q4_K, Q.Q6_K, Q.Q8_0}
