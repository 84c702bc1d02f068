"""`turbollm bench`: llama-bench's tests on turbollm, with the figures that explain them.

Tests follow llama-bench so the two tables can be read side by side:
- `pp N`: N prompt tokens in one pass from an empty cache (logits of the last one included);
- `tg N`: N tokens decoded one at a time from an empty cache, each feeding one random token;
- `pp N+tg M` (llama-bench's `-pg`): both, timed together; tokens/s counts all N+M tokens.
Tokens are random ids (seeded), as in llama-bench; each test runs once to warm up, then
`repetitions` times. Alongside: load time, memory (RSS before and after load, peak) against
the file and the KV cache, the bytes of weights a decode step reads from each device, and how
close decode comes to each device's memory bandwidth, measured in the same run (cli/bandwidth.py:
on a CUDA/ROCm device its own copy and read bandwidth, on the CPU system memory's).

Left out: sampling (llama-bench does not sample either), batched decoding of several sequences.
"""

from __future__ import annotations

import copy
import gc
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from turbollm import kernels
from turbollm.gguf.reader import GGUFFile
from turbollm.cli import bandwidth, flags
from turbollm.config import RunConfig
from turbollm.kv.plan import CacheConfig
from turbollm.planner import normalize_device, resolve_residency
from turbollm.planner.process_memory import anonymous_bytes, peak_rss_bytes, resident_file_bytes, rss_bytes


@dataclass(frozen=True)
class BenchSettings:
    run: RunConfig = RunConfig()  # the model and how it runs (its ctx_size is set to what the tests need)
    n_prompt: tuple[int, ...] = (512,)
    n_gen: tuple[int, ...] = (128,)
    prompt_gen: tuple[tuple[int, int], ...] = ((1150, 2000),)  # the normalized-wall test
    repetitions: int = 5
    seed: int = 1234
    depth: int = 0  # tokens already in the context when each test starts (llama-bench -d)

    def __post_init__(self) -> None:
        if self.repetitions < 1:
            raise ValueError(f"-r/--repetitions must be at least 1, got {self.repetitions}")
        for n in (*self.n_prompt, *self.n_gen, *(x for pg in self.prompt_gen for x in pg)):
            if n < 0:
                raise ValueError(f"test sizes must be positive (0 skips a test, as in llama-bench), got {n}")
        if self.depth < 0:
            raise ValueError(f"-d/--n-depth must be >= 0, got {self.depth}")


@dataclass
class TestResult:
    name: str  # "pp512", "tg128", "pp1150+tg2000"
    n_prompt: int
    n_gen: int
    seconds: list[float]

    @property
    def tokens_per_second(self) -> list[float]:
        return [(self.n_prompt + self.n_gen) / s for s in self.seconds]

    @property
    def avg_ts(self) -> float:
        return statistics.fmean(self.tokens_per_second)

    @property
    def stddev_ts(self) -> float:
        ts = self.tokens_per_second
        return statistics.stdev(ts) if len(ts) > 1 else 0.0


@dataclass
class BenchReport:
    model: str
    description: str  # "gemma3 270M Q4_K_M"
    file_bytes: int
    n_params: int
    backend: str
    threads: int
    load_seconds: float
    rss_before_load: int  # the interpreter, torch and turbollm, before the model
    rss_after_load: int
    peak_rss: int
    max_kv_bytes: int  # the largest KV cache a test allocated
    # what the model costs in memory, sampled after every run (None where /proc is missing):
    anonymous_before_load: int | None  # allocated memory of the interpreter, torch and turbollm
    max_anonymous: int | None  # allocated memory at most: before load + KV cache + buffers
    max_model_file_resident: int | None  # pages of the GGUF resident (the mmapped weights)
    decode_weight_bytes: int  # weight bytes one decode step reads (an estimate: cli/bandwidth.py)
    copy_bandwidth: float  # bytes/s read + written on the compute device (`device`), measured in this run
    read_bandwidth: float  # bytes/s read, likewise
    residency: str = "copy"  # the weights: "copy" (process memory), "mmap" (the file's pages), "lock"
    device: str = "cpu"  # where the model computes: "cpu", "cuda:0"
    n_expert: int = 0  # experts per MoE layer, and active per token (0, 0: dense)
    n_expert_used: int = 0
    decode_bytes_by_device: dict[str, int] = field(default_factory=dict)  # device -> weight bytes read per token
    bandwidths: dict[str, bandwidth.Bandwidth] = field(default_factory=dict)  # every device holding decode bytes
    results: list[TestResult] = field(default_factory=list)

    def fastest_decode(self) -> TestResult | None:
        tg = [r for r in self.results if r.n_prompt == 0]
        return max(tg, key=lambda r: r.avg_ts) if tg else None

    def decode_shares(self) -> list[bandwidth.DecodeShare]:
        tg = self.fastest_decode()
        by_device = self.decode_bytes_by_device or {self.device: self.decode_weight_bytes}
        bws = self.bandwidths or {self.device: bandwidth.Bandwidth(self.copy_bandwidth, self.read_bandwidth)}
        return [] if tg is None else bandwidth.shares(by_device, tg.avg_ts, bws)

    def decode_bandwidth_ratio(self) -> float | None:
        """Weight-read rate of the fastest tg test from the compute device over its read bandwidth."""
        share = next((s for s in self.decode_shares() if s.device == self.device), None)
        return None if share is None else share.of_read

    def decode_copy_share(self) -> float | None:
        """... over its copy bandwidth (read + written): the issue's "share of copy bandwidth"."""
        share = next((s for s in self.decode_shares() if s.device == self.device), None)
        return None if share is None else share.of_copy

    def to_json(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "results"}
        out["decode_bandwidth_ratio"] = self.decode_bandwidth_ratio()
        out["decode_copy_share"] = self.decode_copy_share()
        out["results"] = [{"test": r.name, "n_prompt": r.n_prompt, "n_gen": r.n_gen, "avg_ts": r.avg_ts,
                           "stddev_ts": r.stddev_ts, "samples_ts": r.tokens_per_second,
                           "samples_ns": [int(s * 1e9) for s in r.seconds]} for r in self.results]
        return out


