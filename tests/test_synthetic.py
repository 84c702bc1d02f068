"""The synthetic Gemma 4 26B-A4B writer: the real file's layout, and a small variant that loads and runs."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import torch
from gguf import GGMLQuantizationType as Q

from conftest import REFERENCE_DIR
from turbollm import Model, SamplingParams
from turbollm.synthetic import PRESETS, tensor_plan, write
from turbollm.kv.plan import CacheConfig

F32_CACHE = CacheConfig("f32", "f32")  # the exact path the oracles are held to


def test_26b_a4b_plan_has_the_official_layout():
    plan = tensor_plan(PRESETS["26b-a4b"])
    assert len(plan) == 658  # as llama.cpp logs for gemma-4-26B-A4B-it GGUFs
    types = Counter(q for _, _, q in plan)
    assert types == {Q.F32: 392, Q.Q4_0: 265, Q.Q6_K: 1}
    n_params = sum(math.prod(shape) for _, shape, _ in plan)
    assert 25.1e9 < n_params < 25.3e9  # "25.2 B parameters"
    experts = sum(math.prod(shape) for name, shape, _ in plan if "_exps." in name)
    assert 3.7e9 < n_params - experts * (1 - 8 / 128) < 3.9e9  # "3.8 B active"
    shapes = dict((name, shape) for name, shape, _ in plan)
    assert shapes["blk.0.ffn_gate_up_exps.weight"] == (128, 1408, 2816)
    assert shapes["blk.5.attn_q.weight"] == (8192, 2816) and "blk.5.attn_v.weight" not in shapes
    assert shapes["blk.0.attn_k.weight"] == (2048, 2816)


def test_small_variant_writes_loads_and_generates(tmp_path):
    shape = replace(PRESETS["26b-a4b"], n_layer=6, n_expert=8, n_expert_used=2, n_vocab=4608,
                    n_embd=512, n_ff=256, n_ff_expert=64, n_head=4, n_head_kv_swa=2, n_head_kv_global=1)
    path = tmp_path / "synthetic.gguf"
    write(path, shape, REFERENCE_DIR / "gemma4-tiny-moe" / "gemma4-tiny-moe-Q4_0.gguf", seed=1)
    model = Model.load(path)
    cfg = model.config
    assert (cfg.n_layer, cfg.n_expert, cfg.n_expert_used, cfg.n_vocab) == (6, 8, 2, 4608)
    assert cfg.swa_layers == (True,) * 5 + (False,) and cfg.head_dim == (256,) * 5 + (512,)
    assert model.network.layers[5].attn.wv is None  # K = V on the global layer
    ids = torch.tensor(model.encode("A synthetic model"))
    logits = model.network.logits(model.network.forward(ids, model.network.new_cache(len(ids), F32_CACHE)))
    assert torch.isfinite(logits).all() and logits.abs().max() <= 30.0  # soft-capped
    out = model.generate("Hello", SamplingParams(temperature=0, max_tokens=4))
    assert len(out.token_ids) + (out.finish_reason == "stop") >= 1


def test_kv_heads_that_do_not_divide_query_heads_are_refused(tmp_path):
    import pytest
    from turbollm import GGUFError

    shape = replace(PRESETS["26b-a4b"], n_layer=1, n_expert=2, n_expert_used=1, n_vocab=4608,
                    n_embd=256, n_ff=64, n_ff_expert=32, n_head=4, n_head_kv_swa=8)
    path = tmp_path / "bad.gguf"
    write(path, shape, REFERENCE_DIR / "gemma4-tiny-moe" / "gemma4-tiny-moe-Q4_0.gguf")
    with pytest.raises(GGUFError, match="layer 0: 4 query heads cannot be grouped over 8 KV heads"):
        Model.load(path)
