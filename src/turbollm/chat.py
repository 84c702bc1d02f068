"""Chat templates: from a list of messages to the prompt text a model was trained on.

A GGUF may carry its own Jinja template (`tokenizer.chat_template`); it is rendered in a
sandboxed Jinja2 environment, so a template cannot reach Python internals. Without one, the
built-in Gemma turn format is used.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from turbollm.errors import TurbollmError

Message = Mapping[str, str]


def gemma_turns(messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
    """Gemma 2/3 format: `<start_of_turn>{user|model}\\n...<end_of_turn>\\n`; a system message
    is folded into the first user turn, as Gemma's own template does."""
    system = ""
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"] + "\n\n", messages[1:]
    parts = []
    for i, message in enumerate(messages):
        role = {"user": "user", "assistant": "model", "model": "model"}.get(message["role"])
        if role is None:
            raise TurbollmError(f"chat message {i}: unknown role '{message['role']}' (use system, user or assistant)")
        if (role == "user") != (i % 2 == 0):
            raise TurbollmError("chat roles must alternate user/assistant/user/... (after an optional system message)")
        prefix = system if i == 0 else ""
        parts.append(f"<start_of_turn>{role}\n{prefix}{message['content'].strip()}<end_of_turn>\n")
    if add_generation_prompt:
        parts.append("<start_of_turn>model\n")
    return "".join(parts)


def _raise_exception(message: str) -> None:
    raise TurbollmError(f"chat template: {message}")


def render_template(template: str, messages: Sequence[Message], *, bos_token: str = "", eos_token: str = "",
                    add_generation_prompt: bool = True, **extra) -> str:
    """Render a model's own Jinja chat template in a sandbox."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(template).render(
            messages=list(messages), bos_token=bos_token, eos_token=eos_token,
            add_generation_prompt=add_generation_prompt, **extra,
        )
    except TemplateError as e:
        raise TurbollmError(f"chat template failed to render: {e}") from None
