"""Tool calling in the text a model reads and writes: OpenAI's tools and tool messages into a
prompt, and a model's output back into tool calls.

Two formats, picked by the model's chat template (`tool_format`):
- **Gemma 4's own** (`Gemma4Tools`), when the GGUF's template has it: tools declared in the
  system turn by the template, a call written `<|tool_call>call:NAME{key:value,...}<tool_call|>`
  with strings between `<|"|>` marks, results given back in the model's turn as
  `tool_responses` (OpenAI's `role: "tool"` messages are folded into the assistant message
  that made the calls, as llama.cpp does for this template).
- **JSON** (`JsonTools`), for every other model (Gemma 3's template knows no tools): the tools
  are described in the system message, the model answers a call with one JSON object
  `{"tool_calls": [{"name": ..., "arguments": {...}}]}`, and results come back as a user turn.

Both give, for `tool_choice` "required" or a named function, the grammar that makes every call
well formed with arguments that follow the function's JSON schema (`constraint`: a JSON schema
for the JSON format, a GBNF grammar in Gemma 4's syntax for the other); the engine decodes
under it (engine/grammar.py). With "auto" the model decides, and the output is parsed after;
text that is not a well-formed call stays content, never dropped.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Tool:
    """A function the model may call: OpenAI's `{"type": "function", "function": {...}}`."""

    name: str
    description: str = ""
    parameters: dict | None = None  # a JSON schema of the arguments object

    def openai(self) -> dict:
        function = {"name": self.name, "description": self.description}
        if self.parameters is not None:
            function["parameters"] = self.parameters
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict
    id: str = ""

    def openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}
        return out if index is None else {"index": index, **out}


@dataclass(frozen=True)
class ToolChoice:
    """"auto" (the model decides), "none" (no tools offered), "required" (at least one
    call), or `function`: that function, called once."""

    mode: str = "auto"
    function: str | None = None
    parallel: bool = True  # more than one call in an answer


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _arguments_of(call: dict) -> dict:
    """An assistant message's tool call arguments (OpenAI sends them as JSON text) as a dict."""
    args = call.get("function", {}).get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"tool call arguments are not valid JSON: {e}") from None
    if not isinstance(args, dict):
        raise ValueError("tool call arguments must be a JSON object")
    return args


def _tool_result(message: dict) -> Any:
    """A tool message's content: parsed when it is JSON, as llama.cpp does, else the text."""
    content = message.get("content") or ""
    try:
        return json.loads(content)
    except (json.JSONDecodeError, TypeError):
        return content


