"""`turbollm bench --spec-type ngram|mtp`: decode speed with and without speculative decoding
on a task where drafting can work.

llama-bench's random tokens give a drafter nothing to predict, so this test decodes real text:
a greedy continuation of a prompt (default: rewrite a paragraph of the bundled text, the
input-copying case prompt lookup is for; `-f FILE` for another), `-n` tokens, plain and
speculative in alternating runs on the same model. It prints decode tok/s both ways, the
speedup, the draft acceptance, and whether the two outputs are identical (they must be).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace
from importlib import resources

from turbollm.config import RunConfig
from turbollm.engine.sampler import SamplingParams
from turbollm.engine.speculative import SpecConfig


def copy_task_prompt() -> str:
    text = resources.files("turbollm.data").joinpath("quality_text.txt").read_text(encoding="utf-8")
    return f"Rewrite the following paragraph, correcting any errors.\n\nParagraph:\n{text[:1200]}\n\nRewritten paragraph:\n"


@dataclass(frozen=True)
class SpecBenchSettings:
    run: RunConfig  # its spec says which speculative decoding to measure
    prompt: str | None = None  # None: the copy task
    n_gen: int = 256
    repetitions: int = 3


@dataclass
class SpecBenchReport:
    model: str
    spec: str
    n_prompt: int
    n_gen: int
    plain_ts: list[float] = field(default_factory=list)
    spec_ts: list[float] = field(default_factory=list)
    n_drafted: int = 0
    n_accepted: int = 0
    n_rounds: int = 0
    identical: bool = True

    @property
    def speedup(self) -> float:
        return statistics.fmean(self.spec_ts) / statistics.fmean(self.plain_ts)

    def to_json(self) -> dict:
        return {"model": self.model, "spec": self.spec, "n_prompt": self.n_prompt, "n_gen": self.n_gen,
                "plain_ts": self.plain_ts, "spec_ts": self.spec_ts, "speedup": self.speedup,
                "acceptance": self.n_accepted / self.n_drafted if self.n_drafted else 0.0,
                "n_drafted": self.n_drafted, "n_accepted": self.n_accepted, "identical": self.identical}


def run_spec_bench(s: SpecBenchSettings) -> SpecBenchReport:
    from turbollm.api import Model

    spec_model = Model.load(run=s.run)
    plain_model = Model(spec_model.gguf, spec_model.config, spec_model.tokenizer, spec_model.network,
                        replace(s.run, spec=SpecConfig(), draft_model=None))  # the same weights, no drafter
    prompt = spec_model.encode(s.prompt if s.prompt is not None else copy_task_prompt())
    params = SamplingParams(temperature=0, max_tokens=s.n_gen)
    report = SpecBenchReport(str(spec_model.gguf.path), s.run.spec.kind, len(prompt), s.n_gen)
    plain_model.generate(prompt, SamplingParams(temperature=0, max_tokens=8))  # warm-up
    for _ in range(s.repetitions):
        plain, spec = plain_model.generate(prompt, params), spec_model.generate(prompt, params)
        report.plain_ts.append(plain.stats.decode_tokens_per_second)
        report.spec_ts.append(spec.stats.decode_tokens_per_second)
        report.n_drafted += spec.stats.spec.n_drafted
        report.n_accepted += spec.stats.spec.n_accepted
        report.n_rounds += spec.stats.spec.n_rounds
        report.identical &= plain.token_ids == spec.token_ids
    return report


def format_spec_report(r: SpecBenchReport) -> str:
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0
    acceptance = r.n_accepted / r.n_drafted if r.n_drafted else 0.0
    return "\n".join([
        f"speculative decoding ({r.spec}) on {r.model}: {r.n_prompt}-token prompt, {r.n_gen} tokens greedy, "
        f"{len(r.plain_ts)} alternating runs",
        "| decode | tok/s |", "| --- | --- |",
        f"| plain | {statistics.fmean(r.plain_ts):.2f} ± {sd(r.plain_ts):.2f} |",
        f"| {r.spec} | {statistics.fmean(r.spec_ts):.2f} ± {sd(r.spec_ts):.2f} |",
        f"speedup {r.speedup:.2f}x; draft acceptance rate = {acceptance:.2f} ({r.n_accepted} accepted / "
        f"{r.n_drafted} generated, {r.n_rounds} verify rounds); outputs identical: {'yes' if r.identical else 'NO'}",
    ])
