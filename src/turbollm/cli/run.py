"""`turbollm run`: generate from a prompt, streaming the text to stdout (llama-cli's one-shot
mode); `-v` adds the memory plan, load time, speed and memory to stderr."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from turbollm.cli import flags
from turbollm.config import RunConfig
from turbollm.engine.sampler import SamplingParams
from turbollm.errors import TurbollmError


@dataclass(frozen=True)
class RunArgs:
    prompt: str | None
    prompt_file: str | None
    params: SamplingParams
    chat: bool | None  # None: use the chat template if the GGUF has one
    system: str | None
    verbose: bool
    run: RunConfig = RunConfig()


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="generate from a prompt, streaming tokens to stdout")
    flags.model_flag(p)
    p.add_argument("-p", "--prompt", help="prompt text (default: read standard input)")
    p.add_argument("-f", "--file", dest="prompt_file", help="read the prompt from a file")
    flags.sampling_flags(p)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=None, help="wrap the prompt in the chat template")
    mode.add_argument("--raw", dest="chat", action="store_false", help="use the prompt as is, no chat template")
    p.add_argument("--system", default=None, help="system message (implies --chat)")
    flags.backend_flag(p)
    flags.prefill_flag(p)
    flags.cache_flags(p)
    flags.spec_flags(p)
    flags.placement_flags(p)
    p.add_argument("-v", "--verbose", action="store_true", help="print load time, memory and speed to stderr")
    p.set_defaults(handler=lambda args: run(from_args(args)))


def from_args(args: argparse.Namespace) -> RunArgs:
    return RunArgs(prompt=args.prompt, prompt_file=args.prompt_file, params=flags.sampling_params(args),
                   chat=True if args.system is not None else args.chat, system=args.system, verbose=args.verbose,
                   run=flags.run_config(args))


def _read_prompt(a: RunArgs) -> str:
    if a.prompt is not None and a.prompt_file is not None:
        raise TurbollmError("give the prompt with -p or -f, not both")
    if a.prompt is not None:
        return a.prompt
    if a.prompt_file is not None:
        return flags.read_text_file(a.prompt_file)
    if sys.stdin.isatty():
        raise TurbollmError("no prompt: pass -p TEXT, -f FILE, or pipe text to standard input")
    return sys.stdin.read()


def run(a: RunArgs) -> int:
    from turbollm.api import Model
    from turbollm.engine.sequence import GenerationStats
    from turbollm.planner.process_memory import mib, peak_rss_bytes, rss_breakdown

    prompt = _read_prompt(a)
    model = Model.load(run=a.run)
    if a.verbose:
        print(model.plan.format(), file=sys.stderr)
        print(f"model: {model.gguf.path} ({model.config.arch}, {model.config.name})", file=sys.stderr)
        print(f"load time = {model.load_seconds:.2f} s, after load: {rss_breakdown()}", file=sys.stderr)
    use_chat = a.chat if a.chat is not None else bool(model.gguf.get("tokenizer.chat_template"))
    if use_chat:
        messages = ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": prompt}]
        prompt = model.chat_prompt(messages)
    stats = GenerationStats()
    for piece in model.stream(prompt, a.params, stats):
        sys.stdout.write(piece.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if stats.n_prompt + stats.n_generated >= model.slot_ctx:
        print(f"note: stopped at the end of the context ({model.slot_ctx} tokens); raise --ctx-size to go on", file=sys.stderr)
    if a.verbose:
        if stats.kv_summary:
            print(stats.kv_summary, file=sys.stderr)
        print(f"prompt: {stats.n_prompt} tokens in {stats.prompt_seconds:.3f} s ({stats.prompt_tokens_per_second:.1f} tok/s)", file=sys.stderr)
        if model.spec.enabled:
            print(stats.spec.summary(), file=sys.stderr)
        print(f"decode: {stats.n_decode_tokens} tokens in {stats.decode_seconds:.3f} s ({stats.decode_tokens_per_second:.2f} tok/s), "
              f"{stats.n_generated} generated, finish: {stats.finish_reason}", file=sys.stderr)
        print(f"peak RSS = {mib(peak_rss_bytes())}, now: {rss_breakdown()}", file=sys.stderr)
    return 0
