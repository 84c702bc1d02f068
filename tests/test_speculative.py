"""Speculative decoding: prompt lookup and the Gemma 4 MTP assistant head; greedy output equal
to plain decoding, the sampling rule keeps the target's distribution, the head matches the
transformers oracle, and a head that does not fit its target is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from turbollm import Model, SamplingParams
from turbollm.cli.bench_spec import copy_task_prompt
from turbollm.engine.sequence import GenerationStats
from turbollm.engine.sampler import Sampler
from turbollm.engine.speculative import NgramDrafter, SpecConfig, accept
from turbollm.errors import TurbollmError

from conftest import REFERENCE_DIR, tiny_gguf

ASSISTANT = REFERENCE_DIR / "gemma4-tiny-assistant"
TARGET = REFERENCE_DIR / "gemma4-tiny-moe"


# ---- prompt lookup -----------------------------------------------------------------------

def test_ngram_drafter_proposes_what_followed_the_latest_match():
    d = NgramDrafter(ngram_min=2, ngram_max=3)
    assert d.propose([1, 2, 3, 4, 5, 9, 2, 3], 4) == [4, 5, 9, 2]
    assert d.propose([1, 2, 3, 4, 5, 9, 2, 3, 4], 2) == [5, 9]  # the index grows with the text
    assert d.propose([7, 8, 9], 4) == []  # a new text: no match
    assert NgramDrafter(2, 2).propose([5, 6, 1, 5, 6, 2, 5, 6], 1) == [2]  # the latest occurrence wins
    assert NgramDrafter(3, 3).propose([1, 2, 3, 4, 9, 2, 3], 4) == []  # only a 2-gram matches


# ---- the acceptance rule ---------------------------------------------------------------------

def test_greedy_accepts_while_drafts_equal_the_argmax():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]])  # argmax 1, 0, 2
    sampler = Sampler(SamplingParams(temperature=0))
    assert accept(sampler, logits, [7], [1, 0]) == ([1, 0, 2], 2)  # both accepted + the bonus
    assert accept(sampler, logits, [7], [1, 2]) == ([1, 0], 1)  # second rejected: the argmax instead
    assert accept(sampler, logits, [7], [2, 0]) == ([1], 0)


@pytest.mark.slow
def test_sampled_tokens_keep_the_target_distribution():
    """With drafts from elsewhere, each output position must still be distributed as the
    target's p. 40,000 rounds on a 6-token vocabulary: the empirical frequencies of the first
    and second output tokens stay within 5 standard errors of p (and of p_2 given the first)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, generator=g) * 1.5
    params = SamplingParams(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, seed=42)
    sampler = Sampler(params)
    p = [_in_vocab_order(*sampler.distribution(row, [])) for row in logits]
    n, first, second = 40_000, torch.zeros(6), torch.zeros(6)
    n_second = 0
    for _ in range(n):
        drafts = [int(torch.randint(0, 6, (1,), generator=g)), 3]  # a poor drafter, and a fixed one
        out, _ = accept(sampler, logits, [], drafts)
        first[out[0]] += 1
        if out[0] == drafts[0] and len(out) > 1:  # the second output comes from row 1 after accepting
            second[out[1]] += 1
            n_second += 1
    for counts, total, probs in ((first, n, p[0]), (second, n_second, p[1])):
        freq = counts / total
        se = torch.sqrt(probs * (1 - probs) / total)
        assert torch.all((freq - probs).abs() < 5 * se + 1e-4), (freq, probs)
    assert n_second > 0.1 * n  # enough second tokens for the bound to mean something


