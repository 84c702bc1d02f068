"""`turbollm quality`: what each KV cache configuration costs, measured on a text.

The text (default: a public-domain text bundled with the package) runs through the model once
per configuration, in prompt chunks as generation would, with every key and value going
through the configuration's codecs. For each configuration against the f16 cache:

    perplexity       exp(mean negative log-likelihood of each next token of the text)
    KL               mean over positions of KL(p_f16 || p_config) of the next-token distribution
    top-1            fraction of positions where both caches give the same most likely token
    bytes/token      the cache's exact bytes (kv.plan.KVPlan) for the text's length, per token
    compression      f16 cache bytes / this cache's bytes

Logits are compared in slices of positions, so no [tokens, vocab] array of the whole text is
ever held. A configuration is written `K[/V][@N][~R]`: K and V codecs (V defaults to K), N
boundary layers (the first and last N storing layers) kept at f16, and R latest positions in
the exact window of f16 rows (kv/plan.py; default: 64 below 8 bits per value; ~0 turns it off).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from importlib import resources

import torch

from turbollm.cli import flags
from turbollm.kv.plan import CacheConfig, plan_kv

BASELINE = CacheConfig("f16", "f16")
_LOGIT_ROWS = 64  # positions per slice of logits (times the configurations: rows of one LM-head product)


def parse_cache_entry(entry: str, turbo_block: int = 128) -> CacheConfig:
    """'q8_0/turbo4@2' -> CacheConfig(type_k='q8_0', type_v='turbo4', boundary_layers=2);
    'turbo3~0': turbo3 without the exact window ('~R': its latest R positions at f16)."""
    text, _, recent = entry.strip().partition("~")
    text, _, boundary = text.partition("@")
    k, _, v = text.partition("/")
    try:
        n = int(boundary) if boundary else 0
    except ValueError:
        raise ValueError(f"cache entry {entry!r}: the part after '@' must be a number of layers") from None
    try:
        r = int(recent) if recent else None
    except ValueError:
        raise ValueError(f"cache entry {entry!r}: the part after '~' must be a number of positions") from None
    return CacheConfig(k, v or k, n, turbo_block, recent=r)


def default_text() -> str:
    return resources.files("turbollm.data").joinpath("quality_text.txt").read_text(encoding="utf-8")


@dataclass(frozen=True)
class QualityRow:
    cache: str
    bits_k: float  # bits per value of the K codec (boundary layers not counted)
    bits_v: float
    perplexity: float
    perplexity_change_pct: float  # vs the f16 cache
    kl_mean: float
    top1_agreement: float
    bytes_per_token: float
    compression_vs_f16: float


@dataclass(frozen=True)
class QualityReport:
    model: str
    n_tokens: int
    chunk: int
    rows: tuple[QualityRow, ...]

    def to_json(self) -> dict:
        return {"model": self.model, "n_tokens": self.n_tokens, "chunk": self.chunk,
                "baseline": BASELINE.label, "rows": [asdict(r) for r in self.rows]}


def _hidden_states(network, ids: torch.Tensor, config: CacheConfig, chunk: int) -> torch.Tensor:
    cache = network.new_cache(len(ids), config)
    return torch.cat([network.forward(ids[i:i + chunk], cache) for i in range(0, len(ids), chunk)])


def measure(network, ids: list[int], configs: list[CacheConfig], chunk: int = 512, model_name: str = "",
            progress=None) -> QualityReport:
    """Run the text under the f16 baseline and each configuration; compare their predictions."""
    if len(ids) < 2:
        raise ValueError("the quality text must have at least two tokens")
    tokens = torch.tensor(ids, dtype=torch.int64)
    hidden = {}
    for config in [BASELINE, *configs]:
        if config.label not in hidden:
            hidden[config.label] = _hidden_states(network, tokens, config, chunk)
            if progress:
                progress(config.label)
    targets = tokens[1:]
    n = len(targets)
    sums = {name: {"nll": 0.0, "kl": 0.0, "top1": 0} for name in hidden}
    names = list(hidden)  # the baseline first
    for start in range(0, n, _LOGIT_ROWS):
        stop = min(n, start + _LOGIT_ROWS)
        # every configuration's slice in one LM-head product: the head's weights are read once
        logits = network.logits(torch.cat([hidden[name][start:stop] for name in names]))
        all_logp = torch.log_softmax(logits, dim=-1).view(len(names), stop - start, -1)
        ref_logp = all_logp[0]
        ref_p, ref_top = ref_logp.exp(), ref_logp.argmax(-1)
        for name, logp in zip(names, all_logp):
            s = sums[name]
            s["nll"] -= float(logp.gather(1, targets[start:stop, None]).sum(dtype=torch.float64))
            s["kl"] += float((ref_p * (ref_logp - logp)).sum(dtype=torch.float64))
            s["top1"] += int((logp.argmax(-1) == ref_top).sum())
    layout = network.kv_layout()
    f16_bytes = plan_kv(layout, len(ids), BASELINE).nbytes
    rows = []
    base_ppl = math.exp(sums[BASELINE.label]["nll"] / n)
    for config in [BASELINE, *configs]:
        s, name = sums[config.label], config.label
        plan = plan_kv(layout, len(ids), config)
        ppl = math.exp(s["nll"] / n)
        rows.append(QualityRow(
            cache=name, bits_k=_bits(config.type_k, config), bits_v=_bits(config.type_v, config),
            perplexity=ppl, perplexity_change_pct=100.0 * (ppl / base_ppl - 1.0), kl_mean=s["kl"] / n,
            top1_agreement=s["top1"] / n, bytes_per_token=plan.nbytes / len(ids),
            compression_vs_f16=f16_bytes / plan.nbytes))
    unique = {r.cache: r for r in rows}  # f16 asked for again appears once
    return QualityReport(model_name, len(ids), chunk, tuple(unique.values()))


def _bits(name: str, config: CacheConfig) -> float:
    from turbollm.kv.codecs import Codec
    return Codec(name, config.turbo_block).bits_per_value


def format_table(report: QualityReport) -> str:
    head = (f"{'cache K/V':<16} {'bits K/V':>11} {'perplexity':>11} {'vs f16':>8} {'KL mean':>9} {'top-1':>7} "
            f"{'bytes/tok':>10} {'compress':>9}")
    lines = [f"model: {report.model}", f"text: {report.n_tokens} tokens, prompt chunks of {report.chunk}; "
             f"KL and top-1 against the f16 cache", head, "-" * len(head)]
    for r in report.rows:
        lines.append(f"{r.cache:<16} {r.bits_k:>5.2f}/{r.bits_v:<5.2f} {r.perplexity:>11.4f} "
                     f"{r.perplexity_change_pct:>+7.2f}% {r.kl_mean:>9.5f} {r.top1_agreement:>7.4f} "
                     f"{r.bytes_per_token:>10.1f} {r.compression_vs_f16:>8.2f}x")
    return "\n".join(lines)


def plot(report: QualityReport, path: str) -> None:
    """Perplexity change and KL against bytes per token, one point per configuration (PNG)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'turbollm[plot]'") from None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, title in ((axes[0], "perplexity_change_pct", "perplexity vs f16 (%)"),
                           (axes[1], "kl_mean", "mean KL vs f16 (nats)")):
        for r in report.rows:
            ax.scatter(r.bytes_per_token, getattr(r, key))
            ax.annotate(r.cache, (r.bytes_per_token, getattr(r, key)), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)
        ax.set_xlabel("KV cache bytes per token")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{report.model}: {report.n_tokens} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the command ---------------------------------------------------------------------------

