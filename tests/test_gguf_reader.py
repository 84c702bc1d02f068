"""The GGUF reader: metadata identical to the stock gguf reader's, tensors as mmap views."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType

from turbollm.gguf.reader import GGUFFile

from conftest import REFERENCE_DIR


def _stock_metadata(path) -> dict:
    reader = GGUFReader(path)
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types[0] == GGUFValueType.ARRAY and field.types[-1] != GGUFValueType.STRING:
            out[key] = [v for i in field.data for v in field.parts[i].tolist()]
        else:
            out[key] = field.contents()
    return out


def test_metadata_equals_the_stock_reader():
    path = REFERENCE_DIR / "gemma4-tiny-moe" / "gemma4-tiny-moe-Q4_K_M.gguf"
    ours, stock = GGUFFile(path).metadata, _stock_metadata(path)
    assert ours.keys() == stock.keys()
    for key in stock:
        assert ours[key] == stock[key], key
    # every kind of value is exercised: string arrays, numeric arrays, bool arrays, scalars, strings
    assert len(ours["tokenizer.ggml.tokens"]) == 4096 and len(ours["tokenizer.ggml.merges"]) == 6017
    assert ours["gemma4.attention.sliding_window_pattern"] == [True] * 5 + [False]
    assert ours["gemma4.attention.head_count_kv"] == [2, 2, 2, 2, 2, 1]


def test_tensors_are_views_of_the_file(default_model_path):
    gf = GGUFFile(default_model_path)
    info = gf.tensors["blk.0.attn_q.weight"]
    assert info.shape == (1024, 640) and info.qtype.name == "Q5_0" and info.byte_shape == (1024, 440)
    data = gf.tensor_bytes("blk.0.attn_q.weight")
    assert data.dtype == torch.uint8 and tuple(data.shape) == info.byte_shape
    with open(default_model_path, "rb") as f:
        f.seek(info.offset)
        assert f.read(64) == bytes(data.reshape(-1)[:64].tolist())
    norm = gf.tensor_bytes("output_norm.weight").view(torch.float32)
    stock = GGUFReader(REFERENCE_DIR / "gemma4-tiny-moe" / "gemma4-tiny-moe-Q4_K_M.gguf")
    assert norm.shape == (640,) and np.isfinite(norm.numpy()).all()
    assert len(stock.tensors) == len(GGUFFile(REFERENCE_DIR / "gemma4-tiny-moe" / "gemma4-tiny-moe-Q4_K_M.gguf").tensors)