def _in_vocab_order(ids: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(int(ids.max()) + 1)
    out[ids] = probs
    return out


# ---- the default model with prompt lookup -------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("prompt", ["copy", "The capital of France is", "def fibonacci(n):\n"])
def test_prompt_lookup_gives_the_tokens_of_plain_greedy_decoding(prompt, default_model_path):
    prompt = copy_task_prompt() if prompt == "copy" else prompt
    params = SamplingParams(temperature=0, max_tokens=96)
    plain = Model.load(default_model_path, ctx_size=2048).generate(prompt, params)
    spec_model = Model.load(default_model_path, ctx_size=2048, spec=SpecConfig("ngram", draft_max=8))
    stats = GenerationStats()
    tokens = []
    list(spec_model.stream(prompt, params, stats, tokens))
    assert tokens == plain.token_ids
    if prompt.startswith("Rewrite"):
        assert stats.spec.acceptance > 0.5 and stats.n_decode_steps < len(tokens) / 2


@pytest.mark.slow
def test_prompt_lookup_works_on_quantized_caches_and_rings(default_model_path):
    """Rejected drafts never reach the slots: a q8_0/turbo4 cache and 512-slot rings (the
    copy prompt is longer than the window) give the same tokens as plain decoding on them."""
    from turbollm.kv.plan import CacheConfig
    prompt, params = copy_task_prompt() * 2, SamplingParams(temperature=0, max_tokens=64)
    cache = CacheConfig("q8_0", "turbo4")
    plain = Model.load(default_model_path, ctx_size=2048, cache=cache).generate(prompt, params)
    assert len(plain.prompt_token_ids) > 512
    spec = Model.load(default_model_path, ctx_size=2048, cache=cache, spec=SpecConfig("ngram")).generate(prompt, params)
    assert spec.token_ids == plain.token_ids


# ---- the MTP assistant head ---------------------------------------------------------------------

@pytest.mark.parametrize("variant, reference, tol", [("F32", "hf_w", 0.05), ("Q4_0", "hfdeq_q4_0", 0.08),
                                                     ("IQ3_M", "hfdeq_iq3_m", 0.08)])
@pytest.mark.parametrize("record", ["short", "chat", "long"])
def test_assistant_steps_match_transformers(variant, reference, tol, record):
    """Exact maths (reference backend, F32 target): the head's logits within `tol` of
    transformers with llama.cpp's window (`hf_w`) or on the same dequantized weights
    (`hfdeq_*`); the target's own hidden state differs from transformers' by ~0.015, and each
    step feeds back h, so the bound grows a little per step."""
    model = Model.load(tiny_gguf("moe", "F32"), ctx_size=1024, backend="reference",
                       spec=SpecConfig("mtp"), draft_model=tiny_gguf("assistant", variant))
    with np.load(ASSISTANT / f"{record}.npz") as f:
        rec = {k: f[k] for k in f.files}
    ids = rec["tokens"].tolist()
    cache = model.network.new_cache(len(ids) + 8, model.cache)
    hidden = model.network.forward(torch.tensor(ids), cache)
    assert (hidden[-1] - torch.from_numpy(rec["target_h_last"])).abs().max() < 0.03
    token, h = int(rec["target_next_token"]), hidden[-1]
    for step in range(4):
        logits, h = model.assistant.step(token, h, model.network, cache)
        expected = torch.from_numpy(rec[f"{reference}_draft_logits"][step])
        assert (logits - expected).abs().max() < tol * (1 + step), (step, (logits - expected).abs().max())
        assert torch.allclose(h, torch.from_numpy(rec[f"{reference}_draft_h_out"][step]), atol=tol * (1 + step))
        token = int(torch.argmax(logits))
        assert token == int(rec[f"{reference}_draft_tokens"][step])
    assert cache.n_tokens == len(ids)  # the head wrote nothing


def test_centroid_masked_head_matches_transformers():
    """E2B/E4B heads score clusters and compute only the top clusters' logits."""
    model = Model.load(tiny_gguf("moe", "F32"), ctx_size=1024, backend="reference",
                       spec=SpecConfig("mtp"), draft_model=tiny_gguf("assistant", "F32"))
    head = model.assistant
    with np.load(ASSISTANT / "ordered_embedding_head.npz") as f:
        head.centroids = torch.from_numpy(f["centroids"]).float()
        head.token_ordering = torch.from_numpy(f["token_ordering"]).long()
    head.centroid_top_k = 4  # config.json centroid_intermediate_top_k
    with np.load(ASSISTANT / "short.npz") as f:
        rec = {k: f[k] for k in f.files}
    cache = model.network.new_cache(64, model.cache)
    hidden = model.network.forward(torch.tensor(rec["tokens"].tolist()), cache)
    token, h = int(rec["target_next_token"]), hidden[-1]
    for step in range(2):  # the hf (not hf_w) records: the same on the short prompt
        logits, h = head.step(token, h, model.network, cache)
        expected = torch.from_numpy(rec["hf_draft_masked_logits"][step])
        kept = expected > expected.min()
        assert torch.equal(logits > logits.min(), kept)  # the same clusters' tokens
        assert (logits[kept] - expected[kept]).abs().max() < 0.05
        token = int(rec["hf_draft_input_tokens"][step + 1])  # what transformers fed next


@pytest.mark.parametrize("target_quant, head_quant, cache", [
    ("Q4_0", "Q4_0", "f16"), ("Q8_0", "Q4_K_M", "f16"), ("F32", "F32", "f16"),
    ("Q4_0", "Q4_0", "q4_0/turbo3~8")])  # a quantized cache: the head reads coded rows and the exact window's
def test_mtp_speculation_gives_the_tokens_of_plain_greedy_decoding(target_quant, head_quant, cache, capsys):
    from turbollm.cli.quality import parse_cache_entry
    prompts = [p["tokens"] for p in json.loads((TARGET / "prompts.json").read_text()).values()]
    params = SamplingParams(temperature=0, max_tokens=40)
    cache = parse_cache_entry(cache, turbo_block=32)  # the tiny models' heads of 64 values
    plain = Model.load(tiny_gguf("moe", target_quant), ctx_size=1024, cache=cache)
    spec = Model.load(tiny_gguf("moe", target_quant), ctx_size=1024, spec=SpecConfig("mtp", draft_max=4),
                      draft_model=tiny_gguf("assistant", head_quant), cache=cache)
    for prompt in prompts:
        stats = GenerationStats()
        tokens = []
        list(spec.stream(prompt, params, stats, tokens))
        assert tokens == plain.generate(prompt, params).token_ids
        assert stats.spec.n_drafted > 0 and stats.spec.n_rounds > 0
        print(f"{target_quant}/{head_quant}: {stats.spec.summary()}")
    assert "draft acceptance rate = " in capsys.readouterr().out


def test_a_head_for_another_model_is_refused_with_the_reasons(default_model_path):
    with pytest.raises(TurbollmError, match="does not match the target model: the target is gemma3.*backbone width is 256"):
        Model.load(default_model_path, spec=SpecConfig("mtp"), draft_model=ASSISTANT / "gemma4-tiny-assistant-Q4_0.gguf")
    with pytest.raises(TurbollmError, match="needs the assistant head"):
        Model.load(TARGET / "gemma4-tiny-moe-Q4_0.gguf", spec=SpecConfig("mtp"))
    with pytest.raises(TurbollmError, match="is not a Gemma 4 assistant head"):
        Model.load(TARGET / "gemma4-tiny-moe-Q4_0.gguf", spec=SpecConfig("mtp"), draft_model=TARGET / "gemma4-tiny-moe-Q4_0.gguf")


# ---- per slot in the serving engine ------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["ngram", "mtp"])
def test_speculation_in_the_serving_engine_gives_the_tokens_of_plain_decoding(kind, default_model_path):
    from test_engine import run_all
    from turbollm.engine.engine import Engine
    if kind == "ngram":
        path, draft, prompts = default_model_path, None, [copy_task_prompt(), "The capital of France is", "1, 2, 3, 4,"]
    else:
        path, draft = TARGET / "gemma4-tiny-moe-Q4_0.gguf", ASSISTANT / "gemma4-tiny-assistant-Q4_0.gguf"
        prompts = ["The quick brown fox jumps", "Once upon a time", "A train leaves the station"]
    params = SamplingParams(temperature=0, max_tokens=48)
    plain = Model.load(path, ctx_size=2048)
    spec = Model.load(path, ctx_size=2048, spec=SpecConfig(kind, draft_max=6), draft_model=draft)
    engine = Engine(spec, n_slots=2, slot_ctx=1024)
    seqs, _ = run_all(engine, prompts, params)
    assert [s.generated for s in seqs] == [plain.generate(p, params).token_ids for p in prompts]
    spec_totals = engine.spec_totals()
    assert spec_totals.n_rounds > 0 and spec_totals.n_drafted > 0
    if kind == "ngram":
        assert spec_totals.n_accepted > 20  # the copy task copies


def test_draft_length_grows_shrinks_and_pauses_after_a_round_that_accepts_nothing():
    from turbollm.engine.speculative import DraftLength
    dl = DraftLength(SpecConfig("ngram", draft_max=8, draft_min=1))
    assert dl.n == 8 and dl.drafting
    dl.update(8, 3)
    assert dl.n == 7 and dl.drafting  # partial acceptance: one shorter, no pause
    pauses = []
    for _ in range(5):  # rounds that accept nothing: pauses of 1, 2, 4, 8, 8 plain steps
        dl.update(dl.n, 0)
        skipped = 0
        while not dl.drafting:
            skipped += 1
        pauses.append(skipped)
    assert pauses == [1, 2, 4, 8, 8] and dl.n == 2
    dl.update(2, 2)  # a full acceptance resets the pause and grows the length
    assert dl.n == 4 and dl.drafting
    dl.update(4, 0)
    assert not dl.drafting and dl.drafting  # the pause starts again at one step
