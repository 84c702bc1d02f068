"""Structured output (engine/grammar.py over llguidance): the grammar module on the default
model's vocabulary, the sampler's mask, generation under a JSON schema / any JSON object / a
GBNF grammar (greedy and seeded), with speculative decoding on, and through the real server
with the `openai` client: output that `json.loads` and validates with `jsonschema`, and a bad
schema or grammar as a 400 naming its field."""

from __future__ import annotations

import copy
import dataclasses
import json

import httpx
import jsonschema
import numpy as np
import openai
import pytest
import torch

from conftest import openai_client, start_server, stop_server
from turbollm import Constraint, SamplingParams
from turbollm.engine.grammar import Grammar, Vocabulary, apply_mask
from turbollm.engine.sampler import Sampler
from turbollm.engine.speculative import SpecConfig

PET = {  # small, so that an answer is ~20 tokens
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 30},
                   "kind": {"enum": ["cat", "dog", "fish"]}},
    "required": ["name", "age", "kind"],
    "additionalProperties": False,
}
PET_QUESTION = "Describe a pet as JSON with its name, age and kind."
OBJECT_QUESTION = 'Give a JSON object with the key "answer" and a short value.'
YES_NO = 'root ::= ("yes" | "no")'


@pytest.fixture(scope="module")
def tok(fast_model):
    return fast_model.tokenizer


@pytest.fixture(scope="module")
def vocab(tok):
    return Vocabulary.of(tok)


def _allowed(grammar: Grammar) -> set[int]:
    masked = grammar.mask_logits(torch.zeros(grammar.n_vocab))
    return set(torch.isfinite(masked).nonzero().flatten().tolist())


def _chat(model, question: str) -> str:
    return model.chat_prompt([{"role": "user", "content": question}])


# ---- the grammar module -----------------------------------------------------------------------

def test_the_mask_allows_exactly_the_prefixes_of_the_grammar(tok, vocab):
    g = Grammar(Constraint.gbnf(YES_NO), vocab)
    allowed = _allowed(g)
    pieces = {t: tok.token_bytes(t) for t in allowed}
    assert tok.token_id("yes") in allowed and tok.token_id("no") in allowed
    assert all(p and (b"yes".startswith(p) or b"no".startswith(p)) for p in pieces.values())
    assert not allowed & tok.eog_ids  # nothing is complete yet
    n_prefixes = sum(1 for t in range(tok.n_vocab) if tok.token_bytes(t) in (b"y", b"ye", b"yes", b"n", b"no"))
    assert len(allowed) == n_prefixes
    g.advance(tok.token_id("yes"))
    assert g.is_complete and g.accepts_end


def test_a_json_document_walks_through_its_schema_token_by_token(tok, vocab):
    doc = {"name": "Rex", "age": 4, "kind": "dog"}
    tokens = tok.encode(json.dumps(doc), add_special=False, parse_special=False)
    g = Grammar(Constraint.json_schema(PET), vocab)
    for t in tokens:
        assert t in _allowed(g)
        g.advance(t)
    assert g.is_complete  # additionalProperties false: nothing can follow the closing brace
    # a value outside the enum is never allowed
    g = Grammar(Constraint.json_schema(PET), vocab)
    for t in tok.encode('{"name": "Rex", "age": 4, "kind": "', add_special=False, parse_special=False):
        g.advance(t)
    allowed = _allowed(g)
    assert tok.token_id("dog") in allowed and tok.token_id("cow") not in allowed
    with pytest.raises(RuntimeError, match="refused"):
        g.advance(tok.token_id("cow"))


def test_whitespace_between_json_tokens_is_bounded(tok, vocab):
    g = Grammar(Constraint.json_object(), vocab)
    g.advance(tok.token_id("{"))
    space = tok.token_id("▁")
    n = 0
    while space in _allowed(g) and n < 50:
        g.advance(space)
        n += 1
    assert n == 1  # llama.cpp's rule: one space, or newlines and up to 20 of indentation