class Gemma4Tools:
    """Gemma 4's native tool format (its chat template declares and renders it)."""

    name = "gemma4"
    OPEN, CLOSE, QUOTE = "<|tool_call>", "<tool_call|>", '<|"|>'

    def messages(self, messages: Sequence[dict], tools: Sequence[Tool]) -> list[dict]:
        """Messages for the template: tool calls' arguments as objects, and each run of
        assistant(tool_calls) -> tool results -> assistant(text) as one assistant message
        with `tool_calls`, `tool_responses` and `content`."""
        out: list[dict] = []
        i = 0
        while i < len(messages):
            m = messages[i]
            if m["role"] != "assistant" or not m.get("tool_calls"):
                if m["role"] == "tool":
                    raise ValueError(f"message {i}: a tool result must follow the assistant message that called the tool")
                out.append(m)
                i += 1
                continue
            calls = [{"type": "function", "function": {"name": c["function"]["name"], "arguments": _arguments_of(c)}}
                     for c in m["tool_calls"]]
            turn = {"role": "assistant", "content": m.get("content") or "", "tool_calls": calls}
            i += 1
            responses = []
            while i < len(messages) and messages[i]["role"] == "tool":
                name = calls[len(responses)]["function"]["name"] if len(responses) < len(calls) else messages[i].get("tool_call_id", "")
                responses.append({"name": name, "response": _tool_result(messages[i])})
                i += 1
            if responses:
                turn["tool_responses"] = responses
            if (i < len(messages) and messages[i]["role"] == "assistant" and not messages[i].get("tool_calls")
                    and messages[i].get("content")):
                turn["content"] = (turn["content"] + messages[i]["content"]) if turn["content"] else messages[i]["content"]
                i += 1
            out.append(turn)
        return out

    def template_tools(self, tools: Sequence[Tool]) -> list[dict] | None:
        return [t.openai() for t in tools] or None

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls): every complete `<|tool_call>call:NAME{...}<tool_call|>` block is a
        call; a block that does not parse stays in the content as written."""
        content, calls, at = [], [], 0
        for match in re.finditer(re.escape(self.OPEN) + r"call:([^{<]+)(\{.*?\})" + re.escape(self.CLOSE), text, re.S):
            try:
                arguments = _Gemma4Value(match.group(2), self.QUOTE).parse()
            except ValueError:
                continue
            content.append(text[at:match.start()])
            calls.append(ToolCall(match.group(1).strip(), arguments, new_call_id()))
            at = match.end()
        content.append(text[at:])
        return "".join(content).strip() if calls else text, calls

    def holds(self, text: str) -> int:
        """Where the text that may be a call starts (the client gets it only once parsed)."""
        return _hold_from(text, self.OPEN)

    def constraint(self, tools: Sequence[Tool], choice: ToolChoice) -> tuple[str, str]:
        """("gbnf", grammar) for "required" or a named function: one call (or several with
        parallel calls) of the allowed functions, their arguments in Gemma 4's syntax following
        each one's schema (properties in sorted order, as the template writes them)."""
        rules = _Gemma4Grammar(self.QUOTE)
        allowed = [t for t in tools if choice.function is None or t.name == choice.function]
        names = [rules.function(t) for t in allowed]
        call = f'"{_gbnf_literal(self.OPEN)}call:" ({" | ".join(names)}) "{_gbnf_literal(self.CLOSE)}"'
        root = f"root ::= call{'+' if choice.parallel and choice.function is None else ''}\ncall ::= {call}\n"
        return "gbnf", root + rules.text()


class JsonTools:
    """Tool calls as one JSON object, for templates without a tool format of their own."""

    name = "json"

    def messages(self, messages: Sequence[dict], tools: Sequence[Tool]) -> list[dict]:
        """Plain role/content messages: the tools described in the system message; an
        assistant's calls written as the JSON it is asked to answer with; tool results as a
        user turn (consecutive ones together)."""
        out: list[dict] = []
        if tools:
            head = self._instructions(tools)
            if messages and messages[0]["role"] in ("system", "developer"):
                out.append({"role": messages[0]["role"], "content": messages[0]["content"] + "\n\n" + head})
                messages = messages[1:]
            else:
                out.append({"role": "system", "content": head})
        for i, m in enumerate(messages):
            if m["role"] == "assistant" and m.get("tool_calls"):
                calls = [{"name": c["function"]["name"], "arguments": _arguments_of(c)} for c in m["tool_calls"]]
                text = (m.get("content") or "") + json.dumps({"tool_calls": calls}, ensure_ascii=False)
                out.append({"role": "assistant", "content": text})
            elif m["role"] == "tool":
                result = json.dumps({"tool_call_id": m.get("tool_call_id"), "result": _tool_result(m)}, ensure_ascii=False)
                if out and out[-1].get("tool_results"):
                    out[-1]["content"] += "\n" + result
                else:
                    out.append({"role": "user", "content": "Tool results:\n" + result, "tool_results": True})
            else:
                out.append(m)
        return [{k: v for k, v in m.items() if k != "tool_results"} for m in out]

    @staticmethod
    def _instructions(tools: Sequence[Tool]) -> str:
        listed = json.dumps([t.openai()["function"] for t in tools], ensure_ascii=False)
        return ("You can call these tools:\n" + listed + "\nTo call tools, answer with only this JSON object: "
                '{"tool_calls": [{"name": "<tool name>", "arguments": {<the arguments>}}]}. '
                "Otherwise answer normally.")

    def template_tools(self, tools: Sequence[Tool]) -> None:
        return None  # the template is not given the tools: they are in the system message

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """An answer that is (after leading text) one JSON object with a `tool_calls` list of
        {name, arguments} is calls; anything else is content."""
        start = text.find("{")
        if start < 0:
            return text, []
        try:
            data, end = json.JSONDecoder().raw_decode(text[start:])
        except json.JSONDecodeError:
            return text, []
        calls = data.get("tool_calls") if isinstance(data, dict) else None
        if (not isinstance(calls, list) or not calls or text[start + end:].strip()
                or not all(isinstance(c, dict) and isinstance(c.get("name"), str) and isinstance(c.get("arguments", {}), dict)
                           for c in calls)):
            return text, []
        return text[:start].strip(), [ToolCall(c["name"], c.get("arguments", {}), new_call_id()) for c in calls]

    def holds(self, text: str) -> int:
        start = text.find("{")
        return start if start >= 0 else len(text)

    def constraint(self, tools: Sequence[Tool], choice: ToolChoice) -> tuple[str, dict]:
        """("json_schema", schema): the answer object with one call (or, with parallel calls
        and no named function, one or more) of the allowed functions."""
        allowed = [t for t in tools if choice.function is None or t.name == choice.function]
        one = [{"type": "object", "properties": {"name": {"const": t.name},
                                                  "arguments": _closed(t.parameters or {"type": "object"})},
                "required": ["name", "arguments"], "additionalProperties": False} for t in allowed]
        items = one[0] if len(one) == 1 else {"anyOf": one}
        calls = {"type": "array", "items": items, "minItems": 1}
        if not (choice.parallel and choice.function is None):
            calls["maxItems"] = 1
        return "json_schema", {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"],
                               "additionalProperties": False}


