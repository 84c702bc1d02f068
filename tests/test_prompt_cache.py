"""Prompt caching across requests (engine/prompt_cache.py): a new request starts from the kept
cache of the longest common prefix and prefills only the rest; greedy output is token for token
that of a fresh run; a sliding-window ring that lost what the prefix needs is re-prefilled, not
read wrong; kept and running caches together never exceed the slots."""

from __future__ import annotations

import pytest

from turbollm import SamplingParams
from turbollm.engine.engine import Engine
from turbollm.engine.prompt_cache import PromptCache, common_prefix
from turbollm.engine.sequence import GenerationStats

GREEDY = SamplingParams(temperature=0, max_tokens=8)
WINDOW = 512  # the default model's sliding window: its rings hold 512 positions

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
        "combined movable metal type, oil-based ink and a screw press. ")


@pytest.fixture(scope="module")
def model(fast_model):
    return fast_model  # a real model: its greedy choices have margins, a random tiny one's do not


def _tokens(model, text: str) -> list[int]:
    return model.encode(text)


def _generate(engine: Engine, prompt: list[int]) -> tuple[list[int], GenerationStats]:
    stats, out = GenerationStats(), []
    for _ in engine.run(prompt, GREEDY, stats, out):
        pass
    return out, stats


def _fresh(model, prompt: list[int]) -> list[int]:
    return _generate(Engine(model, n_slots=1, slot_ctx=1024), prompt)[0]


def test_a_longer_prompt_starts_from_the_kept_prefix_and_decodes_the_same_tokens(model):
    engine = Engine(model, n_slots=1, slot_ctx=1024, prompt_cache=True)
    first = _tokens(model, TEXT * 30)  # longer than the window: the rings have wrapped
    assert len(first) > WINDOW
    out1, s1 = _generate(engine, first)
    assert s1.n_cached == 0
    # the next turn: the whole earlier exchange and a question
    second = first + out1 + model.tokenizer.encode(" What came next?", add_special=False)
    out2, s2 = _generate(engine, second)
    kept = len(first) + len(out1) - 1  # the last sampled token was never fed to the model
    assert s2.n_cached == kept
    assert out2 == _fresh(model, second)
    assert engine.totals.n_cache_hits == 1 and engine.totals.n_cached == kept
    assert engine.totals.n_prompt == len(first) + len(second)


def test_a_prefix_the_ring_has_lost_is_prefilled_again(model):
    engine = Engine(model, n_slots=1, slot_ctx=1024, prompt_cache=True)
    first = _tokens(model, TEXT * 30)
    _generate(engine, first)
    # diverges more than a ring's 512 slots before the end of what was kept
    second = first[:len(first) - 520] + model.tokenizer.encode(" In short, it spread.", add_special=False)
    out, stats = _generate(engine, second)
    assert stats.n_cached == 0
    assert out == _fresh(model, second)
    # diverging within the window rolls the rings back instead
    third = second[:-3] + model.tokenizer.encode(" Then what?", add_special=False)
    out, stats = _generate(engine, third)
    assert stats.n_cached == len(second) - 3
    assert out == _fresh(model, third)


def test_cache_prompt_false_prefills_everything(model):
    engine = Engine(model, n_slots=1, slot_ctx=1024, prompt_cache=True)
    prompt = _tokens(model, TEXT)
    _generate(engine, prompt)
    stats = GenerationStats()
    engine.submit(prompt, GREEDY, lambda ev: None, stats, reuse_prompt=False)
    while stats.finish_reason == "":
        engine.step()
    assert stats.n_cached == 0


def test_kept_and_running_caches_never_exceed_the_slots():
    made = []

    class FakeCache:
        def __init__(self):
            self.n_tokens, self.nbytes = 0, 1
            made.append(self)

        def truncate(self, n):
            self.n_tokens = n

    pool = PromptCache(2, FakeCache)
    a, _ = pool.take([1, 2, 3], n_running=0)
    b, _ = pool.take([7, 8], n_running=1)
    a.n_tokens, b.n_tokens = 3, 2
    pool.keep([1, 2, 3, 4], a)  # holds 3 tokens: the 4th was sampled, not fed
    pool.keep([7, 8], b)
    assert [k.tokens for k in pool.kept] == [[1, 2, 3], [7, 8]]
    c, n = pool.take([9, 9, 9], n_running=0)  # no match, no free slot: the least recent's buffers
    assert c is a and n == 0 and len(made) == 2
    d, n = pool.take([7, 8, 5], n_running=1)
    assert d is b and n == 2 and len(made) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2 and common_prefix([], [1]) == 0
    e, n = pool.take([1], n_running=0)  # an empty pool with a free slot: a new cache
    assert n == 0 and len(made) == 3