DEFAULT_QUALITY_TYPES = ("f16", "q8_0", "q4_0", "turbo4", "turbo3", "turbo2@2", "q8_0/turbo4")


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


def add_parser(sub) -> None:
    p = sub.add_parser("quality", help="measure what KV cache types cost: perplexity, KL and top-1 vs f16, bytes")
    flags.model_flag(p)
    p.add_argument("--text", dest="text_file", default=None, help="UTF-8 text to score (default: the bundled public-domain text)")
    p.add_argument("--cache-types", type=lambda t: tuple(x for x in t.split(",") if x.strip()), default=DEFAULT_QUALITY_TYPES,
                   help="comma-separated entries K[/V][@N][~R]: K and V codecs, N boundary layers kept at f16, "
                        "R latest positions kept at f16 beside their codes (default 64 under 8 bits, ~0: none) "
                        f"(default {','.join(DEFAULT_QUALITY_TYPES)})")
    p.add_argument("--cache-turbo-block", dest="turbo_block", type=int, choices=(32, 128), default=128,
                   help="TurboQuant rotation block (default 128)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    flags.threads_flag(p)
    flags.prefill_flag(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw the results to this PNG file")
    p.set_defaults(handler=lambda args: quality(QualityArgs(
        model=args.model, text_file=args.text_file, cache_types=args.cache_types, turbo_block=args.turbo_block,
        threads=args.threads, prefill=args.prefill, max_tokens=args.max_tokens, as_json=args.json, plot=args.plot)))


def quality(a: QualityArgs) -> int:
    import json
    import sys
    from pathlib import Path

    from turbollm.api import Model
    from turbollm.errors import TurbollmError

    configs = [parse_cache_entry(entry, a.turbo_block) for entry in a.cache_types]
    text = flags.read_text_file(a.text_file, "text") if a.text_file is not None else default_text()
    model = Model.load(a.model, threads=a.threads, prefill=a.prefill)
    ids = model.tokenizer.encode(text, add_special=True, parse_special=False)
    if a.max_tokens is not None:
        if a.max_tokens < 2:
            raise TurbollmError(f"--max-tokens must be at least 2, got {a.max_tokens}")
        ids = ids[:a.max_tokens]
    if len(ids) > model.slot_ctx:
        raise TurbollmError(f"the text has {len(ids)} tokens, more than the model's context of {model.slot_ctx}: "
                            f"pass --max-tokens {model.slot_ctx} or a shorter --text")

    def progress(name: str) -> None:
        if not a.as_json:
            print(f"ran {name}", file=sys.stderr, flush=True)

    report = measure(model.network, ids, configs, model_name=Path(model.gguf.path).name, progress=progress)
    print(json.dumps(report.to_json(), indent=2) if a.as_json else format_table(report))
    if a.plot:
        plot(report, a.plot)
        if not a.as_json:
            print(f"plot written to {a.plot}", file=sys.stderr)
    return 0