def decode_weight_bytes(gf: GGUFFile, n_expert: int, n_expert_used: int) -> int:
    """Bytes of weights one decode step reads, on all devices together (cli/bandwidth.py)."""
    return sum(bandwidth.decode_bytes(gf, n_expert, n_expert_used).values())


class _Runner:
    """Runs the three kinds of test on one loaded model with random tokens."""

    def __init__(self, network, n_vocab: int, seed: int, cache: CacheConfig, device: str = "cpu"):
        self.net, self.n_vocab, self.cache_config, self.device = network, n_vocab, cache, device
        self.rng = torch.Generator().manual_seed(seed)
        self.max_kv_bytes = 0
        self.depth = 0
        self._at_depth: dict[int, object] = {}  # cache capacity -> a cache holding `depth` tokens

    def _tokens(self, n: int) -> torch.Tensor:
        return torch.randint(0, self.n_vocab, (n,), generator=self.rng, dtype=torch.int64)

    def run(self, n_prompt: int, n_gen: int) -> float:
        """Seconds for a prompt of n_prompt tokens, then n_gen single-token steps, each with logits."""
        net = self.net
        cache = self._cache(self.depth + n_prompt + n_gen)
        self.max_kv_bytes = max(self.max_kv_bytes, cache.nbytes)
        prompt, steps = self._tokens(n_prompt), self._tokens(n_gen)
        start = time.perf_counter()
        for at in range(0, n_prompt, 512):  # the generation loop's prefill chunk
            hidden = net.forward(prompt[at:at + 512], cache)
        if n_prompt:
            net.logits(hidden[-1:])
        for i in range(n_gen):
            net.logits(net.forward(steps[i:i + 1], cache))
        bandwidth.synchronize(self.device)  # a GPU's queued work is part of the test
        return time.perf_counter() - start


    def _cache(self, capacity: int):
        """An empty cache, or a copy of one prefilled (untimed, once) with `depth` random tokens."""
        if not self.depth:
            return self.net.new_cache(capacity, self.cache_config)
        if capacity not in self._at_depth:
            cache = self.net.new_cache(capacity, self.cache_config)
            context = self._tokens(self.depth)
            for at in range(0, self.depth, 512):
                self.net.forward(context[at:at + 512], cache)
            self._at_depth[capacity] = cache
        return copy.deepcopy(self._at_depth[capacity])


