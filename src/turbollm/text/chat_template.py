"""Chat templates: from a list of messages to the prompt text a model was trained on.

A GGUF may carry its own Jinja template (`tokenizer.chat_template`); it is rendered in a
sandboxed Jinja2 environment configured like transformers' (`trim_blocks`, `lstrip_blocks`,
loop controls), so a template cannot reach Python internals. Without one, the built-in turn
format of the model's generation is used: Gemma 2/3 `<start_of_turn>`, Gemma 4 `<|turn>`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from turbollm.errors import TurbollmError

Message = Mapping[str, str]


def _check_roles(messages: Sequence[Message]) -> None:
    for i, message in enumerate(messages):
        if message.get("role") not in ("system", "developer", "user", "assistant", "model"):
            raise TurbollmError(f"chat message {i}: unknown role {message.get('role')!r} (use system, user or assistant)")


def gemma_turns(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """Gemma 2/3 format: `<start_of_turn>{user|model}\\n...<end_of_turn>\\n`; a system message
    is folded into the first user turn, as Gemma's own template does."""
    _check_roles(messages)
    system = ""
    if messages and messages[0]["role"] in ("system", "developer"):
        system, messages = messages[0]["content"] + "\n\n", messages[1:]
    parts = []
    for i, message in enumerate(messages):
        role = "model" if message["role"] in ("assistant", "model") else message["role"]
        if (role == "user") != (i % 2 == 0):
            raise TurbollmError("chat roles must alternate user/assistant/user/... (after an optional system message)")
        prefix = system if i == 0 else ""
        parts.append(f"<start_of_turn>{role}\n{prefix}{message['content'].strip()}<end_of_turn>\n")
    if add_generation_prompt:
        parts.append("<start_of_turn>model\n")
    return "".join(parts)


def strip_thinking(text: str) -> str:
    """Remove `<|channel>...<channel|>` thought blocks (old thoughts never re-enter the prompt)."""
    kept = []
    for part in text.split("<channel|>"):
        kept.append(part.split("<|channel>")[0] if "<|channel>" in part else part)
    return "".join(kept).strip()


def gemma4_turns(messages: Sequence[Message], add_generation_prompt: bool = True, enable_thinking: bool = False) -> str:
    """Gemma 4 format, the text parts of its official template: `<|turn>{role}\\n...<turn|>\\n`,
    `<|think|>` opening the system turn when thinking is on, and an empty thought channel after
    the generation prompt when it is off."""
    _check_roles(messages)
    parts = []
    if enable_thinking or (messages and messages[0]["role"] in ("system", "developer")):
        parts.append("<|turn>system\n" + ("<|think|>" if enable_thinking else ""))
        if messages and messages[0]["role"] in ("system", "developer"):
            parts.append(messages[0]["content"].strip())
            messages = messages[1:]
        parts.append("<turn|>\n")
    for message in messages:
        role = "model" if message["role"] in ("assistant", "model") else message["role"]
        content = strip_thinking(message["content"]) if role == "model" else message["content"].strip()
        parts.append(f"<|turn>{role}\n{content}<turn|>\n")
    if add_generation_prompt:
        parts.append("<|turn>model\n")
        if not enable_thinking:
            parts.append("<|channel>thought\n<channel|>")
    return "".join(parts)


def _raise_exception(message: str) -> None:
    raise TurbollmError(f"chat template: {message}")


def _tojson(value, indent=None, ensure_ascii=False, separators=None, sort_keys=False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)


def render_template(template: str, messages: Sequence[Message], *, bos_token: str = "", eos_token: str = "",
                    add_generation_prompt: bool = True, **extra) -> str:
    """Render a model's own Jinja chat template in a sandbox."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    env.filters["tojson"] = _tojson
    try:
        return env.from_string(template).render(
            messages=list(messages), bos_token=bos_token, eos_token=eos_token,
            add_generation_prompt=add_generation_prompt, **extra,
        )
    except TemplateError as e:
        raise TurbollmError(f"chat template failed to render: {e}") from None
