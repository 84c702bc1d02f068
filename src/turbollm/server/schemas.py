"""Request bodies as pydantic models: OpenAI's (each converting itself to SamplingParams) and
llama-server's own (/tokenize, /detokenize, /completion).

No field is silently dropped. A field this server does not know is a 400 naming it (the
models forbid extra fields; server/app.py's parse_body words the error). A known field of the
wrong type is a 400 naming it. A field asking for something this server does not do (`tools`
on a completion, `n` > 8, a non-zero presence penalty) is a 400 saying so. Structured output
(`response_format` json_object / json_schema, llama-server's `json_schema` and `grammar`, on
every completion body) is checked while the body is parsed: a schema or grammar the engine
cannot use is a 400 naming its field (engine/grammar.py says why). The fields accepted
without changing anything are listed in INERT_FIELDS (and in docs/server.md): each is either
metadata (`user`, `metadata`, `store`, ...) or the value that does nothing (`tools: []` on a
completion, `logit_bias: {}`, `typical_p: 1`).
"""

from __future__ import annotations

import functools
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from turbollm.text.chat_template import strip_thinking
from turbollm.engine.grammar import Constraint
from turbollm.text.tool_calls import Tool, ToolChoice
from turbollm.engine.sampler import SamplingParams

MAX_N = 8  # choices per request: each is a sequence of its own
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs (and here on completions' logprobs)
MAX_N_PROBS = 100  # llama-server's n_probs (it has no bound; each one is a topk over the vocabulary)
RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: a fresh random seed per request
# the order the sampler applies its steps (engine/sampler.py), in llama.cpp's names
SAMPLER_ORDER = ("penalties", "top_k", "top_p", "min_p", "temperature")

# accepted and without effect: metadata, hints, and features asked for at their "off" value
INERT_FIELDS = {
    "user": "metadata", "metadata": "metadata", "store": "metadata", "service_tier": "metadata",
    "name": "a message's participant name (not templated)",
    "parallel_tool_calls": "completions: without tools", "n_probs": "0 only (on the OpenAI bodies; /completion implements it)",
    "logit_bias": "{} only", "tools": "completions: [] only",
    "tool_choice": "completions: \"none\" or \"auto\" without tools", "typical_p": "1 only", "mirostat": "0 only",
}


class _Strict(BaseModel):
    """Unknown fields are refused, not dropped (parse_body names them); types are strict (`stream:
    1` or `"1"` is not a boolean, `max_tokens: 2.0` not an integer, as OpenAI's), and numbers finite."""
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _only(message: str, *fields: str, allowed=lambda v: not v):
    """A validator of `fields` that refuses every value but the ones that change nothing
    (`allowed`; default: absent, false, zero or empty) with `message`."""
    def check(cls, v):
        if not allowed(v):
            raise ValueError(message)
        return v
    return field_validator(*fields)(check)


_NO_TOOLS = "tools are for chat completions (/v1/chat/completions)"


class ContentPart(_Strict):
    type: str = "text"
    text: str = ""
    image_url: Any = None  # known, so that ChatMessage.text() refuses it by its type
    input_audio: Any = None


class FunctionCall(_Strict):
    name: str
    arguments: str | dict[str, Any] = "{}"  # OpenAI sends JSON text


class ToolCallItem(_Strict):
    """An assistant message's earlier call (OpenAI's shape)."""
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall
    index: int | None = None  # as a streamed delta carries it


class FunctionSpec(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")
    description: str = ""
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None  # the arguments always follow `parameters` when a call is forced (docs/server.md)


class ToolSpec(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "model", "tool"]
    content: str | list[ContentPart] | None = None
    reasoning_content: str | None = None  # an earlier answer's thoughts: never templated
    name: str | None = None  # inert
    tool_calls: list[ToolCallItem] | None = None
    tool_call_id: str | None = None  # a tool result: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        kinds = {part.type for part in self.content} - {"text"}
        if kinds:
            raise ValueError(f"message content of type {sorted(kinds)} is not supported: this server takes text")
        return "".join(part.text for part in self.content)


@functools.lru_cache(maxsize=64)
def _constraint(kind: str, source: str) -> Constraint:
    """The checked constraint of a schema (its JSON text) or a grammar: built when a body is
    validated and found again by `_Sampling.sampling` (and for the same schema sent with every
    turn of an agent's chat). A ValueError names what is wrong with it."""
    if kind == "gbnf":
        return Constraint.gbnf(source)
    return Constraint.json_object() if kind == "json_object" else Constraint.json_schema(source)


def _schema_text(schema: Any) -> str:
    return json.dumps(schema, sort_keys=True)


class JsonSchemaFormat(_Strict):
    """response_format.json_schema (OpenAI): `schema` is what the output must validate against.
    `strict` is accepted either way: the grammar always enforces the whole schema, and a
    schema keyword it cannot enforce is a 400, never skipped."""
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _usable(cls, v):
        _constraint("json_schema", _schema_text(v))
        return v


class ResponseFormat(_Strict):
    """`{"type": "text"}` (no constraint), `{"type": "json_object"}` (any JSON object; with
    llama-server's optional `schema`, an object valid against it), or `{"type": "json_schema",
    "json_schema": {...}}`."""
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")

    @field_validator("schema_")
    @classmethod
    def _usable(cls, v):
        if v is not None:
            _constraint("json_schema", _schema_text(v))
        return v

    @field_validator("json_schema")
    @classmethod
    def _only_with_its_type(cls, v, info: ValidationInfo):
        if v is not None and info.data.get("type") != "json_schema":
            raise ValueError('json_schema goes with "type": "json_schema"')
        return v

    def constraint(self) -> Constraint | None:
        if self.type == "json_schema":
            if self.json_schema is None:
                raise ValueError('"type": "json_schema" needs "json_schema": {"name": ..., "schema": {...}}')
            return _constraint("json_schema", _schema_text(self.json_schema.schema_))
        if self.type == "json_object":
            if self.schema_ is not None:
                return _constraint("json_schema", _schema_text(self.schema_))
            return _constraint("json_object", "")
        return None


class StreamOptions(_Strict):
    include_usage: bool = False


class ReasoningField(_Strict):
    enabled: bool | None = None
    effort: str | None = None


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float = Field(default=0.8, ge=0.0, le=2.0)
    top_p: float = Field(default=0.95, gt=0.0, le=1.0)
    top_k: int = Field(default=40, ge=0)
    min_p: float = Field(default=0.05, ge=0.0, le=1.0)
    repeat_penalty: float = Field(default=1.0, gt=0.0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    # inert (INERT_FIELDS): metadata, and features at the value that turns them off
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    cache_prompt: bool = True  # start from a kept sequence's cache (engine/prompt_cache.py)
    logit_bias: dict[str, Any] | None = None
    typical_p: float = 1.0
    mirostat: int = 0
    # structured output (engine/grammar.py): one of OpenAI's response_format, or llama-server's
    # json_schema (a JSON schema) or grammar (GBNF), on every completion body as llama-server
    response_format: ResponseFormat | None = None
    json_schema: dict[str, Any] | None = None
    grammar: str | None = None

    _no_logit_bias = _only("logit_bias is not supported by this server", "logit_bias")
    _no_typical = _only("typical_p sampling is not supported (use top_p, top_k, min_p)", "typical_p",
                        allowed=lambda v: v == 1.0)
    _no_mirostat = _only("mirostat sampling is not supported (use top_p, top_k, min_p)", "mirostat",
                         allowed=lambda v: v == 0)

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float) -> float:
        if v != 0.0:
            raise ValueError("presence and frequency penalties are not supported; use repeat_penalty (llama.cpp's)")
        return v

    @field_validator("response_format")
    @classmethod
    def _format_complete(cls, v: ResponseFormat | None) -> ResponseFormat | None:
        if v is not None:
            v.constraint()
        return v

    @field_validator("json_schema")
    @classmethod
    def _usable_schema(cls, v, info: ValidationInfo):
        if v is not None:
            _one_constraint(info, "json_schema")
            _constraint("json_schema", _schema_text(v))
        return v

    @field_validator("grammar")
    @classmethod
    def _usable_grammar(cls, v, info: ValidationInfo):
        if v is not None:
            _one_constraint(info, "grammar")
            _constraint("gbnf", v)
        return v

    def constraint(self) -> Constraint | None:
        """What the output must match, from whichever of the three fields is set (one at most)."""
        if self.grammar is not None:
            return _constraint("gbnf", self.grammar)
        if self.json_schema is not None:
            return _constraint("json_schema", _schema_text(self.json_schema))
        return self.response_format.constraint() if self.response_format is not None else None

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def n_logprobs(self) -> int | None:
        """None: no log probabilities; k: each token's and the k most likely at its position."""
        return None

    def post_sampling(self) -> bool:
        """Log probabilities of the sampler's final distribution instead of the model's."""
        return False

    def sampling(self, max_tokens: int, choice: int = 0) -> SamplingParams:
        # Choice i of a seeded request uses seed + i, so n choices differ and each repeats.
        seed = None if self.seed is None else self.seed + choice
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              repeat_penalty=self.repeat_penalty, seed=seed, max_tokens=max_tokens, stop=self.stops(),
                              logprobs=self.n_logprobs(), post_sampling=self.post_sampling(),
                              constraint=self.constraint())


def _one_constraint(info: ValidationInfo, field: str) -> None:
    """`field` (json_schema or grammar) is refused beside another constraint, as by llama-server."""
    others = [name for name in ("response_format", "json_schema") if name != field and info.data.get(name) is not None
              and (name != "response_format" or info.data[name].type != "text")]
    if others:
        raise ValueError(f"give one constraint: {field} and {others[0]} cannot both be set")


class _OpenAISampling(_Sampling):
    n_probs: int = 0  # llama-server's name; inert here

    _no_n_probs = _only("n_probs is llama-server's field of /completion: use logprobs (and top_logprobs) here",
                        "n_probs")


class ChatCompletionRequest(_OpenAISampling):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning: ReasoningField | None = None
    reasoning_effort: str | None = None
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @field_validator("tool_choice")
    @classmethod
    def _choice_needs_tools(cls, v, info: ValidationInfo):
        names = [t.function.name for t in info.data.get("tools") or []]
        if isinstance(v, NamedToolChoice) and v.function.name not in names:
            raise ValueError(f"names the function {v.function.name!r}, which is not among the tools {names}")
        if v == "required" and not names:
            raise ValueError("'required' needs tools to call")
        return v

    def tool_list(self) -> list[Tool]:
        """The tools offered to the model ([] with tool_choice "none")."""
        if self.tool_choice == "none":
            return []
        return [Tool(t.function.name, t.function.description, t.function.parameters) for t in self.tools or []]

    def tool_mode(self) -> ToolChoice:
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return ToolChoice("function", choice.function.name, self.parallel_tool_calls)
        return ToolChoice(choice or "auto", None, self.parallel_tool_calls)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v and not info.data.get("logprobs"):  # OpenAI's rule (logprobs is validated first)
            raise ValueError("top_logprobs needs logprobs: true")
        return v

    def n_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def thinking(self, default: bool) -> bool:
        """Whether the model should think: off with a `/no_think` prefix on the last user
        message, `chat_template_kwargs.enable_thinking`, `reasoning.enabled`/`effort` or
        `reasoning_effort` = "none"; on when one of them asks for it; else the server's default."""
        last_user = next((m for m in reversed(self.messages) if m.role == "user"), None)
        if last_user is not None and last_user.text().lstrip().startswith("/no_think"):
            return False
        kwargs = self.chat_template_kwargs or {}
        if "enable_thinking" in kwargs:
            return bool(kwargs["enable_thinking"])
        if self.reasoning is not None:
            if self.reasoning.enabled is not None:
                return self.reasoning.enabled
            if self.reasoning.effort is not None:
                return self.reasoning.effort != "none"
        if self.reasoning_effort is not None:
            return self.reasoning_effort != "none"
        return default

    def template_messages(self) -> list[dict[str, Any]]:
        """Messages for the chat template: text, the `/no_think` prefix removed, no thoughts
        from earlier answers (`reasoning_content` is dropped; thought blocks in an assistant's
        content are stripped); an assistant's earlier `tool_calls` and a tool result's
        `tool_call_id` kept, in OpenAI's shape (text/tool_calls.py renders them)."""
        out = []
        for m in self.messages:
            text = m.text()
            if m.role == "user" and text.lstrip().startswith("/no_think"):
                text = text.lstrip()[len("/no_think"):].lstrip()
            elif m.role in ("assistant", "model"):
                text = strip_thinking(text)
            message: dict[str, Any] = {"role": "assistant" if m.role == "model" else m.role, "content": text}
            if m.tool_calls:
                message["tool_calls"] = [c.model_dump(exclude_none=True) for c in m.tool_calls]
            if m.role == "tool":
                message["tool_call_id"] = m.tool_call_id
            out.append(message)
        return out


class _NoTools(_Strict):
    """Tool fields on the routes without tools: accepted only at the values that ask for none."""
    parallel_tool_calls: bool | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None

    _no_tools = _only(_NO_TOOLS, "tools")
    _no_tool_choice = _only(_NO_TOOLS, "tool_choice", allowed=lambda v: v in (None, "none", "auto"))


class CompletionRequest(_OpenAISampling, _NoTools):
    prompt: str | list[str] | list[int] = Field(min_length=1)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # the k most likely per token
    suffix: str | None = None

    def n_logprobs(self) -> int | None:
        return self.logprobs

    _no_suffix = _only("suffix (fill-in-the-middle) is not supported by this server", "suffix")
    _no_echo = _only("echo is not supported", "echo")


def default_sampling() -> SamplingParams:
    """What a request that sets no sampling field gets (the defaults of the bodies above)."""
    return _Sampling().sampling(max_tokens=0)


def generation_settings(p: SamplingParams, n_predict: int = -1, stream: bool = False) -> dict[str, Any]:
    """llama-server's `params` object (/props' default_generation_settings, /slots, /completion's
    generation_settings) for what this server samples with; n_predict -1: until the slot is full."""
    return {"seed": RANDOM_SEED if p.seed is None else p.seed, "temperature": p.temperature, "top_k": p.top_k,
            "top_p": p.top_p, "min_p": p.min_p, "repeat_last_n": p.repeat_last_n, "repeat_penalty": p.repeat_penalty,
            "presence_penalty": 0.0, "frequency_penalty": 0.0, "n_predict": n_predict, "max_tokens": n_predict,
            "stream": stream, "n_probs": p.logprobs or 0, "stop": list(p.stop), "samplers": list(SAMPLER_ORDER)}


# ---- llama-server's own endpoints --------------------------------------------------------------

class TokenizeRequest(BaseModel):
    """POST /tokenize: `content` is a string, or a list of strings and token ids (llama-server's
    mixed prompt); without it the answer is no tokens, as llama-server's."""
    model_config = ConfigDict(extra="ignore")
    content: str | list[str | int] = ""
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tokens: list[int] = []


class NativeCompletionRequest(_Sampling, _NoTools):
    """llama-server's POST /completion body: `prompt` (a string, token ids, or both mixed),
    `n_predict` (-1: until the slot is full), the sampling fields of the OpenAI bodies, `seed`
    -1 (or 4294967295) for a random one, `stop`, `stream`, `return_tokens`, `n_probs` (with
    `post_sampling_probs`), `json_schema` and `grammar` (structured output). A field it does not
    know is a 400, as in the OpenAI bodies."""
    prompt: str | list[str | int] = Field(min_length=1)
    n_predict: int = Field(default=-1, ge=-1)
    return_tokens: bool = False
    n_probs: int = Field(default=0, ge=0, le=MAX_N_PROBS)
    post_sampling_probs: bool = False

    @field_validator("seed")
    @classmethod
    def _random_seed(cls, v: int | None) -> int | None:
        return None if v in (-1, RANDOM_SEED) else v

    def n_logprobs(self) -> int | None:
        return self.n_probs if self.n_probs > 0 else None

    def post_sampling(self) -> bool:
        return self.post_sampling_probs

    def requested_max_tokens(self) -> int | None:
        if self.n_predict >= 0:
            return self.n_predict
        return self.max_tokens
