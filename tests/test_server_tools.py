"""Tool calls through the HTTP API. A Gemma 4 model whose network is replaced by a script
(test_server_reasoning.ScriptedNetwork) writes a call in its native format, so the parse into
`message.tool_calls`, the streamed `delta.tool_calls` and `finish_reason: "tool_calls"` are
checked exactly; the default model (Gemma 3, the JSON format) is then driven by the `openai`
client through a forced call, the tool's result and the answer."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from conftest import REFERENCE_DIR, openai_client, start_server, stop_server
from test_server_reasoning import ScriptedNetwork

pytestmark = [pytest.mark.server]

SCRIPT = 'Checking.<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2}<tool_call|>'
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "required": ["city"],
                   "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def scripted():
    from turbollm import Model
    from turbollm.engine.engine import Engine
    from turbollm.server.app import ServerSettings, create_app
    model = Model.load(REFERENCE_DIR / "gemma4-tiny-moe" / "gemma4-tiny-moe-Q4_0.gguf", ctx_size=512)
    tok = model.tokenizer
    # after the call the model ends its turn with <|tool_response> (an end-of-generation token)
    script = tok.encode(SCRIPT, add_special=False, parse_special=True) + [tok.token_id("<|tool_response>")]
    model.network = ScriptedNetwork(script, tok.n_vocab)
    engine = Engine(model, n_slots=2, slot_ctx=256).start()
    with TestClient(create_app(engine, ServerSettings(model_id="tiny"))) as c:
        yield c
    engine.stop()


def test_a_native_call_becomes_tool_calls(scripted):
    r = scripted.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "max_tokens": 60})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Checking."
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_") and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "days": 2}


def test_without_tools_the_same_text_is_content(scripted):
    r = scripted.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 60}).json()
    assert r["choices"][0]["message"]["content"] == SCRIPT and r["choices"][0]["finish_reason"] == "stop"
    none = scripted.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "tool_choice": "none",
                                                      "max_tokens": 60}).json()
    assert none["choices"][0]["message"]["content"] == SCRIPT


def test_a_streamed_call_comes_as_one_tool_calls_delta_after_the_text(scripted):
    body = {"messages": ASK, "tools": [WEATHER], "max_tokens": 60, "stream": True}
    with scripted.stream("POST", "/v1/chat/completions", json=body) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content") or "" for d in deltas) == "Checking."
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert len(calls) == 1 and calls[0][0]["index"] == 0 and calls[0][0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0][0]["function"]["arguments"]) == {"city": "Paris", "days": 2}
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["tool_calls"]
    assert not any("<|tool_call>" in (d.get("content") or "") for d in deltas)


def test_the_history_of_a_tool_loop_renders_in_the_native_format(scripted):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    prompt = scripted.post("/apply-template", json={"messages": history, "tools": [WEATHER]}).json()["prompt"]
    assert "<|tool>declaration:get_weather" in prompt
    assert "<|tool_call>call:get_weather{city:<|\"|>Paris<|\"|>}<tool_call|><|tool_response>response:get_weather" \
           "{temperature:21}<tool_response|>" in prompt


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required", "tools": None}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
])
def test_bad_tool_fields_are_400_naming_them(scripted, body, param):
    r = scripted.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = scripted.post("/v1/completions", json={"prompt": "hi", "tools": [WEATHER]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"


# ---- the default model, through the openai client ------------------------------------------------

@pytest.fixture(scope="module")
def client():
    proc, url = start_server("-c", "2048", "-t", "2")
    yield openai_client(url)
    stop_server(proc)


def test_a_forced_call_validates_and_the_result_leads_to_an_answer(client):
    jsonschema = pytest.importorskip("jsonschema")
    model = client.models.list().data[0].id
    first = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], temperature=0, max_tokens=60,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    history = ASK + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21, "sky": "clear"}'}]
    answer = client.chat.completions.create(model=model, messages=history, tools=[WEATHER], temperature=0, max_tokens=30)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
