"""No request field is dropped silently: unknown fields and features this server does not have
are 400s naming the field; the accepted-but-inert fields are the listed ones, at their "off"
values. Checked on the request parser itself (no model, no server)."""

from __future__ import annotations

import asyncio
import json

import pytest

from turbollm.server.app import ApiError, parse_body
from turbollm.server.schemas import INERT_FIELDS, ChatCompletionRequest, CompletionRequest, NativeCompletionRequest

CHAT = [{"role": "user", "content": "hi"}]


class _Body:
    """What parse_body reads of a request: its headers and its body in chunks."""

    def __init__(self, data, raw: bytes | None = None, headers: dict | None = None):
        self._raw = raw if raw is not None else json.dumps(data).encode()
        self.headers = headers or {}

    async def stream(self):
        for at in range(0, len(self._raw), 1 << 16):
            yield self._raw[at:at + 1 << 16]


def _parse(data, schema=ChatCompletionRequest):
    return asyncio.run(parse_body(_Body(data), schema))


def _refusal(data, schema=ChatCompletionRequest) -> ApiError:
    with pytest.raises(ApiError) as e:
        _parse(data, schema)
    assert e.value.status == 400
    return e.value


@pytest.mark.parametrize("schema, data, param", [
    (ChatCompletionRequest, {"messages": CHAT, "frobnicate": 1}, "frobnicate"),
    (CompletionRequest, {"prompt": "hi", "best_of": 3}, "best_of"),
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": "hi", "weight": 2}]}, "messages.0.weight"),
    (ChatCompletionRequest, {"messages": CHAT, "stream_options": {"continuous_usage_stats": True}},
     "stream_options.continuous_usage_stats"),
])
def test_an_unknown_field_is_a_400_naming_it(schema, data, param):
    e = _refusal(data, schema)
    assert e.param == param and "not supported by this server" in e.message


@pytest.mark.parametrize("schema, field, value, words", [
    (CompletionRequest, "tools", [{"type": "function", "function": {"name": "f"}}], "chat completions"),
    (NativeCompletionRequest, "tool_choice", "required", "chat completions"),
    (ChatCompletionRequest, "tool_choice", "required", "needs tools"),
    (ChatCompletionRequest, "top_logprobs", 3, "needs logprobs: true"),
    (ChatCompletionRequest, "n_probs", 5, "use logprobs"),
    (CompletionRequest, "n_probs", 5, "use logprobs"),
    (CompletionRequest, "logit_bias", {"42": -100}, "logit_bias"),
    (CompletionRequest, "suffix", "}", "fill-in-the-middle"),
    (CompletionRequest, "typical_p", 0.5, "typical_p"),
    (CompletionRequest, "mirostat", 2, "mirostat"),
])
def test_a_feature_this_server_lacks_is_refused_not_ignored(schema, field, value, words):
    base = {"messages": CHAT} if schema is ChatCompletionRequest else {"prompt": "hi"}
    e = _refusal({**base, field: value}, schema)
    assert e.param == field and words in e.message


def test_a_tool_call_in_the_history_needs_its_function():
    history = CHAT + [{"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]}]
    assert _refusal({"messages": history}).param == "messages.1.tool_calls.0.function"


@pytest.mark.parametrize("raw, words", [
    (b'{"messages": [{"role": "user", "content": "hi"}], "stream": 1}', "valid boolean"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stream": "true"}', "valid boolean"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2.0}', "valid integer"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "finite number"),
    (b'{"messages": [{"role": "user", "content": "\\ud800 lone"}]}', "malformed JSON"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}",
     "malformed JSON"),
    (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', "malformed JSON"),
])
def test_strict_types_and_hostile_json_are_400s(raw, words):
    with pytest.raises(ApiError) as e:
        asyncio.run(parse_body(_Body(None, raw), ChatCompletionRequest))
    assert e.value.status == 400 and words in e.value.message, e.value.message


def test_a_body_over_the_limit_is_a_413_before_it_is_read_whole():
    from turbollm.server.app import MAX_BODY_BYTES
    for headers in ({"content-length": str(MAX_BODY_BYTES + 1)}, {}):  # declared, or only sent
        with pytest.raises(ApiError) as e:
            asyncio.run(parse_body(_Body(None, b" " * (MAX_BODY_BYTES + 1), headers), ChatCompletionRequest))
        assert e.value.status == 413


def test_the_inert_fields_at_their_off_values_are_accepted():
    body = _parse({"messages": [{"role": "user", "content": "hi", "name": "ann"}], "user": "u1", "metadata": {"a": "b"},
                   "store": False, "service_tier": "auto", "cache_prompt": True, "parallel_tool_calls": True,
                   "n_probs": 0, "logit_bias": {}, "tools": [], "tool_choice": "auto",
                   "response_format": {"type": "text"}, "typical_p": 1.0, "mirostat": 0})
    assert body.template_messages() == [{"role": "user", "content": "hi"}]
    documented = set(INERT_FIELDS)
    accepted = {"user", "metadata", "store", "service_tier", "name", "parallel_tool_calls", "n_probs", "logit_bias",
                "tools", "tool_choice", "typical_p", "mirostat"}
    assert accepted == documented


PET = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}}, "required": ["kind"]}


@pytest.mark.parametrize("schema, fields, kind", [
    (ChatCompletionRequest, {"response_format": {"type": "text"}}, None),
    (ChatCompletionRequest, {"response_format": {"type": "json_object"}}, "json_object"),
    (ChatCompletionRequest, {"response_format": {"type": "json_object", "schema": PET}}, "json_schema"),
    (ChatCompletionRequest, {"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PET,
                                                                                       "strict": True}}}, "json_schema"),
    (CompletionRequest, {"response_format": {"type": "json_object"}}, "json_object"),
    (CompletionRequest, {"json_schema": PET}, "json_schema"),
    (ChatCompletionRequest, {"grammar": 'root ::= "a"'}, "gbnf"),
    (NativeCompletionRequest, {"grammar": 'root ::= "a"'}, "gbnf"),
    (NativeCompletionRequest, {"json_schema": PET, "response_format": {"type": "text"}}, "json_schema"),
])
def test_structured_output_fields_become_the_constraint(schema, fields, kind):
    base = {"messages": CHAT} if schema is ChatCompletionRequest else {"prompt": "hi"}
    params = _parse({**base, **fields}, schema).sampling(max_tokens=8)
    assert (params.constraint.kind if params.constraint is not None else None) == kind


@pytest.mark.parametrize("fields, param, words", [
    ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs"),
    ({"response_format": {"type": "json_object", "json_schema": {"schema": PET}}}, "response_format.json_schema",
     '"type": "json_schema"'),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "objekt"}}}},
     "response_format.json_schema.schema", "objekt"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p"}}}, "response_format.json_schema.schema",
     "required"),
    ({"response_format": {"type": "json_object", "schema": {"pattern": "(("}}}, "response_format.schema", "unclosed"),
    ({"json_schema": {"type": "objekt"}}, "json_schema", "objekt"),
    ({"grammar": "root ::= missing"}, "grammar", "missing"),
    ({"grammar": 'root ::= "a"', "json_schema": PET}, "grammar", "one constraint"),
    ({"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}, "grammar", "one constraint"),
    ({"json_schema": PET, "response_format": {"type": "json_object"}}, "json_schema", "one constraint"),
])
def test_a_bad_constraint_is_a_400_naming_its_field(fields, param, words):
    e = _refusal({"messages": CHAT, **fields})
    assert e.param == param and words in e.message