def _closed(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on every object that lists its properties and
    says nothing of others: a forced call's arguments are the function's own (as llama.cpp's
    schema grammars and OpenAI's strict mode read a schema), not whatever else a model adds."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) if k in ("items", "anyOf", "oneOf", "allOf", "prefixItems") else v for k, v in schema.items()}
    if isinstance(schema.get("properties"), dict):
        out["properties"] = {k: _closed(v) for k, v in schema["properties"].items()}
        out.setdefault("additionalProperties", False)
    return out


def tool_format(template: str | None) -> Gemma4Tools | JsonTools:
    """The tool format of a model whose GGUF chat template is `template` (None: built in)."""
    if template and "<|tool_call>call:" in template:
        return Gemma4Tools()
    return JsonTools()


def _hold_from(text: str, marker: str) -> int:
    """The index from which `text` may be (the start of) `marker`; len(text) if nowhere."""
    at = text.find(marker)
    if at >= 0:
        return at
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return len(text) - n
    return len(text)


class _Gemma4Value:
    """A value in Gemma 4's call syntax: `<|"|>text<|"|>`, numbers, true/false/null,
    `{key:value,...}` (bare keys) and `[value,...]`."""

    def __init__(self, text: str, quote: str):
        self.text, self.quote, self.at = text, quote, 0

    def parse(self) -> Any:
        value = self._value()
        self._space()
        if self.at != len(self.text):
            raise ValueError("trailing text")
        return value

    def _space(self) -> None:
        while self.at < len(self.text) and self.text[self.at] in " \t\n\r":
            self.at += 1

    def _value(self) -> Any:
        self._space()
        t = self.text
        if t.startswith(self.quote, self.at):
            end = t.find(self.quote, self.at + len(self.quote))
            if end < 0:
                raise ValueError("unterminated string")
            value, self.at = t[self.at + len(self.quote):end], end + len(self.quote)
            return value
        if t.startswith("{", self.at):
            return self._members("}", dict)
        if t.startswith("[", self.at):
            return self._members("]", list)
        match = re.compile(r"-?\d+(\.\d+)?([eE][-+]?\d+)?|true|false|null").match(t, self.at)
        if match is None:
            raise ValueError(f"unexpected text at {self.at}")
        self.at = match.end()
        return json.loads(match.group(0))

    def _members(self, close: str, kind) -> Any:
        self.at += 1
        out = kind()
        self._space()
        if self.text.startswith(close, self.at):
            self.at += 1
            return out
        while True:
            if kind is dict:
                self._space()
                colon = self.text.find(":", self.at)
                if colon < 0:
                    raise ValueError("a key without a value")
                key = self.text[self.at:colon].strip()
                if key.startswith(self.quote) and key.endswith(self.quote):
                    key = key[len(self.quote):-len(self.quote)]
                self.at = colon + 1
                out[key] = self._value()
            else:
                out.append(self._value())
            self._space()
            if self.text.startswith(",", self.at):
                self.at += 1
            elif self.text.startswith(close, self.at):
                self.at += 1
                return out
            else:
                raise ValueError(f"expected ',' or '{close}' at {self.at}")


def _gbnf_literal(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


class _Gemma4Grammar:
    """GBNF rules for arguments in Gemma 4's syntax that follow a JSON schema: objects with
    their properties in sorted order (required ones present), strings (enums as their
    values), numbers, integers, booleans, null and arrays; any other schema is any value."""

    def __init__(self, quote: str):
        self.q = _gbnf_literal(quote)
        self.rules: dict[str, str] = {}
        self._n = 0
        # the generic value: strings end at the quote mark (a '<' not starting it may occur)
        self.rules.update({
            "ws": "[ \\t\\n]*",
            "str": f'"{self.q}" ([^<] | "<" [^|])* "{self.q}"',
            "num": '"-"? [0-9]+ ("." [0-9]+)? ([eE] [-+]? [0-9]+)?',
            "int": '"-"? [0-9]+',
            "bool": '"true" | "false"',
            "null": '"null"',
            "key": "[a-zA-Z_] [a-zA-Z0-9_.-]*",
            "dict": '"{" ws (key ":" value ("," ws key ":" value)*)? ws "}"',
            "list": '"[" ws (value ("," ws value)*)? ws "]"',
            "value": "str | num | bool | null | dict | list",
        })

    def _rule(self, body: str) -> str:
        self._n += 1
        name = f"r{self._n}"
        self.rules[name] = body
        return name

    def function(self, tool: Tool) -> str:
        """The rule of one call's name and arguments (always an object)."""
        params = tool.parameters or {}
        props = params.get("properties")
        args = self._object(props, set(params.get("required", []))) if isinstance(props, dict) and props else "dict"
        return self._rule(f'"{_gbnf_literal(tool.name)}" {args}')

    def schema(self, schema: Any) -> str:
        if not isinstance(schema, dict):
            return "value"
        if "enum" in schema and all(isinstance(v, str) for v in schema["enum"]):
            return self._rule(" | ".join(f'"{self.q}{_gbnf_literal(v)}{self.q}"' for v in schema["enum"]))
        kind = schema.get("type")
        if kind == "string":
            return "str"
        if kind == "number":
            return "num"
        if kind == "integer":
            return "int"
        if kind == "boolean":
            return "bool"
        if kind == "null":
            return "null"
        if kind == "array":
            item = self.schema(schema.get("items", {}))
            return self._rule(f'"[" ws ({item} ("," ws {item})*)? ws "]"')
        if kind == "object" and isinstance(schema.get("properties"), dict) and schema["properties"]:
            return self._object(schema["properties"], set(schema.get("required", [])))
        if kind == "object":
            return "dict"
        return "value"

    def _object(self, properties: dict, required: set) -> str:
        names = sorted(properties)
        members = [f'"{_gbnf_literal(n)}:" {self.schema(properties[n])}' for n in names]
        tails: dict[tuple[int, bool], str] = {}

        def tail(i: int, comma: bool) -> str:
            """The members from i on (an optional one may be left out); `comma`: one came
            before, so the next is preceded by ","."""
            if i == len(names):
                return ""
            if (i, comma) not in tails:
                sep = '"," ws ' if comma else ""
                take = f"{sep}{members[i]} {tail(i + 1, True)}".strip()
                skip = "" if names[i] in required else tail(i + 1, comma)
                body = take if names[i] in required else (f"({take}) | {skip}" if skip else f"({take})?")
                tails[i, comma] = self._rule(body)
            return tails[i, comma]

        inner = tail(0, False)
        return self._rule(f'"{{" ws {inner} ws "}}"')

    def text(self) -> str:
        return "".join(f"{name} ::= {body}\n" for name, body in self.rules.items())