def run_bench(s: BenchSettings, progress=None) -> BenchReport:
    from turbollm.api import Model, read_config  # the API is above this module; imported when used

    gc.collect()  # what a caller left for the collector is not the baseline (else it may be freed during the load)
    rss_before, anon_before = rss_bytes(), anonymous_bytes()
    needed = s.depth + max([p + g for p, g in s.prompt_gen] + list(s.n_prompt) + list(s.n_gen))
    n_ctx_train = read_config(s.run.model).n_ctx_train
    if needed > n_ctx_train:
        raise ValueError(f"a test needs {needed} tokens of context but the model's is {n_ctx_train}")
    # planned (and refused if it does not fit) at the largest cache a test allocates
    model = Model.load(run=replace(s.run, ctx_size=max(needed, 2), parallel=1))
    rss_after = rss_bytes()
    cfg, gf = model.config, model.gguf
    ops = model.network.ops
    threads = kernels.native.num_threads() if ops.name == "fast" else torch.get_num_threads()
    backend = ops.name + (f" ({kernels.native.SIMD_NAMES[kernels.native.simd_level()]}, "
                          f"{ops.prefill} prefill)" if ops.name == "fast" else "")
    backend += (f" on {s.run.device}" if s.run.device != "cpu" else "") + f", KV cache {s.run.cache.label}"
    device = normalize_device(s.run.device)
    placement = {t.name: t.device for t in model.plan.tensors if not t.draft} if model.plan is not None else None
    by_device = bandwidth.decode_bytes(gf, cfg.n_expert, cfg.n_expert_used, placement)
    report = BenchReport(
        model=str(Path(gf.path).resolve()), description=describe(gf), file_bytes=gf.file_size,
        n_params=sum(t.n_elements for t in gf.tensors.values()), backend=backend, threads=threads,
        load_seconds=model.load_seconds, rss_before_load=rss_before, rss_after_load=rss_after, peak_rss=0,
        max_kv_bytes=0, anonymous_before_load=anon_before, max_anonymous=anon_before, max_model_file_resident=0,
        decode_weight_bytes=sum(by_device.values()), copy_bandwidth=0.0, read_bandwidth=0.0,
        residency=resolve_residency(s.run.residency, s.run.device).value,
        device=device, n_expert=cfg.n_expert, n_expert_used=cfg.n_expert_used, decode_bytes_by_device=by_device,
    )
    runner = _Runner(model.network, cfg.n_vocab, s.seed, s.run.cache, device)
    runner.depth = s.depth
    at_depth = f" @ d{s.depth}" if s.depth else ""
    tests = ([(f"pp{n}{at_depth}", n, 0) for n in s.n_prompt if n] + [(f"tg{n}{at_depth}", 0, n) for n in s.n_gen if n]
             + [(f"pp{p}+tg{g}{at_depth}", p, g) for p, g in s.prompt_gen if p and g])
    for name, n_prompt, n_gen in tests:
        long_test = n_prompt and n_gen  # the normalized-wall test: warming up would double its cost
        if not long_test:
            runner.run(n_prompt, min(n_gen, 8))
        seconds = []
        for _ in range(s.repetitions):
            seconds.append(runner.run(n_prompt, n_gen))
            _sample_memory(report)
        result = TestResult(name, n_prompt, n_gen, seconds)
        report.results.append(result)
        if progress is not None:
            progress(result)
    report.peak_rss, report.max_kv_bytes = peak_rss_bytes(), runner.max_kv_bytes
    # last: their buffers must not count in the peak. Every device that holds decode bytes, the
    # compute device always; the CPU on the threads the run computed with
    for name in dict.fromkeys([device, *(d for d, n in by_device.items() if n)]):
        if name == "cpu" or torch.cuda.is_available():  # not a pretend device (--vram without one)
            report.bandwidths[name] = bandwidth.measure(name, threads if name == "cpu" else None)
    report.copy_bandwidth, report.read_bandwidth = report.bandwidths[device].copy, report.bandwidths[device].read
    return report


def _sample_memory(report: BenchReport) -> None:
    anon, resident = anonymous_bytes(), resident_file_bytes(report.model)
    if anon is not None and report.max_anonymous is not None:
        report.max_anonymous = max(report.max_anonymous, anon)
    if resident is not None and report.max_model_file_resident is not None:
        report.max_model_file_resident = max(report.max_model_file_resident, resident)


def describe(gf: GGUFFile) -> str:
    """'gemma3 270M Q4_K_M', as llama-bench names a model: architecture, size label, file type."""
    from gguf import LlamaFileType

    arch = gf.get("general.architecture", "?")
    size = gf.get("general.size_label") or _size_label(sum(t.n_elements for t in gf.tensors.values()))
    file_type = gf.get("general.file_type")
    try:
        quant = LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else "?"
    except ValueError:
        quant = f"type {file_type}"
    return f"{arch} {size} {quant}"


