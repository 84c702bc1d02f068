"""Log probabilities of generated tokens (engine/sampler.py TokenLogprob, carried by the
engine's events): they are the model's log-softmax at each position (checked against one
teacher-forced forward), the sampled token is their subject, speculative decoding reports the
same ones as plain decoding, a stop string's tokens are not reported, and
`post_sampling` gives the sampler's final distribution."""

from __future__ import annotations

import math

import pytest
import torch

from turbollm import Model, SamplingParams
from turbollm.engine.engine import Engine
from turbollm.engine.sequence import GenerationStats
from turbollm.engine.speculative import SpecConfig

PROMPT = "The capital of France is"


def _run(model, prompt: list[int], params: SamplingParams):
    events, out = [], []
    for ev in Engine(model, n_slots=1, slot_ctx=1024).run(prompt, params, GenerationStats(), out):
        events.append(ev)
    return out, [lp for ev in events for lp in ev.logprobs], "".join(ev.text for ev in events)


def test_logprobs_are_the_model_log_softmax_at_each_generated_position(fast_model):
    prompt = fast_model.encode(PROMPT)
    params = SamplingParams(temperature=0.7, top_k=20, seed=5, max_tokens=10, logprobs=3)
    out, entries, _ = _run(fast_model, prompt, params)
    assert [e.token_id for e in entries] == out and len(out) == 10
    # one forward over prompt + output: the rows that predicted each output token
    cache = fast_model.network.new_cache(1024, fast_model.cache)
    hidden = fast_model.network.forward(torch.tensor(prompt + out[:-1]), cache)
    expected = torch.log_softmax(fast_model.network.logits(hidden[len(prompt) - 1:]).float(), dim=-1)
    for e, row in zip(entries, expected):
        assert e.logprob == pytest.approx(float(row[e.token_id]), abs=1e-3)
        top = torch.topk(row, 3)
        assert [t for t, _ in e.top] == top.indices.tolist()
        assert [lp for _, lp in e.top] == pytest.approx(top.values.tolist(), abs=1e-3)
        assert all(a >= b for (_, a), (_, b) in zip(e.top, e.top[1:]))


def test_greedy_tokens_are_their_own_top_entry_and_logprobs_off_costs_nothing(fast_model):
    prompt = fast_model.encode(PROMPT)
    out, entries, _ = _run(fast_model, prompt, SamplingParams(temperature=0, max_tokens=8, logprobs=2))
    assert all(e.top[0] == (e.token_id, e.logprob) and len(e.top) == 2 for e in entries)
    plain, none, _ = _run(fast_model, prompt, SamplingParams(temperature=0, max_tokens=8))
    assert plain == out and none == []
    assert fast_model.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8, logprobs=2)).logprobs == entries


def test_a_stop_strings_tokens_are_not_reported(fast_model):
    prompt = fast_model.encode("1, 2, 3, 4,")
    out, entries, text = _run(fast_model, prompt, SamplingParams(temperature=0, max_tokens=20, stop=(" 7,",), logprobs=0))
    assert text == " 5, 6,"
    assert fast_model.tokenizer.decode([e.token_id for e in entries]) == text
    assert len(entries) < len(out)  # the tokens of " 7" were generated, and are not reported


def test_post_sampling_reports_the_distribution_the_token_was_drawn_from(fast_model):
    prompt = fast_model.encode(PROMPT)
    params = SamplingParams(temperature=1.0, top_k=3, top_p=1.0, min_p=0.0, seed=1, max_tokens=6, logprobs=3,
                            post_sampling=True)
    out, entries, _ = _run(fast_model, prompt, params)
    for e in entries:
        assert len(e.top) == 3 and e.token_id in [t for t, _ in e.top]
        assert sum(math.exp(lp) for _, lp in e.top) == pytest.approx(1.0, abs=1e-5)  # top-k 3: all of it


@pytest.mark.slow
def test_speculative_decoding_reports_the_logprobs_of_plain_decoding(default_model_path):
    prompt_text = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3,"
    params = SamplingParams(temperature=0, max_tokens=32, logprobs=2)
    plain = Model.load(default_model_path, ctx_size=2048)
    spec = Model.load(default_model_path, ctx_size=2048, spec=SpecConfig("ngram", draft_max=6))
    prompt = plain.encode(prompt_text)
    engine = Engine(spec, n_slots=1, slot_ctx=1024)
    stats, out, entries = GenerationStats(), [], []
    for ev in engine.run(prompt, params, stats, out):
        entries += ev.logprobs
    # drafts were verified in multi-token forwards, and some were rejected (a round's rows are cut there)
    assert 5 < stats.spec.n_accepted < stats.spec.n_drafted
    want_out, want, _ = _run(plain, prompt, params)
    assert out == want_out and [e.token_id for e in entries] == want_out
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in want], abs=2e-3)
