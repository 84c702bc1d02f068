"""`turbollm chat`: a multi-turn conversation in the terminal.

Each turn renders the whole conversation through the model's chat template (thoughts of
earlier answers are never sent back) and streams the answer; a Gemma 4 model's thinking is
shown dimmed when `--think` is on. `/clear` starts over, `/exit` or Ctrl-D quits. A turn that
would not fit the context is refused with the numbers, and the conversation is kept.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

from turbollm.api import LoadOptions
from turbollm.engine.sampler import SamplingParams
from turbollm.errors import TurbollmError

DIM, RESET = "\033[2m", "\033[0m"


@dataclass(frozen=True)
class ChatArgs:
    params: SamplingParams
    system: str | None = None
    think: bool = False
    load: LoadOptions = LoadOptions()


def chat(a: ChatArgs, stdin=None, stdout=None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    tty = stdout.isatty()
    model = a.load.load()
    print(f"{model.gguf.path.name}: {model.ctx_size} tokens of context. /clear starts over, /exit quits.", file=stdout)
    messages: list[dict[str, str]] = [{"role": "system", "content": a.system}] if a.system else []
    n_system = len(messages)
    while True:
        if tty:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/clear":
            del messages[n_system:]
            print("(conversation cleared)", file=stdout)
            continue
        turn = messages + [{"role": "user", "content": text}]
        prompt_ids = model.encode(model.chat_prompt(turn, enable_thinking=a.think))
        room = model.ctx_size - len(prompt_ids)
        if room <= 0:
            print(f"error: the conversation is {len(prompt_ids)} tokens, the context {model.ctx_size}: "
                  f"/clear, or restart with a larger --ctx-size", file=stdout)
            continue
        params = replace(a.params, max_tokens=min(a.params.max_tokens, room))
        answer, thinking = [], False
        try:
            for piece in model.stream(prompt_ids, params):
                if piece.channel == "reasoning":
                    stdout.write((DIM if tty and not thinking else "") + piece.text)
                    thinking = True
                    continue
                if thinking:
                    stdout.write((RESET if tty else "") + "\n")
                    thinking = False
                answer.append(piece.text)
                stdout.write(piece.text)
                stdout.flush()
        except KeyboardInterrupt:  # Ctrl-C ends this answer, not the session
            stdout.write(" [interrupted]")
        except TurbollmError as e:
            print(f"error: {e}", file=stdout)
            continue
        stdout.write((RESET if tty and thinking else "") + "\n")
        stdout.flush()
        messages = turn + [{"role": "assistant", "content": "".join(answer)}]