def _size_label(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"


def format_table(r: BenchReport) -> str:
    gib = lambda n: f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"
    params = f"{r.n_params / 1e9:.2f} B" if r.n_params >= 1e9 else f"{r.n_params / 1e6:.2f} M"
    head = ["model", "size", "params", "backend", "threads", "test", "t/s"]
    rows = [[r.description, gib(r.file_bytes), params, r.backend, str(r.threads), t.name,
             f"{t.avg_ts:.2f} ± {t.stddev_ts:.2f}"] for t in r.results]
    widths = [max(len(row[i]) for row in [head] + rows) for i in range(len(head))]
    line = lambda cells: "| " + " | ".join(c.rjust(w) if i >= 4 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    out = [line(head), "| " + " | ".join("-" * w for w in widths) + " |"] + [line(row) for row in rows]
    for t in r.results:
        if t.n_prompt and t.n_gen:
            out.append(f"{t.name}: {statistics.fmean(t.seconds):.2f} s wall ({t.n_prompt} tokens in, {t.n_gen} out)")
    out.append(f"load: {r.load_seconds:.2f} s; RSS before load {gib(r.rss_before_load)} (interpreter, torch, "
               f"turbollm), after load {gib(r.rss_after_load)}, peak {gib(r.peak_rss)}")
    if r.max_anonymous is not None and r.anonymous_before_load is not None and r.max_model_file_resident is not None:
        grown = r.max_anonymous - r.anonymous_before_load
        model = r.max_model_file_resident + grown
        budget = r.file_bytes + r.max_kv_bytes
        if r.residency == "copy":
            where = f"weights read into process memory ({gib(r.file_bytes)} file; --mmap maps it instead)"
            out.append(f"model memory: allocated {gib(grown)} ({where}, KV cache {gib(r.max_kv_bytes)}, compute buffers) "
                       f"+ mapped file pages {gib(r.max_model_file_resident)} = {gib(model)}, {model / budget:.0%} of file + KV cache")
        else:
            out.append(f"model memory: weights resident {gib(r.max_model_file_resident)} (mmapped, of {gib(r.file_bytes)}) "
                       f"+ allocated {gib(grown)} (KV cache {gib(r.max_kv_bytes)} + compute buffers) = {gib(model)}, "
                       f"{model / budget:.0%} of file + KV cache")
    tg = r.fastest_decode()
    out += bandwidth.format_lines(r.decode_bytes_by_device or {r.device: r.decode_weight_bytes},
                                  r.bandwidths or {r.device: bandwidth.Bandwidth(r.copy_bandwidth, r.read_bandwidth)},
                                  None if tg is None else (tg.name, tg.avg_ts), r.n_expert, r.n_expert_used)
    return "\n".join(out)


# ---- the command ---------------------------------------------------------------------------

def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure prompt and decode speed (llama-bench's tests and flags)")
    flags.model_flag(p)
    p.add_argument("-p", "--n-prompt", type=flags.int_list, default=(512,), help="prompt sizes, comma-separated (default 512)")
    p.add_argument("-n", "--n-gen", type=flags.int_list, default=(128,), help="decode lengths, comma-separated (default 128)")
    p.add_argument("-pg", "--prompt-gen", type=flags.pair_list, default=((1150, 2000),),
                   help="prompt+decode tests as P,G pairs separated by ';' (default 1150,2000; 'none' to skip)")
    flags.threads_flag(p)
    p.add_argument("-d", "--n-depth", type=int, default=0,
                   help="tokens already in the context when each test starts, prefilled untimed (default 0)")
    p.add_argument("-r", "--repetitions", type=int, default=5, help="runs of each test (default 5)")
    flags.backend_flag(p)
    flags.prefill_flag(p)
    flags.cache_flags(p)
    flags.spec_flags(p)
    flags.placement_flags(p)
    p.add_argument("-f", "--file", dest="spec_prompt_file", default=None,
                   help="with --spec-type: the prompt to continue (default: rewrite a paragraph of the bundled text)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(handler=_command)


def _command(args) -> int:
    import json
    import sys

    run = flags.run_config(args)
    if run.spec.enabled:  # speculative decoding measured on real text (cli/bench_spec.py)
        from turbollm.cli.bench_spec import SpecBenchSettings, format_spec_report, run_spec_bench
        report = run_spec_bench(SpecBenchSettings(run=run, prompt=flags.read_text_file(args.spec_prompt_file),
                                                  n_gen=args.n_gen[0], repetitions=args.repetitions))
        print(json.dumps(report.to_json(), indent=2) if args.json else format_spec_report(report))
        return 0 if report.identical else 1

    def progress(result) -> None:
        if not args.json:
            print(f"{result.name}: {result.avg_ts:.2f} ± {result.stddev_ts:.2f} tok/s", file=sys.stderr, flush=True)

    report = run_bench(BenchSettings(run=run, n_prompt=args.n_prompt, n_gen=args.n_gen, prompt_gen=args.prompt_gen,
                                     repetitions=args.repetitions, depth=args.n_depth), progress)
    print(json.dumps(report.to_json(), indent=2) if args.json else format_table(report))
    return 0
