"""Sampling, the generation loop, stop strings, streaming, and the CLI on the default model."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from turbollm import SamplingParams
from turbollm.text.output import split_at_stop
from turbollm.cli import main as cli_main
from turbollm.engine.engine import Engine
from turbollm.engine.sequence import GenerationStats
from turbollm.engine.speculative import SpecConfig
from turbollm.engine.sampler import Sampler
from turbollm.kv.cache import KVCache
from turbollm.kv.plan import CacheConfig, LayerKVShape, plan_kv


# ---- sampler -------------------------------------------------------------------------------

def test_greedy_is_argmax_with_ties_to_the_lowest_id():
    logits = torch.tensor([0.0, 3.0, 1.0, 3.0])
    assert Sampler(SamplingParams(temperature=0))(logits, []) == 1


def test_top_k_1_is_greedy_at_any_temperature():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(SamplingParams(temperature=1.5, top_k=1, seed=3))
    assert all(sampler(logits, []) == int(torch.argmax(logits)) for _ in range(20))


def test_seed_makes_sampling_reproducible_and_seeds_differ():
    logits = torch.zeros(50)
    a = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=11))
    b = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=11))
    c = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=12))
    seq_a = [a(logits, []) for _ in range(30)]
    assert seq_a == [b(logits, []) for _ in range(30)]
    assert seq_a != [c(logits, []) for _ in range(30)]


def test_min_p_and_top_p_cut_the_tail():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    min_p = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.35, seed=0))
    assert {min_p(logits, []) for _ in range(200)} == {0, 1}  # 0.15 < 0.35 * 0.5
    top_p = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.8, min_p=0.0, seed=0))
    assert {top_p(logits, []) for _ in range(200)} == {0, 1}  # 0.5 + 0.3 reaches 0.8


@pytest.mark.parametrize("temperature, penalty", [(1e-300, 1.0), (0.8, 1e-300), (1e-30, 1e300), (1e-300, 1e-300)])
def test_extreme_temperatures_and_penalties_still_give_a_distribution(temperature, penalty):
    """No sampling input may make the probabilities NaN: a temperature far below float32's
    range gives the best token all the mass, a huge or tiny penalty stays finite."""
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 5
    sampler = Sampler(SamplingParams(temperature=temperature, repeat_penalty=penalty, top_k=0, top_p=1.0, min_p=0.0, seed=1))
    ids, probs = sampler.distribution(logits, list(range(100)))
    assert torch.isfinite(probs).all() and float(probs.sum()) == pytest.approx(1.0)
    token = sampler(logits, list(range(100)))
    if penalty == 1.0:  # nothing penalised: the argmax, certainly
        assert token == int(torch.argmax(logits)) and float(probs.max()) == 1.0


def test_repeat_penalty_demotes_recent_tokens():
    logits = torch.tensor([2.0, 1.9, -1.0])
    params = SamplingParams(temperature=0, repeat_penalty=1.5, repeat_last_n=4)
    assert Sampler(params)(logits, [0]) == 1  # 2.0 / 1.5 < 1.9
    assert Sampler(params)(logits, [0, 2, 2, 2, 2]) == 0  # 0 is outside the last 4


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), "temperature must be >= 0"),
    (dict(top_p=0), "top_p must be in (0, 1]"),
    (dict(min_p=2), "min_p must be in [0, 1]"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(repeat_penalty=0), "repeat_penalty must be > 0"),
    (dict(max_tokens=-5), "max_tokens must be >= 0"),
])
def test_invalid_sampling_params_say_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace("[", "\\[")):
        SamplingParams(**kwargs)


# ---- generation loop on a scripted model ---------------------------------------------------

class ScriptedTokenizer:
    eog_ids = frozenset({1})
    n_vocab = 16

    def token_bytes(self, token_id: int, special: bool = False) -> bytes:
        return f"<{token_id}>".encode()

    def token_id(self, text: str) -> int | None:
        return None


class ScriptedModel:
    """A loaded model whose network emits a fixed sequence of argmax tokens, one per forward."""

    def __init__(self, script: list[int], ctx_size: int = 100, vocab: int = 16):
        self.script, self.vocab, self.calls = script, vocab, 0
        self.network, self.tokenizer, self.slot_ctx = self, ScriptedTokenizer(), ctx_size
        self.cache, self.spec = CacheConfig(), SpecConfig()

    def new_drafter(self, cache):
        return None

    def new_cache(self, capacity: int, config: CacheConfig = CacheConfig()) -> KVCache:
        return KVCache(plan_kv([LayerKVShape(1, 2)], capacity, config))

    def forward_batch(self, ids, caches, commit=True):
        for seq_ids, cache in zip(ids, caches):
            cache.begin(len(seq_ids))
            cache.advance()
        return torch.zeros(sum(len(t) for t in ids), 1)

    def forward(self, ids, cache, commit=True):
        return self.forward_batch([ids], [cache], commit)

    def logits(self, hidden):
        rows = torch.zeros(hidden.shape[0], self.vocab)
        for row in rows:
            row[self.script[min(self.calls, len(self.script) - 1)]] = 1.0
            self.calls += 1
        return rows


def _run(model: ScriptedModel, prompt: list[int], max_tokens: int, stats: GenerationStats | None = None) -> list[int]:
    tokens: list[int] = []
    list(Engine(model, stop_at_context_end=True).run(prompt, SamplingParams(temperature=0, max_tokens=max_tokens), stats, tokens))
    return tokens


def test_generation_stops_at_end_of_generation_token_without_yielding_it():
    stats = GenerationStats()
    out = _run(ScriptedModel([5, 6, 1, 7]), [2, 3], 10, stats)
    assert out == [5, 6] and stats.finish_reason == "stop" and stats.n_generated == 2
    assert stats.n_prompt == 2 and stats.n_decode_steps == 2 and stats.n_decode_tokens == 2


def test_generation_stops_at_max_tokens_and_at_the_context_end():
    stats = GenerationStats()
    out = _run(ScriptedModel([5, 6, 7, 8]), [2, 3], 3, stats)
    assert out == [5, 6, 7] and stats.finish_reason == "length"
    stats = GenerationStats()
    out = _run(ScriptedModel([5, 6, 7, 8], ctx_size=5), [2, 3], 30, stats)
    assert out == [5, 6, 7] and stats.finish_reason == "length"  # 2 prompt + 3 generated fill the 5-token context


def test_the_server_engine_refuses_what_the_caller_thread_engine_cuts_at_the_context_end():
    from turbollm.errors import ContextLengthError
    with pytest.raises(ContextLengthError, match="max_tokens 30 is more than the 3 tokens left in the context size of 5"):
        Engine(ScriptedModel([5], ctx_size=5)).submit([2, 3], SamplingParams(max_tokens=30), lambda ev: None)
    with pytest.raises(ContextLengthError, match="the prompt has 5 tokens but the context size is 5"):
        _run(ScriptedModel([5], ctx_size=5), [2, 3, 4, 5, 6], 1)


def test_closing_the_stream_early_cancels_the_request_and_a_failed_step_raises():
    model = ScriptedModel([5, 6, 7, 8])
    engine = Engine(model, stop_at_context_end=True)
    events = engine.run([2, 3], SamplingParams(temperature=0, max_tokens=10))
    assert next(events).text == "<5>"
    events.close()
    assert engine.n_running == 0 and engine.n_finished == {"cancelled": 1}
    model.logits = lambda hidden: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        list(engine.run([2, 3], SamplingParams(temperature=0, max_tokens=10)))


def test_kv_cache_refuses_overflow_and_truncates():
    cache = KVCache(plan_kv([LayerKVShape(1, 4)], 3))
    cache.check_room(3)
    with pytest.raises(Exception, match="exceed the context size of 3"):
        cache.begin(4)
    cache.begin(2)
    cache.advance()
    cache.truncate(1)
    assert cache.n_tokens == 1
    with pytest.raises(ValueError):
        cache.truncate(2)


# ---- stop strings --------------------------------------------------------------------------

def test_stop_string_split_holds_back_possible_prefixes():
    assert split_at_stop("hello wor", ("world",)) == ("hello ", "wor", False)
    assert split_at_stop("hello world!", ("world",)) == ("hello ", "", True)
    assert split_at_stop("a. b", ("\n\n", ". ")) == ("a", "", True)
    assert split_at_stop("abc", ()) == ("abc", "", False)
    assert split_at_stop("hello wor", ("world",), final=True) == ("hello wor", "", False)


# ---- the default model ---------------------------------------------------------------------

def test_generate_greedy_matches_the_oracle_text(gemma3_model, gemma3_oracle):
    ref = gemma3_oracle("short_en")
    out = gemma3_model.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=12))
    assert out.prompt_token_ids == ref["tokens"].tolist()
    assert out.token_ids == ref["hf_greedy"][:12].tolist()
    assert out.text == gemma3_model.tokenizer.decode(out.token_ids)
    assert out.finish_reason == "length" and out.stats.n_generated == 12


def test_stream_pieces_join_to_the_generated_text(fast_model):
    params = SamplingParams(temperature=0.9, seed=5, max_tokens=24)
    whole = fast_model.generate("Once upon a time", params)
    pieces = list(fast_model.stream("Once upon a time", params))
    assert "".join(p.text for p in pieces) == whole.text and len(pieces) > 1


def test_stop_string_ends_generation(fast_model):
    full = fast_model.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=12)).text
    stop = " " + full.split()[4]  # a word in the middle of the greedy answer
    assert full.index(stop) > 0
    out = fast_model.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=12, stop=(stop,)))
    assert out.text == full[:full.index(stop)] and out.finish_reason == "stop"


def test_cli_run_streams_the_greedy_answer(capsys, default_model_path, gemma3_model, gemma3_oracle):
    status = cli_main(["run", "-m", str(default_model_path), "-p", "The capital of France is", "-n", "8", "--temp", "0", "-v"])
    captured = capsys.readouterr()
    assert status == 0
    ref = gemma3_oracle("short_en")
    # the greedy answer up to the first step where an oracle is unsure: at step 4 llama.cpp's
    # margin is 0.03 (" of" or "."), below the ~0.5 that 8-bit activations move a logit
    sure = int(np.argmax((ref["greedy_margin"] < 0.1) | (ref["hf_greedy_margin"] < 0.1)))
    assert sure >= 4
    expected = gemma3_model.tokenizer.decode(ref["hf_greedy"][:sure])
    assert captured.out.startswith(expected) and captured.out.endswith("\n")
    for line in ("load time =", "prompt: 6 tokens", "decode: 7 tokens", "finish: length"):
        assert line in captured.err


def test_cli_inspect_lists_architecture_and_tensors(capsys, default_model_path):
    assert cli_main(["inspect", str(default_model_path)]) == 0
    out = capsys.readouterr().out
    assert "architecture: gemma3 (Gemma 3 270m): 18 layers, hidden 640" in out
    assert "parameters: 268,098,176 total" in out
    assert "layer pattern SSSSSGSSSSSGSSSSSG" in out
    assert "tokenizer.ggml.tokens = <262144 entries>" in out
    assert any(line.startswith("blk.0.attn_q.weight") and "Q5_0" in line and "[1024, 640]" in line for line in out.splitlines())


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "turbollm.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "run" in result.stdout and "inspect" in result.stdout
