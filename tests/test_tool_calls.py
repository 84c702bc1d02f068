"""Tool calling's text layer (text/tool_calls.py): OpenAI's tools and tool messages rendered
in Gemma 4's own format (through the GGUF's template) and in the JSON format of the other
models, answers parsed back into calls, and the grammars of forced calls: llguidance accepts
them, they derive the calls the parser reads, and they refuse arguments against the schema."""

from __future__ import annotations

import json

import llguidance
import pytest

from conftest import REFERENCE_DIR
from turbollm.text.tool_calls import Gemma4Tools, JsonTools, Tool, ToolChoice, tool_format

WEATHER = Tool("get_weather", "The weather in a city now", {
    "type": "object", "required": ["city"],
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                   "days": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}}})
TIME = Tool("get_time", "The time now", {"type": "object", "properties": {}})
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    {"role": "assistant", "content": "It is 21 degrees."},
    {"role": "user", "content": "And tomorrow?"},
]


@pytest.fixture(scope="module")
def gemma4():
    from turbollm import Model
    return Model.load(REFERENCE_DIR / "gemma4-tiny-dense" / "gemma4-tiny-dense-Q4_0.gguf", ctx_size=512)


def test_the_format_follows_the_template(gemma4, fast_model):
    assert isinstance(gemma4.tool_format(), Gemma4Tools)
    assert isinstance(fast_model.tool_format(), JsonTools)  # Gemma 3's GGUF has no template
    assert isinstance(tool_format("{{ messages }}"), JsonTools)


def test_gemma4_renders_declarations_calls_and_responses_through_its_template(gemma4):
    fmt = gemma4.tool_format()
    prompt = gemma4.chat_prompt(fmt.messages(HISTORY, [WEATHER]), tools=fmt.template_tools([WEATHER]))
    assert "<|tool>declaration:get_weather{description:<|\"|>The weather in a city now<|\"|>" in prompt
    assert "<|tool_call>call:get_weather{city:<|\"|>Paris<|\"|>}<tool_call|>" in prompt
    assert "<|tool_response>response:get_weather{temperature:21}<tool_response|>It is 21 degrees.<turn|>" in prompt
    assert prompt.endswith("<|turn>user\nAnd tomorrow?<turn|>\n<|turn>model\n<|channel>thought\n<channel|>")


def test_a_tool_result_without_its_call_is_refused():
    with pytest.raises(ValueError, match="must follow the assistant message"):
        Gemma4Tools().messages([{"role": "tool", "tool_call_id": "x", "content": "1"}], [])


def test_gemma4_calls_parse_with_their_values():
    text = ('Let me look.<|tool_call>call:get_weather{city:<|"|>São Paulo, {BR}<|"|>,days:3,tags:[<|"|>a<|"|>],'
            'opts:{deep:true,none:null,x:-1.5}}<tool_call|><|tool_call>call:get_time{}<tool_call|>')
    content, calls = Gemma4Tools().parse(text)
    assert content == "Let me look."
    assert [(c.name, c.arguments) for c in calls] == [
        ("get_weather", {"city": "São Paulo, {BR}", "days": 3, "tags": ["a"], "opts": {"deep": True, "none": None, "x": -1.5}}),
        ("get_time", {})]
    assert calls[0].id != calls[1].id and json.loads(calls[0].openai()["function"]["arguments"])["days"] == 3
    broken = "<|tool_call>call:get_weather{city:Paris}<tool_call|>"  # a bare word is not a value
    assert Gemma4Tools().parse(broken) == (broken, [])


def test_the_json_format_describes_tools_and_replays_calls_and_results(fast_model):
    fmt = fast_model.tool_format()
    messages = fmt.messages(HISTORY, [WEATHER])
    assert messages[0]["role"] == "system" and '"name": "get_weather"' in messages[0]["content"]
    assert json.loads(messages[2]["content"]) == {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
    assert messages[3]["role"] == "user" and '"result": {"temperature": 21}' in messages[3]["content"]
    prompt = fast_model.chat_prompt(messages)  # Gemma 3's turns alternate: the result is a user turn
    assert prompt.count("<start_of_turn>user") == 3 and prompt.count("<start_of_turn>model") == 3


def test_json_answers_parse_into_calls_and_other_text_stays_content():
    fmt = JsonTools()
    content, calls = fmt.parse('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}')
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Oslo"})]
    for text in ["It is sunny.", '{"answer": 1}', '{"tool_calls": [{"name": "f"}]} and more', '{"tool_calls": [']:
        assert fmt.parse(text) == (text, [])


def _matches(grammar: str, text: str) -> bool:
    """Whether llguidance's matcher for `grammar` accepts `text` as a whole (byte by byte)."""
    tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Bytes()), n_vocab=257)
    m = llguidance.LLMatcher(tok, grammar, log_level=0)
    for b in text.encode():
        if not m.consume_token(b):
            return False
    return m.is_accepting()


class _Bytes:
    """A tokenizer of one token per byte (and 256: the end), for checking a grammar's language."""
    tokens = [bytes([b]) for b in range(256)] + [b"\xff<end>"]
    eos_token_id, bos_token_id, special_token_ids = 256, None, [256]

    def __call__(self, text):
        return list(text.encode() if isinstance(text, str) else text)


def test_the_forced_gemma4_grammar_follows_the_schema():
    kind, gbnf = Gemma4Tools().constraint([WEATHER, TIME], ToolChoice("function", "get_weather"))
    grammar = llguidance.grammar_from("gbnf", gbnf)
    assert kind == "gbnf" and not llguidance.LLMatcher.validate_grammar_with_warnings(grammar)[0]
    good = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2,unit:<|"|>celsius<|"|>}<tool_call|>'
    assert _matches(grammar, good)
    assert Gemma4Tools().parse(good)[1][0].arguments == {"city": "Paris", "days": 2, "unit": "celsius"}
    for bad in ['<|tool_call>call:get_weather{days:2}<tool_call|>',  # the required city is missing
                '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,unit:<|"|>kelvin<|"|>}<tool_call|>',  # not in the enum
                '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:2.5}<tool_call|>',  # not an integer
                '<|tool_call>call:get_time{}<tool_call|>']:  # another function than the named one
        assert not _matches(grammar, bad), bad


def test_the_forced_json_schema_allows_only_valid_calls():
    jsonschema = pytest.importorskip("jsonschema")
    kind, schema = JsonTools().constraint([WEATHER, TIME], ToolChoice("required", parallel=False))
    assert kind == "json_schema"
    jsonschema.validate({"tool_calls": [{"name": "get_time", "arguments": {}}]}, schema)
    for bad in [{"tool_calls": []}, {"tool_calls": [{"name": "get_weather", "arguments": {}}]},
                {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo", "country": "NO"}}]},
                {"tool_calls": [{"name": "get_time", "arguments": {}}] * 2}]:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
