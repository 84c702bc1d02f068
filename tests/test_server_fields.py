"""No request field is dropped silently: unknown fields and features this server does not have
are 400s naming the field; the accepted-but-inert fields are the listed ones, at their "off"
values. Checked on the request parser itself (no model, no server)."""

from __future__ import annotations

import asyncio
import json

import pytest

from turbollm.server.app import ApiError, parse_body
from turbollm.server.schemas import INERT_FIELDS, ChatCompletionRequest, CompletionRequest

CHAT = [{"role": "user", "content": "hi"}]


class _Body:
    def __init__(self, data):
        self._raw = json.dumps(data).encode()

    async def body(self):
        return self._raw


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
    (ChatCompletionRequest, "tools", [{"type": "function", "function": {"name": "f"}}], "tool calling"),
    (ChatCompletionRequest, "tool_choice", "required", "tool calling"),
    (ChatCompletionRequest, "response_format", {"type": "json_object"}, "structured output"),
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


def test_tool_messages_in_the_history_are_refused():
    history = CHAT + [{"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]}]
    assert "tool calls" in _refusal({"messages": history}).message


def test_the_inert_fields_at_their_off_values_are_accepted():
    body = _parse({"messages": [{"role": "user", "content": "hi", "name": "ann"}], "user": "u1", "metadata": {"a": "b"},
                   "store": False, "service_tier": "auto", "cache_prompt": True, "parallel_tool_calls": True,
                   "n_probs": 0, "logit_bias": {}, "tools": [], "tool_choice": "auto",
                   "response_format": {"type": "text"}, "typical_p": 1.0, "mirostat": 0})
    assert body.template_messages() == [{"role": "user", "content": "hi"}]
    documented = set(INERT_FIELDS)
    accepted = {"user", "metadata", "store", "service_tier", "name", "parallel_tool_calls", "n_probs", "logit_bias", "tools", "tool_choice", "response_format", "typical_p", "mirostat"}
    assert accepted == documented