def test_apply_mask_matches_unpacked_bits():
    n = 1000  # not a multiple of 32
    words = torch.randint(-2**31, 2**31 - 1, ((n + 31) // 32,), dtype=torch.int32)
    logits = torch.randn(n)
    bits = np.unpackbits(words.numpy().view(np.uint8), bitorder="little")[:n].astype(bool)
    expected = torch.where(torch.from_numpy(bits), logits, float("-inf"))
    assert torch.equal(apply_mask(logits.clone(), words), expected)


@pytest.mark.parametrize("make, words", [
    (lambda: Constraint.json_schema({"type": "objekt"}), "Invalid type: objekt"),
    (lambda: Constraint.json_schema({"type": "string", "pattern": "(("}), "unclosed group"),
    (lambda: Constraint.json_schema({"properties": {"a": {"$ref": "#/nowhere"}}}), "does not exist"),
    (lambda: Constraint.json_schema("{not json"), "not valid JSON"),
    (lambda: Constraint.json_schema([1]), "is an object"),
    (lambda: Constraint.gbnf("root ::= missing"), "Rule 'missing' not found"),
    (lambda: Constraint.gbnf("root := \"x\""), "Expected ::="),
    (lambda: Constraint.gbnf("  "), "empty"),
])
def test_a_bad_schema_or_grammar_is_a_value_error_naming_the_problem(make, words):
    with pytest.raises(ValueError, match=words):
        make()


# ---- the sampler --------------------------------------------------------------------------------

def test_the_mask_comes_before_top_k_and_greedy(tok, vocab):
    logits = torch.zeros(tok.n_vocab)
    logits[tok.token_id("maybe")] = 10.0  # the best token, not allowed
    logits[tok.token_id("no")] = 5.0
    logits[tok.token_id("yes")] = 4.0
    greedy = Sampler(SamplingParams(temperature=0), Grammar(Constraint.gbnf(YES_NO), vocab))
    assert greedy(logits, []) == tok.token_id("no")
    # top_k 1 after the mask keeps the best allowed token; before it, it would keep "maybe"
    top1 = Sampler(SamplingParams(temperature=1.0, top_k=1, seed=1), Grammar(Constraint.gbnf(YES_NO), vocab))
    assert top1(logits, []) == tok.token_id("no")
    drawn = {Sampler(SamplingParams(temperature=2.0, top_k=0, top_p=1.0, min_p=0.0, seed=s),
                     Grammar(Constraint.gbnf(YES_NO), vocab))(logits, []) for s in range(20)}
    assert drawn <= _allowed(Grammar(Constraint.gbnf(YES_NO), vocab)) and tok.token_id("no") in drawn


# ---- generation on the default model ----------------------------------------------------------

@pytest.mark.parametrize("params", [dict(temperature=0), dict(temperature=0.8, seed=7)], ids=["greedy", "seeded"])
def test_generation_under_a_json_schema_validates(fast_model, params):
    out = fast_model.generate(_chat(fast_model, PET_QUESTION),
                              SamplingParams(max_tokens=48, constraint=Constraint.json_schema(PET), **params))
    assert out.finish_reason == "stop"  # the grammar ended it, not max_tokens
    jsonschema.validate(json.loads(out.text), PET)


def test_json_object_gives_a_json_object(fast_model):
    out = fast_model.generate(_chat(fast_model, OBJECT_QUESTION),
                              SamplingParams(temperature=0, max_tokens=48, constraint=Constraint.json_object()))
    assert out.finish_reason == "stop" and isinstance(json.loads(out.text), dict)


def test_a_gbnf_grammar_gives_one_of_its_strings(fast_model):
    for seed in (0, 1):
        out = fast_model.generate(_chat(fast_model, "Is water wet?"),
                                  SamplingParams(temperature=1.0, seed=seed, max_tokens=8, constraint=Constraint.gbnf(YES_NO)))
        assert out.text in ("yes", "no") and out.finish_reason == "stop"
        # the grammar's end ends the sequence at once: no forward to sample an end token
        assert out.stats.n_decode_steps == len(out.token_ids) - 1


def test_a_constrained_sequence_decodes_without_drafts(fast_model):
    spec = copy.copy(fast_model)  # the same weights and tokenizer, with prompt lookup on
    spec.run = dataclasses.replace(fast_model.run, spec=SpecConfig("ngram", draft_max=4))
    prompt = _chat(spec, PET_QUESTION + " " + json.dumps({"name": "Rex", "age": 4, "kind": "dog"}))
    out = spec.generate(prompt, SamplingParams(temperature=0, max_tokens=48, constraint=Constraint.json_schema(PET)))
    jsonschema.validate(json.loads(out.text), PET)
    assert out.stats.spec.n_drafted == 0
    plain = spec.generate(prompt, SamplingParams(temperature=0, max_tokens=24))
    assert plain.stats.spec.n_draft_calls > 0  # the same model does draft without a constraint


# ---- through the server -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    proc, url = start_server("-c", "2048", "-np", "1", "-t", "2")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


@pytest.mark.server
def test_the_openai_client_gets_json_that_validates(client, model_id):
    messages = [{"role": "user", "content": PET_QUESTION}]
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET, "strict": True}}
    r = client.chat.completions.create(model=model_id, messages=messages, response_format=fmt, temperature=0, max_tokens=48)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), PET)
    r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": OBJECT_QUESTION}],
                                       response_format={"type": "json_object"}, temperature=0, max_tokens=48)
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.completions.create(model=model_id, prompt="Is water wet? Answer:", max_tokens=8, temperature=0,
                                  extra_body={"grammar": YES_NO})
    assert r.choices[0].text in ("yes", "no")


@pytest.mark.server
def test_a_bad_schema_or_grammar_is_a_400_naming_the_field(client, model_id, server):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_id, messages=messages, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}})
    assert e.value.body["param"] == "response_format.json_schema.schema" and "objekt" in e.value.body["message"]
    r = httpx.post(server + "/completion", json={"prompt": "hi", "grammar": "root ::= missing"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "grammar"
    r = httpx.post(server + "/completion", json={"prompt": "hi", "grammar": YES_NO, "json_schema": PET})
    assert r.status_code == 400 and "one constraint" in r.json()["error"]["message"]


@pytest.mark.server
def test_native_completion_takes_llama_server_json_schema(server):
    r = httpx.post(server + "/completion", timeout=120, json={
        "prompt": _PET_PROMPT, "json_schema": PET, "n_predict": 48, "temperature": 0})
    body = r.json()
    assert r.status_code == 200 and body["stop_type"] == "eos"
    jsonschema.validate(json.loads(body["content"]), PET)


_PET_PROMPT = f"<start_of_turn>user\n{PET_QUESTION}<end_of_turn>\n<start_of_turn>model\n"
