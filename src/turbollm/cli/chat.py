"""`turbollm chat`: a multi-turn conversation in the terminal.

Each turn renders the whole conversation through the model's chat template (thoughts of
earlier answers are never sent back) and streams the answer; a Gemma 4 model's thinking is
shown dimmed when `--think` is on. `/clear` starts over, `/exit` or Ctrl-D quits. A turn that
would not fit the context is refused with the numbers, and the conversation is kept.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from turbollm.cli import flags
from turbollm.config import RunConfig
from turbollm.engine.sampler import SamplingParams
from turbollm.errors import ContextLengthError, TurbollmError

DIM, RESET = "\033[2m", "\033[0m"


@dataclass(frozen=True)
class ChatArgs:
    params: SamplingParams
    system: str | None = None
    think: bool = False
    run: RunConfig = RunConfig()


def add_parser(sub) -> None:
    p = sub.add_parser("chat", help="multi-turn chat in the terminal (/clear starts over, /exit or Ctrl-D quits)")
    flags.model_flag(p)
    flags.sampling_flags(p, n_predict=1024)
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--think", action="store_true", help="let a Gemma 4 model think before answering (shown dimmed)")
    flags.backend_flag(p)
    flags.prefill_flag(p)
    flags.cache_flags(p)
    flags.spec_flags(p)
    flags.placement_flags(p)
    p.set_defaults(handler=lambda args: chat(ChatArgs(params=flags.sampling_params(args), system=args.system,
                                                      think=args.think, run=flags.run_config(args))))


def chat(a: ChatArgs, stdin=None, stdout=None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    tty = stdout.isatty()
    from turbollm.api import Model

    model = Model.load(run=a.run)
    print(f"{model.gguf.path.name}: {model.slot_ctx} tokens of context. /clear starts over, /exit quits.", file=stdout)
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
        answer, thinking = [], False
        try:  # an answer that reaches the end of the context stops there (the engine's rule)
            for piece in model.stream(prompt_ids, a.params):
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
        except ContextLengthError as e:  # the conversation is kept: /clear, or a larger --ctx-size
            print(f"error: {e} (/clear starts over)", file=stdout)
            continue
        except TurbollmError as e:
            print(f"error: {e}", file=stdout)
            continue
        stdout.write((RESET if tty and thinking else "") + "\n")
        stdout.flush()
        messages = turn + [{"role": "assistant", "content": "".join(answer)}]
