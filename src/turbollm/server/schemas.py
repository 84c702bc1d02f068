"""OpenAI request bodies as pydantic models, each converting itself to SamplingParams.

Fields OpenAI clients send that do not change the output here (`user`, `logprobs: false`,
`stream_options` ...) are accepted; a known field of the wrong type is a 400 naming it; a
field asking for something this server does not do (`n` > 8, non-zero presence penalty) is a
400 saying so, never silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from turbollm.text.chat_template import strip_thinking
from turbollm.engine.sampler import SamplingParams

MAX_N = 8  # choices per request: each is a sequence of its own


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = "text"
    text: str = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "model"]
    content: str | list[ContentPart] | None = None
    reasoning_content: str | None = None  # an earlier answer's thoughts: never templated

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        kinds = {part.type for part in self.content} - {"text"}
        if kinds:
            raise ValueError(f"message content of type {sorted(kinds)} is not supported: this server takes text")
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ReasoningField(BaseModel):
    model_config = ConfigDict(extra="ignore")
    enabled: bool | None = None
    effort: str | None = None


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
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

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float) -> float:
        if v != 0.0:
            raise ValueError("presence and frequency penalties are not supported; use repeat_penalty (llama.cpp's)")
        return v

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def sampling(self, max_tokens: int, choice: int = 0) -> SamplingParams:
        # Choice i of a seeded request uses seed + i, so n choices differ and each repeats.
        seed = None if self.seed is None else self.seed + choice
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                              repeat_penalty=self.repeat_penalty, seed=seed, max_tokens=max_tokens, stop=self.stops())


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning: ReasoningField | None = None
    reasoning_effort: str | None = None

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

    def template_messages(self) -> list[dict[str, str]]:
        """Messages for the chat template: text only, the `/no_think` prefix removed, and no
        thoughts from earlier answers (`reasoning_content` is dropped; thought blocks in an
        assistant's content are stripped)."""
        out = []
        for m in self.messages:
            text = m.text()
            if m.role == "user" and text.lstrip().startswith("/no_think"):
                text = text.lstrip()[len("/no_think"):].lstrip()
            elif m.role in ("assistant", "model"):
                text = strip_thinking(text)
            out.append({"role": m.role, "content": text})
        return out


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] = Field(min_length=1)
    echo: bool = False

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v
